//! Lima instances served without wiring by hand, and `setup finch`.
//!
//! With a `[lima]` table in the config the agent looks for instances under `home` (a
//! directory holding `NAME/lima.yaml`, as Lima lays out `$LIMA_HOME`); for each one that
//! `instances` names (or all, with `"*"`) it
//!
//! * fills `NAME/finch-bridge/` (the guest binaries for the instance's architecture, from
//!   `guest_dir/linux-ARCH/`, `install.sh`, `uninstall.sh`, `SHA256SUMS` and the VM's key), which
//!   the fragment (`lima/finch-credential-bridge.yaml`) mounts read-only and installs at boot;
//! * dials `unix://NAME/sock/finch-guest-agent.sock`, the host end of the fragment's socket
//!   forward, and stops dialing when the instance is deleted.
//!
//! Lima merges `$LIMA_HOME/_config/default.yaml` into every instance, concatenating `mounts`,
//! `provision`, `portForwards` and `probes` (lima-vm/lima `pkg/limayaml/load.go` and
//! `defaults.go` `FillDefault`). Finch writes `_config/override.yaml` at every `finch vm
//! start` and `default.yaml` only at `finch vm init` (runfinch/finch
//! `cmd/finch/virtual_machine_start.go`, `virtual_machine_init.go`), so the fragment goes in
//! `default.yaml`, and with `keep_fragment = true` the agent puts it back when `vm init` has
//! rewritten the file.
//!
//! Modules: this file (discovery and adoption), `yaml` (Lima's files, bounded), `bundle`
//! (`finch-bridge/`), `fragment` (`default.yaml` and the config's `[lima]` table).
//!
//! Every YAML file here is read bounded ([`MAX_YAML`]) and without aliases (an alias is
//! expanded by copying, so a small file could expand to any size).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use finch_shared::endpoint::Endpoint;

use crate::settings::{LimaSettings, Settings, VmName, VmSettings};

mod bundle;
mod finch;
mod fragment;
mod yaml;

pub use bundle::*;
pub use finch::*;
pub use fragment::*;
pub use yaml::*;

/// The instance's bundle directory, mounted read-only at `/mnt/finch-bridge`.
pub const BUNDLE_DIR: &str = "finch-bridge";
/// The host end of the link's socket forward, under the instance directory.
pub const LINK_SOCKET: &str = "sock/finch-guest-agent.sock";
/// Largest YAML file read (Lima's own templates are a few KiB).
pub const MAX_YAML: u64 = 1024 * 1024;
/// The fragment `setup finch` merges into `_config/default.yaml`.
pub const FRAGMENT: &str = include_str!("../../../lima/finch-credential-bridge.yaml");
/// The guest scripts a bundle carries.
const INSTALL_SH: &str = include_str!("../../../lima/guest/install.sh");
pub const UNINSTALL_SH: &str = include_str!("../../../lima/guest/uninstall.sh");
/// The guest binaries a bundle carries, from `guest_dir/linux-ARCH/`.
pub const GUEST_BINARIES: [&str; 2] = ["finch-guest-agent", "docker-credential-finchhost"];
/// Finch's Lima home on macOS (runfinch/finch `pkg/path`: `<install>/lima/data`).
pub const FINCH_LIMA_HOME_MACOS: &str = "/Applications/Finch/lima/data";

/// A Lima instance found under the home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its name (the directory's).
    pub name: VmName,
    /// Its directory.
    pub dir: PathBuf,
}

impl Instance {
    /// Where the agent dials it.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.dir.join(LINK_SOCKET))
    }

    /// Its bundle directory.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join(BUNDLE_DIR)
    }
}

/// Most instances served from one Lima home; more are left out (and said), so a home that
/// anything can write into (a VM's writable `~` mount reaches `~/.lima`) cannot grow the
/// agent's links, bundles and state without bound.
pub const MAX_INSTANCES: usize = 64;

/// Most directory entries looked at in one scan of a Lima home (it is rescanned every 2 s).
pub const MAX_SCANNED: usize = 4096;

