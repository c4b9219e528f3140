//! Where the VM link keys live on the host.
//!
//! A VM's key is known on two sides: the host agent's, and root's inside that VM (its bundle,
//! then `/etc/finch-guest-agent/link.key`). On the host it is kept where no VM mount reaches:
//! Finch mounts the home directory into its VM, so a key file under `~` is readable there,
//! while an item in the OS keychain is not. With `key_store = "auto"` (the default) keys go
//! to the OS keychain when it answers and stay in the state directory's `vms/NAME.key` (mode
//! 0600) when it does not; `"keychain"` requires the keychain; `"file"` never uses it. A key
//! file found for a VM whose key is not in the keychain yet is moved into it (written, read
//! back, then the file removed), and `vms/NAME.in-keychain` (no secret) records that the key
//! is there: a keychain that does not answer later is then an error, never a new key that
//! would cut the VM off. A VM with its own `key = "PATH"` always uses that file.
//!
//! The items are the bridge's own, never docker credentials, so no `get` from a guest can
//! name one, and docker's helpers do not list them:
//!
//! * Secret Service: schema `dev.finch.credential-bridge.LinkKey`, attribute `vm` = NAME,
//!   label `finch credential bridge: link key of VM NAME`, secret = the key bytes.
//! * macOS Keychain: a generic password, service `dev.finch.credential-bridge.link-key`,
//!   account NAME (docker's items are internet passwords).
//! * Windows Credential Manager: a generic credential `finch-credential-bridge:link-key/NAME`
//!   without docker's `label` attribute and with the item label as its comment (a target no
//!   registry name parses to, which the `wincred` source also refuses by name).
//!
//! Each OS compiles its own vault (Linux, macOS, Windows); any other has `OtherOs`, which
//! refuses, so `auto` there means files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use finch_shared::key::LinkKey;

use crate::lima::Instance;
use crate::platform::paths;
use crate::settings::{KeyStore, Settings, VmName};
use crate::source::keychain::vault::Vault;

/// Where a VM's key was found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHome {
    /// A key file.
    File(PathBuf),
    /// An item in this OS keychain (its helper name).
    Keychain(&'static str),
}

impl std::fmt::Display for KeyHome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyHome::File(p) => write!(f, "{}", p.display()),
            KeyHome::Keychain(name) => write!(f, "the {name} keychain"),
        }
    }
}

/// This OS's keychain.
pub fn os_vault(timeout: std::time::Duration) -> Box<dyn Vault> {
    crate::source::keychain::key_vault(timeout)
}

/// Loads VM `name`'s key from where `settings` keep it, creating it when missing (a VM not
/// configured yet gets the key it will have: `key-path` and `key-export` wire VMs before).
pub fn load_key(settings: &Settings, name: &str) -> anyhow::Result<(LinkKey, KeyHome)> {
    load_key_with(settings, name, || os_vault(settings.keychain_timeout))
}

/// [`load_key`] with the vault given (tests).
pub fn load_key_with(
    settings: &Settings,
    name: &str,
    vault: impl FnOnce() -> Box<dyn Vault>,
) -> anyhow::Result<(LinkKey, KeyHome)> {
    if let Some(path) = settings.vms.get(name).and_then(|vm| vm.key_file.as_ref()) {
        let key = LinkKey::load(path).with_context(|| format!("VM {name}"))?;
        return Ok((key, KeyHome::File(path.clone())));
    }
    let file = paths::key_path(&settings.state_dir, name);
    let in_keychain = marker(&file);
    if settings.key_store == KeyStore::File {
        anyhow::ensure!(
            file.exists() || !in_keychain.exists(),
            "VM {name}: its key is in the keychain ({} says so) and key_store = \"file\" has no \
             copy: `finch-host-agent key-export {name} --key-store auto --out {}` makes one \
             (removing the marker instead makes a new key, and the VM must be wired again)",
            in_keychain.display(),
            file.display()
        );
        return Ok((file_key(settings, &file, name)?, KeyHome::File(file)));
    }
    let vault = vault();
    match in_vault(settings, vault.as_ref(), name, &file) {
        Ok(key) => Ok((key, KeyHome::Keychain(vault.name()))),
        // A key that went into the keychain is never replaced by a new file key because the
        // keychain is locked today: the VM would lose its link.
        Err(e) if settings.key_store == KeyStore::Auto && in_keychain.exists() => {
            Err(e.context(format!(
                "VM {name}: its key is in the {} keychain, which did not answer (unlock it)",
                vault.name()
            )))
        }
        Err(e) if settings.key_store == KeyStore::Auto => {
            tracing::info!(vm = %name, reason = %format!("{e:#}"), "VM key kept in a file: the keychain did not answer");
            Ok((file_key(settings, &file, name)?, KeyHome::File(file)))
        }
        Err(e) => Err(e.context(format!("VM {name}: key_store = \"keychain\""))),
    }
}

