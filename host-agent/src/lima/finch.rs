//! Finch's own Lima configs: the template `finch vm init` makes its instance from, and that
//! instance's `lima.yaml`.
//!
//! Finch rewrites `_config/default.yaml` whole at `vm init`, right before `limactl start`,
//! and `_config/override.yaml` at every `vm start` (runfinch/finch
//! `pkg/config/lima_config_applier.go`, `cmd/finch/virtual_machine_init.go`); its macOS
//! installer deletes both and the instance (`installer-builder/darwin/scripts/postinstall`).
//! It never writes the template (`<install>/os/finch.yaml`, `pkg/path` `BaseYamlFilePath`),
//! nor an instance's `lima.yaml` once Lima has made it from the template. So with `[lima]
//! template` set, the fragment goes into those two, and so do `harden`'s mount changes (Lima
//! merges mounts by mount point and lets a later file only change `writable`, so a mount can
//! be taken out only where it is written: `pkg/limayaml/defaults.go` `FillDefault`).
//! `vm init` then makes an instance that has the bridge at its first boot; an upgrade, which
//! replaces the template, is wired again by the agent within seconds.
//!
//! A file the agent changes while it is not wired keeps its bytes beside it,
//! `FILE.finch-bridge-orig` ([`crate::kept`]); `setup finch --remove` puts them back. An instance Lima made
//! from the wired template has no such copy: unwiring takes the fragment out and gives it
//! the template's original mounts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use yaml_rust2::Yaml;
use yaml_rust2::yaml::Hash;

use super::*;
use crate::kept::{Kept, Original};

/// Where Finch keeps its template, from its Lima home (`<install>/lima/data` →
/// `<install>/os/finch.yaml`; runfinch/finch `pkg/path/finch_remote.go`).
pub fn template_beside(lima_home: &Path) -> Option<PathBuf> {
    let lima = lima_home.parent()?;
    (lima.file_name()? == "lima" && lima_home.file_name()? == "data")
        .then(|| lima.parent().map(|root| root.join("os/finch.yaml")))
        .flatten()
}

/// What wired means for a Finch config: the fragment's entries, and with `harden` the
/// mounts changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    /// Finch's install directory (the template's `os/`'s parent): mounts of it become
    /// read-only when hardened (it holds `finch-cred/credserver`, which the host runs).
    pub finch_root: PathBuf,
    /// The user's home, for `~`.
    pub home: PathBuf,
    /// `Some(shares)` when hardened: no mount that holds the home; `shares` mounted writable.
    pub harden: Option<Vec<PathBuf>>,
}

impl Wiring {
    /// The wiring `lima` asks for, or `None` when it names no template.
    pub fn of(lima: &LimaSettings, home: &Path) -> Option<Wiring> {
        let template = lima.template.as_ref()?;
        let finch_root = template.parent()?.parent()?.to_path_buf();
        Some(Wiring {
            finch_root,
            home: home.to_path_buf(),
            harden: lima.harden.then(|| lima.shares.clone()),
        })
    }

    /// `original` wired.
    fn apply(&self, original: &Hash) -> anyhow::Result<Hash> {
        let mut doc = original.clone();
        apply_fragment(&mut doc, true)?;
        let Some(shares) = &self.harden else { return Ok(doc) };
        let k = key("mounts");
        let mut mounts = match doc.get(&k) {
            None | Some(Yaml::Null) => Vec::new(),
            Some(Yaml::Array(a)) => a.clone(),
            Some(_) => anyhow::bail!("`mounts` is not a list"),
        };
        mounts.retain(|m| !self.location(m).is_some_and(|l| self.home.starts_with(l)));
        for m in &mut mounts {
            if self.location(m).is_some_and(|l| l.starts_with(&self.finch_root))
                && let Yaml::Hash(h) = m
            {
                set(h, "writable", Yaml::Boolean(false));
            }
        }
        for share in shares {
            anyhow::ensure!(
                !self.home.starts_with(share),
                "the share {} holds the home: name directories inside it",
                share.display()
            );
            let text = share.display().to_string();
            match mounts.iter_mut().find(|m| self.location(m).as_deref() == Some(share)) {
                Some(Yaml::Hash(h)) => set(h, "writable", Yaml::Boolean(true)),
                _ => {
                    let mut h = Hash::new();
                    h.insert(key("location"), Yaml::String(text));
                    h.insert(key("writable"), Yaml::Boolean(true));
                    mounts.push(Yaml::Hash(h));
                }
            }
        }
        if mounts.is_empty() {
            doc.remove(&k);
        } else {
            set(&mut doc, "mounts", Yaml::Array(mounts));
        }
        Ok(doc)
    }

