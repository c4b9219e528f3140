//! Where things are on this host: the home directory, Finch's root, the state directory's
//! key files, and private directories.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The user's home, for `~/` in paths and the login service's files: `$HOME` on unix,
/// `%USERPROFILE%` on Windows.
pub fn home() -> anyhow::Result<PathBuf> {
    let var = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    env_path(var).with_context(|| {
        format!("{var} is not set: give --state-dir, --docker-config and --config")
    })
}

/// Where Finch keeps its files, under which the defaults live (`.finch/…`): the home
/// directory on macOS and Linux, `%LOCALAPPDATA%` on Windows (Finch's `pkg/path`; like
/// Finch, a `LOCALAPPDATA` holding `&` or `"` is refused).
pub fn finch_root() -> anyhow::Result<PathBuf> {
    if !cfg!(windows) {
        return home();
    }
    let root = env_path("LOCALAPPDATA")
        .context("LOCALAPPDATA is not set: give --state-dir, --docker-config and --config")?;
    let text = root.to_string_lossy();
    anyhow::ensure!(
        !text.contains(['&', '"']),
        "LOCALAPPDATA ({text}) contains & or \", which Finch refuses too"
    );
    Ok(root)
}

/// A path from the environment; unset and empty are the same.
pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `[lima] guest_dir` when not given: `guest/` beside the agent's binary.
pub fn default_guest_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("guest")))
        .unwrap_or_else(|| PathBuf::from("guest"))
}

/// The directory of VM keys (and their markers) in the state directory.
pub fn keys_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// Where the key of VM `name` lives in the state directory.
pub fn key_path(state_dir: &Path, name: &str) -> PathBuf {
    keys_dir(state_dir).join(format!("{name}.key"))
}

/// Creates `dir` (and its parents) private (mode 0700, or an owner-only DACL) if missing, and
/// refuses one that anyone else may enter: it holds keys and the control socket.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use finch_shared::private;
    private::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exposure =
        private::path_exposure(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    if let Some(e) = exposure {
        anyhow::bail!(
            "{} is open to other users ({e}): run {}",
            dir.display(),
            private::fix_command(dir, true)
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and private (mode 0600, or an owner-only DACL).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    finch_shared::private::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}
