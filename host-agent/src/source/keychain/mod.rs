//! The OS keychains, served natively under the helper names users already have in
//! `~/.finch/config.json`: `secretservice` (Linux), `osxkeychain` (macOS), `wincred`
//! (Windows). Items are read and written exactly as docker's own helpers do, so the host's
//! `docker`/`finch` and the VM see the same credentials and nobody logs in again.
//!
//! * `secretservice`: the Secret Service over D-Bus (pure-Rust `secret-service` crate), async.
//! * `osxkeychain` / `wincred`: small [`SyncKeychain`]s (the OS APIs are blocking) run through
//!   [`Blocking`], which bounds every call and keeps it off the async runtime.
//!
//! Each OS compiles its own backend; the others are [`standin::OtherOs`], which answers every
//! call with the OS that has that keychain (as cargo's `cargo-credential-wincred` does), so
//! every path of [`open`] is compiled everywhere and none is hidden from the compiler.
//!
//! Every call is bounded: a locked keychain, a missing D-Bus session or a denied access is one
//! clear [`KeychainError`], which the guest sees as `unavailable`, never a hang.

#[cfg(target_os = "macos")]
mod osxkeychain;
#[cfg(target_os = "linux")]
pub mod secretservice;
mod standin;
pub mod vault;
#[cfg(windows)]
mod wincred;

use std::sync::Arc;
use std::time::Duration;

use finch_shared::message::ListEntry;

use super::{Credential, CredentialSource, SourceError, SourceFuture};

/// The label docker's helpers give every item (an attribute on Linux and Windows, the item
/// label on macOS).
pub const DOCKER_LABEL: &str = "Docker Credentials";

/// The helper name this OS's keychain is served under, if it has one.
pub const NATIVE_NAME: Option<&str> = if cfg!(target_os = "linux") {
    Some("secretservice")
} else if cfg!(target_os = "macos") {
    Some("osxkeychain")
} else if cfg!(windows) {
    Some("wincred")
} else {
    None
};

/// The native keychain source for helper `name`, if this OS serves that name natively; any
/// other name (including another OS's keychain) stays a host helper binary.
pub fn open(name: &str, timeout: Duration) -> Option<Arc<dyn CredentialSource>> {
    if NATIVE_NAME != Some(name) {
        return None;
    }
    match name {
        "secretservice" => Some(secretservice(timeout)),
        "osxkeychain" => Some(Arc::new(Blocking::new("osxkeychain", osxkeychain(), timeout))),
        "wincred" => Some(Arc::new(Blocking::new("wincred", wincred(), timeout))),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn secretservice(timeout: Duration) -> Arc<dyn CredentialSource> {
    Arc::new(secretservice::SecretService::new(timeout))
}

#[cfg(not(target_os = "linux"))]
fn secretservice(timeout: Duration) -> Arc<dyn CredentialSource> {
    Arc::new(Blocking::new(
        "secretservice",
        standin::OtherOs::new("secretservice", "Linux"),
        timeout,
    ))
}

#[cfg(target_os = "macos")]
fn osxkeychain() -> osxkeychain::OsxKeychain {
    osxkeychain::OsxKeychain
}

#[cfg(not(target_os = "macos"))]
fn osxkeychain() -> standin::OtherOs {
    standin::OtherOs::new("osxkeychain", "macOS")
}

#[cfg(windows)]
fn wincred() -> wincred::WinCred {
    wincred::WinCred
}

#[cfg(not(windows))]
fn wincred() -> standin::OtherOs {
    standin::OtherOs::new("wincred", "Windows")
}

/// This OS's vault for VM link keys (`crate::vm_keys`).
#[cfg(target_os = "linux")]
pub fn key_vault(timeout: Duration) -> Box<dyn vault::Vault> {
    Box::new(secretservice::KeyVault::new(timeout))
}

/// This OS's vault for VM link keys (`crate::vm_keys`).
#[cfg(target_os = "macos")]
pub fn key_vault(_timeout: Duration) -> Box<dyn vault::Vault> {
    Box::new(osxkeychain::OsxKeyVault)
}

/// This OS's vault for VM link keys (`crate::vm_keys`).
#[cfg(windows)]
pub fn key_vault(_timeout: Duration) -> Box<dyn vault::Vault> {
    Box::new(wincred::WinKeyVault)
}

/// This OS's vault for VM link keys: none known here.
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
pub fn key_vault(_timeout: Duration) -> Box<dyn vault::Vault> {
    Box::new(vault::OtherOs)
}

/// Why a keychain call failed. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(clippy::enum_variant_names)] // noun + verb names, one noun per error type
pub enum KeychainError {
    /// The keychain (or the item) is locked and was not unlocked.
    #[error(
        "{store} keychain: the keychain is locked: unlock it (log in to the desktop session, or unlock the login keyring) and retry"
    )]
    KeychainLocked {
        /// Store name.
        store: &'static str,
    },
    /// The keychain service cannot be reached.
    #[error("{store} keychain: the keychain service is not reachable: {reason}")]
    KeychainUnreachable {
        /// Store name.
        store: &'static str,
        /// Why.
        reason: String,
    },
    /// The OS refused the host agent access.
    #[error("{store} keychain: access was denied to the host agent: {reason}")]
    KeychainDenied {
        /// Store name.
        store: &'static str,
        /// Why.
        reason: String,
    },
    /// The call did not finish in time.
    #[error("{store} keychain: no answer within {secs} s")]
    KeychainTimeout {
        /// Store name.
        store: &'static str,
        /// Bound.
        secs: u64,
    },
    /// Any other failure.
    #[error("{store} keychain: {reason}")]
    KeychainFailed {
        /// Store name.
        store: &'static str,
        /// Why.
        reason: String,
    },
}