/// Beside where a VM's key file would be, `NAME.in-keychain` (no secret in it) says the key
/// went into the keychain: a keychain that does not answer later is then an error, never a
/// reason to make a new key.
fn marker(file: &Path) -> PathBuf {
    file.with_extension("in-keychain")
}

fn write_marker(settings: &Settings, file: &Path, store: &str) -> anyhow::Result<()> {
    key_dirs(settings, file)?;
    let m = marker(file);
    if !m.exists() {
        let note = format!("this VM's link key is kept in the {store} keychain\n");
        paths::write_private(&m, note.as_bytes())?;
    }
    Ok(())
}

/// The state directory and its `vms/`, private, made when missing.
fn key_dirs(settings: &Settings, file: &Path) -> anyhow::Result<()> {
    paths::private_dir(&settings.state_dir)?;
    if let Some(dir) = file.parent() {
        paths::private_dir(dir)?;
    }
    Ok(())
}

/// The key file in the state directory, created private when missing.
fn file_key(settings: &Settings, file: &Path, name: &str) -> anyhow::Result<LinkKey> {
    key_dirs(settings, file)?;
    LinkKey::load_or_create(file).with_context(|| format!("VM {name}"))
}

/// The key in `vault`; a key file there is moved in, and a new key made when neither has one.
fn in_vault(
    settings: &Settings,
    vault: &dyn Vault,
    name: &str,
    file: &Path,
) -> anyhow::Result<LinkKey> {
    if let Some(bytes) = vault.get(name)? {
        let key = LinkKey::from_bytes(&bytes)
            .with_context(|| format!("the {} item of VM {name}", vault.name()))?;
        write_marker(settings, file, vault.name())?;
        remove_moved_file(&key, file, name);
        return Ok(key);
    }
    anyhow::ensure!(
        !marker(file).exists(),
        "VM {name}: the {} keychain has lost its key ({} says it was there): \
         remove that marker to make a new key, then wire the VM again",
        vault.name(),
        marker(file).display()
    );
    let moving = file.exists();
    let key = if moving { LinkKey::load(file)? } else { LinkKey::generate()? };
    vault.put(name, key.file_bytes())?;
    // Answered only once it lasts: read back what was written.
    match vault.get(name)? {
        Some(bytes) if LinkKey::from_bytes(&bytes).is_ok_and(|k| k.same_as(&key)) => {}
        _ => anyhow::bail!("the {} keychain did not keep the key of VM {name}", vault.name()),
    }
    write_marker(settings, file, vault.name())?;
    if moving {
        remove_moved_file(&key, file, name);
    }
    Ok(key)
}

/// Removes a key file whose key the keychain now holds; a file with another key is left and
/// said (someone may have wired a VM with it by hand).
fn remove_moved_file(key: &LinkKey, file: &Path, name: &str) {
    let Ok(on_disk) = LinkKey::load(file) else { return };
    if on_disk.same_as(key) {
        match std::fs::remove_file(file) {
            Ok(()) => {
                tracing::info!(vm = %name, file = %file.display(), "VM key moved into the keychain")
            }
            Err(e) => {
                tracing::warn!(vm = %name, file = %file.display(), error = %e, "cannot remove a key file the keychain now holds")
            }
        }
    } else {
        tracing::warn!(vm = %name, file = %file.display(), "a key file differs from the keychain's key, which is used; remove the file");
    }
}

/// Beside where a VM's key file would be, `NAME.lima` (no secret in it) says the VM is a
/// Lima instance the agent adopted by discovery: when the instance is gone, so is its key.
fn lima_marker(file: &Path) -> PathBuf {
    file.with_extension("lima")
}

/// Most entries of the keys directory looked at for keys of vanished instances.
const MAX_KEY_ENTRIES: usize = 4096;

