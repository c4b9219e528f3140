//! `setup finch` for Finch on Windows (WSL2), through Finch's own helper mechanism.
//!
//! What Finch 1.18 does there (runfinch/finch): it has no credential server on Windows
//! (`pkg/credserver/process_windows.go` is a stub); in its distro (`lima-finch`, lima-vm/lima
//! `pkg/driver/wsl2/vm_windows.go`) nerdctl runs with `DOCKER_CONFIG="$FINCH_DIR"`, the host's
//! own `%LOCALAPPDATA%\.finch` through `/mnt/c`, and for each name in `creds_helpers` of
//! `finch.yaml` it links `$FINCH_DIR/cred-helpers/docker-credential-NAME` into `/usr/local/bin`
//! (`pkg/config/nerdctl_config_applier.go` `updateEnvironment`). With `ecr-login` there it
//! exports the host's AWS keys into the VM (`cmd/finch/nerdctl_remote.go`
//! `ensureRemoteCredentials`) and, at `vm init`, sets `credsStore: ecr-login` in that
//! `config.json` (`pkg/dependency/credhelper/cred_helper_binary.go` `updateConfigFile`).
//!
//! So setup puts the bridge's Linux helper in `cred-helpers\`, `finchhost` in `creds_helpers`
//! (and `ecr-login` out: the bridge answers ECR natively), and `credsStore: finchhost` in the
//! shared `config.json`, which the host agent then reads as "the host's own store", recorded
//! here as `host_creds_store` from the file's previous `credsStore`. Each file's bytes before
//! the first change are kept in the state directory (`finch-setup/`); `--remove` puts them
//! back exactly.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use yaml_rust2::Yaml;

use crate::kept::{Kept, Original};
use crate::lima;
use crate::settings::BRIDGE_HELPER;
use crate::source::docker_config::MAX_CONFIG;

/// The WSL distro Lima makes for Finch's instance (`lima-` + the instance name).
pub const DISTRO: &str = "lima-finch";
/// Under the state directory: each file's bytes before setup changed it.
pub const SAVED_DIR: &str = "finch-setup";

/// Finch's directory and the files setup changes in it.
#[derive(Debug, Clone)]
pub struct FinchDir {
    /// `%LOCALAPPDATA%\.finch`.
    pub dir: PathBuf,
}

impl FinchDir {
    fn finch_yaml(&self) -> PathBuf {
        self.dir.join("finch.yaml")
    }