/// Longest service message kept in an error (they can be long, and are never secrets).
const MAX_REASON: usize = 200;

/// Shortens a message from a keychain service (or AWS) for an error.
pub fn shorten(reason: impl std::fmt::Display) -> String {
    finch_shared::limit::cap(&reason.to_string(), MAX_REASON).into_owned()
}

/// A keychain whose OS API blocks (macOS Security framework, Windows Credential Manager).
pub trait SyncKeychain: Send + Sync + 'static {
    /// The credential stored under exactly `server`.
    fn get(&self, server: &str) -> Result<Option<Credential>, KeychainError>;
    /// Stores `credential` under `server`, replacing whatever was there.
    fn store(&self, server: &str, credential: &Credential) -> Result<(), KeychainError>;
    /// Removes every item for `server`; nothing there is not an error.
    fn erase(&self, server: &str) -> Result<(), KeychainError>;
    /// Every docker item's server and username.
    fn list(&self) -> Result<Vec<ListEntry>, KeychainError>;
}

/// Runs a [`SyncKeychain`] on the blocking pool, each call bounded by a timeout.
#[derive(Debug)]
pub struct Blocking<K> {
    store: &'static str,
    inner: Arc<K>,
    timeout: Duration,
}

impl<K: SyncKeychain> Blocking<K> {
    /// Wraps `inner`, named `store` in errors and audit lines.
    pub fn new(store: &'static str, inner: K, timeout: Duration) -> Self {
        Blocking { store, inner: Arc::new(inner), timeout }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&K) -> Result<T, KeychainError> + Send + 'static,
    ) -> Result<T, SourceError> {
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || f(&inner));
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result.map_err(SourceError::from),
            Ok(Err(_)) => Err(KeychainError::KeychainFailed {
                store: self.store,
                reason: "the keychain call failed unexpectedly".into(),
            }
            .into()),
            // The blocked thread finishes on its own; its answer is dropped.
            Err(_) => Err(KeychainError::KeychainTimeout {
                store: self.store,
                secs: self.timeout.as_secs(),
            }
            .into()),
        }
    }
}

impl<K: SyncKeychain> CredentialSource for Blocking<K> {
    fn name(&self) -> String {
        format!("keychain:{}", self.store)
    }

    fn kind(&self) -> crate::source::SourceKind {
        crate::source::SourceKind::Keychain
    }

    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>> {
        let server = server.to_owned();
        Box::pin(self.call(move |k| k.get(&server)))
    }

    fn store<'a>(&'a self, server: &'a str, credential: &'a Credential) -> SourceFuture<'a, ()> {
        let (server, credential) = (server.to_owned(), credential.clone());
        Box::pin(self.call(move |k| k.store(&server, &credential)))
    }

    fn erase<'a>(&'a self, server: &'a str) -> SourceFuture<'a, ()> {
        let server = server.to_owned();
        Box::pin(self.call(move |k| k.erase(&server)))
    }

    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>> {
        Box::pin(self.call(|k| k.list()))
    }
}

/// A server URL split the way docker-credential-osxkeychain stores it: protocol (`https`
/// unless `http://` is given), host, port and path. Compiled where the macOS Keychain uses
/// it, and in the tests of every OS.
#[cfg(any(test, target_os = "macos"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Host name.
    pub host: String,
    /// Port, when given.
    pub port: Option<u16>,
    /// Path, when given (without a lone `/`).
    pub path: String,
}

