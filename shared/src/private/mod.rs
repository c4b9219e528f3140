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

/// Replaces `path` with `bytes` atomically and durably: a sibling temporary file, born
/// private, is written, synced, given `unix_mode` (unix only; Windows keeps the owner-only
/// DACL), and renamed over `path`; on unix the directory is synced too, so a success
/// survives a crash. A reader sees the old file or the new one, never a part. On failure the
/// temporary file is removed and `path` is untouched. Each call has its own temporary name,
/// so concurrent writers never write into one file (the last rename wins).
pub fn write_atomic(path: &Path, bytes: &[u8], unix_mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, mut file) = temporary_beside(dir, &name)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| set_mode(&file, unix_mode))
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// A new private file `.NAME.PID.N.finch-tmp` in `dir`.
fn temporary_beside(dir: &Path, name: &str) -> std::io::Result<(std::path::PathBuf, File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..64 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.finch-tmp", std::process::id()));
        match create_new(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &File, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
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

    #[test]
    fn atomic_writes_replace_whole_and_leave_nothing_behind() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let file = dir.join("attached.toml");
        write_atomic(&file, b"one", 0o600).unwrap();
        write_atomic(&file, b"two", 0o755).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o755);
        // A failed rename (the target is a directory) leaves the target and no temporary.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomic(&blocked, b"x", 0o600).is_err());
        assert!(blocked.join("inside").is_dir());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.iter().all(|n| !n.contains("finch-tmp")), "{left:?}");
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