    /// A mount's location on the host, when it is `~`, under `~/` or absolute (template
    /// fields such as `{{.Dir}}` are left alone: the fragment's own mount is one).
    fn location(&self, mount: &Yaml) -> Option<PathBuf> {
        let l = text_field(mount, "location")?;
        if l.contains("{{") {
            return None;
        }
        let path = match l.strip_prefix('~') {
            Some("") => self.home.clone(),
            Some(tail) => self.home.join(tail.strip_prefix('/')?),
            None => PathBuf::from(l),
        };
        path.is_absolute().then(|| clean(&path))
    }
}

/// Sets `h[name]`, in its place when it is there (an insert would move it last).
fn set(h: &mut Hash, name: &str, value: Yaml) {
    match h.get_mut(&key(name)) {
        Some(slot) => *slot = value,
        None => {
            h.insert(key(name), value);
        }
    }
}

/// What [`wire`] did to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wired {
    /// It was as asked.
    Unchanged,
    /// It was written.
    Written,
    /// There is no such file.
    Missing,
}

/// A Finch config as the agent found it.
struct Found {
    text: String,
    doc: Hash,
}

fn read(path: &Path) -> anyhow::Result<Option<Found>> {
    let text = match read_text(path)? {
        Some(t) => t,
        None => return Ok(None),
    };
    let doc = mapping(parse_yaml(&text).with_context(|| format!("cannot use {}", path.display()))?)
        .with_context(|| format!("cannot use {}", path.display()))?;
    Ok(Some(Found { text, doc }))
}

/// Where a wired Lima file keeps its bytes as they were.
fn kept(path: &Path) -> Kept {
    Kept::beside(path, MAX_YAML)
}

/// The file's text before it was wired, and whether that is the file itself (it is not
/// wired now). `template_original` gives an instance made from the wired template its mounts.
fn original_of(
    path: &Path,
    found: &Found,
    template_original: Option<&Hash>,
) -> anyhow::Result<(String, bool)> {
    if !has_fragment(&Yaml::Hash(found.doc.clone())) {
        return Ok((found.text.clone(), true));
    }
    if let Some(Original::Bytes(bytes)) = kept(path).read()? {
        let text = String::from_utf8(bytes)
            .with_context(|| format!("{} is not UTF-8", kept(path).path().display()))?;
        return Ok((text, false));
    }
    let mut doc = found.doc.clone();
    apply_fragment(&mut doc, false)?;
    if let Some(mounts) = template_original.and_then(|t| t.get(&key("mounts"))) {
        set(&mut doc, "mounts", mounts.clone());
    } else if template_original.is_some() {
        doc.remove(&key("mounts"));
    }
    Ok((emit(doc, "")?, false))
}

/// The original of the Finch config at `path` as a mapping (the template's, for the
/// instances made from it); `None` when there is no such file.
pub fn original(path: &Path) -> anyhow::Result<Option<Hash>> {
    let Some(found) = read(path)? else { return Ok(None) };
    let (text, _) = original_of(path, &found, None)?;
    mapping(parse_yaml(&text)?).map(Some)
}