/// Records that the Lima instances of `settings` were adopted by discovery, and removes the
/// keys (file, keychain item, markers) of instances adopted before that are gone now and not
/// configured otherwise, so names that come and go leave nothing behind. Returns the names
/// whose keys were removed. A key that cannot be removed is said and tried again next time.
pub fn forget_vanished_lima(
    settings: &Settings,
    instances: &BTreeMap<VmName, Instance>,
    vault: impl FnOnce() -> Box<dyn Vault>,
) -> Vec<String> {
    let own_key = |name: &str| settings.vms.get(name).is_some_and(|vm| vm.key_file.is_none());
    for name in instances.keys().filter(|n| own_key(n)) {
        let m = lima_marker(&paths::key_path(&settings.state_dir, name));
        if !m.exists() && key_dirs(settings, &m).is_ok() {
            let note = b"a Lima instance adopted by discovery: its key goes when it does\n";
            if let Err(e) = paths::write_private(&m, note) {
                tracing::warn!(vm = %name, error = %format!("{e:#}"), "cannot mark an adopted Lima instance");
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(paths::keys_dir(&settings.state_dir)) else {
        return Vec::new();
    };
    let gone: Vec<String> = entries
        .flatten()
        .take(MAX_KEY_ENTRIES)
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".lima").map(str::to_owned))
        .filter(|name| VmName::is_valid(name) && !settings.vms.contains_key(name.as_str()))
        .collect();
    if gone.is_empty() {
        return gone;
    }
    let vault = vault();
    let mut removed = Vec::new();
    for name in gone {
        let file = paths::key_path(&settings.state_dir, &name);
        if marker(&file).exists()
            && let Err(e) = vault.remove(&name)
        {
            tracing::warn!(vm = %name, error = %e, "cannot remove the key of a Lima instance that is gone; tried again later");
            continue;
        }
        for path in [file.clone(), marker(&file), lima_marker(&file)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot remove"),
            }
        }
        tracing::info!(vm = %name, "the Lima instance is gone: its key is removed");
        removed.push(name);
    }
    removed
}

/// Where VM `name`'s key is now, found without creating or moving anything (`doctor`).
#[derive(Debug)]
pub enum Found {
    /// In this keychain.
    Keychain(&'static str),
    /// In this file; `keychain_said` is why the keychain was not used, when it was tried.
    File {
        /// The file.
        path: PathBuf,
        /// The keychain's answer when `key_store` let it be tried and it did not answer.
        keychain_said: Option<String>,
    },
    /// Nowhere yet (the agent makes it at its next start).
    Missing {
        /// Where it will be made.
        home: String,
    },
}

/// Looks for VM `name`'s key as [`load_key`] would, changing nothing.
pub fn find(settings: &Settings, name: &str) -> anyhow::Result<Found> {
    if let Some(path) = settings.vms.get(name).and_then(|vm| vm.key_file.as_ref()) {
        return Ok(Found::File { path: path.clone(), keychain_said: None });
    }
    let file = paths::key_path(&settings.state_dir, name);
    let mut keychain_said = None;
    if settings.key_store != KeyStore::File {
        let vault = os_vault(settings.keychain_timeout);
        match vault.get(name) {
            Ok(Some(_)) => return Ok(Found::Keychain(vault.name())),
            Ok(None) if !file.exists() => {
                return Ok(Found::Missing { home: format!("the {} keychain", vault.name()) });
            }
            Ok(None) => {}
            Err(e) if settings.key_store == KeyStore::Keychain || marker(&file).exists() => {
                return Err(anyhow::Error::from(e).context(format!(
                    "the key is in the {} keychain, which did not answer",
                    vault.name()
                )));
            }
            Err(e) => keychain_said = Some(e.to_string()),
        }
    }
    if file.exists() {
        Ok(Found::File { path: file, keychain_said })
    } else {
        Ok(Found::Missing { home: file.display().to_string() })
    }
}

/// Writes VM `name`'s key to `out` (mode 0600, or an owner-only DACL), for wiring a VM by
/// hand: `finch-host-agent key-export NAME --out FILE`.
pub fn export(settings: &Settings, name: &str, out: &Path) -> anyhow::Result<KeyHome> {
    let (key, home) = load_key(settings, name)?;
    paths::write_private(out, key.file_bytes())?;
    Ok(home)
}

// The file side needs a private state directory, which Wine's ACLs do not give in its temp
// directory (so is the file key test below); the Windows vault itself
// is tested against Wine's Credential Manager in `source/keychain/wincred.rs`.
#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::settings::{Layer, Overrides};
    use crate::source::keychain::KeychainError;
    use zeroize::Zeroizing;

