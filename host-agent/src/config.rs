//! The host agent's settings: named defaults, `--vm` specs, the state directory.
//!
//! Precedence: flags > environment > defaults (a config file joins in a later issue).

use std::path::{Path, PathBuf};

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use finch_shared::key::LinkKey;

/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "FINCH_HOST_AGENT_STATE_DIR";
/// State directory under `$HOME` when nothing else is given.
pub const DEFAULT_STATE_SUBDIR: &str = ".finch/host-agent";
/// Docker config directory under `$HOME` when nothing else is given (Finch's).
pub const DEFAULT_DOCKER_CONFIG_SUBDIR: &str = ".finch";

/// One `--vm NAME=ENDPOINT[,key=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// Where to dial it.
    pub endpoint: Endpoint,
    /// Its key file, when not the one in the state directory.
    pub key: Option<PathBuf>,
}

/// Whether `name` is a usable VM name (it becomes a file name in the state directory).
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl std::str::FromStr for VmSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ENDPOINT[,key=PATH]"))?;
        if !valid_vm_name(name) {
            return Err(format!(
                "{name:?}: a VM name uses letters, digits, '.', '_' or '-' (at most 64)"
            ));
        }
        let (endpoint, key) = match rest.rsplit_once(",key=") {
            Some((endpoint, key)) => {
                if !key.starts_with('/') {
                    return Err(format!("{s:?}: key=PATH must be an absolute path"));
                }
                (endpoint, Some(PathBuf::from(key)))
            }
            None => (rest, None),
        };
        let endpoint = endpoint.parse::<Endpoint>().map_err(|e| e.to_string())?;
        Ok(VmSpec { name: name.to_owned(), endpoint, key })
    }
}

/// `$HOME`, required for defaults.
pub fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set: give --state-dir and --docker-config")
}

/// The state directory: the flag, else `$FINCH_HOST_AGENT_STATE_DIR`, else `~/.finch/host-agent`.
pub fn state_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag
        .or_else(|| std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
    {
        return Ok(dir);
    }
    Ok(home()?.join(DEFAULT_STATE_SUBDIR))
}

/// The docker config directory: the flag, else `~/.finch`.
pub fn docker_config_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match flag {
        Some(dir) => Ok(dir),
        None => Ok(home()?.join(DEFAULT_DOCKER_CONFIG_SUBDIR)),
    }
}

/// Where the key of VM `name` lives in the state directory.
pub fn key_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("vms").join(format!("{name}.key"))
}

/// Loads the VM's key: its `key=` file (which must exist), or the one in the state
/// directory, created with mode 0600 (directories 0700) when missing.
pub fn load_key(spec: &VmSpec, state_dir: &Path) -> anyhow::Result<LinkKey> {
    if let Some(path) = &spec.key {
        return LinkKey::load(path).with_context(|| format!("VM {}", spec.name));
    }
    let path = key_path(state_dir, &spec.name);
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    }
    LinkKey::load_or_create(&path).with_context(|| format!("VM {}", spec.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_specs() {
        let s: VmSpec = "default=unix:///tmp/l.sock".parse().unwrap();
        assert_eq!(
            s,
            VmSpec {
                name: "default".into(),
                endpoint: Endpoint::Unix("/tmp/l.sock".into()),
                key: None
            }
        );
        let s: VmSpec = "finch=unix:///a/b.sock,key=/k/finch.key".parse().unwrap();
        assert_eq!(s.key, Some(PathBuf::from("/k/finch.key")));
        for bad in [
            "noequals",
            "=unix:///x",
            "../x=unix:///x",
            "a=unix://rel",
            "a=unix:///x,key=rel",
            "a=tcp://x",
        ] {
            assert!(bad.parse::<VmSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn key_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spec: VmSpec = "vm1=unix:///x".parse().unwrap();
        load_key(&spec, dir.path()).unwrap();
        let path = key_path(dir.path(), "vm1");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
    }
}