/// Brings the Finch config at `path` to `want` (`None`: as it was before it was wired).
/// Writes atomically, keeping the file's mode; the first change to a file that is not wired
/// keeps its bytes in `FILE.finch-bridge-orig`, and unwiring puts them back and removes it.
pub fn wire(
    path: &Path,
    want: Option<&Wiring>,
    template_original: Option<&Hash>,
) -> anyhow::Result<Wired> {
    let Some(found) = read(path)? else { return Ok(Wired::Missing) };
    let (original, fresh) = original_of(path, &found, template_original)?;
    let keep = kept(path);
    let mode = file_mode(path);
    let Some(want) = want else {
        if fresh {
            return Ok(Wired::Unchanged);
        }
        put_bytes(path, original.as_bytes(), mode)?;
        keep.forget()?;
        return Ok(Wired::Written);
    };
    let original_doc = mapping(parse_yaml(&original)?)
        .with_context(|| format!("cannot use the original of {}", path.display()))?;
    let wired =
        want.apply(&original_doc).with_context(|| format!("cannot wire {}", path.display()))?;
    // Key order aside (a list the fragment alone made comes back last): the same mapping.
    let same =
        wired.len() == found.doc.len() && wired.iter().all(|(k, v)| found.doc.get(k) == Some(v));
    if same {
        return Ok(Wired::Unchanged);
    }
    if fresh || keep.read()?.is_none() {
        keep.keep(&Original::Bytes(original.clone().into_bytes()), mode)?;
    }
    let header = format!(
        "# Wired by finch-host-agent (the finch credential bridge); the file as it was is {}\n",
        keep.path().display()
    );
    put_bytes(path, emit(wired, &header)?.as_bytes(), mode)?;
    Ok(Wired::Written)
}

fn put_bytes(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    finch_shared::private::write_atomic(path, bytes, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(unix)]
fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn file_mode(_: &Path) -> u32 {
    0o644
}

/// Whether instance `dir`'s Lima host agent started before its `lima.yaml` last changed:
/// the VM then runs without what the file says now (Lima reads it at start; `ha.pid` is
/// written by the host agent as it starts).
pub fn started_before_its_config(dir: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(&dir.join("ha.pid")), modified(&dir.join("lima.yaml"))) {
        (Some(started), Some(config)) => started < config,
        _ => false,
    }
}

/// Lima's logs of the VM's console, in the instance directory (lima-vm/lima
/// `pkg/limatype/filenames`: QEMU's serial, its PCI serial, VZ's virtio console); each is
/// started anew at every start of the VM.
pub const SERIAL_LOGS: [&str; 3] = ["serial.log", "serialp.log", "serialv.log"];

/// How much of a serial log's end is read.
const SERIAL_TAIL: u64 = 256 * 1024;

/// What the guest side last said on the VM's console since the kernel last booted (the
/// readiness probe's reason, on the kernel's log at error level), from Lima's serial logs in
/// instance `dir`: the text from `finch-credential-bridge:` on, at most 300 characters. The
/// VM writes these logs: the caller shows the text escaped, as the VM's words.
pub fn guest_says(dir: &Path) -> Option<String> {
    const MARK: &str = "finch-credential-bridge:";
    let mut said = None;
    for name in SERIAL_LOGS {
        let Ok(mut file) = std::fs::File::open(dir.join(name)) else { continue };
        let len = file.metadata().map_or(0, |m| m.len());
        let mut tail = Vec::new();
        use std::io::Seek;
        if file.seek(std::io::SeekFrom::Start(len.saturating_sub(SERIAL_TAIL))).is_err()
            || file.take(SERIAL_TAIL).read_to_end(&mut tail).is_err()
        {
            continue;
        }
        let text = String::from_utf8_lossy(&tail);
        let boot = text.rfind("Linux version").unwrap_or(0);
        if let Some(line) = text[boot..].lines().rev().find(|l| l.contains(MARK)) {
            let from = line.find(MARK).unwrap_or(0);
            said = Some(line[from..].chars().take(300).collect());
        }
    }
    said
}