/// The instances under `lima.home` that `lima.instances` names, by name, and how many were
/// left out by [`MAX_INSTANCES`] or [`MAX_SCANNED`]. A missing home has none; names Lima
/// reserves (`_config`, `_networks`, …) and names that are not usable VM names are skipped.
///
/// An instance named in `instances` is looked up by its name, never by a scan, so no number
/// of other entries in the home can push it out. With `"*"` the home is scanned, bounded;
/// past the bound the first names in order are kept, so a rescan keeps the same ones. Only
/// a real directory holding a real `lima.yaml` is an instance: a symbolic link in either
/// place is not, so the agent never writes a bundle or dials a socket outside the home
/// through one.
pub fn discover(lima: &LimaSettings) -> (BTreeMap<VmName, Instance>, usize) {
    let mut out = BTreeMap::new();
    let mut left_out = 0;
    for name in lima.instances.iter().filter_map(|n| instance_name(n)) {
        let dir = lima.home.join(name.as_str());
        if is_instance(&dir) {
            out.insert(name.clone(), Instance { name, dir });
        }
    }
    if !lima.instances.iter().any(|i| i == "*") {
        return (out, 0);
    }
    let Ok(entries) = std::fs::read_dir(&lima.home) else { return (out, 0) };
    let mut found = 0;
    for (seen, entry) in entries.flatten().enumerate() {
        if seen >= MAX_SCANNED {
            left_out += 1;
            continue;
        }
        let Some(name) = entry.file_name().to_str().and_then(instance_name) else { continue };
        if out.contains_key(&name) {
            continue;
        }
        let dir = entry.path();
        if is_instance(&dir) {
            found += 1;
            out.insert(name.clone(), Instance { name, dir });
            if found > MAX_INSTANCES {
                // Drop the last name found by the scan (never a named one).
                let last = out
                    .keys()
                    .rev()
                    .find(|n| !lima.instances.iter().any(|i| i == n.as_str()))
                    .cloned();
                if let Some(last) = last {
                    out.remove(&last);
                }
                found -= 1;
                left_out += 1;
            }
        }
    }
    (out, left_out)
}

/// `name` as an instance's name: not one Lima reserves, and a usable VM name.
fn instance_name(name: &str) -> Option<VmName> {
    if name.starts_with('_') { None } else { name.parse().ok() }
}

/// Whether `dir` is a Lima instance: a directory (not a link to one) with a `lima.yaml` file
/// (not a link to one).
fn is_instance(dir: &Path) -> bool {
    let real_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_dir());
    real_dir && std::fs::symlink_metadata(dir.join("lima.yaml")).is_ok_and(|m| m.is_file())
}

/// Marker in the state directory: a VM could once write the Lima home (see
/// [`home_writable_from`]). While it is there, `"*"` adopts no instance; the user removes it
/// once no VM mounts the home writable.
pub const HOME_WRITABLE_MARKER: &str = "lima-home-writable";

/// The first of `instances` whose Lima config mounts `lima.home` (or a directory around it)
/// writable, with that mount's location: a process in that VM can then make directories
/// there that look like instances. `user_home` expands `~`. Instances whose config cannot be
/// read are skipped (Lima cannot start them either).
pub fn home_writable_from(
    lima: &LimaSettings,
    instances: &BTreeMap<VmName, Instance>,
    user_home: &Path,
) -> Option<(VmName, PathBuf)> {
    let home = clean(&lima.home);
    for (name, instance) in instances {
        let Ok(yaml) = LimaYaml::read(lima, instance) else { continue };
        for m in yaml.mounts().into_iter().filter(|m| m.writable) {
            let Some(location) = expand_location(&m.location, instance, user_home) else {
                continue;
            };
            if reaches(&location, &home) {
                return Some((name.clone(), location));
            }
        }
    }
    None
}

/// A Lima home that a VM can write, so `"*"` adopts nothing from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimaUntrusted {
    /// Which VM's mount reaches the home, and where.
    pub reason: String,
    /// Whether this was read from the marker (seen before) rather than found now.
    pub from_marker: bool,
}

