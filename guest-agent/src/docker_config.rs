//! `finch-guest-agent docker-config`: points the VM's docker config at `finchhost` and puts
//! back what was there, so provisioning needs no JSON tool in the VM. Other keys are kept, in
//! their order; what `credsStore` was before is recorded once, so running the install again
//! (Lima provisions at every boot) changes nothing, and uninstalling restores it.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest docker config read.
const MAX_CONFIG: u64 = 4 * 1024 * 1024;

/// What was there before `set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Whether the config file existed.
    pub created: bool,
    /// Its `credsStore`, if it had one.
    pub previous: Option<String>,
}

fn read(path: &Path) -> anyhow::Result<Option<Map<String, Value>>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = Vec::new();
    file.take(MAX_CONFIG + 1).read_to_end(&mut text)?;
    anyhow::ensure!(text.len() as u64 <= MAX_CONFIG, "{} is too large", path.display());
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(Map::new()));
    }
    match serde_json::from_slice(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => anyhow::bail!("{} is not a JSON object", path.display()),
        Err(e) => anyhow::bail!(
            "{} is not valid JSON (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        ),
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    finch_shared::private::write_atomic(path, bytes, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Rewrites the config keeping its mode and owner (a user's config stays the user's); a new
/// one is 0600 and owned by its directory's owner.
fn write_config(path: &Path, map: &Map<String, Value>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut text = serde_json::to_vec_pretty(&Value::Object(map.clone()))?;
    text.push(b'\n');
    let (mode, owner) = match std::fs::metadata(path) {
        Ok(m) => (m.mode() & 0o7777, Some((m.uid(), m.gid()))),
        Err(_) => {
            let dir = path.parent().and_then(|d| std::fs::metadata(d).ok());
            (0o600, dir.map(|m| (m.uid(), m.gid())))
        }
    };
    write(path, &text, mode)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} back to its owner", path.display()))?;
    }
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(())
}

/// Sets `credsStore` to `name` in `config`, recording what was there in `record` (once).
pub fn set_creds_store(config: &Path, name: &str, record: &Path) -> anyhow::Result<bool> {
    let existing = read(config)?;
    let mut map = existing.clone().unwrap_or_default();
    if map.get("credsStore").and_then(Value::as_str) == Some(name) {
        return Ok(false);
    }
    if !record.exists() {
        let r = Record {
            created: existing.is_none(),
            previous: map.get("credsStore").and_then(Value::as_str).map(str::to_owned),
        };
        write(record, &serde_json::to_vec(&r)?, 0o600)?;
    }
    map.insert("credsStore".into(), Value::String(name.to_owned()));
    write_config(config, &map)?;
    Ok(true)
}

/// Puts back what `record` says, if `credsStore` is still `name`; removes the record.
pub fn restore_creds_store(config: &Path, name: &str, record: &Path) -> anyhow::Result<bool> {
    let r: Record = match std::fs::read(record) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a record", record.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", record.display())),
    };
    let mut changed = false;
    if let Some(mut map) = read(config)?
        && map.get("credsStore").and_then(Value::as_str) == Some(name)
    {
        match &r.previous {
            Some(p) => {
                map.insert("credsStore".into(), Value::String(p.clone()));
            }
            None => {
                map.remove("credsStore");
            }
        }
        if r.created && map.is_empty() {
            std::fs::remove_file(config)
                .with_context(|| format!("cannot remove {}", config.display()))?;
        } else {
            write_config(config, &map)?;
        }
        changed = true;
    }
    std::fs::remove_file(record).with_context(|| format!("cannot remove {}", record.display()))?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn set_is_idempotent_and_restore_puts_back() {
        let dir = tempfile::tempdir().unwrap();
        let (config, record) = (dir.path().join("c/config.json"), dir.path().join("r.json"));
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, r#"{"auths":{"x":{}},"credsStore":"desktop","z":1}"#).unwrap();
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(set_creds_store(&config, "finchhost", &record).unwrap());
        assert!(!set_creds_store(&config, "finchhost", &record).unwrap());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&config).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644, "the mode was not kept");
        let v: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        assert_eq!(v["credsStore"], "finchhost");
        assert_eq!(v["z"], 1);
        assert!(restore_creds_store(&config, "finchhost", &record).unwrap());
        let v: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        assert_eq!(v["credsStore"], "desktop");
        assert!(!record.exists());
        // A file we created goes away again.
        let fresh = dir.path().join("new/config.json");
        set_creds_store(&fresh, "finchhost", &record).unwrap();
        restore_creds_store(&fresh, "finchhost", &record).unwrap();
        assert!(!fresh.exists());
        // Bad JSON is an error, and nothing is written.
        std::fs::write(&config, "{not json").unwrap();
        assert!(
            set_creds_store(&config, "finchhost", &record)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        assert_eq!(std::fs::read(&config).unwrap(), b"{not json");
    }
}
