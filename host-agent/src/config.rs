//! The host agent's settings: named defaults, the config file, `--vm` specs, keys.
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
//!
//! [vm.finch]
//! endpoint = "unix:///Users/me/.finch/lima/data/finch/sock/finch-guest-agent.sock"
//! key = "~/.finch/host-agent/vms/finch.key"   # optional; this is the default
//!
//! [vm.finch.policy]                     # optional; each rule defaults to ["*"]
//! get = ["*"]
//! store = ["*.dkr.ecr.us-west-2.amazonaws.com", "ghcr.io"]
//! erase = ["ghcr.io"]
//! list = []                             # an empty rule allows nothing
//!
//! [lima]                                # optional: serve Lima instances by discovery
//! home = "/Applications/Finch/lima/data"  # $LIMA_HOME [default: $LIMA_HOME or ~/.lima]
//! instances = ["finch"]                 # or ["*"] (the default): every instance there
//! guest_dir = "~/finch-bridge/guest"    # linux-x86_64/, linux-aarch64/ [default: guest/ beside the binary]
//! keep_fragment = true                  # put the fragment back into _config/default.yaml
//! ```
//!
//! A `[vm.NAME]` table for a Lima instance needs no endpoint (its policy applies).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use serde::Deserialize;

use crate::lima::{Instance, LimaSettings};
use crate::policy::{Pattern, Policy, Rule};
use crate::source::ecr::{EcrRule, EcrSettings, RegistryMatch};
use crate::vm_keys::KeyStore;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "FINCH_HOST_AGENT_CONFIG";
/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "FINCH_HOST_AGENT_STATE_DIR";
/// Environment variable naming the host's docker config directory.
pub const DOCKER_CONFIG_ENV: &str = "FINCH_HOST_AGENT_DOCKER_CONFIG";
/// Config file under Finch's root ([`finch_root`]) when nothing else is given.
pub const DEFAULT_CONFIG_FILE: &str = ".finch/host-agent.toml";
/// State directory under Finch's root when nothing else is given.
pub const DEFAULT_STATE_SUBDIR: &str = ".finch/host-agent";
/// Docker config directory under Finch's root when nothing else is given (Finch's).
pub const DEFAULT_DOCKER_CONFIG_SUBDIR: &str = ".finch";
/// Default time a host credential helper may take.
pub const DEFAULT_HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time one native keychain call may take.
pub const DEFAULT_KEYCHAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default heartbeat interval on each link.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default cap of the reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(3);
/// Largest config file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;

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

fn vm_name_error(name: &str) -> String {
    format!("{name:?}: a VM name uses letters, digits, '.', '_' or '-' (at most 64)")
}

impl std::str::FromStr for VmSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ENDPOINT[,key=PATH]"))?;
        if !valid_vm_name(name) {
            return Err(vm_name_error(name));
        }
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
        Ok(VmSpec { name: name.to_owned(), endpoint, key })
    }
}

