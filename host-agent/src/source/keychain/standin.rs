//! The keychain of another OS, named under its helper name: every call fails with one clear
//! error saying which OS has it. It stands where that OS's backend is not compiled, so
//! [`open`](super::open) has the same arms on every OS.

use finch_shared::message::ListEntry;

use super::{KeychainError, SyncKeychain};
use crate::source::Credential;

/// A keychain that exists only on `os`.
#[derive(Debug)]
pub struct OtherOs {
    store: &'static str,
    os: &'static str,
}

impl OtherOs {
    /// The `store` keychain, which exists only on `os`.
    pub fn new(store: &'static str, os: &'static str) -> OtherOs {
        OtherOs { store, os }
    }

    fn refuse<T>(&self) -> Result<T, KeychainError> {
        Err(KeychainError::KeychainUnreachable {
            store: self.store,
            reason: format!("this keychain exists only on {} hosts", self.os),
        })
    }
}

impl SyncKeychain for OtherOs {
    fn get(&self, _server: &str) -> Result<Option<Credential>, KeychainError> {
        self.refuse()
    }

    fn store(&self, _server: &str, _credential: &Credential) -> Result<(), KeychainError> {
        self.refuse()
    }

    fn erase(&self, _server: &str) -> Result<(), KeychainError> {
        self.refuse()
    }

    fn list(&self) -> Result<Vec<ListEntry>, KeychainError> {
        self.refuse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_names_the_os_that_has_it() {
        let k = OtherOs::new("wincred", "Windows");
        let want = "wincred keychain: the keychain service is not reachable: this keychain exists only on Windows hosts";
        assert_eq!(k.get("h").unwrap_err().to_string(), want);
        assert_eq!(k.erase("h").unwrap_err().to_string(), want);
        assert_eq!(k.list().unwrap_err().to_string(), want);
    }
}
