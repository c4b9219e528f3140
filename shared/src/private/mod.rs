//! Files and directories only their owner may open, on every OS: what holds link keys, the
//! host agent's state and the host's credential files.
//!
//! * unix (`unix`): mode bits. Private means no group or other bits (files 0600, dirs 0700).
//! * Windows (`windows`, whose SID and ACL helpers the host agent's named pipe reuses): the DACL. Private means no allowing ACE for anyone but the owner,
//!   the current user, `SYSTEM` and `Administrators`; created files and directories get a
//!   protected DACL with one ACE, for the current user.
//!
//! The Windows verdict over a DACL ([`acl::exposure`]) is plain logic, compiled and tested on
//! every OS; only reading and writing the DACL is Windows code.

pub mod acl;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
pub mod windows;

#[cfg(unix)]
use unix as imp;
#[cfg(windows)]
use windows as imp;

use std::fs::File;
use std::path::Path;

/// Who else may open a file, as a sentence fragment for an error (`mode 0644`,
/// `its ACL lets S-1-5-32-545 read or write it`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure(pub String);

impl std::fmt::Display for Exposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `file` (opened from `path`) is private: `Ok(None)` when only its owner may open
/// it, `Ok(Some(who else))` when not.
pub fn exposure(file: &File, path: &Path) -> std::io::Result<Option<Exposure>> {
    imp::exposure(file, path)
}

/// Whether the file or directory at `path` is private (see [`exposure`]).
pub fn path_exposure(path: &Path) -> std::io::Result<Option<Exposure>> {
    let file = imp::open_for_inspection(path)?;
    imp::exposure(&file, path)
}

/// Creates `path`, which must not exist, as a private file open for writing.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    imp::create_new(path)
}

/// Opens `path` for writing, truncated, creating it private when missing; an existing file
/// is made private too (it is about to hold a secret).
pub fn create_or_truncate(path: &Path) -> std::io::Result<File> {
    imp::create_or_truncate(path)
}

/// Creates `dir` and its missing parents; `dir` itself, when created, is private.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    imp::create_dir_all(dir)
}

/// The command that makes `path` private, for a `fix:` line.
pub fn fix_command(path: &Path, dir: bool) -> String {
    if cfg!(windows) {
        format!("icacls \"{}\" /inheritance:r /grant:r \"%USERNAME%:F\"", path.display())
    } else {
        format!("chmod {} {}", if dir { "700" } else { "600" }, path.display())
    }
}

// Windows: Wine maps a DACL onto unix mode bits and gives the group what the owner has, so
// what it reads back of an owner-only DACL is not what real Windows reads back; the Windows
// tests (`windows::tests`) check the DACL this module writes instead.
#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;

    #[test]
    fn created_files_and_dirs_are_private_and_an_open_one_is_not() {
        let dir = tempfile_dir();
        let sub = dir.join("a").join("b");
        create_dir_all(&sub).unwrap();
        let file = sub.join("key");
        drop(create_new(&file).unwrap());
        assert_eq!(path_exposure(&sub).unwrap(), None);
        assert_eq!(path_exposure(&file).unwrap(), None);
        assert_eq!(create_new(&file).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        drop(create_or_truncate(&file).unwrap());
        assert_eq!(path_exposure(&file).unwrap(), None);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = path_exposure(&file).unwrap().unwrap();
            assert_eq!(e.0, "mode 0640");
            drop(create_or_truncate(&file).unwrap());
            assert_eq!(path_exposure(&file).unwrap(), None, "made private again");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("finch-private-{name}"));
        std::fs::create_dir(&dir).unwrap();
        dir
    }
}