    #[test]
    fn a_file_key_is_created_private_in_a_private_state_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let o = Overrides {
            config: Some(dir.path().join("none.toml")),
            vms: vec!["vm1=unix:///x".parse().unwrap()],
            layer: Layer {
                state_dir: Some(state.clone()),
                key_store: Some(KeyStore::File),
                ..Layer::default()
            },
        };
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        let s = Settings::load(&o).unwrap();
        load_key(&s, "vm1").unwrap();
        let path = paths::key_path(&state, "vm1");
        assert_eq!(s.key_file("vm1"), Some(path.clone()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = paths::private_dir(&state).unwrap_err().to_string();
        assert!(e.contains("open to other users"), "{e}");
    }

    /// A keychain in memory; `down` makes every call fail as an unreachable one would.
    #[derive(Default, Clone)]
    struct Memory {
        items: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
        down: bool,
        forgetful: bool,
    }

    impl Vault for Memory {
        fn name(&self) -> &'static str {
            "memory"
        }
        fn get(&self, vm: &str) -> Result<Option<Zeroizing<Vec<u8>>>, KeychainError> {
            if self.down {
                return Err(KeychainError::KeychainLocked { store: "memory" });
            }
            Ok(self.items.lock().unwrap().get(vm).cloned().map(Zeroizing::new))
        }
        fn put(&self, vm: &str, key: &[u8]) -> Result<(), KeychainError> {
            if self.down {
                return Err(KeychainError::KeychainLocked { store: "memory" });
            }
            if !self.forgetful {
                self.items.lock().unwrap().insert(vm.to_owned(), key.to_vec());
            }
            Ok(())
        }
        fn remove(&self, vm: &str) -> Result<(), KeychainError> {
            if self.down {
                return Err(KeychainError::KeychainLocked { store: "memory" });
            }
            self.items.lock().unwrap().remove(vm);
            Ok(())
        }
    }

    fn settings(dir: &Path, store: &str) -> Settings {
        let file = dir.join("host-agent.toml");
        std::fs::write(
            &file,
            format!(
                "state_dir = {}\nkey_store = \"{store}\"\n[vm.a]\nendpoint = \"tcp://127.0.0.1:1\"\n",
                crate::settings::toml_string(&dir.join("state").display().to_string())
            ),
        )
        .unwrap();
        Settings::load(&Overrides { config: Some(file), ..Default::default() }).unwrap()
    }