    fn config_json(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// Where Finch links helpers from.
    pub fn helper(&self) -> PathBuf {
        self.dir.join("cred-helpers").join(format!("docker-credential-{BRIDGE_HELPER}"))
    }
}

/// What [`wire`] found and did.
#[derive(Debug, Default)]
pub struct Done {
    /// The `credsStore` the shared config had before (`finchhost` read as it from now on).
    pub host_store: Option<String>,
    /// `creds_helpers` before.
    pub helpers_before: Vec<String>,
    /// Lines for the user.
    pub said: Vec<String>,
}

/// Reads `path` at most [`MAX_CONFIG`] bytes (the docker config's own bound: a `config.json`
/// the host agent may read is one setup may read); `None` when it is missing.
fn read(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    lima::read_bounded(path, MAX_CONFIG)
}

/// Where `name`'s original is kept: in `saved`, the state directory's, never in Finch's
/// directory (the VM reads that).
fn kept(saved: &Path, name: &str) -> Kept {
    Kept::in_dir(saved, name, MAX_CONFIG)
}

/// The original of `file` (named `name` in `saved`): what is kept, else the file as it is
/// when `wired` says it is not wired yet (then kept now). `None` inside: it did not exist.
fn original(
    file: &Path,
    saved: &Path,
    name: &str,
    wired: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Option<Vec<u8>>> {
    let current = read(file)?;
    let fresh = current.as_deref().is_none_or(|b| !wired(b));
    let kept = kept(saved, name);
    if !fresh && let Some(original) = kept.read()? {
        return Ok(original.into_bytes());
    }
    crate::platform::paths::private_dir(saved)?;
    let original = Original::of(current);
    kept.keep(&original, 0o600)?;
    Ok(original.into_bytes())
}

/// `finch.yaml`'s text with `finchhost` in `creds_helpers` and `ecr-login` out; and the list
/// before.
fn helpers_edit(text: &str) -> anyhow::Result<(String, Vec<String>)> {
    let mut doc = match lima::parse_yaml(text)? {
        Yaml::Hash(h) => h,
        Yaml::Null => Default::default(),
        _ => anyhow::bail!("it is not a YAML mapping"),
    };
    let k = Yaml::String("creds_helpers".into());
    let before: Vec<String> = match doc.get(&k) {
        None | Some(Yaml::Null) => Vec::new(),
        Some(Yaml::Array(a)) => a.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        Some(_) => anyhow::bail!("`creds_helpers` is not a list"),
    };
    let mut after: Vec<Yaml> = before
        .iter()
        .filter(|h| *h != "ecr-login" && *h != BRIDGE_HELPER)
        .map(|h| Yaml::String(h.clone()))
        .collect();
    after.push(Yaml::String(BRIDGE_HELPER.into()));
    match doc.get_mut(&k) {
        Some(slot) => *slot = Yaml::Array(after),
        None => {
            doc.insert(k, Yaml::Array(after));
        }
    }
    let mut out = String::from(
        "# finch-host-agent setup finch put finchhost in creds_helpers (setup finch --remove restores this file)\n",
    );
    yaml_rust2::YamlEmitter::new(&mut out)
        .dump(&Yaml::Hash(doc))
        .map_err(|e| anyhow::anyhow!("cannot write YAML: {e}"))?;
    out.push('\n');
    Ok((out, before))
}

fn helpers_wired(text: &[u8]) -> bool {
    let text = String::from_utf8_lossy(text);
    lima::parse_yaml(&text).ok().is_some_and(|y| {
        y["creds_helpers"]
            .as_vec()
            .is_some_and(|v| v.iter().any(|h| h.as_str() == Some(BRIDGE_HELPER)))
    })
}

fn store_of(config: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(config).ok()?;
    v.get("credsStore")?.as_str().map(str::to_owned)
}

/// Wires Finch's directory: the helper from `guest_dir` (Linux, `arch`) into `cred-helpers\`,
/// `creds_helpers` and `credsStore` pointed at the bridge. `saved` keeps the originals.
pub fn wire(finch: &FinchDir, guest_binaries: &Path, saved: &Path) -> anyhow::Result<Done> {
    let mut done = Done::default();
    let yaml_path = finch.finch_yaml();
    let original_yaml = original(&yaml_path, saved, "finch.yaml", helpers_wired)?
        .with_context(|| format!("no {}: run `finch vm init` once first", yaml_path.display()))?;
    let text = String::from_utf8(original_yaml)
        .with_context(|| format!("{} is not UTF-8", yaml_path.display()))?;
    let (wired, before) =
        helpers_edit(&text).with_context(|| format!("cannot use {}", yaml_path.display()))?;
    done.helpers_before = before;
    if read(&yaml_path)?.as_deref() != Some(wired.as_bytes()) {
        finch_shared::private::write_atomic(&yaml_path, wired.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", yaml_path.display()))?;
        done.said.push(format!("put {BRIDGE_HELPER} in creds_helpers of {}", yaml_path.display()));
    }

    let config_path = finch.config_json();
    let is_bridge = |b: &[u8]| store_of(b).as_deref() == Some(BRIDGE_HELPER);
    let original_config = original(&config_path, saved, "config.json", is_bridge)?;
    let mut map = match &original_config {
        Some(b) => finch_shared::docker_config::parse(b)
            .with_context(|| format!("cannot use {}", config_path.display()))?,
        None => serde_json::Map::new(),
    };
    done.host_store = original_config.as_deref().and_then(store_of).filter(|s| s != BRIDGE_HELPER);
    map.insert("credsStore".into(), Value::String(BRIDGE_HELPER.into()));
    let mut json = serde_json::to_vec_pretty(&Value::Object(map))?;
    json.push(b'\n');
    if !read(&config_path)?.as_deref().is_some_and(is_bridge) {
        finch_shared::private::write_atomic(&config_path, &json, 0o600)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        done.said.push(format!("set credsStore to {BRIDGE_HELPER} in {}", config_path.display()));
    }

    let helper = finch.helper();
    let bytes = std::fs::read(guest_binaries.join(format!("docker-credential-{BRIDGE_HELPER}")))
        .with_context(|| {
            format!("no docker-credential-{BRIDGE_HELPER} in {}", guest_binaries.display())
        })?;
    if std::fs::read(&helper).ok().as_deref() != Some(&bytes[..]) {
        if let Some(dir) = helper.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        finch_shared::private::write_atomic(&helper, &bytes, 0o755)
            .with_context(|| format!("cannot write {}", helper.display()))?;
        done.said.push(format!("put the bridge's Linux helper at {}", helper.display()));
    }
    Ok(done)
}

/// Undoes [`wire`]: both files as they were, byte for byte, and the helper removed.
pub fn unwire(finch: &FinchDir, saved: &Path) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    for (file, name) in [(finch.finch_yaml(), "finch.yaml"), (finch.config_json(), "config.json")] {
        if kept(saved, name).put_back(&file, 0o600)? {
            said.push(format!("restored {}", file.display()));
        }
    }
    match std::fs::remove_file(finch.helper()) {
        Ok(()) => said.push(format!("removed {}", finch.helper().display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove {}", finch.helper().display()));
        }
    }
    let _ = std::fs::remove_dir(saved);
    Ok(said)
}

// ---- the host agent's config: host_creds_store --------------------------------------------

/// The comment lines around what `setup finch` puts at the top of the config.
pub const STORE_MARK: &str = "# Added by `finch-host-agent setup finch` (Windows): where credsStore finchhost leads on this host.";
const STORE_END: &str = "# (end of what setup finch added)";

/// `text` (a host agent config) with setup's `host_creds_store` line at its top for `store`
/// (`Some(None)`: the plaintext auths, no line), or (`None`) taken out.
pub fn store_config_text(text: &str, store: Option<Option<&str>>) -> anyhow::Result<String> {
    let mut kept = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if line == STORE_MARK {
            skipping = true;
            continue;
        }
        if skipping {
            skipping = line != STORE_END;
            continue;
        }
        kept.push(line);
    }
    let rest = kept.join("\n");
    let foreign = kept.iter().any(|l| {
        let t = l.trim_start();
        t.starts_with("host_creds_store") && t[16..].trim_start().starts_with('=')
    });
    let Some(store) = store else {
        return Ok(if rest.is_empty() { rest } else { rest + "\n" });
    };
    anyhow::ensure!(
        !foreign,
        "the config already sets host_creds_store, which setup did not write: edit it instead"
    );
    let mut out = String::new();
    if let Some(s) = store {
        out.push_str(&format!(
            "{STORE_MARK}\nhost_creds_store = {}\n{STORE_END}\n",
            crate::settings::toml_string(s)
        ));
    }
    if !rest.is_empty() {
        out.push_str(&rest);
        out.push('\n');
    }
    Ok(out)
}

/// The shell command that installs the guest side in Finch's distro, as root: the bundle at
/// Windows path `bundle` (read through `wslpath`), the link on `guest_link`, the distro's
/// default user (uid `uid`) allowed; with `harden`, the bundle's `wsl-fstab` as the only
/// mounts. `wsl.exe -d DISTRO -u root -- sh -c SCRIPT`.
///
/// Both root's and the user's `~/.docker` get `credsStore: finchhost`: hardened, Finch's
/// `DOCKER_CONFIG` (its own directory on C:) is not in the distro, and `sudo -E nerdctl`
/// reads the config under whichever `HOME` sudo leaves.
pub fn install_script(bundle: &str, guest_link: &str, uid: u32, harden: bool) -> String {
    let quoted = bundle.replace('\'', "'\\''");
    let mounts = if harden { " --wsl-mounts \"$b/wsl-fstab\"" } else { "" };
    format!(
        "set -e; b=$(wslpath -u '{quoted}'); h=$(getent passwd {uid} | cut -d: -f6); \
         sh \"$b/install.sh\" --bundle \"$b\" --init wsl --link-listen {guest_link} \
         --link-allow-uid {uid} --allow-uid {uid} --docker-config /root/.docker \
         ${{h:+--docker-config \"$h/.docker\"}}{mounts}"
    )
}

/// Where `setup finch --harden` mounts the user's temporary directory in the distro (read-only):
/// Lima boots a WSL2 VM by running a script it writes there, through `wslpath`
/// (lima-vm/lima `pkg/driver/wsl2/vm_windows.go` `provisionVM`).
pub const TEMP_TARGET: &str = "/mnt/finch-bridge/temp";
/// Where it mounts the Lima instance's directory (read-only): Lima's boot reads `cidata\` there
/// (`lima-init.TEMPLATE`: `wslpath CIDataPath`), which it removes and writes anew at each start
/// (`pkg/cidata/cidata.go` `writeCIDataDir`), so the directory above it is the one mounted.
pub const LIMA_TARGET: &str = "/mnt/finch-bridge/lima";

/// A Windows directory mounted in Finch's distro once `setup finch --harden` has turned WSL's
/// drive automount off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvMount {
    /// The Windows directory, `C:\Users\me\src`.
    pub source: String,
    /// Where the distro sees it.
    pub target: String,
    /// Mounted read-write (a share), or read-only.
    pub writable: bool,
}

impl DrvMount {
    /// Its line in the distro's `/etc/fstab`, in libmount's escapes (WSL processes the file
    /// with `/bin/mount -a`, microsoft/WSL `src/linux/init/config.cpp` `ConfigMountFsTab`;
    /// `mount.drvfs` takes a directory as its source, `src/linux/init/drvfs.cpp`).
    pub fn fstab_line(&self) -> String {
        let mode = if self.writable { "rw" } else { "ro" };
        format!(
            "{} {} drvfs {mode},noatime 0 0",
            fstab_escape(&self.source),
            fstab_escape(&self.target)
        )
    }
}

/// A field of an fstab line: the characters that end a field or start a comment, and the
/// backslash itself, as `\NNN` octal (what libmount undoes).
fn fstab_escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            ' ' | '\t' | '\\' | '#' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// An absolute drive path's drive letter (lower case) and components.
fn drive_path(path: &str) -> anyhow::Result<(char, Vec<&str>)> {
    let bytes = path.as_bytes();
    let drive = match bytes {
        [d, b':', b'\\' | b'/', ..] if d.is_ascii_alphabetic() => (*d as char).to_ascii_lowercase(),
        _ => anyhow::bail!("{path:?} is not a directory on a drive (X:\\...)"),
    };
    // `,` and `;` separate mount options, where mount.drvfs puts the directory
    // (`aname=drvfs;path=DIR`); a control character has no place in an fstab line.
    anyhow::ensure!(
        !path.chars().any(|c| c == ',' || c == ';' || c.is_control()),
        "{path:?} has a comma, a semicolon or a control character, which a WSL mount cannot take"
    );
    let parts: Vec<&str> = path[3..].split(['\\', '/']).filter(|p| !p.is_empty()).collect();
    anyhow::ensure!(
        !parts.iter().any(|p| *p == "." || *p == ".."),
        "{path:?} has . or .. in it: give the directory itself"
    );
    Ok((drive, parts))
}

/// Where Finch sends a Windows path in its distro: `C:\Users\me\src` is
/// `/mnt/c/Users/me/src` (runfinch/finch `cmd/finch/nerdctl_windows.go` `convertToWSLPath`,
/// for the working directory and file arguments), so a share is mounted there.
pub fn wsl_path(windows: &str) -> anyhow::Result<String> {
    let (drive, parts) = drive_path(windows)?;
    let mut out = format!("/mnt/{drive}");
    for p in parts {
        out.push('/');
        out.push_str(p);
    }
    Ok(out)
}

/// Whether Windows path `a` is `b` or holds it (paths compare without regard to case).
pub fn holds(a: &str, b: &str) -> bool {
    let (Ok((da, pa)), Ok((db, pb))) = (drive_path(a), drive_path(b)) else { return false };
    da == db && pa.len() <= pb.len() && pa.iter().zip(&pb).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// What the bridge keeps on the host, which no mount of Finch's distro may reach: Finch's
/// directory, the agent's config and state, and the home's `.aws`, `.docker`, `.ssh`; each
/// with what it holds.
pub fn protected(
    finch_dir: &Path,
    config: Option<PathBuf>,
    state_dir: &Path,
    home: Option<PathBuf>,
) -> Vec<(PathBuf, &'static str)> {
    let mut out = vec![
        (finch_dir.to_owned(), "Finch's directory: config.json, finch.yaml"),
        (state_dir.to_owned(), "this agent's state and VM keys"),
    ];
    out.extend(config.map(|c| (c, "this agent's config")));
    if let Some(home) = home {
        for (dir, what) in
            [(".aws", "AWS credentials"), (".docker", "docker's config"), (".ssh", "SSH keys")]
        {
            out.push((home.join(dir), what));
        }
    }
    out
}

/// What `setup finch --harden` mounts in Finch's distro instead of whole drives: `temp` and
/// Lima's `instance` directory read-only (Lima's boot needs both), each of `shares` read-write
/// where Finch expects it. Refused (nothing changes): a directory that is not on a drive, or
/// any of them holding or inside one of `protected` (the agent's config, state and keys,
/// Finch's directory, `~\.aws`, ...), with what it holds.
pub fn harden_mounts(
    temp: &str,
    instance: &str,
    shares: &[String],
    protected: &[(String, &str)],
) -> anyhow::Result<Vec<DrvMount>> {
    let mut mounts = vec![
        DrvMount { source: temp.to_owned(), target: TEMP_TARGET.to_owned(), writable: false },
        DrvMount { source: instance.to_owned(), target: LIMA_TARGET.to_owned(), writable: false },
    ];
    for share in shares {
        let target = wsl_path(share).with_context(|| format!("--share {share}"))?;
        if !mounts.iter().any(|m| m.target.eq_ignore_ascii_case(&target)) {
            mounts.push(DrvMount { source: share.clone(), target, writable: true });
        }
    }
    for m in &mounts {
        drive_path(&m.source)?;
        for (p, what) in protected {
            anyhow::ensure!(
                !holds(&m.source, p) && !holds(p, &m.source),
                "{} would mount {} in the VM, {} {p} ({what}): nothing was changed",
                if m.writable { "--share" } else { "--harden" },
                m.source,
                if holds(&m.source, p) { "which holds" } else { "which is inside" },
            );
        }
    }
    // A share inside another is mounted after it.
    mounts.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(mounts)
}

/// The fstab lines for `mounts`, as install.sh `--wsl-mounts` takes them.
pub fn fstab_text(mounts: &[DrvMount]) -> String {
    let mut out = String::from(
        "# finch-host-agent setup finch --harden: the only Windows directories Finch's distro mounts\n",
    );
    for m in mounts {
        out.push_str(&m.fstab_line());
        out.push('\n');
    }
    out
}

/// Most bytes of the distro's `wsl.conf` or `fstab` read.
pub const MAX_DISTRO_FILE: u64 = 256 * 1024;

/// What Finch's distro mounts from Windows, from its `/etc/wsl.conf` and `/etc/fstab`.
#[derive(Debug, Clone, Default)]
pub struct DistroMounts {
    /// WSL mounts every fixed drive whole (its default, unless `[automount] enabled = false`).
    pub automount: bool,
    /// The drvfs lines of its fstab (what WSL mounts when `mountFsTab` is on, its default).
    pub mounts: Vec<DrvMount>,
}

impl DistroMounts {
    /// Reads `wsl_conf` and `fstab` (either may be empty).
    pub fn read(wsl_conf: &str, fstab: &str) -> Self {
        let mounts = fstab
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4 && f[2] == "drvfs").then(|| DrvMount {
                    source: fstab_unescape(f[0]),
                    target: fstab_unescape(f[1]),
                    writable: !f[3].split(',').any(|o| o == "ro"),
                })
            })
            .collect();
        DistroMounts { automount: automount_enabled(wsl_conf), mounts }
    }

    /// How the distro reaches Windows path `path`, if it does: WSL's automount of its drive,
    /// or an fstab mount that holds it.
    pub fn reach(&self, path: &str) -> Option<String> {
        if self.automount {
            let drive = path.get(..2).unwrap_or(path);
            return Some(format!("{drive} whole, through WSL's automount"));
        }
        self.mounts.iter().find(|m| holds(&m.source, path)).map(|m| {
            format!("{} at {}{}", m.source, m.target, if m.writable { "" } else { " (read-only)" })
        })
    }
}

