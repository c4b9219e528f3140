//! The vault of VM link keys in each OS keychain (`crate::vm_keys` decides what goes in):
//! the item names every backend uses, and the trait each implements.

use zeroize::Zeroizing;

use super::KeychainError;

/// Secret Service schema of a link key item.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub const SCHEMA: &str = "dev.finch.credential-bridge.LinkKey";
/// macOS generic-password service of a link key item.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub const SERVICE: &str = "dev.finch.credential-bridge.link-key";
/// Windows target name prefix of a link key item.
#[cfg_attr(not(windows), allow(dead_code))]
pub const TARGET_PREFIX: &str = "finch-credential-bridge:link-key/";

/// An OS keychain holding link keys. Calls block (bounded by the keychain timeout).
pub trait Vault: Send + Sync {
    /// The keychain's helper name (`secretservice`, `osxkeychain`, `wincred`).
    fn name(&self) -> &'static str;
    /// VM `vm`'s key bytes, if the keychain has them.
    fn get(&self, vm: &str) -> Result<Option<Zeroizing<Vec<u8>>>, KeychainError>;
    /// Stores VM `vm`'s key bytes, replacing any.
    fn put(&self, vm: &str, key: &[u8]) -> Result<(), KeychainError>;
    /// Removes VM `vm`'s key; none there is not an error.
    fn remove(&self, vm: &str) -> Result<(), KeychainError>;
}

/// Item label, the same on every OS.
pub fn label(vm: &str) -> String {
    format!("finch credential bridge: link key of VM {vm}")
}

/// The vault of an OS without a keychain this project knows.
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
#[derive(Debug)]
pub struct OtherOs;

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
impl Vault for OtherOs {
    fn name(&self) -> &'static str {
        "none"
    }
    fn get(&self, _vm: &str) -> Result<Option<Zeroizing<Vec<u8>>>, KeychainError> {
        Err(no_keychain())
    }
    fn put(&self, _vm: &str, _key: &[u8]) -> Result<(), KeychainError> {
        Err(no_keychain())
    }
    fn remove(&self, _vm: &str) -> Result<(), KeychainError> {
        Err(no_keychain())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
fn no_keychain() -> KeychainError {
    KeychainError::KeychainUnreachable {
        store: "none",
        reason: "this OS has no keychain the host agent uses".into(),
    }
}