/// Wires (`want`), or unwires (`None`), Finch's `template` and the `lima.yaml` of each of
/// `instances`: each file with what was done to it. The template's original is read first,
/// for the instances Lima made from it.
pub fn wire_finch(
    template: &Path,
    instances: &BTreeMap<VmName, Instance>,
    want: Option<&Wiring>,
) -> Vec<(PathBuf, anyhow::Result<Wired>)> {
    let template_original = original(template).ok().flatten();
    let mut out = vec![(template.to_path_buf(), wire(template, want, None))];
    for instance in instances.values() {
        let path = instance.dir.join("lima.yaml");
        let done = wire(&path, want, template_original.as_ref());
        out.push((path, done));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finch's template as its Makefile builds it, cut down: the home and Finch's own
    /// directories mounted writable, a provision script and a forward of its own.
    const TEMPLATE: &str = "# Finch's template\nvmType: qemu\nmounts:\n  - location: \"~\"\n    writable: true\n  - location: /tmp/lima\n    writable: true\n  - location: ROOT/finch-cred\n    writable: true\nprovision:\n  - mode: user\n    script: |\n      sudo cp ROOT/finch-cred/docker-credential-finchhost /usr/bin/\nportForwards:\n  - guestSocket: /run/finch.sock\n    hostSocket: \"{{.Dir}}/sock/finch.sock\"\n";

    struct Install {
        _t: tempfile::TempDir,
        root: PathBuf,
        home: PathBuf,
        template: PathBuf,
    }

    fn install() -> Install {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("Finch");
        let home = t.path().join("Users/me");
        std::fs::create_dir_all(root.join("os")).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let template = root.join("os/finch.yaml");
        std::fs::write(&template, TEMPLATE.replace("ROOT", &root.display().to_string())).unwrap();
        Install { _t: t, root, home, template }
    }

    fn wiring(i: &Install, harden: Option<Vec<PathBuf>>) -> Wiring {
        Wiring { finch_root: i.root.clone(), home: i.home.clone(), harden }
    }

    fn doc(path: &Path) -> Yaml {
        read_yaml(path).unwrap().unwrap()
    }

    /// (location, writable) of each mount in `path`.
    fn mounts(path: &Path) -> Vec<(String, bool)> {
        let doc = doc(path);
        field(&doc, "mounts")
            .and_then(Yaml::as_vec)
            .map(|v| {
                v.iter()
                    .map(|m| {
                        let writable = field(m, "writable").and_then(Yaml::as_bool);
                        (text_field(m, "location").unwrap().to_owned(), writable == Some(true))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_template_is_found_where_finch_installs_it() {
        let found = template_beside(Path::new("/Applications/Finch/lima/data"));
        assert_eq!(found, Some(PathBuf::from("/Applications/Finch/os/finch.yaml")));
        assert_eq!(template_beside(Path::new("/Users/me/.lima")), None);
        assert_eq!(template_beside(Path::new("/")), None);
    }

    #[test]
    fn wiring_keeps_the_original_and_unwiring_restores_it_byte_for_byte() {
        let i = install();
        let before = std::fs::read(&i.template).unwrap();
        let w = wiring(&i, None);
        assert_eq!(wire(&i.template, Some(&w), None).unwrap(), Wired::Written);
        assert!(has_fragment(&doc(&i.template)));
        assert_eq!(std::fs::read(kept(&i.template).path()).unwrap(), before);
        // Finch's own entries stay, ours are added once.
        let text = std::fs::read_to_string(&i.template).unwrap();
        assert!(text.contains("/run/finch.sock") && text.contains("finch-cred"), "{text}");
        assert_eq!(wire(&i.template, Some(&w), None).unwrap(), Wired::Unchanged);
        assert_eq!(wire(&i.template, None, None).unwrap(), Wired::Written);
        assert_eq!(std::fs::read(&i.template).unwrap(), before);
        assert!(!kept(&i.template).path().exists());
        assert_eq!(wire(&i.template, None, None).unwrap(), Wired::Unchanged);
        assert_eq!(wire(&i.root.join("os/none.yaml"), Some(&w), None).unwrap(), Wired::Missing);
    }

    #[test]
    fn an_upgrade_that_replaces_the_template_is_wired_again_and_its_bytes_kept() {
        let i = install();
        let w = wiring(&i, None);
        wire(&i.template, Some(&w), None).unwrap();
        let upgraded = format!("# Finch 1.19\n{}", TEMPLATE.replace("ROOT", "/x"));
        std::fs::write(&i.template, &upgraded).unwrap();
        assert_eq!(wire(&i.template, Some(&w), None).unwrap(), Wired::Written);
        assert!(has_fragment(&doc(&i.template)));
        assert_eq!(std::fs::read_to_string(kept(&i.template).path()).unwrap(), upgraded);
    }

    #[test]
    fn hardening_drops_the_home_mount_makes_finchs_files_read_only_and_adds_the_shares() {
        let i = install();
        let src = i.home.join("src");
        let w = wiring(&i, Some(vec![src.clone()]));
        wire(&i.template, Some(&w), None).unwrap();
        let cred = format!("{}/finch-cred", i.root.display()); // as the template spells it
        assert_eq!(
            mounts(&i.template),
            vec![
                ("/tmp/lima".to_owned(), true),
                (cred.clone(), false),
                ("{{.Dir}}/finch-bridge".to_owned(), false),
                (src.display().to_string(), true),
            ]
        );
        // Un-hardened again: from the original, not from the hardened file.
        wire(&i.template, Some(&wiring(&i, None)), None).unwrap();
        assert_eq!(mounts(&i.template)[0], ("~".to_owned(), true));
        // A share that holds the home is refused, and the file is left as it was.
        let before = std::fs::read(&i.template).unwrap();
        let bad = wiring(&i, Some(vec![i.home.parent().unwrap().to_path_buf()]));
        assert!(wire(&i.template, Some(&bad), None).is_err());
        assert_eq!(std::fs::read(&i.template).unwrap(), before);
    }

    #[test]
    fn an_instance_made_from_the_wired_template_is_wired_and_unwired_with_it() {
        let i = install();
        let w = wiring(&i, Some(vec![]));
        wire(&i.template, Some(&w), None).unwrap();
        // `limactl start --name finch TEMPLATE --set .ssh.overVsock=false` copies it.
        let inst = i.root.join("lima/data/finch");
        std::fs::create_dir_all(&inst).unwrap();
        let mut text = std::fs::read_to_string(&i.template).unwrap();
        text.push_str("ssh:\n  overVsock: false\n");
        std::fs::write(inst.join("lima.yaml"), &text).unwrap();
        let instances = BTreeMap::from([(
            "finch".parse::<VmName>().unwrap(),
            Instance { name: "finch".parse().unwrap(), dir: inst.clone() },
        )]);
        let done: Vec<_> = wire_finch(&i.template, &instances, Some(&w))
            .into_iter()
            .map(|d| d.1.unwrap())
            .collect();
        assert_eq!(done, [Wired::Unchanged, Wired::Unchanged]);
        // Unwired: the fragment out, the template's original mounts back, Lima's own edit kept.
        wire_finch(&i.template, &instances, None).into_iter().for_each(|d| {
            d.1.unwrap();
        });
        let y = doc(&inst.join("lima.yaml"));
        assert!(!has_fragment(&y));
        assert_eq!(mounts(&inst.join("lima.yaml"))[0], ("~".to_owned(), true));
        assert_eq!(
            field(&y, "ssh").and_then(|s| field(s, "overVsock")),
            Some(&Yaml::Boolean(false))
        );
        assert!(!kept(&inst.join("lima.yaml")).path().exists());
    }

    #[test]
    fn the_guest_sides_last_words_on_the_console_are_read_from_the_last_boot_only() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(guest_says(t.path()), None);
        let old =
            "[    0.000000] Linux version 6.1\n[   9.1] finch-credential-bridge: old reason\n";
        std::fs::write(t.path().join("serialv.log"), old).unwrap();
        assert_eq!(guest_says(t.path()).as_deref(), Some("finch-credential-bridge: old reason"));
        let rebooted = format!("{old}[    0.000000] Linux version 6.1\nlogin:\n");
        std::fs::write(t.path().join("serialv.log"), rebooted).unwrap();
        assert_eq!(guest_says(t.path()), None, "said before the last boot");
        // A long line is cut; a huge log is read at its end only.
        let mut big = "x".repeat(1 << 20);
        big.push_str(&format!("\nfinch-credential-bridge: {}\n", "y".repeat(1000)));
        std::fs::write(t.path().join("serial.log"), big).unwrap();
        assert_eq!(guest_says(t.path()).map(|s| s.chars().count()), Some(300));
    }

    #[test]
    fn a_vm_started_before_its_config_changed_is_told_apart() {
        let t = tempfile::tempdir().unwrap();
        assert!(!started_before_its_config(t.path()), "not running");
        std::fs::write(t.path().join("lima.yaml"), "").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(t.path().join("ha.pid"), "1").unwrap();
        assert!(!started_before_its_config(t.path()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(t.path().join("lima.yaml"), "cpus: 2\n").unwrap();
        assert!(started_before_its_config(t.path()));
    }
}