    /// Keys of Lima instances adopted by discovery go when the instance does, from the
    /// keychain and from files; keys of VMs configured otherwise stay.
    #[test]
    fn keys_of_vanished_lima_instances_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let lima = dir.path().join("lima");
        for vm in ["vm1", "vm2", "a"] {
            std::fs::create_dir_all(lima.join(vm)).unwrap();
            std::fs::write(lima.join(vm).join("lima.yaml"), "").unwrap();
        }
        let file = dir.path().join("host-agent.toml");
        let load = |config: &str| {
            std::fs::write(&file, config).unwrap();
            let mut s =
                Settings::load(&Overrides { config: Some(file.clone()), ..Default::default() })
                    .unwrap();
            let adopted = crate::lima::adopt(&mut s, Path::new("/nonexistent"));
            (s, adopted.instances)
        };
        let state = crate::settings::toml_string(&dir.path().join("state").display().to_string());
        let lima_table = format!(
            "[lima]\nhome = {}\ninstances = [\"*\"]\n",
            crate::settings::toml_string(&lima.display().to_string())
        );
        let both = format!("state_dir = {state}\nkey_store = \"auto\"\n{lima_table}");
        let (s, found) = load(&both);
        let vault = Memory::default();
        for vm in ["vm1", "vm2", "a"] {
            let v = vault.clone();
            load_key_with(&s, vm, move || Box::new(v)).unwrap();
        }
        let v = vault.clone();
        assert!(forget_vanished_lima(&s, &found, move || Box::new(v)).is_empty());
        // vm1 is deleted; `a` is no longer an instance but is configured by hand.
        std::fs::remove_dir_all(lima.join("vm1")).unwrap();
        std::fs::remove_dir_all(lima.join("a")).unwrap();
        let (s, found) = load(&format!("{both}[vm.a]\nendpoint = \"tcp://127.0.0.1:1\"\n"));
        let v = vault.clone();
        assert_eq!(forget_vanished_lima(&s, &found, move || Box::new(v)), ["vm1"]);
        let kept: Vec<String> = vault.items.lock().unwrap().keys().cloned().collect();
        assert_eq!(kept, ["a", "vm2"]);
        let marker = paths::key_path(&s.state_dir, "vm1").with_extension("in-keychain");
        assert!(!marker.exists() && !marker.with_extension("lima").exists());
        // A keychain that does not answer keeps the marker, to try again.
        std::fs::remove_dir_all(lima.join("vm2")).unwrap();
        let (s, found) = load(&format!("{both}[vm.a]\nendpoint = \"tcp://127.0.0.1:1\"\n"));
        let down = Memory { down: true, ..vault.clone() };
        assert!(forget_vanished_lima(&s, &found, move || Box::new(down)).is_empty());
        let v = vault.clone();
        assert_eq!(forget_vanished_lima(&s, &found, move || Box::new(v)), ["vm2"]);
    }

    #[test]
    fn keys_go_to_the_keychain_and_a_key_file_moves_in() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), "file");
        let (from_file, home) = load_key_with(&s, "a", || Box::new(Memory::default())).unwrap();
        let file = paths::key_path(&s.state_dir, "a");
        assert_eq!(home, KeyHome::File(file.clone()));

        let s = settings(dir.path(), "auto");
        let vault = Memory::default();
        let v = vault.clone();
        let (moved, home) = load_key_with(&s, "a", move || Box::new(v)).unwrap();
        assert_eq!(home, KeyHome::Keychain("memory"));
        assert!(moved.same_as(&from_file), "the file's key was not kept");
        assert!(!file.exists(), "the moved key file is still there");
        let v = vault.clone();
        let (again, _) = load_key_with(&s, "a", move || Box::new(v)).unwrap();
        assert!(again.same_as(&from_file));
        assert!(!file.exists(), "a second load wrote a file");
    }

    #[test]
    fn auto_falls_back_to_files_and_keychain_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let down = Memory { down: true, ..Memory::default() };
        let s = settings(dir.path(), "auto");
        let d = down.clone();
        let (_, home) = load_key_with(&s, "a", move || Box::new(d)).unwrap();
        assert_eq!(home, KeyHome::File(paths::key_path(&s.state_dir, "a")));

        let s = settings(dir.path(), "keychain");
        let err = load_key_with(&s, "a", move || Box::new(down)).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("key_store = \"keychain\"") && text.contains("locked"), "{text}");
    }

    #[test]
    fn a_keychain_that_does_not_keep_the_key_is_an_error_and_the_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), "file");
        load_key_with(&s, "a", || Box::new(Memory::default())).unwrap();
        let s = settings(dir.path(), "keychain");
        let forgetful = Memory { forgetful: true, ..Memory::default() };
        let err = load_key_with(&s, "a", move || Box::new(forgetful)).unwrap_err();
        assert!(format!("{err:#}").contains("did not keep the key of VM a"), "{err:#}");
        assert!(paths::key_path(&s.state_dir, "a").exists(), "the only copy was removed");
    }

    #[test]
    fn a_locked_keychain_never_makes_a_new_key_for_a_vm_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), "auto");
        let vault = Memory::default();
        let v = vault.clone();
        let (key, _) = load_key_with(&s, "a", move || Box::new(v)).unwrap();
        let file = paths::key_path(&s.state_dir, "a");
        assert!(!file.exists() && marker(&file).exists());
        // Locked today: an error, not a new file key.
        let down = Memory { down: true, ..vault.clone() };
        let err = load_key_with(&s, "a", move || Box::new(down)).unwrap_err();
        assert!(format!("{err:#}").contains("did not answer (unlock it)"), "{err:#}");
        assert!(!file.exists(), "a new key file was made");
        // file mode has no copy: it says how to make one instead of making another key.
        let f = settings(dir.path(), "file");
        let err = load_key_with(&f, "a", || Box::new(Memory::default())).unwrap_err();
        assert!(format!("{err:#}").contains("key-export a --key-store auto"), "{err:#}");
        // A keychain that lost the item: an error too.
        let err = load_key_with(&s, "a", || Box::new(Memory::default())).unwrap_err();
        assert!(format!("{err:#}").contains("has lost its key"), "{err:#}");
        // Unlocked again: the same key.
        let (again, _) = load_key_with(&s, "a", move || Box::new(vault)).unwrap();
        assert!(again.same_as(&key));
    }

    #[test]
    fn export_writes_a_private_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), "file");
        let out = dir.path().join("link.key");
        export(&s, "a", &out).unwrap();
        let (key, _) = load_key(&s, "a").unwrap();
        assert!(LinkKey::load(&out).unwrap().same_as(&key), "exported another key");
    }
}
