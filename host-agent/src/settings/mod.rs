//! The host agent's settings: named defaults, the config file, `--vm` specs, `attached.toml`.
//!
//! One precedence, for every setting: flags > environment > file > defaults. The file is
//! TOML at `~/.finch/host-agent.toml` (or `--config` / `$FINCH_HOST_AGENT_CONFIG`); a missing
//! default file is an empty one, a missing file that was named is an error. Unknown keys are
//! refused, and every error names the file, the line, the column and the key.
//!
//! ```toml
//! docker_config = "~/.finch"            # the host's Finch docker config directory
//! state_dir = "~/.finch/host-agent"     # VM keys, control socket
//! helper_timeout_secs = 10              # a host docker-credential-<name> helper
//! keychain_timeout_secs = 10            # one native keychain call
//! native_keychain = true                # osxkeychain/wincred/secretservice served natively
//! key_store = "auto"                    # VM keys: "auto" (keychain, else files), "keychain", "file"
//! heartbeat_ms = 5000
//! reconnect_max_ms = 3000
//! host_creds_store = "wincred"          # where `credsStore: finchhost` leads (a shared config.json)
//!
//! [vm.finch]
//! endpoint = "unix:///Applications/Finch/lima/data/finch/sock/finch-guest-agent.sock"
//! key = "~/.finch/host-agent/vms/finch.key"   # optional; this is the default
//!
//! [vm.finch.policy]                     # optional; each rule defaults to ["*"]
//! get = ["*"]
//! store = ["*.dkr.ecr.us-west-2.amazonaws.com", "ghcr.io"]
//! erase = ["ghcr.io"]
//! list = []                             # an empty rule allows nothing
//!
//! [lima]                                # optional: serve Lima instances by discovery
//! home = "/Applications/Finch/lima/data"  # [env: LIMA_HOME, which wins; default: ~/.lima]
//! instances = ["finch"]                 # or ["*"] (the default): every instance there
//! guest_dir = "~/finch-bridge/guest"    # linux-x86_64/, linux-aarch64/ [default: guest/ beside the binary]
//! keep_fragment = true                  # keep the fragment wired (default.yaml, or template)
//! template = "/Applications/Finch/os/finch.yaml"  # Finch's: wire it and its instances instead
//! harden = true                         # with template: no mount holding ~, Finch's files read-only
//! shares = ["~/src"]                    # with harden: the directories mounted writable instead
//! ```
//!
//! A `[vm.NAME]` table for a Lima instance needs no endpoint (its policy applies).
//!
//! Loading is pure: [`Settings::load`] reads the file and `attached.toml` and returns values
//! or a [`ConfigError`]; it discovers nothing and logs nothing (Lima instances are adopted by
//! the agent, `crate::lima::adopt`).
//!
//! * this file: the merge, with one [`Layer`] type for the scalar settings of every source;
//! * [`file`](mod@file): the TOML schema, read with spans;
//! * [`attached`]: `attached.toml`, the VMs attached at run time.
//!
//! Paths (the home, Finch's root, key files) are `crate::platform::paths`.

pub mod attached;
pub mod file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use finch_shared::endpoint::Endpoint;
pub use finch_shared::vm_name::VmName;
use serde::Deserialize;

pub use attached::{ATTACHED_FILE, AttachedVm, read_attached, write_attached};
pub use file::toml_string;

use crate::platform::paths::{env_path, finch_root};
use crate::policy::Policy;
use crate::source::ecr::EcrSettings;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "FINCH_HOST_AGENT_CONFIG";
/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "FINCH_HOST_AGENT_STATE_DIR";
/// Environment variable naming the host's docker config directory.
pub const DOCKER_CONFIG_ENV: &str = "FINCH_HOST_AGENT_DOCKER_CONFIG";
/// The config file, under Finch's root, when neither flag nor environment names one.
pub const DEFAULT_CONFIG_FILE: &str = ".finch/host-agent.toml";
/// The state directory, under Finch's root, by default.
pub const DEFAULT_STATE_SUBDIR: &str = ".finch/host-agent";
/// The docker config directory, under Finch's root, by default.
pub const DEFAULT_DOCKER_CONFIG_SUBDIR: &str = ".finch";
/// Largest config file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// A numeric setting: its key (the flag is the key with dashes), its range, its default.
#[derive(Debug)]
pub struct Number {
    /// The file key.
    pub key: &'static str,
    /// The values accepted.
    pub range: std::ops::RangeInclusive<u64>,
    /// The value when nothing gives one.
    pub default: u64,
}

