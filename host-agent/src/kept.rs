//! A file's bytes from before the bridge changed it, kept so that undoing the change puts
//! them back byte for byte. One mechanism for both of setup's users: `lima::finch` keeps
//! Lima's files beside themselves (`FILE.finch-bridge-orig`, in the instance that holds
//! them); `finch_wsl` keeps Finch's files in the agent's state directory (Finch's own
//! directory is the VM's to read). A file that did not exist is kept as that (`….absent`), so
//! undoing removes it.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The name Lima's files keep their originals under, beside them.
pub const BESIDE_SUFFIX: &str = ".finch-bridge-orig";
/// What marks a kept original as "the file did not exist".
const ABSENT_SUFFIX: &str = ".absent";

/// What was kept of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Original {
    /// Its bytes.
    Bytes(Vec<u8>),
    /// It did not exist.
    Absent,
}

impl Original {
    /// A file as read (`None`: it does not exist).
    pub fn of(read: Option<Vec<u8>>) -> Original {
        read.map_or(Original::Absent, Original::Bytes)
    }

    /// The bytes, `None` for a file that did not exist.
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            Original::Bytes(b) => Some(b),
            Original::Absent => None,
        }
    }
}

/// Where one file's original is kept.
#[derive(Debug, Clone)]
pub struct Kept {
    bytes: PathBuf,
    absent: PathBuf,
    /// Longest original read back (the bound the file itself is read under).
    max: u64,
}

impl Kept {
    /// Kept beside `file`, as `FILE.finch-bridge-orig`; read back at most `max` bytes.
    pub fn beside(file: &Path, max: u64) -> Kept {
        let mut name = file.file_name().unwrap_or_default().to_os_string();
        name.push(BESIDE_SUFFIX);
        Kept::at(file.with_file_name(name), max)
    }

    /// Kept in `dir` (which the caller made private) as `name`; read back at most `max` bytes.
    pub fn in_dir(dir: &Path, name: &str, max: u64) -> Kept {
        Kept::at(dir.join(name), max)
    }

    fn at(bytes: PathBuf, max: u64) -> Kept {
        let mut absent = bytes.clone().into_os_string();
        absent.push(ABSENT_SUFFIX);
        Kept { bytes, absent: PathBuf::from(absent), max }
    }

    /// Where the bytes are kept.
    pub fn path(&self) -> &Path {
        &self.bytes
    }

    /// What is kept; `None` when nothing is.
    pub fn read(&self) -> anyhow::Result<Option<Original>> {
        if let Some(b) = crate::lima::read_bounded(&self.bytes, self.max)? {
            return Ok(Some(Original::Bytes(b)));
        }
        Ok(self.absent.exists().then_some(Original::Absent))
    }

    /// Keeps `original` in place of whatever was kept, written with `mode`.
    pub fn keep(&self, original: &Original, mode: u32) -> anyhow::Result<()> {
        self.forget()?;
        let (path, bytes) = match original {
            Original::Bytes(b) => (&self.bytes, &b[..]),
            Original::Absent => (&self.absent, &b""[..]),
        };
        finch_shared::private::write_atomic(path, bytes, mode)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Puts the kept original back at `file` (bytes written with `mode`, or the file removed
    /// when it did not exist) and forgets it; `false` when nothing was kept.
    pub fn put_back(&self, file: &Path, mode: u32) -> anyhow::Result<bool> {
        match self.read()? {
            None => return Ok(false),
            Some(Original::Bytes(b)) => finch_shared::private::write_atomic(file, &b, mode)
                .with_context(|| format!("cannot write {}", file.display()))?,
            Some(Original::Absent) => remove(file)?,
        }
        self.forget()?;
        Ok(true)
    }

    /// Forgets what is kept.
    pub fn forget(&self) -> anyhow::Result<()> {
        remove(&self.bytes)?;
        remove(&self.absent)
    }
}

/// Removes `path`; one that is not there is fine.
fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_kept_and_put_back_byte_for_byte() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("lima.yaml");
        let kept = Kept::beside(&file, 1024);
        assert_eq!(kept.path(), t.path().join("lima.yaml.finch-bridge-orig"));
        assert_eq!(kept.read().unwrap(), None);
        assert!(!kept.put_back(&file, 0o644).unwrap(), "nothing kept");
        let before = b"cpus: 2\r\n# \xc3\xa9\n".to_vec();
        kept.keep(&Original::Bytes(before.clone()), 0o644).unwrap();
        std::fs::write(&file, "wired").unwrap();
        assert!(kept.put_back(&file, 0o644).unwrap());
        assert_eq!(std::fs::read(&file).unwrap(), before);
        assert_eq!(kept.read().unwrap(), None, "forgotten once put back");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1, "only the file is left");
    }

    #[test]
    fn a_file_that_did_not_exist_is_removed_when_put_back() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("config.json");
        let kept = Kept::in_dir(&t.path().join("saved"), "config.json", 1024);
        std::fs::create_dir(t.path().join("saved")).unwrap();
        kept.keep(&Original::of(None), 0o600).unwrap();
        assert_eq!(kept.read().unwrap(), Some(Original::Absent));
        std::fs::write(&file, "{}").unwrap();
        assert!(kept.put_back(&file, 0o600).unwrap());
        assert!(!file.exists());
        assert_eq!(kept.read().unwrap(), None);
    }

    #[test]
    fn keeping_replaces_what_was_kept_and_reading_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let kept = Kept::in_dir(t.path(), "finch.yaml", 8);
        kept.keep(&Original::Absent, 0o600).unwrap();
        kept.keep(&Original::Bytes(b"a: 1\n".to_vec()), 0o600).unwrap();
        assert_eq!(kept.read().unwrap(), Some(Original::Bytes(b"a: 1\n".to_vec())));
        kept.keep(&Original::Bytes(b"123456789".to_vec()), 0o600).unwrap();
        let err = kept.read().unwrap_err();
        assert!(format!("{err:#}").contains("larger than 8 bytes"), "{err:#}");
    }
}
