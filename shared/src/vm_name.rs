//! A VM's name, as the host agent knows it: a key in its settings, a file name in its state
//! directory (`vms/NAME.key`), a field of every audit line. One parser, so a name that is not
//! safe in all three never gets in.

use std::borrow::Borrow;
use std::fmt;

/// Longest VM name.
pub const MAX_VM_NAME: usize = 64;

/// A valid VM name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, not starting with `.` or
/// `-` (so never `..`, a hidden file or a flag).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

/// Why a string is not a VM name. The text quotes at most 80 characters of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: a VM name uses letters, digits, '.', '_' or '-' (at most 64)")]
pub struct VmNameInvalid(String);

impl VmName {
    /// Whether `name` is a valid VM name.
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_VM_NAME
            && !name.starts_with(['.', '-'])
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for VmName {
    type Err = VmNameInvalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if VmName::is_valid(s) {
            Ok(VmName(s.to_owned()))
        } else {
            Err(VmNameInvalid(crate::limit::cap(s, 80).into_owned()))
        }
    }
}

impl TryFrom<String> for VmName {
    type Error = VmNameInvalid;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if VmName::is_valid(&s) { Ok(VmName(s)) } else { s.parse() }
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for VmName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for VmName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for VmName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for VmName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<VmName> for String {
    fn from(name: VmName) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_safe_as_file_names_and_log_fields() {
        for good in ["finch", "default", "a", "vm-1.test_2", &"x".repeat(64)] {
            assert_eq!(good.parse::<VmName>().unwrap().as_str(), good);
        }
        for bad in ["", ".", "..", ".hidden", "-flag", "a/b", "a b", "é", "a\n", &"x".repeat(65)] {
            assert!(bad.parse::<VmName>().is_err(), "{bad:?}");
        }
        let long = format!("{}/", "y".repeat(10_000));
        let e = long.parse::<VmName>().unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains("a VM name uses"), "{e}");
    }
}