/// `helper_timeout_secs`, `keychain_timeout_secs`, `heartbeat_ms`, `reconnect_max_ms`, in
/// [`Layer`]'s order.
pub const NUMBERS: [Number; 4] = [
    Number { key: "helper_timeout_secs", range: 1..=600, default: 10 },
    Number { key: "keychain_timeout_secs", range: 1..=600, default: 10 },
    Number { key: "heartbeat_ms", range: 100..=3_600_000, default: 5000 },
    Number { key: "reconnect_max_ms", range: 100..=3_600_000, default: 3000 },
];

/// `key_store`: where keys of VMs without a `key` file of their own are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyStore {
    /// The OS keychain when it answers, else files.
    #[default]
    Auto,
    /// The OS keychain; an error when it does not answer.
    Keychain,
    /// Files in the state directory.
    File,
}

/// One `--vm NAME=ENDPOINT[,key=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// VM name.
    pub name: VmName,
    /// Where to dial it.
    pub endpoint: Endpoint,
    /// Its key file, when not the one in the state directory.
    pub key: Option<PathBuf>,
}

impl std::str::FromStr for VmSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ENDPOINT[,key=PATH]"))?;
        let name = name.parse::<VmName>().map_err(|e| e.to_string())?;
        let (endpoint, key) = match rest.rsplit_once(",key=") {
            Some((endpoint, key)) => {
                if !Path::new(key).is_absolute() {
                    return Err(format!("{s:?}: key=PATH must be an absolute path"));
                }
                (endpoint, Some(PathBuf::from(key)))
            }
            None => (rest, None),
        };
        let endpoint = endpoint.parse::<Endpoint>().map_err(|e| e.to_string())?;
        Ok(VmSpec { name, endpoint, key })
    }
}

/// The scalar settings as one source gives them; `None` leaves a setting to the next source.
/// Flags, the environment and the file each give one layer, merged by [`Layer::or`].
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Layer {
    /// The host's docker config directory [env: FINCH_HOST_AGENT_DOCKER_CONFIG; default: ~/.finch].
    #[arg(long, value_name = "DIR")]
    pub docker_config: Option<PathBuf>,
    /// Where VM keys and the control socket live [env: FINCH_HOST_AGENT_STATE_DIR; default: ~/.finch/host-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Time a host credential helper may take, in seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    pub helper_timeout_secs: Option<u64>,
    /// Time one native keychain call may take, in seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    pub keychain_timeout_secs: Option<u64>,
    /// Serve secretservice/osxkeychain/wincred natively (false: run the helper binary) [default: true].
    #[arg(long, value_name = "BOOL")]
    pub native_keychain: Option<bool>,
    /// Where keys of VMs without a key file of their own are kept: the OS keychain when it
    /// answers (auto), the keychain or an error (keychain), files in the state directory (file)
    /// [default: auto].
    #[arg(long, value_name = "STORE")]
    pub key_store: Option<KeyStore>,
    /// Heartbeat interval on each link, in milliseconds [default: 5000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Cap of the reconnect delay, in milliseconds [default: 3000].
    #[arg(long, value_name = "MS")]
    pub reconnect_max_ms: Option<u64>,
    /// The host's own store where the docker config names `finchhost` (the bridge's helper,
    /// as a config.json that the VM reads too says): a helper name, served as any `credsStore`
    /// is [default: none: the plaintext `auths`]. `finchhost` itself is never run on the host.
    #[arg(long, value_name = "NAME")]
    pub host_creds_store: Option<String>,
}

impl Layer {
    /// `self`, with what it leaves unset taken from `lower`.
    pub fn or(self, lower: Layer) -> Layer {
        Layer {
            docker_config: self.docker_config.or(lower.docker_config),
            state_dir: self.state_dir.or(lower.state_dir),
            helper_timeout_secs: self.helper_timeout_secs.or(lower.helper_timeout_secs),
            keychain_timeout_secs: self.keychain_timeout_secs.or(lower.keychain_timeout_secs),
            native_keychain: self.native_keychain.or(lower.native_keychain),
            key_store: self.key_store.or(lower.key_store),
            heartbeat_ms: self.heartbeat_ms.or(lower.heartbeat_ms),
            reconnect_max_ms: self.reconnect_max_ms.or(lower.reconnect_max_ms),
            host_creds_store: self.host_creds_store.or(lower.host_creds_store),
        }
    }