/// What [`adopt`] found.
#[derive(Debug, Clone, Default)]
pub struct Adopted {
    /// The instances served (each is also in the settings' VMs).
    pub instances: BTreeMap<VmName, Instance>,
    /// Why `"*"` adopted no instance: a VM can write the Lima home.
    pub untrusted: Option<LimaUntrusted>,
    /// Instances or entries past [`MAX_INSTANCES`] or [`MAX_SCANNED`], not served.
    pub left_out: usize,
}

/// Finds the instances `settings.lima` serves and adds each to `settings.vms`, with the
/// policy and key of its endpoint-less `[vm.NAME]` table if there is one; an endpoint
/// given anywhere else (the file, `attach`, `--vm`) wins. Reads the Lima home and the
/// marker in the state directory; `user_home` expands `~` in mounts.
pub fn adopt(settings: &mut Settings, user_home: &Path) -> Adopted {
    let Some(lima) = &settings.lima else { return Adopted::default() };
    let (mut instances, left_out) = discover(lima);
    let untrusted = trust(lima, &instances, &settings.state_dir, user_home);
    if untrusted.is_some() {
        instances.retain(|name, _| lima.instances.iter().any(|i| i == name.as_str()));
    }
    for (name, instance) in &instances {
        if settings.vms.contains_key(name) {
            continue;
        }
        let (key_file, policy) = match settings.awaiting_lima.get(name) {
            Some(a) => (a.key_file.clone(), a.policy.clone()),
            None => (None, Default::default()),
        };
        settings
            .vms
            .insert(name.clone(), VmSettings { endpoint: instance.endpoint(), key_file, policy });
    }
    Adopted { instances, untrusted, left_out }
}

/// Whether `"*"` may adopt instances from `lima`'s home: not when a VM can write it, now
/// (one of `instances` mounts it writable) or before (the marker in `state_dir` says so: a VM
/// could since have rewritten its own `lima.yaml` to hide the mount it still has).
fn trust(
    lima: &LimaSettings,
    instances: &BTreeMap<VmName, Instance>,
    state_dir: &Path,
    user_home: &Path,
) -> Option<LimaUntrusted> {
    if !lima.instances.iter().any(|i| i == "*") {
        return None;
    }
    let marker = state_dir.join(HOME_WRITABLE_MARKER);
    let mut text = String::new();
    if std::fs::File::open(&marker).and_then(|f| f.take(4096).read_to_string(&mut text)).is_ok() {
        return Some(LimaUntrusted { reason: text.trim().to_owned(), from_marker: true });
    }
    let (vm, location) = home_writable_from(lima, instances, user_home)?;
    let reason = format!(
        "VM {vm} mounts {} writable, which holds the Lima home {}",
        location.display(),
        lima.home.display()
    );
    Some(LimaUntrusted { reason, from_marker: false })
}

#[cfg(test)]
mod tests {
    use yaml_rust2::Yaml;

    use super::fragment::{MERGED, fragment, ours};
    use super::yaml::{field, text_field};
    use super::*;

    #[test]
    fn the_fragment_is_a_mapping_with_every_merged_list_ours() {
        let f = Yaml::Hash(fragment());
        assert!(has_fragment(&f));
        for list in MERGED {
            let items = field(&f, list).and_then(Yaml::as_vec).unwrap();
            assert!(items.iter().all(|i| ours(list, i)), "{list}");
        }
    }