/// Whether a wsl.conf leaves drive automounting on (WSL's default).
pub fn automount_enabled(text: &str) -> bool {
    let mut section = String::new();
    let mut enabled = true;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_ascii_lowercase();
        } else if section == "automount"
            && let Some((k, v)) = line.split_once('=')
            && k.trim().eq_ignore_ascii_case("enabled")
        {
            enabled = !v.trim().eq_ignore_ascii_case("false");
        }
    }
    enabled
}

/// An fstab field with its `\NNN` octal escapes undone.
fn fstab_unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn finch_dir(t: &Path, yaml: &str, config: Option<&str>) -> FinchDir {
        let dir = t.join(".finch");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("finch.yaml"), yaml).unwrap();
        if let Some(c) = config {
            std::fs::write(dir.join("config.json"), c).unwrap();
        }
        FinchDir { dir }
    }

    #[cfg(unix)]
    fn guest(t: &Path) -> PathBuf {
        let g = t.join("guest");
        std::fs::create_dir_all(&g).unwrap();
        std::fs::write(g.join("docker-credential-finchhost"), b"\x7fELF helper").unwrap();
        g
    }

    // Unix only: Wine reads a fresh private directory's DACL back as open (the Windows build
    // runs this path in tests/tests/wine.rs, on a directory made private there).
    #[cfg(unix)]
    #[test]
    fn wiring_records_the_store_and_helpers_and_unwiring_restores_both_files_exactly() {
        let t = tempfile::tempdir().unwrap();
        let yaml =
            "# my Finch\ncpus: 4\ncreds_helpers:\n  - ecr-login\n  - wincred\nvmType: wsl2\n";
        let config = "{\"credsStore\": \"wincred\", \"auths\": {}}";
        let f = finch_dir(t.path(), yaml, Some(config));
        let saved = t.path().join("state/finch-setup");
        let done = wire(&f, &guest(t.path()), &saved).unwrap();
        assert_eq!(done.host_store.as_deref(), Some("wincred"));
        assert_eq!(done.helpers_before, ["ecr-login", "wincred"]);
        assert_eq!(done.said.len(), 3, "{:?}", done.said);
        let y = lima::read_yaml(&f.finch_yaml()).unwrap().unwrap();
        let helpers: Vec<&str> =
            y["creds_helpers"].as_vec().unwrap().iter().filter_map(Yaml::as_str).collect();
        assert_eq!(helpers, ["wincred", "finchhost"]);
        assert_eq!(y["cpus"].as_i64(), Some(4));
        let c: Value = serde_json::from_slice(&std::fs::read(f.config_json()).unwrap()).unwrap();
        assert_eq!(c["credsStore"], "finchhost");
        assert!(f.helper().is_file());
        // Again: nothing to do, and what was recorded is still the original's.
        let again = wire(&f, &guest(t.path()), &saved).unwrap();
        assert!(again.said.is_empty(), "{:?}", again.said);
        assert_eq!(again.host_store.as_deref(), Some("wincred"));
        unwire(&f, &saved).unwrap();
        assert_eq!(std::fs::read_to_string(f.finch_yaml()).unwrap(), yaml);
        assert_eq!(std::fs::read_to_string(f.config_json()).unwrap(), config);
        assert!(!f.helper().exists() && !saved.exists());
    }

    // Unix only: Wine reads a fresh private directory's DACL back as open (the Windows build
    // runs this path in tests/tests/wine.rs, on a directory made private there).
    #[cfg(unix)]
    #[test]
    fn a_missing_config_json_is_made_and_removed_again() {
        let t = tempfile::tempdir().unwrap();
        let f = finch_dir(t.path(), "vmType: wsl2\n", None);
        let saved = t.path().join("state/finch-setup");
        let done = wire(&f, &guest(t.path()), &saved).unwrap();
        assert_eq!(done.host_store, None);
        assert!(f.config_json().is_file());
        unwire(&f, &saved).unwrap();
        assert!(!f.config_json().exists());
        assert_eq!(std::fs::read_to_string(f.finch_yaml()).unwrap(), "vmType: wsl2\n");
        let none = FinchDir { dir: t.path().join("none") };
        assert!(wire(&none, &guest(t.path()), &saved).is_err(), "no finch.yaml: vm init first");
    }

    #[test]
    fn a_file_past_the_bound_is_refused_unread() {
        let t = tempfile::tempdir().unwrap();
        let big = t.path().join("config.json");
        std::fs::File::create(&big).unwrap().set_len(MAX_CONFIG + 1).unwrap();
        let err = read(&big).unwrap_err().to_string();
        assert!(err.contains("is larger than"), "{err}");
        assert_eq!(read(&t.path().join("none")).unwrap(), None);
    }

    #[test]
    fn the_store_line_goes_on_top_once_and_comes_out_alone() {
        let user = "state_dir = \"/s\"\n\n[vm.x]\nendpoint = \"unix:///x\"\n";
        let added = store_config_text(user, Some(Some("wincred"))).unwrap();
        assert!(added.starts_with(STORE_MARK), "{added}");
        let parsed: toml::Table = toml::from_str(&added).unwrap();
        assert_eq!(parsed["host_creds_store"].as_str(), Some("wincred"));
        assert_eq!(store_config_text(&added, Some(Some("wincred"))).unwrap(), added);
        assert_eq!(store_config_text(&added, None).unwrap(), user);
        assert_eq!(store_config_text(user, Some(None)).unwrap(), user);
        assert!(store_config_text("host_creds_store = \"x\"\n", Some(Some("y"))).is_err());
    }

    #[test]
    fn the_install_command_quotes_the_bundle_path() {
        let s = install_script("C:\\Users\\o'brien\\b", "vsock://-1:6127", 1000, false);
        assert!(s.contains("wslpath -u 'C:\\Users\\o'\\''brien\\b'"), "{s}");
        assert!(
            s.contains("--init wsl --link-listen vsock://-1:6127 --link-allow-uid 1000"),
            "{s}"
        );
        assert!(!s.contains("--wsl-mounts"), "{s}");
        let hardened = install_script("C:\\b", "tcp://127.0.0.1:6127", 1000, true);
        assert!(hardened.ends_with(" --wsl-mounts \"$b/wsl-fstab\""), "{hardened}");
    }

    #[test]
    fn windows_paths_go_where_finch_sends_them_in_the_distro() {
        assert_eq!(wsl_path(r"C:\Users\me\My Src").unwrap(), "/mnt/c/Users/me/My Src");
        assert_eq!(wsl_path("D:/x//y/").unwrap(), "/mnt/d/x/y");
        for bad in [r"\\server\share", "relative", r"C:\a\..\b", r"C:\a,b", r"C:\a;b", "C:\\a\nb"] {
            assert!(wsl_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hardened_mounts_refuse_what_the_bridge_keeps_on_the_host() {
        let protected = vec![
            (r"C:\Users\me\AppData\Local\.finch".to_owned(), "Finch's directory"),
            (r"C:\Users\me\.aws".to_owned(), "AWS credentials"),
        ];
        let temp = r"C:\Users\me\AppData\Local\Temp";
        let lima = r"C:\Program Files\Finch\lima\data\finch";
        let plan = |shares: &[&str]| {
            let shares: Vec<String> = shares.iter().map(|s| (*s).to_owned()).collect();
            harden_mounts(temp, lima, &shares, &protected)
        };
        let mounts = plan(&[r"C:\Users\me\src", r"c:\users\me\SRC"]).unwrap();
        let got: Vec<(&str, &str, bool)> =
            mounts.iter().map(|m| (m.source.as_str(), m.target.as_str(), m.writable)).collect();
        assert_eq!(
            got,
            [
                (r"C:\Users\me\src", "/mnt/c/Users/me/src", true),
                (lima, LIMA_TARGET, false),
                (temp, TEMP_TARGET, false),
            ]
        );
        // The home holds .aws; a share inside Finch's directory is in it (case aside).
        for bad in [r"C:\Users\me", r"C:\", r"c:\users\ME\appdata\local\.finch\cred-helpers"] {
            let e = plan(&[bad]).unwrap_err().to_string();
            assert!(e.contains("nothing was changed"), "{bad}: {e}");
        }
        let e = plan(&[r"C:\Users"]).unwrap_err().to_string();
        assert!(e.contains("which holds") && e.contains("Finch's directory"), "{e}");
        let text = fstab_text(&mounts);
        assert!(text.starts_with('#') && text.lines().count() == 4, "{text}");
        assert!(
            text.contains(r"C:\134Program\040Files\134Finch\134lima\134data\134finch /mnt/finch-bridge/lima drvfs ro,noatime 0 0"),
            "{text}"
        );
    }

    /// What libmount (WSL's `mount -a`) reads back from the lines: the same names, spaces,
    /// backslashes and `#` included.
    #[cfg(target_os = "linux")]
    #[test]
    fn util_linux_reads_the_fstab_lines_back() {
        let t = tempfile::tempdir().unwrap();
        let mounts = [
            DrvMount {
                source: r"C:\Program Files\Finch # 1\lima".to_owned(),
                target: "/mnt/c/a b/#c".to_owned(),
                writable: true,
            },
            DrvMount {
                source: "D:\\x\ty".to_owned(),
                target: "/mnt/d/x\ty".to_owned(),
                writable: false,
            },
        ];
        let file = t.path().join("fstab");
        std::fs::write(&file, fstab_text(&mounts)).unwrap();
        let out = std::process::Command::new("findmnt")
            .args(["--fstab", "--json", "-o", "SOURCE,TARGET,FSTYPE,OPTIONS", "-F"])
            .arg(&file)
            .output()
            .expect("findmnt (util-linux) runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<(String, String, String)> = v["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let s = |k: &str| f[k].as_str().unwrap().to_owned();
                (s("source"), s("target"), s("options"))
            })
            .collect();
        let want: Vec<(String, String, String)> = mounts
            .iter()
            .map(|m| {
                let mode = if m.writable { "rw,noatime" } else { "ro,noatime" };
                (m.source.clone(), m.target.clone(), mode.to_owned())
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn wsl_automount_is_on_unless_wsl_conf_turns_it_off() {
        assert!(automount_enabled(""));
        assert!(automount_enabled("[boot]\nsystemd=true\n"));
        assert!(!automount_enabled("[automount]\nenabled = false\nmountFsTab = true\n"));
        assert!(automount_enabled("[automount]\nenabled=true\n[network]\nenabled=false\n"));
    }

    #[test]
    fn the_distro_reaches_what_its_automount_or_fstab_mounts() {
        let stock = DistroMounts::read("[boot]\nsystemd=true\n", "");
        assert_eq!(stock.reach(r"C:\Users\me\.aws").unwrap(), "C: whole, through WSL's automount");
        let mounts = harden_mounts(
            r"C:\Users\me\AppData\Local\Temp",
            r"C:\Program Files\Finch\lima\data\finch",
            &[r"C:\Users\me\My Src".to_owned()],
            &[],
        )
        .unwrap();
        let conf = "[boot]\nsystemd=true\n[automount]\nenabled = false\nmountFsTab = true\n";
        let fstab = format!("LABEL=root / ext4 defaults 0 1\n{}", fstab_text(&mounts));
        let hardened = DistroMounts::read(conf, &fstab);
        assert_eq!(hardened.mounts, mounts, "the lines read back as written");
        assert_eq!(hardened.reach(r"C:\Users\me\.aws"), None);
        assert_eq!(hardened.reach(r"C:\Users\me\AppData\Local\.finch"), None);
        assert_eq!(
            hardened.reach(r"c:\users\me\my src\app").unwrap(),
            r"C:\Users\me\My Src at /mnt/c/Users/me/My Src"
        );
        assert_eq!(
            hardened.reach(r"C:\Users\me\AppData\Local\Temp\x").unwrap(),
            r"C:\Users\me\AppData\Local\Temp at /mnt/finch-bridge/temp (read-only)"
        );
        assert_eq!(fstab_unescape(r"a\040b\134c\9\04"), r"a b\c\9\04");
    }
}