    /// What the environment gives.
    pub fn from_env() -> Layer {
        Layer {
            state_dir: env_path(STATE_DIR_ENV),
            docker_config: env_path(DOCKER_CONFIG_ENV),
            ..Layer::default()
        }
    }

    fn numbers(&self) -> [Option<u64>; 4] {
        [
            self.helper_timeout_secs,
            self.keychain_timeout_secs,
            self.heartbeat_ms,
            self.reconnect_max_ms,
        ]
    }

    /// Refuses a flag's number out of its range (the file's are checked where parsed).
    fn check_flags(&self) -> Result<(), ConfigError> {
        for (n, number) in self.numbers().into_iter().zip(&NUMBERS) {
            match n {
                Some(n) if !number.range.contains(&n) => {
                    return Err(ConfigError::ConfigValue(format!(
                        "--{} {n} is out of range ({}..={})",
                        number.key.replace('_', "-"),
                        number.range.start(),
                        number.range.end()
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The state directory this layer names, else the default under Finch's root.
    fn state_dir_or_default(&self) -> Result<PathBuf, ConfigError> {
        match &self.state_dir {
            Some(p) => absolute(p.clone(), "state directory"),
            None => Ok(root()?.join(DEFAULT_STATE_SUBDIR)),
        }
    }
}

/// What the command line says: the config file, the `--vm`s, and the flags' [`Layer`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Config file [env: FINCH_HOST_AGENT_CONFIG; default: ~/.finch/host-agent.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A VM to serve: NAME=ENDPOINT[,key=PATH], e.g. default=unix:///path/to/link.sock.
    /// Repeatable; adds to (or sets the endpoint of) the config file's [vm.NAME] tables.
    #[arg(long = "vm", value_name = "NAME=ENDPOINT[,key=PATH]")]
    pub vms: Vec<VmSpec>,
    /// The flags' scalar settings.
    #[command(flatten)]
    pub layer: Layer,
}

/// One VM as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    /// Where to dial it.
    pub endpoint: Endpoint,
    /// Its key file (the state directory's `vms/NAME.key` when `None`).
    pub key_file: Option<PathBuf>,
    /// What it may do.
    pub policy: Policy,
}

/// A `[vm.NAME]` table without an endpoint, for a Lima instance not found yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitingLima {
    /// Its key file.
    pub key_file: Option<PathBuf>,
    /// Its policy.
    pub policy: Policy,
}

/// The `[lima]` table: Lima instances served by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimaSettings {
    /// `$LIMA_HOME`: where the instances live.
    pub home: PathBuf,
    /// Names of the instances to serve; `"*"` for every one.
    pub instances: Vec<String>,
    /// Holds `linux-x86_64/` and `linux-aarch64/`, each with the guest binaries.
    pub guest_dir: PathBuf,
    /// Whether the agent puts the fragment back when it is gone: into `_config/default.yaml`,
    /// or with `template` into the template and each instance's `lima.yaml`.
    pub keep_fragment: bool,
    /// Finch's template (`<install>/os/finch.yaml`): the fragment goes there and into each
    /// served instance's `lima.yaml`, which Finch does not rewrite (`crate::lima::Wiring`).
    pub template: Option<PathBuf>,
    /// With `template`: no mount that holds the home, Finch's own files read-only.
    pub harden: bool,
    /// With `harden`: the directories mounted writable instead of the home.
    pub shares: Vec<PathBuf>,
}

impl LimaSettings {
    /// Whether instance `name` is one to serve.
    pub fn wants(&self, name: &str) -> bool {
        self.instances.iter().any(|i| i == "*" || i == name)
    }

    /// Lima's config directory, `home/_config`.
    pub fn config_dir(&self) -> PathBuf {
        self.home.join("_config")
    }
}

/// The bridge's own helper name: in a docker config it means "ask the host agent", which is
/// this process (Finch on Windows shares `config.json` between the host and the VM).
pub const BRIDGE_HELPER: &str = "finchhost";

/// `name` checked as `host_creds_store`: a helper name, and not the bridge's own.
fn host_creds_store(name: String) -> Result<String, ConfigError> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !plain || name == BRIDGE_HELPER {
        return Err(ConfigError::ConfigValue(format!(
            "host_creds_store {name:?}: a helper name (letters, digits, '-', '_', '.'), not {BRIDGE_HELPER:?}"
        )));
    }
    Ok(name)
}

/// Every setting, merged. Lima instances are not in it: the agent adopts them
/// (`crate::lima::adopt`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file consulted (it may not exist).
    pub config_file: PathBuf,
    /// Whether it existed.
    pub config_file_found: bool,
    /// Where VM keys and the control socket live.
    pub state_dir: PathBuf,
    /// The host's docker config directory.
    pub docker_config: PathBuf,
    /// Time a host helper may take.
    pub helper_timeout: Duration,
    /// Time one native keychain call may take.
    pub keychain_timeout: Duration,
    /// Whether keychain helper names are served natively.
    pub native_keychain: bool,
    /// Where a docker config's `finchhost` leads on the host (`None`: the plaintext `auths`).
    pub host_creds_store: Option<String>,
    /// Where keys of VMs without a `key` file of their own are kept.
    pub key_store: KeyStore,
    /// Heartbeat interval on each link.
    pub heartbeat: Duration,
    /// Cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// The VMs, by name.
    pub vms: BTreeMap<VmName, VmSettings>,
    /// `[vm.NAME]` tables without an endpoint, each for a Lima instance `[lima]` wants.
    pub awaiting_lima: BTreeMap<VmName, AwaitingLima>,
    /// Native ECR.
    pub ecr: EcrSettings,
    /// The `[lima]` table.
    pub lima: Option<LimaSettings>,
}

/// A config that could not be used. The message names the file, line, column and key.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::enum_variant_names)] // noun + verb names, one noun per error type
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    ConfigRead {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// A key or value is wrong.
    #[error("{file}:{line}:{column}: key `{key}`: {reason}")]
    ConfigInvalid {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A setting given outside the file is wrong.
    #[error("{0}")]
    ConfigValue(String),
}

fn root() -> Result<PathBuf, ConfigError> {
    finch_root().map_err(|e| ConfigError::ConfigValue(e.to_string()))
}

/// The config file to read: the flag, else `$FINCH_HOST_AGENT_CONFIG`, else the default;
/// and whether it was named (a named file must exist).
pub fn config_file(flag: Option<&Path>) -> Result<(PathBuf, bool), ConfigError> {
    if let Some(p) = flag.map(Path::to_path_buf).or_else(|| env_path(CONFIG_ENV)) {
        return Ok((p, true));
    }
    Ok((root()?.join(DEFAULT_CONFIG_FILE), false))
}

/// The state directory from flags, environment and defaults alone, for commands that must
/// work while the config file is broken.
pub fn state_dir_without_file(o: &Overrides) -> Result<PathBuf, ConfigError> {
    o.layer.clone().or(Layer::from_env()).state_dir_or_default()
}

fn read_file(path: &Path, named: bool) -> Result<Option<String>, ConfigError> {
    use std::io::Read;
    let err = |reason: String| ConfigError::ConfigRead { path: path.display().to_string(), reason };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(err(format!("larger than {MAX_CONFIG_FILE} bytes")));
    }
    Ok(Some(text))
}

impl Settings {
    /// Merges flags, environment, the config file, `attached.toml` and defaults. Reads those
    /// two files and nothing else; creates nothing, logs nothing.
    ///
    /// Scalars: flags > environment > file > defaults. VMs: the file's tables, then the
    /// attached ones, then `--vm`s; a later endpoint or key replaces an earlier one, and the
    /// file's policy stays.
    pub fn load(o: &Overrides) -> Result<Settings, ConfigError> {
        o.layer.check_flags()?;
        let (path, named) = config_file(o.config.as_deref())?;
        let text = read_file(&path, named)?;
        let found = text.is_some();
        let file = file::parse(&path, text.as_deref().unwrap_or_default())?;
        let layer = o.layer.clone().or(Layer::from_env()).or(file.layer);
        let state_dir = layer.state_dir_or_default()?;
        let docker_config = match &layer.docker_config {
            Some(p) => absolute(p.clone(), "docker config directory")?,
            None => root()?.join(DEFAULT_DOCKER_CONFIG_SUBDIR),
        };
        let numbers = layer.numbers();
        let [helper, keychain, heartbeat, reconnect] =
            std::array::from_fn(|i| numbers[i].unwrap_or(NUMBERS[i].default));

        let mut vms = BTreeMap::new();
        let mut awaiting = BTreeMap::new();
        for (name, vm) in file.vms {
            match vm.endpoint {
                Some(endpoint) => {
                    vms.insert(
                        name,
                        VmSettings { endpoint, key_file: vm.key_file, policy: vm.policy },
                    );
                }
                None => {
                    awaiting.insert(name, vm);
                }
            }
        }
        let attached = read_attached(&state_dir.join(ATTACHED_FILE))?;
        let mut seen = std::collections::HashSet::new();
        for spec in &o.vms {
            if !seen.insert(&spec.name) {
                return Err(ConfigError::ConfigValue(format!(
                    "VM {} is given twice on the command line",
                    spec.name
                )));
            }
        }
        let later = attached
            .into_iter()
            .map(|(name, vm)| (name, vm.endpoint, vm.key))
            .chain(o.vms.iter().map(|s| (s.name.clone(), s.endpoint.clone(), s.key.clone())));
        for (name, endpoint, key) in later {
            let vm = vms.entry(name).or_insert_with_key(|name| {
                let (key_file, policy) = match awaiting.remove(name) {
                    Some(vm) => (vm.key_file, vm.policy),
                    None => (None, Policy::default()),
                };
                VmSettings { endpoint: endpoint.clone(), key_file, policy }
            });
            vm.endpoint = endpoint;
            if key.is_some() {
                vm.key_file = key;
            }
        }
        let mut awaiting_lima = BTreeMap::new();
        for (name, vm) in awaiting {
            if !file.lima.as_ref().is_some_and(|l| l.wants(&name)) {
                return Err(vm.missing);
            }
            awaiting_lima.insert(name, AwaitingLima { key_file: vm.key_file, policy: vm.policy });
        }
        Ok(Settings {
            config_file: path,
            config_file_found: found,
            state_dir,
            docker_config,
            helper_timeout: Duration::from_secs(helper),
            keychain_timeout: Duration::from_secs(keychain),
            native_keychain: layer.native_keychain.unwrap_or(true),
            host_creds_store: match layer.host_creds_store {
                Some(name) => Some(host_creds_store(name)?),
                None => None,
            },
            key_store: layer.key_store.unwrap_or_default(),
            heartbeat: Duration::from_millis(heartbeat),
            reconnect_max: Duration::from_millis(reconnect),
            vms,
            awaiting_lima,
            ecr: file.ecr,
            lima: file.lima,
        })
    }

