//! The per-VM link key: at least [`MIN_KEY_LEN`] random bytes, known to the host agent and to
//! root inside the VM, never sent over the link.

use std::io::Read;
use std::path::Path;

use zeroize::Zeroizing;

/// Fewest bytes a link key may have.
pub const MIN_KEY_LEN: usize = 32;

/// Most bytes read from a key file.
pub const MAX_KEY_LEN: usize = 4096;

/// Length of keys this project generates.
pub const GENERATED_KEY_LEN: usize = 32;

/// Why a key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("cannot read link key file {path}")]
    KeyRead {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Someone but its owner may open the file.
    #[error("link key file {path} is open to other users ({exposure}): run {fix}")]
    KeyPermissions {
        /// The file.
        path: String,
        /// Who else may open it (`mode 0640`, or the ACL's other SIDs on Windows).
        exposure: crate::private::Exposure,
        /// The command that makes it private.
        fix: String,
    },
    /// The key is too short or too long.
    #[error("link key in {path} is {len} bytes: it needs {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes")]
    KeyLength {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// The file is not a regular file.
    #[error("link key file {path} is not a regular file")]
    KeyNotFile {
        /// The file.
        path: String,
    },
    /// The system random source failed.
    #[error("no randomness available: {0}")]
    RandomUnavailable(getrandom::Error),
    /// The key file could not be created.
    #[error("cannot create link key file {path}")]
    KeyCreate {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A link key. Zeroized on drop; `Debug` is redacted.
#[derive(Clone)]
pub struct LinkKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(<redacted>)")
    }
}

impl LinkKey {
    /// Whether two keys are the same, in time that does not depend on where they differ.
    pub fn same_as(&self, other: &LinkKey) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A key from bytes, checking the length only.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            return Err(KeyError::KeyLength { path: "<memory>".into(), len: bytes.len() });
        }
        Ok(Self(Zeroizing::new(bytes.to_vec())))
    }

    /// A fresh random key of [`GENERATED_KEY_LEN`] bytes.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new(vec![0u8; GENERATED_KEY_LEN]);
        getrandom::fill(&mut bytes).map_err(KeyError::RandomUnavailable)?;
        Ok(Self(bytes))
    }

    /// Loads a key file, refusing one that anyone but its owner may open (group or other
    /// mode bits on unix, another SID in its ACL on Windows), that is not a regular file, or
    /// whose length is out of bounds. The file holds the raw key bytes.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let read_err = |source| KeyError::KeyRead { path: shown.clone(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::KeyNotFile { path: shown });
        }
        if let Some(exposure) = crate::private::exposure(&file, path).map_err(read_err)? {
            let fix = crate::private::fix_command(path, false);
            return Err(KeyError::KeyPermissions { path: shown, exposure, fix });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(MIN_KEY_LEN));
        file.take(MAX_KEY_LEN as u64 + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            return Err(KeyError::KeyLength { path: shown, len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// Loads the key at `path`, or creates it (private: mode 0600, or an owner-only DACL; new
    /// random bytes) when it is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        use std::io::Write;
        match crate::private::create_new(path) {
            Ok(mut file) => {
                let key = Self::generate()?;
                let create_err =
                    |source| KeyError::KeyCreate { path: path.display().to_string(), source };
                file.write_all(&key.0).map_err(create_err)?;
                file.sync_all().map_err(create_err)?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(source) => Err(KeyError::KeyCreate { path: path.display().to_string(), source }),
        }
    }

    /// What a key file holds: for writing one (a VM's bundle); never for a log or a message.
    pub fn file_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn permissions_and_length_are_checked() {
        let dir = std::env::temp_dir().join(format!("finch-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, [1u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = LinkKey::load(&path).unwrap_err();
        assert!(err.to_string().contains("(mode 0640): run chmod 600 "), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        LinkKey::load(&path).unwrap();
        std::fs::write(&path, [1u8; 31]).unwrap();
        assert!(matches!(LinkKey::load(&path), Err(KeyError::KeyLength { len: 31, .. })));

        let fresh = dir.join("fresh");
        let a = LinkKey::load_or_create(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = LinkKey::load_or_create(&fresh).unwrap();
        assert_eq!(a.bytes(), b.bytes());
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.bytes())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