    #[test]
    fn merging_keeps_what_is_there_and_is_idempotent() {
        let finch = "vmType: vz\nmounts:\n- location: /Users/me/src\n  writable: true\nprovision:\n- mode: boot\n  script: echo hi\n";
        let once = merge_fragment(finch, true).unwrap().unwrap();
        assert!(merge_fragment(&once, true).unwrap().is_none(), "a second setup changes nothing");
        let y = parse_yaml(&once).unwrap();
        assert!(has_fragment(&y));
        assert_eq!(text_field(&y, "vmType"), Some("vz"));
        let mounts = field(&y, "mounts").and_then(Yaml::as_vec).unwrap();
        assert_eq!(text_field(&mounts[0], "location"), Some("/Users/me/src"));
        assert_eq!(mounts.len(), 2);
        let provision = field(&y, "provision").and_then(Yaml::as_vec).unwrap();
        assert_eq!(text_field(&provision[0], "script"), Some("echo hi"));
        // Removal gives back the same content (re-emitted).
        let removed = parse_yaml(&merge_fragment(&once, false).unwrap().unwrap()).unwrap();
        assert_eq!(removed, parse_yaml(finch).unwrap());
        assert!(merge_fragment(finch, false).unwrap().is_none());
    }

    #[test]
    fn an_empty_or_missing_config_gets_the_fragment_and_loses_it_whole() {
        let added = merge_fragment("", true).unwrap().unwrap();
        assert!(has_fragment(&parse_yaml(&added).unwrap()));
        assert_eq!(merge_fragment(&added, false).unwrap().unwrap(), "");
    }

    #[test]
    fn bad_yaml_is_refused_not_overwritten() {
        for bad in ["mounts: 3\n", "- a\n- b\n", "a: [\n", "a: &x [1]\nb: *x\n"] {
            assert!(merge_fragment(bad, true).is_err(), "{bad:?}");
        }
        let bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n";
        assert!(parse_yaml(bomb).unwrap_err().to_string().contains("aliases"));
    }

    #[cfg(unix)]
    fn inst() -> Instance {
        Instance { name: "finch".parse().unwrap(), dir: PathBuf::from("/L/finch") }
    }

    // Unix paths: Lima's mounts are for macOS and Linux hosts (on Windows, Lima's WSL2 driver
    // mounts nothing and `setup finch` is refused).
    #[cfg(unix)]
    #[test]
    fn locations_expand_as_lima_expands_them() {
        let home = Path::new("/Users/me");
        let cases = [
            ("~", Some("/Users/me")),
            ("~/src/../.aws", Some("/Users/me/.aws")),
            ("{{.Dir}}/finch-bridge", Some("/L/finch/finch-bridge")),
            ("{{ .Home }}/x", Some("/Users/me/x")),
            ("/tmp/lima", Some("/tmp/lima")),
            ("{{.Param.X}}", None),
            ("relative", None),
            ("{{.Dir", None),
        ];
        for (loc, want) in cases {
            assert_eq!(expand_location(loc, &inst(), home), want.map(PathBuf::from), "{loc}");
        }
        assert!(reaches(Path::new("/Users/me"), Path::new("/Users/me/.aws")));
        assert!(reaches(Path::new("/Users/me/.aws/sso"), Path::new("/Users/me/.aws")));
        assert!(!reaches(Path::new("/Users/me/src"), Path::new("/Users/me/.aws")));
        assert!(!reaches(Path::new("/Users/me/.awsx"), Path::new("/Users/me/.aws")));
    }