    /// The key file of VM `name` (where it is, or would be, when kept in a file).
    pub fn key_file(&self, name: &str) -> Option<PathBuf> {
        let vm = self.vms.get(name)?;
        Some(
            vm.key_file
                .clone()
                .unwrap_or_else(|| crate::platform::paths::key_path(&self.state_dir, name)),
        )
    }
}

fn absolute(p: PathBuf, what: &str) -> Result<PathBuf, ConfigError> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(ConfigError::ConfigValue(format!(
            "the {what} {} must be an absolute path",
            p.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ecr::RegistryMatch;

    #[cfg(unix)]
    fn reg(s: &str) -> finch_shared::registry::Registry {
        finch_shared::registry::Registry::parse(s).unwrap()
    }

    fn load(text: &str, o: Overrides) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host-agent.toml");
        std::fs::write(&file, text).unwrap();
        Settings::load(&Overrides { config: Some(file), ..o })
    }

    #[test]
    fn vm_specs() {
        let s: VmSpec = "default=unix:///tmp/l.sock".parse().unwrap();
        assert_eq!(
            s,
            VmSpec {
                name: "default".parse().unwrap(),
                endpoint: Endpoint::Unix("/tmp/l.sock".into()),
                key: None
            }
        );
        let key = if cfg!(windows) { r"C:\k\finch.key" } else { "/k/finch.key" };
        let s: VmSpec = format!("finch=unix:///a/b.sock,key={key}").parse().unwrap();
        assert_eq!(s.key, Some(PathBuf::from(key)));
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

    #[cfg(unix)] // the fixtures spell unix absolute paths
    #[test]
    fn precedence_flags_over_file_over_defaults() {
        let text = "state_dir = \"/from/file/state\"\nhelper_timeout_secs = 7\nheartbeat_ms = 900\n\
                    [vm.a]\nendpoint = \"unix:///a.sock\"\n[vm.a.policy]\nstore = [\"ghcr.io\"]\n";
        let s = load(text, Overrides::default()).unwrap();
        assert!(s.config_file_found);
        assert_eq!(s.state_dir, PathBuf::from("/from/file/state"));
        assert_eq!(s.helper_timeout, Duration::from_secs(7));
        assert_eq!(s.heartbeat, Duration::from_millis(900));
        assert_eq!(s.reconnect_max, Duration::from_millis(NUMBERS[3].default));
        assert!(s.native_keychain);
        let a = &s.vms["a"];
        assert!(a.policy.store.allows(&reg("ghcr.io")) && !a.policy.store.allows(&reg("quay.io")));
        assert!(a.policy.get.allows(&reg("quay.io")));
        let o = Overrides {
            vms: vec!["a=unix:///flag.sock".parse().unwrap(), "b=unix:///b.sock".parse().unwrap()],
            layer: Layer {
                state_dir: Some("/flag/state".into()),
                helper_timeout_secs: Some(3),
                native_keychain: Some(false),
                ..Layer::default()
            },
            ..Overrides::default()
        };
        let s = load(text, o).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/flag/state"));
        assert_eq!(s.helper_timeout, Duration::from_secs(3));
        assert!(!s.native_keychain);
        assert_eq!(s.vms["a"].endpoint, Endpoint::Unix("/flag.sock".into()));
        // The flag's endpoint keeps the file's policy.
        assert!(!s.vms["a"].policy.store.allows(&reg("quay.io")));
        assert_eq!(s.vms["b"].policy, Policy::default());
    }

    #[cfg(unix)] // the fixtures spell unix absolute paths
    #[test]
    fn errors_name_file_line_column_and_key() {
        let cases: &[(&str, &str)] = &[
            ("helper_timeout_secs = 0\n", ":1:23: key `helper_timeout_secs`: 0 is out of range"),
            ("bogus = 1\n", ":1:1: key `bogus`: unknown field"),
            (
                "\n[vm.a]\nendpoint = \"ftp://x\"\n",
                ":3:12: key `vm.a.endpoint`: unsupported endpoint",
            ),
            (
                "[vm.a]\nendpoint = \"unix:///a\"\n[vm.a.policy]\nget = [\"ok.io\", \"https://bad/\"]\n",
                ":4:17: key `vm.a.policy.get`: \"https://bad/\" is not a registry pattern",
            ),
            ("[vm.\"../x\"]\nendpoint = \"unix:///a\"\n", "key `vm.../x`: \"../x\": a VM name"),
            ("[vm.a]\nkey = \"/k\"\n", ":1:5: key `vm.a.endpoint`: missing"),
            (
                "state_dir = \"relative\"\n",
                ":1:13: key `state_dir`: \"relative\" is not an absolute",
            ),
            ("heartbeat_ms = \"fast\"\n", ":1:16: key `heartbeat_ms`: invalid type"),
            (
                "[vm.a]\nendpoint = \"unix:///a\"\ncolour = 1\n",
                ":3:1: key `vm.a.colour`: unknown field",
            ),
            ("native_keychain = yes\n", ":1:19: key `native_keychain`:"),
            ("key_store = \"vault\"\n", ":1:13: key `key_store`: unknown variant `vault`"),
        ];
        for (text, want) in cases {
            let err = load(text, Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("host-agent.toml"), "{err}");
            assert!(err.contains(want), "{text:?}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn ecr_table() {
        let text = "[ecr]\nauto = false\ntimeout_secs = 5\n[[ecr.registry]]\nregistry = \"210987654321\"\nprofile = \"cross\"\nrole_arn = \"arn:aws:iam::210987654321:role/pull\"\n[[ecr.registry]]\nregistry = \"*.amazonaws.com.cn\"\nregion = \"cn-north-1\"\n";
        let s = load(text, Overrides::default()).unwrap();
        assert!(!s.ecr.auto && !s.ecr.instance_metadata);
        assert_eq!(s.ecr.timeout, Duration::from_secs(5));
        assert_eq!(s.ecr.rules.len(), 2);
        assert_eq!(s.ecr.rules[0].registry, RegistryMatch::Account("210987654321".into()));
        assert_eq!(load("", Overrides::default()).unwrap().ecr, EcrSettings::default());
        for (text, want) in [
            (
                "[[ecr.registry]]\nregistry = \"https://x/\"\n",
                ":2:12: key `ecr.registry.registry`: \"https://x/\" is not a registry pattern",
            ),
            (
                "[[ecr.registry]]\nregistry = \"*\"\nrole_arn = \"role\"\n",
                ":3:12: key `ecr.registry.role_arn`: \"role\" is not a role ARN",
            ),
            (
                "[[ecr.registry]]\nregistry = \"*\"\nregion = \"US WEST\"\n",
                ":3:10: key `ecr.registry.region`",
            ),
            ("[ecr]\ntimeout_secs = 0\n", ":2:16: key `ecr.timeout_secs`: 0 is out of range"),
            ("[ecr]\nautomatic = true\n", ":2:1: key `ecr.automatic`: unknown field"),
        ] {
            let err = load(text, Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}\n got: {err}\nwant: {want}");
        }
    }

    #[cfg(unix)] // the fixtures spell unix absolute paths
    #[test]
    fn attached_vms_merge_after_the_file_and_before_flags() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mut vms = BTreeMap::new();
        vms.insert(
            "b".parse().unwrap(),
            AttachedVm {
                endpoint: "unix:///att/b \"q\".sock".parse().unwrap(),
                key: Some("/k/b.key".into()),
            },
        );
        vms.insert(
            "a".parse().unwrap(),
            AttachedVm { endpoint: "hybrid:///att/a.sock:6127".parse().unwrap(), key: None },
        );
        write_attached(&state.join(ATTACHED_FILE), &vms).unwrap();
        assert_eq!(read_attached(&state.join(ATTACHED_FILE)).unwrap(), vms);
        let o = Overrides {
            layer: Layer { state_dir: Some(state.clone()), ..Layer::default() },
            ..Overrides::default()
        };
        let text = "[vm.a]\nendpoint = \"unix:///file/a.sock\"\n[vm.a.policy]\nlist = []\n[vm.c.policy]\nget = []\n";
        // vm.c has no endpoint anywhere: refused.
        assert!(load(text, o.clone()).unwrap_err().to_string().contains("vm.c.endpoint"));
        let text = "[vm.a]\nendpoint = \"unix:///file/a.sock\"\n[vm.a.policy]\nlist = []\n[vm.b.policy]\nget = []\n";
        let s = load(text, Overrides { vms: vec!["b=unix:///flag/b.sock".parse().unwrap()], ..o })
            .unwrap();
        assert_eq!(s.vms["a"].endpoint, "hybrid:///att/a.sock:6127".parse().unwrap());
        assert!(s.vms["a"].policy.list.is_empty(), "the file's policy is kept");
        assert_eq!(s.vms["b"].endpoint, Endpoint::Unix("/flag/b.sock".into()));
        assert_eq!(s.vms["b"].key_file, Some(PathBuf::from("/k/b.key")));
    }

    #[test]
    fn named_file_must_exist_default_may_not() {
        let o = Overrides { config: Some("/nonexistent/x.toml".into()), ..Overrides::default() };
        assert!(matches!(Settings::load(&o), Err(ConfigError::ConfigRead { .. })));
        let o = Overrides {
            layer: Layer { helper_timeout_secs: Some(0), ..Layer::default() },
            ..Overrides::default()
        };
        let err = load("", o).unwrap_err().to_string();
        assert!(err.contains("--helper-timeout-secs 0 is out of range"), "{err}");
    }

    #[cfg(windows)]
    #[test]
    fn windows_defaults_follow_finch_and_paths_are_windows_paths() {
        let root = PathBuf::from(std::env::var_os("LOCALAPPDATA").unwrap());
        let s = load("", Overrides::default()).unwrap();
        assert_eq!(s.docker_config, root.join(".finch"));
        assert_eq!(s.state_dir, root.join(".finch").join("host-agent"));
        assert_eq!(config_file(None).unwrap().0, root.join(".finch/host-agent.toml"));
        assert_eq!(file::expand_path("C:\\finch\\x").unwrap(), PathBuf::from("C:\\finch\\x"));
        assert!(file::expand_path("/unrooted").is_err(), "no drive: not absolute on Windows");
        assert!(
            file::expand_path("~\\x").unwrap().starts_with(crate::platform::paths::home().unwrap())
        );
    }
}