#[cfg(any(test, target_os = "macos"))]
impl ServerUrl {
    /// Splits `server` (`host`, `host:port`, `https://host:port/path`, …).
    pub fn parse(server: &str) -> Result<ServerUrl, finch_shared::registry::RegistryInvalid> {
        let (scheme, rest) = if let Some(r) = server.strip_prefix("http://") {
            ("http", r)
        } else {
            ("https", server.strip_prefix("https://").unwrap_or(server))
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let registry = finch_shared::registry::Registry::parse(hostport)?;
        let (host, port) = (registry.host(), registry.port());
        let path = if path == "/" { String::new() } else { path.to_owned() };
        Ok(ServerUrl { scheme, host: host.to_owned(), port, path })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use finch_shared::Secret;

    use super::*;

    /// An in-memory keychain that can be made to hang or fail.
    #[derive(Default)]
    struct Memory {
        items: Mutex<BTreeMap<String, (String, String)>>,
        hang: bool,
        locked: bool,
    }

    impl SyncKeychain for Memory {
        fn get(&self, server: &str) -> Result<Option<Credential>, KeychainError> {
            if self.hang {
                std::thread::sleep(Duration::from_secs(5));
            }
            if self.locked {
                return Err(KeychainError::KeychainLocked { store: "memory" });
            }
            Ok(self
                .items
                .lock()
                .unwrap()
                .get(server)
                .map(|(u, s)| Credential { username: u.clone(), secret: Secret::new(s.clone()) }))
        }
        fn store(&self, server: &str, c: &Credential) -> Result<(), KeychainError> {
            self.items
                .lock()
                .unwrap()
                .insert(server.into(), (c.username.clone(), c.secret.expose().into()));
            Ok(())
        }
        fn erase(&self, server: &str) -> Result<(), KeychainError> {
            self.items.lock().unwrap().remove(server);
            Ok(())
        }
        fn list(&self) -> Result<Vec<ListEntry>, KeychainError> {
            Ok(self
                .items
                .lock()
                .unwrap()
                .iter()
                .map(|(s, (u, _))| ListEntry { server: s.clone(), username: u.clone() })
                .collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_adapter_round_trip_and_bounds() {
        let k = Blocking::new("memory", Memory::default(), Duration::from_secs(2));
        assert_eq!(k.name(), "keychain:memory");
        let c = Credential { username: "u".into(), secret: Secret::new("s3cret".into()) };
        k.store("h:5000", &c).await.unwrap();
        assert_eq!(k.get("h:5000").await.unwrap(), Some(c));
        assert_eq!(k.list().await.unwrap().len(), 1);
        k.erase("h:5000").await.unwrap();
        k.erase("h:5000").await.unwrap();
        assert_eq!(k.get("h:5000").await.unwrap(), None);

        let hung = Blocking::new(
            "memory",
            Memory { hang: true, ..Memory::default() },
            Duration::from_millis(200),
        );
        let started = std::time::Instant::now();
        let err = hung.get("h").await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(err, "memory keychain: no answer within 0 s");

        let locked = Blocking::new(
            "memory",
            Memory { locked: true, ..Memory::default() },
            Duration::from_secs(2),
        );
        let err = locked.get("h").await.unwrap_err().to_string();
        assert!(err.contains("the keychain is locked"), "{err}");
    }

    #[test]
    fn server_urls_split_like_osxkeychain() {
        let u = ServerUrl::parse("https://reg.example:5000/v2/").unwrap();
        assert_eq!(
            u,
            ServerUrl {
                scheme: "https",
                host: "reg.example".into(),
                port: Some(5000),
                path: "/v2/".into()
            }
        );
        let u = ServerUrl::parse("ghcr.io").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            ("https", "ghcr.io", None, "")
        );
        let u = ServerUrl::parse("http://h/").unwrap();
        assert_eq!((u.scheme, u.path.as_str()), ("http", ""));
        assert!(ServerUrl::parse("https://:5000").is_err());
        assert!(ServerUrl::parse("h:99999").is_err());
    }

    #[test]
    fn long_reasons_are_cut() {
        assert_eq!(shorten("short"), "short");
        let long = "é".repeat(300);
        let s = shorten(&long);
        assert!(s.len() <= MAX_REASON + 3 && s.ends_with('…'));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn native_name_is_this_os() {
        assert_eq!(NATIVE_NAME, Some("secretservice"));
        assert!(open("osxkeychain", Duration::from_secs(1)).is_none());
        assert!(open("pass", Duration::from_secs(1)).is_none());
    }
}