    #[test]
    fn discovery_is_bounded_and_keeps_the_same_instances() {
        let home = tempfile::tempdir().unwrap();
        for i in 0..MAX_INSTANCES + 6 {
            let dir = home.path().join(format!("vm{i:03}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("lima.yaml"), "").unwrap();
        }
        let lima = LimaSettings {
            home: home.path().to_owned(),
            instances: vec!["*".into()],
            guest_dir: PathBuf::from("g"),
            keep_fragment: false,
            template: None,
            harden: false,
            shares: Vec::new(),
        };
        let (found, left_out) = discover(&lima);
        assert_eq!((found.len(), left_out), (MAX_INSTANCES, 6));
        assert_eq!(found.keys().next_back().map(VmName::as_str), Some("vm063"));
        for i in 0..MAX_SCANNED {
            std::fs::write(home.path().join(format!("junk{i}")), "").unwrap();
        }
        let (found, left_out) = discover(&lima);
        assert!(found.len() <= MAX_INSTANCES);
        // 70 instances + 4096 other entries: the 70 entries past the scan bound are counted.
        assert!(left_out >= MAX_INSTANCES + 6, "{left_out}");
    }

    fn settings(home: &Path, instances: &[&str]) -> LimaSettings {
        LimaSettings {
            home: home.to_owned(),
            instances: instances.iter().map(|s| (*s).to_owned()).collect(),
            guest_dir: PathBuf::from("g"),
            keep_fragment: false,
            template: None,
            harden: false,
            shares: Vec::new(),
        }
    }

    #[cfg(unix)]
    #[test]
    fn only_real_directories_with_a_real_lima_yaml_are_instances() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("lima");
        let real = home.join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("lima.yaml"), "").unwrap();
        std::os::unix::fs::symlink(&real, home.join("linked")).unwrap();
        let odd = home.join("odd");
        std::fs::create_dir(&odd).unwrap();
        std::os::unix::fs::symlink(real.join("lima.yaml"), odd.join("lima.yaml")).unwrap();
        for instances in [&["*"][..], &["real", "linked", "odd"][..]] {
            let (found, _) = discover(&settings(&home, instances));
            assert_eq!(found.keys().collect::<Vec<_>>(), ["real"], "{instances:?}");
        }
        // A named instance is found whatever else the home holds; the scan never runs.
        for i in 0..MAX_SCANNED + 10 {
            std::fs::write(home.join(format!("a{i:05}")), "").unwrap();
        }
        let (found, left_out) = discover(&settings(&home, &["real"]));
        assert_eq!((found.len(), left_out), (1, 0));
    }