/// What the command line says; `None` leaves the setting to the environment, file, defaults.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--vm`, in order.
    pub vms: Vec<VmSpec>,
    /// `--docker-config`.
    pub docker_config: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--helper-timeout-secs`.
    pub helper_timeout_secs: Option<u64>,
    /// `--keychain-timeout-secs`.
    pub keychain_timeout_secs: Option<u64>,
    /// `--native-keychain`.
    pub native_keychain: Option<bool>,
    /// `--key-store`.
    pub key_store: Option<KeyStore>,
    /// `--heartbeat-ms`.
    pub heartbeat_ms: Option<u64>,
    /// `--reconnect-max-ms`.
    pub reconnect_max_ms: Option<u64>,
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

/// Every setting, merged.
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
    /// Where keys of VMs without a `key` file of their own are kept.
    pub key_store: KeyStore,
    /// Heartbeat interval on each link.
    pub heartbeat: Duration,
    /// Cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// The VMs, by name.
    pub vms: BTreeMap<String, VmSettings>,
    /// Native ECR.
    pub ecr: EcrSettings,
    /// The `[lima]` table: Lima instances served by discovery.
    pub lima: Option<LimaSettings>,
    /// The Lima instances found (each is also in `vms`).
    pub lima_instances: BTreeMap<String, Instance>,
    /// Why `"*"` adopted no instance: a VM can write the Lima home (see
    /// [`crate::lima::home_writable_from`]).
    pub lima_untrusted: Option<LimaUntrusted>,
}

/// A Lima home that a VM can write, so `"*"` adopts nothing from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimaUntrusted {
    /// Which VM's mount reaches the home, and where.
    pub reason: String,
    /// Whether this was read from the marker (seen before) rather than found now.
    pub from_marker: bool,
}

/// Whether `"*"` may adopt instances from `lima`'s home: not when a VM can write it, now
/// (one of `instances` mounts it writable) or before (the marker in `state_dir` says so: a VM
/// could since have rewritten its own `lima.yaml` to hide the mount it still has).
fn lima_trust(
    lima: &LimaSettings,
    instances: &BTreeMap<String, Instance>,
    state_dir: &Path,
) -> Option<LimaUntrusted> {
    use std::io::Read;
    if !lima.instances.iter().any(|i| i == "*") {
        return None;
    }
    let marker = state_dir.join(crate::lima::HOME_WRITABLE_MARKER);
    let mut text = String::new();
    if std::fs::File::open(&marker).and_then(|f| f.take(4096).read_to_string(&mut text)).is_ok() {
        return Some(LimaUntrusted { reason: text.trim().to_owned(), from_marker: true });
    }
    let (vm, location) =
        crate::lima::home_writable_from(lima, instances, &home().unwrap_or_default())?;
    let reason = format!(
        "VM {vm} mounts {} writable, which holds the Lima home {}",
        location.display(),
        lima.home.display()
    );
    Some(LimaUntrusted { reason, from_marker: false })
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

// ---- the file's shape ------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    docker_config: Option<toml::Spanned<String>>,
    state_dir: Option<toml::Spanned<String>>,
    helper_timeout_secs: Option<toml::Spanned<u64>>,
    keychain_timeout_secs: Option<toml::Spanned<u64>>,
    native_keychain: Option<bool>,
    key_store: Option<KeyStore>,
    heartbeat_ms: Option<toml::Spanned<u64>>,
    reconnect_max_ms: Option<toml::Spanned<u64>>,
    #[serde(default)]
    vm: BTreeMap<toml::Spanned<String>, FileVm>,
    ecr: Option<FileEcr>,
    lima: Option<FileLima>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLima {
    home: Option<toml::Spanned<String>>,
    instances: Option<Vec<toml::Spanned<String>>>,
    guest_dir: Option<toml::Spanned<String>>,
    keep_fragment: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEcr {
    auto: Option<bool>,
    instance_metadata: Option<bool>,
    timeout_secs: Option<toml::Spanned<u64>>,
    #[serde(default)]
    registry: Vec<FileEcrRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEcrRule {
    registry: toml::Spanned<String>,
    profile: Option<toml::Spanned<String>>,
    region: Option<toml::Spanned<String>>,
    role_arn: Option<toml::Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVm {
    endpoint: Option<toml::Spanned<String>>,
    key: Option<toml::Spanned<String>>,
    policy: Option<FilePolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    get: Option<Vec<toml::Spanned<String>>>,
    store: Option<Vec<toml::Spanned<String>>>,
    erase: Option<Vec<toml::Spanned<String>>>,
    list: Option<Vec<toml::Spanned<String>>>,
}

/// A parsed file and the means to point into it.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        reason: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::ConfigInvalid {
            file: self.file.display().to_string(),
            line,
            column,
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn path(&self, v: &toml::Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        expand_path(v.get_ref()).map_err(|reason| self.error(v.span(), key, reason))
    }

    fn ranged(
        &self,
        v: &toml::Spanned<u64>,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let n = *v.get_ref();
        if range.contains(&n) {
            Ok(n)
        } else {
            Err(self.error(
                v.span(),
                key,
                format!("{n} is out of range ({}..={})", range.start(), range.end()),
            ))
        }
    }

    fn rule(&self, patterns: &[toml::Spanned<String>], key: &str) -> Result<Rule, ConfigError> {
        patterns
            .iter()
            .map(|p| {
                p.get_ref().parse::<Pattern>().map_err(|e| self.error(p.span(), key, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Rule)
    }
}

impl Source<'_> {
    fn lima(&self, l: &FileLima) -> Result<LimaSettings, ConfigError> {
        let home = match &l.home {
            Some(h) => self.path(h, "lima.home")?,
            None => match env_path("LIMA_HOME") {
                Some(p) => p,
                None => home().map_err(|e| ConfigError::ConfigValue(e.to_string()))?.join(".lima"),
            },
        };
        let mut instances = Vec::new();
        for i in l.instances.iter().flatten() {
            let name = i.get_ref();
            if name != "*" && !valid_vm_name(name) {
                return Err(self.error(
                    i.span(),
                    "lima.instances",
                    format!("{}, or \"*\" for every instance", vm_name_error(name)),
                ));
            }
            instances.push(name.clone());
        }
        if l.instances.is_none() {
            instances.push("*".to_owned());
        }
        let guest_dir = match &l.guest_dir {
            Some(g) => self.path(g, "lima.guest_dir")?,
            None => default_guest_dir(),
        };
        Ok(LimaSettings {
            home,
            instances,
            guest_dir,
            keep_fragment: l.keep_fragment.unwrap_or(false),
        })
    }

    fn ecr(&self, e: &FileEcr) -> Result<EcrSettings, ConfigError> {
        let defaults = EcrSettings::default();
        let timeout = match &e.timeout_secs {
            Some(v) => Duration::from_secs(self.ranged(v, "ecr.timeout_secs", 1..=300)?),
            None => defaults.timeout,
        };
        let mut rules = Vec::new();
        for rule in &e.registry {
            let r = rule.registry.get_ref();
            let key = "ecr.registry.registry";
            let registry = if r.len() == 12 && r.bytes().all(|b| b.is_ascii_digit()) {
                RegistryMatch::Account(r.clone())
            } else {
                RegistryMatch::Pattern(r.parse::<Pattern>().map_err(|err| {
                    self.error(
                        rule.registry.span(),
                        key,
                        format!("{err}, or a 12-digit account id"),
                    )
                })?)
            };
            let text = |v: &Option<toml::Spanned<String>>,
                        key: &str,
                        ok: &dyn Fn(&str) -> bool,
                        what: &str| {
                match v {
                    None => Ok(None),
                    Some(v) if ok(v.get_ref()) => Ok(Some(v.get_ref().clone())),
                    Some(v) => {
                        Err(self.error(v.span(), key, format!("{:?} is not {what}", v.get_ref())))
                    }
                }
            };
            let name_ok = |s: &str| {
                !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
            };
            let region_ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            };
            let arn_ok = |s: &str| {
                s.starts_with("arn:")
                    && s.contains(":role/")
                    && s.len() <= 2048
                    && s.bytes().all(|b| b.is_ascii_graphic())
            };
            rules.push(EcrRule {
                registry,
                profile: text(&rule.profile, "ecr.registry.profile", &name_ok, "a profile name")?,
                region: text(
                    &rule.region,
                    "ecr.registry.region",
                    &region_ok,
                    "a region (like us-west-2)",
                )?,
                role_arn: text(
                    &rule.role_arn,
                    "ecr.registry.role_arn",
                    &arn_ok,
                    "a role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                )?,
            });
        }
        Ok(EcrSettings {
            auto: e.auto.unwrap_or(defaults.auto),
            instance_metadata: e.instance_metadata.unwrap_or(defaults.instance_metadata),
            timeout,
            rules,
        })
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (line, String::from_utf8_lossy(&before[start..]).chars().count() + 1)
}

/// The dotted key being defined at byte `offset`: the last `[table]` header before it and
/// the key on its line (for errors toml reports by position only).
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let mut table = String::new();
    let mut key = String::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
            key.clear();
        } else if let Some((k, _)) = trimmed.split_once('=') {
            key = k.trim().trim_matches('"').to_owned();
        }
        pos += line.len();
        if pos > offset {
            break;
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// `~/x` and absolute paths; anything else is refused (the agent's cwd means nothing).
pub fn expand_path(s: &str) -> Result<PathBuf, String> {
    if let Some(rest) =
        s.strip_prefix("~/").or_else(|| s.strip_prefix("~\\").filter(|_| cfg!(windows)))
    {
        return home().map(|h| h.join(rest)).map_err(|e| e.to_string());
    }
    if Path::new(s).is_absolute() {
        return Ok(PathBuf::from(s));
    }
    Err(format!("{s:?} is not an absolute path (or ~/…)"))
}

/// The user's home, for `~/` in paths and the login service's files: `$HOME` on unix,
/// `%USERPROFILE%` on Windows.
pub fn home() -> anyhow::Result<PathBuf> {
    let var = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    std::env::var_os(var).filter(|h| !h.is_empty()).map(PathBuf::from).with_context(|| {
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
    let root = std::env::var_os("LOCALAPPDATA")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("LOCALAPPDATA is not set: give --state-dir, --docker-config and --config")?;
    let text = root.to_string_lossy();
    anyhow::ensure!(
        !text.contains(['&', '"']),
        "LOCALAPPDATA ({text}) contains & or \", which Finch refuses too"
    );
    Ok(root)
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The config file to read: the flag, else `$FINCH_HOST_AGENT_CONFIG`, else the default;
/// and whether it was named (a named file must exist).
pub fn config_file(flag: Option<&Path>) -> Result<(PathBuf, bool), ConfigError> {
    if let Some(p) = flag.map(Path::to_path_buf).or_else(|| env_path(CONFIG_ENV)) {
        return Ok((p, true));
    }
    let root = finch_root().map_err(|e| ConfigError::ConfigValue(e.to_string()))?;
    Ok((root.join(DEFAULT_CONFIG_FILE), false))
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
    /// Merges flags, environment, the config file and defaults. Nothing is created.
    pub fn load(o: &Overrides) -> Result<Settings, ConfigError> {
        let (path, named) = config_file(o.config.as_deref())?;
        let text = read_file(&path, named)?;
        let found = text.is_some();
        let text = text.unwrap_or_default();
        let src = Source { file: &path, text: &text };
        let file: FileConfig = toml::from_str(&text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = key_at(&text, span.start);
            src.error(span, if key.is_empty() { "-" } else { &key }, e.message().trim())
        })?;
        let value = |msg: String| ConfigError::ConfigValue(msg);

        let state_dir = match (o.state_dir.clone(), env_path(STATE_DIR_ENV), &file.state_dir) {
            (Some(p), _, _) | (None, Some(p), _) => absolute(p, "state directory")?,
            (None, None, Some(v)) => src.path(v, "state_dir")?,
            (None, None, None) => {
                finch_root().map_err(|e| value(e.to_string()))?.join(DEFAULT_STATE_SUBDIR)
            }
        };
        let docker_config =
            match (o.docker_config.clone(), env_path(DOCKER_CONFIG_ENV), &file.docker_config) {
                (Some(p), _, _) | (None, Some(p), _) => absolute(p, "docker config directory")?,
                (None, None, Some(v)) => src.path(v, "docker_config")?,
                (None, None, None) => finch_root()
                    .map_err(|e| value(e.to_string()))?
                    .join(DEFAULT_DOCKER_CONFIG_SUBDIR),
            };
        let number = |flag: Option<u64>,
                      from_file: &Option<toml::Spanned<u64>>,
                      key: &str,
                      range: std::ops::RangeInclusive<u64>,
                      default: u64|
         -> Result<u64, ConfigError> {
            match (flag, from_file) {
                (Some(n), _) if range.contains(&n) => Ok(n),
                (Some(n), _) => Err(value(format!(
                    "--{} {n} is out of range ({}..={})",
                    key.replace('_', "-"),
                    range.start(),
                    range.end()
                ))),
                (None, Some(v)) => src.ranged(v, key, range),
                (None, None) => Ok(default),
            }
        };
        let helper_timeout = number(
            o.helper_timeout_secs,
            &file.helper_timeout_secs,
            "helper_timeout_secs",
            1..=600,
            DEFAULT_HELPER_TIMEOUT.as_secs(),
        )?;
        let keychain_timeout = number(
            o.keychain_timeout_secs,
            &file.keychain_timeout_secs,
            "keychain_timeout_secs",
            1..=600,
            DEFAULT_KEYCHAIN_TIMEOUT.as_secs(),
        )?;
        let heartbeat = number(
            o.heartbeat_ms,
            &file.heartbeat_ms,
            "heartbeat_ms",
            100..=3_600_000,
            DEFAULT_HEARTBEAT.as_millis() as u64,
        )?;
        let reconnect_max = number(
            o.reconnect_max_ms,
            &file.reconnect_max_ms,
            "reconnect_max_ms",
            100..=3_600_000,
            DEFAULT_RECONNECT_MAX.as_millis() as u64,
        )?;

        let mut vms = BTreeMap::new();
        let mut file_endpoints = BTreeMap::new();
        for (name, vm) in &file.vm {
            let key = format!("vm.{}", name.get_ref());
            if !valid_vm_name(name.get_ref()) {
                return Err(src.error(name.span(), &key, vm_name_error(name.get_ref())));
            }
            let policy = match &vm.policy {
                None => Policy::default(),
                Some(p) => {
                    let rule = |r: &Option<Vec<toml::Spanned<String>>>, op: &str| match r {
                        None => Ok(Rule::any()),
                        Some(list) => src.rule(list, &format!("{key}.policy.{op}")),
                    };
                    Policy {
                        get: rule(&p.get, "get")?,
                        store: rule(&p.store, "store")?,
                        erase: rule(&p.erase, "erase")?,
                        list: rule(&p.list, "list")?,
                    }
                }
            };
            let endpoint = match &vm.endpoint {
                Some(e) => Some(e.get_ref().parse::<Endpoint>().map_err(|err| {
                    src.error(e.span(), &format!("{key}.endpoint"), err.to_string())
                })?),
                None => None,
            };
            let key_file = match &vm.key {
                Some(k) => Some(src.path(k, &format!("{key}.key"))?),
                None => None,
            };
            file_endpoints.insert(name.get_ref().clone(), (name.span(), endpoint.is_some()));
            if let Some(endpoint) = endpoint {
                vms.insert(name.get_ref().clone(), VmSettings { endpoint, key_file, policy });
            } else {
                // Completed by a --vm of the same name below, or refused.
                vms.insert(
                    name.get_ref().clone(),
                    VmSettings { endpoint: Endpoint::Unix(PathBuf::new()), key_file, policy },
                );
            }
        }
        // Lima instances found under [lima] home: an endpoint the file gives wins.
        let lima = match &file.lima {
            None => None,
            Some(l) => Some(src.lima(l)?),
        };
        let (mut lima_instances, left_out) =
            lima.as_ref().map(crate::lima::discover).unwrap_or_default();
        let lima_untrusted = lima.as_ref().and_then(|l| lima_trust(l, &lima_instances, &state_dir));
        if let (Some(l), Some(_)) = (&lima, &lima_untrusted) {
            lima_instances.retain(|name, _| l.instances.contains(name));
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                max = crate::lima::MAX_INSTANCES,
                "Lima home: instances or entries past the bound are not served"
            );
        }
        for (name, instance) in &lima_instances {
            match file_endpoints.get_mut(name) {
                Some((_, true)) => {}
                Some((_, has_endpoint)) => {
                    *has_endpoint = true;
                    if let Some(vm) = vms.get_mut(name) {
                        vm.endpoint = instance.endpoint();
                    }
                }
                None => {
                    vms.insert(
                        name.clone(),
                        VmSettings {
                            endpoint: instance.endpoint(),
                            key_file: None,
                            policy: Policy::default(),
                        },
                    );
                }
            }
        }
        // VMs attached at run time (`finch-host-agent attach`): after the file, before flags.
        let mut attached_names = std::collections::HashSet::new();
        for (name, vm) in read_attached(&state_dir.join(ATTACHED_FILE))? {
            let entry = vms.entry(name.clone()).or_insert_with(|| VmSettings {
                endpoint: vm.endpoint.clone(),
                key_file: None,
                policy: Policy::default(),
            });
            entry.endpoint = vm.endpoint;
            if vm.key.is_some() {
                entry.key_file = vm.key;
            }
            attached_names.insert(name);
        }
        let mut seen = std::collections::HashSet::new();
        for spec in &o.vms {
            if !seen.insert(spec.name.clone()) {
                return Err(value(format!("VM {} is given twice on the command line", spec.name)));
            }
            let entry = vms.entry(spec.name.clone()).or_insert_with(|| VmSettings {
                endpoint: spec.endpoint.clone(),
                key_file: None,
                policy: Policy::default(),
            });
            entry.endpoint = spec.endpoint.clone();
            if spec.key.is_some() {
                entry.key_file = spec.key.clone();
            }
        }
        for (name, (span, has_endpoint)) in file_endpoints {
            if !has_endpoint && !seen.contains(&name) && !attached_names.contains(&name) {
                // A Lima instance the agent would serve, not there (yet): served once found.
                if lima.as_ref().is_some_and(|l| l.wants(&name)) {
                    vms.remove(&name);
                    continue;
                }
                return Err(src.error(
                    span,
                    &format!("vm.{name}.endpoint"),
                    "missing: give endpoint = \"unix:///…\" here or --vm NAME=ENDPOINT",
                ));
            }
        }
        let ecr = match &file.ecr {
            None => EcrSettings::default(),
            Some(e) => src.ecr(e)?,
        };
        Ok(Settings {
            ecr,
            lima,
            lima_instances,
            lima_untrusted,
            config_file: path,
            config_file_found: found,
            state_dir,
            docker_config,
            helper_timeout: Duration::from_secs(helper_timeout),
            keychain_timeout: Duration::from_secs(keychain_timeout),
            native_keychain: o.native_keychain.or(file.native_keychain).unwrap_or(true),
            key_store: o.key_store.or(file.key_store).unwrap_or_default(),
            heartbeat: Duration::from_millis(heartbeat),
            reconnect_max: Duration::from_millis(reconnect_max),
            vms,
        })
    }

    /// The key file of VM `name` (where it is, or would be, when kept in a file).
    pub fn key_file(&self, name: &str) -> Option<PathBuf> {
        let vm = self.vms.get(name)?;
        Some(vm.key_file.clone().unwrap_or_else(|| key_path(&self.state_dir, name)))
    }
}

/// `[lima] guest_dir` when not given: `guest/` beside the agent's binary.
pub fn default_guest_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("guest")))
        .unwrap_or_else(|| PathBuf::from("guest"))
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

/// The file in the state directory holding the VMs attached at run time.
pub const ATTACHED_FILE: &str = "attached.toml";

/// One VM attached at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVm {
    /// Where to dial it.
    pub endpoint: Endpoint,
    /// Its key file, when not the state directory's.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachedFile {
    #[serde(default)]
    vm: BTreeMap<toml::Spanned<String>, AttachedEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachedEntry {
    endpoint: toml::Spanned<String>,
    key: Option<toml::Spanned<String>>,
}

/// The VMs in `path` (none if it does not exist).
pub fn read_attached(path: &Path) -> Result<BTreeMap<String, AttachedVm>, ConfigError> {
    let Some(text) = read_file(path, false)? else { return Ok(BTreeMap::new()) };
    let src = Source { file: path, text: &text };
    let file: AttachedFile = toml::from_str(&text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.error(span.clone(), &key_at(&text, span.start), e.message().trim())
    })?;
    let mut out = BTreeMap::new();
    for (name, vm) in file.vm {
        let key = format!("vm.{}", name.get_ref());
        if !valid_vm_name(name.get_ref()) {
            return Err(src.error(name.span(), &key, vm_name_error(name.get_ref())));
        }
        let endpoint = vm.endpoint.get_ref().parse::<Endpoint>().map_err(|e| {
            src.error(vm.endpoint.span(), &format!("{key}.endpoint"), e.to_string())
        })?;
        let key_file = match &vm.key {
            Some(k) => Some(src.path(k, &format!("{key}.key"))?),
            None => None,
        };
        out.insert(name.into_inner(), AttachedVm { endpoint, key: key_file });
    }
    Ok(out)
}

/// A TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `vms` to `path` atomically, private (mode 0600, or an owner-only DACL).
pub fn write_attached(path: &Path, vms: &BTreeMap<String, AttachedVm>) -> anyhow::Result<()> {
    let mut text =
        String::from("# VMs attached with `finch-host-agent attach`; `detach` removes them.\n");
    for (name, vm) in vms {
        text.push_str(&format!(
            "\n[vm.{}]\nendpoint = {}\n",
            toml_string(name),
            toml_string(&vm.endpoint.to_string())
        ));
        if let Some(k) = &vm.key {
            text.push_str(&format!("key = {}\n", toml_string(&k.display().to_string())));
        }
    }
    write_private(path, text.as_bytes())
}

/// Writes `text` to `path` atomically (a sibling temporary file, synced, renamed), private
/// (mode 0600, or an owner-only DACL).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    finch_shared::private::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

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
                name: "default".into(),
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
        assert_eq!(s.reconnect_max, DEFAULT_RECONNECT_MAX);
        assert!(s.native_keychain);
        let a = &s.vms["a"];
        assert!(a.policy.store.allows(&reg("ghcr.io")) && !a.policy.store.allows(&reg("quay.io")));
        assert!(a.policy.get.allows(&reg("quay.io")));
        let o = Overrides {
            state_dir: Some("/flag/state".into()),
            helper_timeout_secs: Some(3),
            vms: vec!["a=unix:///flag.sock".parse().unwrap(), "b=unix:///b.sock".parse().unwrap()],
            native_keychain: Some(false),
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
            "b".to_owned(),
            AttachedVm {
                endpoint: "unix:///att/b \"q\".sock".parse().unwrap(),
                key: Some("/k/b.key".into()),
            },
        );
        vms.insert(
            "a".to_owned(),
            AttachedVm { endpoint: "hybrid:///att/a.sock:6127".parse().unwrap(), key: None },
        );
        write_attached(&state.join(ATTACHED_FILE), &vms).unwrap();
        assert_eq!(read_attached(&state.join(ATTACHED_FILE)).unwrap(), vms);
        let o = Overrides { state_dir: Some(state.clone()), ..Overrides::default() };
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
        let o = Overrides { helper_timeout_secs: Some(0), ..Overrides::default() };
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
        assert_eq!(expand_path("C:\\finch\\x").unwrap(), PathBuf::from("C:\\finch\\x"));
        assert!(expand_path("/unrooted").is_err(), "no drive: not absolute on Windows");
        assert!(expand_path("~\\x").unwrap().starts_with(home().unwrap()));
    }

    #[cfg(unix)]
    #[test]
    fn key_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let o = Overrides {
            state_dir: Some(state.clone()),
            vms: vec!["vm1=unix:///x".parse().unwrap()],
            key_store: Some(KeyStore::File),
            ..Overrides::default()
        };
        let s = load("", o).unwrap();
        crate::vm_keys::load_key(&s, "vm1").unwrap();
        let path = key_path(&state, "vm1");
        assert_eq!(s.key_file("vm1"), Some(path.clone()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&state).unwrap_err().to_string().contains("open to other users"));
    }
}