    #[test]
    fn a_writable_mount_around_the_home_is_found() {
        let t = tempfile::tempdir().unwrap();
        let user = t.path().join("home");
        let lima = settings(&user.join(".lima"), &["*"]);
        let dir = lima.home.join("vm");
        std::fs::create_dir_all(&dir).unwrap();
        let inst = BTreeMap::from([(
            "vm".parse().unwrap(),
            Instance { name: "vm".parse().unwrap(), dir },
        )]);
        let cases = [
            ("mounts:\n- location: \"~\"\n  writable: true\n", true),
            ("mounts:\n- location: \"~\"\n", false),
            ("mounts:\n- location: \"~/src\"\n  writable: true\n", false),
            ("mounts:\n- location: \"~/.lima/vm\"\n  writable: true\n", true),
            ("", false),
        ];
        for (yaml, writable) in cases {
            std::fs::write(lima.home.join("vm/lima.yaml"), yaml).unwrap();
            let found = home_writable_from(&lima, &inst, &user);
            assert_eq!(found.is_some(), writable, "{yaml}: {found:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_bundle_never_follows_a_link_or_reads_a_pipe() {
        let t = tempfile::tempdir().unwrap();
        let guest = t.path().join("guest/linux-x86_64");
        std::fs::create_dir_all(&guest).unwrap();
        for b in GUEST_BINARIES {
            std::fs::write(guest.join(b), b).unwrap();
        }
        let dir = t.path().join("lima/vm");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lima.yaml"), "").unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(BUNDLE_DIR)).unwrap();
        let instance = Instance { name: "vm".parse().unwrap(), dir: dir.clone() };
        let key = finch_shared::key::LinkKey::generate().unwrap();
        fill_bundle(&instance, "x86_64", &t.path().join("guest"), &key, &[]).unwrap();
        assert!(std::fs::symlink_metadata(dir.join(BUNDLE_DIR)).unwrap().is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A pipe where a file goes is replaced, not read (reading it would block forever).
        let fifo = dir.join(BUNDLE_DIR).join("install.sh");
        std::fs::remove_file(&fifo).unwrap();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let filled = fill_bundle(&instance, "x86_64", &t.path().join("guest"), &key, &[]).unwrap();
        assert_eq!(filled.written, 1);
        assert!(std::fs::symlink_metadata(&fifo).unwrap().is_file());
        // An instance directory replaced by a link is not written to at all.
        std::fs::rename(&dir, t.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &dir).unwrap();
        assert!(fill_bundle(&instance, "x86_64", &t.path().join("guest"), &key, &[]).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn the_bundle_names_the_registries_to_wire_and_its_sums_cover_them() {
        let t = tempfile::tempdir().unwrap();
        let key = finch_shared::key::LinkKey::generate().unwrap();
        let binaries: Vec<(&str, Vec<u8>)> =
            GUEST_BINARIES.iter().map(|b| (*b, b.as_bytes().to_vec())).collect();
        let dir = t.path().join("bundle");
        let scoped = ["docker.io".to_owned(), "ghcr.io".to_owned()];
        write_bundle(&dir, &binaries, &key, &scoped).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("scoped")).unwrap(), "docker.io\nghcr.io\n");
        let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
        assert!(sums.lines().any(|l| l.ends_with("  scoped")), "{sums}");
        // A policy that names none: the file is there, empty, and rewritten.
        let filled = write_bundle(&dir, &binaries, &key, &[]).unwrap();
        assert_eq!(filled.written, 2, "scoped and SHA256SUMS");
        assert_eq!(std::fs::read_to_string(dir.join("scoped")).unwrap(), "");
    }

    #[test]
    fn mounts_and_arch_merge_as_lima_merges_them() {
        let y = LimaYaml {
            default: parse_yaml("arch: default\nmounts:\n- location: /d\n").unwrap(),
            instance: parse_yaml("arch: aarch64\nmounts:\n- location: \"~\"\n  writable: true\n- location: /d\n  writable: true\n").unwrap(),
            overrides: parse_yaml("mounts:\n- location: /o\n").unwrap(),
        };
        assert_eq!(y.arch(), "aarch64");
        let m = y.mounts();
        let want = [("/d", true), ("~", true), ("/o", false)];
        assert_eq!(m.len(), 3);
        for (m, (loc, w)) in m.iter().zip(want) {
            assert_eq!((m.location.as_str(), m.writable), (loc, w));
        }
        // One location on two mount points is two mounts: the writable `~` stays writable
        // (merged by location, it read as read-only); one mount point is one mount.
        let y = LimaYaml {
            default: Yaml::Null,
            instance: parse_yaml("mounts:\n- location: \"~\"\n  writable: true\n").unwrap(),
            overrides: parse_yaml("mounts:\n- location: \"~\"\n  mountPoint: /mnt/h\n  writable: false\n- location: /y\n  mountPoint: /mnt/h\n").unwrap(),
        };
        let m = y.mounts();
        let got: Vec<_> = m.iter().map(|m| (m.location.as_str(), m.writable)).collect();
        assert_eq!(got, [("~", true), ("~", false)]);
    }

    #[test]
    fn setup_config_text_adds_once_and_removes_only_its_own() {
        let l = LimaSettings {
            home: PathBuf::from("/L"),
            instances: vec!["finch".into()],
            guest_dir: PathBuf::from("/g"),
            keep_fragment: true,
            template: Some(PathBuf::from("/F/os/finch.yaml")),
            harden: true,
            shares: vec![PathBuf::from("/Users/me/src")],
        };
        let user = "state_dir = \"/s\"\n\n[vm.x]\nendpoint = \"unix:///x\"\n";
        let added = setup_config_text(user, Some(&l)).unwrap();
        assert_eq!(setup_config_text(&added, Some(&l)).unwrap(), added, "idempotent");
        let parsed: toml::Table = toml::from_str(&added).unwrap();
        assert_eq!(parsed["lima"]["instances"][0].as_str(), Some("finch"));
        assert_eq!(parsed["lima"]["template"].as_str(), Some("/F/os/finch.yaml"));
        assert_eq!(parsed["lima"]["harden"].as_bool(), Some(true));
        assert_eq!(parsed["lima"]["shares"][0].as_str(), Some("/Users/me/src"));
        assert_eq!(setup_config_text(&added, None).unwrap(), user);
        let foreign = "[lima]\nhome = \"/x\"\n";
        assert!(setup_config_text(foreign, Some(&l)).is_err());
        assert_eq!(setup_config_text(foreign, None).unwrap(), foreign);
    }
}
