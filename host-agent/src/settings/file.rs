//! The config file's schema, read with spans: every value is checked where it is parsed, and
//! every error names the file, the line, the column and the dotted key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use finch_shared::endpoint::Endpoint;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, KeyStore, Layer, LimaSettings, NUMBERS, VmName};
use crate::platform::paths::{default_guest_dir, env_path, home};
use crate::policy::{Pattern, Policy, Rule};
use crate::source::ecr::{EcrRule, EcrSettings, RegistryMatch};
use crate::source::token::{RepoPattern, TokenPolicy};

/// What the file says, checked.
#[derive(Debug, Default)]
pub struct FileSettings {
    /// Its scalar settings.
    pub layer: Layer,
    /// Its `[vm.NAME]` tables.
    pub vms: BTreeMap<VmName, FileVm>,
    /// Its `[ecr]` table, or the defaults.
    pub ecr: EcrSettings,
    /// Its `[lima]` table.
    pub lima: Option<LimaSettings>,
}

/// One `[vm.NAME]` table.
#[derive(Debug)]
pub struct FileVm {
    /// Its endpoint, when the table gives one.
    pub endpoint: Option<Endpoint>,
    /// Its `key` file.
    pub key_file: Option<PathBuf>,
    /// Its policy (each rule defaults to `["*"]`).
    pub policy: Policy,
    /// The error to give when nothing else supplies the endpoint.
    pub missing: ConfigError,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Schema {
    docker_config: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    helper_timeout_secs: Option<Spanned<u64>>,
    keychain_timeout_secs: Option<Spanned<u64>>,
    native_keychain: Option<bool>,
    key_store: Option<KeyStore>,
    heartbeat_ms: Option<Spanned<u64>>,
    reconnect_max_ms: Option<Spanned<u64>>,
    host_creds_store: Option<String>,
    #[serde(default)]
    vm: BTreeMap<Spanned<String>, SchemaVm>,
    ecr: Option<SchemaEcr>,
    lima: Option<SchemaLima>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaLima {
    home: Option<Spanned<String>>,
    instances: Option<Vec<Spanned<String>>>,
    guest_dir: Option<Spanned<String>>,
    keep_fragment: Option<bool>,
    template: Option<Spanned<String>>,
    harden: Option<bool>,
    shares: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaEcr {
    auto: Option<bool>,
    instance_metadata: Option<bool>,
    timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    registry: Vec<SchemaEcrRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaEcrRule {
    registry: Spanned<String>,
    profile: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    role_arn: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaVm {
    endpoint: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    policy: Option<SchemaPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaPolicy {
    get: Option<Vec<Spanned<String>>>,
    store: Option<Vec<Spanned<String>>>,
    erase: Option<Vec<Spanned<String>>>,
    list: Option<Vec<Spanned<String>>>,
    pull: Option<Vec<Spanned<String>>>,
    push: Option<Vec<Spanned<String>>>,
}

/// Parses and checks the config file `text`, read from `file`.
pub fn parse(file: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    let src = Spans { file, text };
    let schema: Schema = src.deserialize()?;
    let [helper, keychain, heartbeat, reconnect] = &NUMBERS;
    let layer = Layer {
        docker_config: src.optional_path(&schema.docker_config, "docker_config")?,
        state_dir: src.optional_path(&schema.state_dir, "state_dir")?,
        helper_timeout_secs: src.number(&schema.helper_timeout_secs, helper)?,
        keychain_timeout_secs: src.number(&schema.keychain_timeout_secs, keychain)?,
        native_keychain: schema.native_keychain,
        key_store: schema.key_store,
        heartbeat_ms: src.number(&schema.heartbeat_ms, heartbeat)?,
        reconnect_max_ms: src.number(&schema.reconnect_max_ms, reconnect)?,
        host_creds_store: schema.host_creds_store,
    };
    let mut vms = BTreeMap::new();
    for (name, vm) in &schema.vm {
        let key = format!("vm.{}", name.get_ref());
        let vm_name =
            name.get_ref().parse::<VmName>().map_err(|e| src.error(name.span(), &key, e))?;
        vms.insert(vm_name, src.vm(&key, name, vm)?);
    }
    let ecr = match &schema.ecr {
        None => EcrSettings::default(),
        Some(e) => src.ecr(e)?,
    };
    let lima = schema.lima.as_ref().map(|l| src.lima(l)).transpose()?;
    Ok(FileSettings { layer, vms, ecr, lima })
}

/// A file being parsed and the means to point into it.
pub(super) struct Spans<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

impl Spans<'_> {
    /// Deserializes the whole text, a syntax or schema error pointing at its key.
    pub(super) fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = key_at(self.text, span.start);
            self.error(span, if key.is_empty() { "-" } else { &key }, e.message().trim())
        })
    }

    pub(super) fn error(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        reason: impl std::fmt::Display,
    ) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::ConfigInvalid {
            file: self.file.display().to_string(),
            line,
            column,
            key: key.to_owned(),
            reason: reason.to_string(),
        }
    }

    pub(super) fn path(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        expand_path(v.get_ref()).map_err(|reason| self.error(v.span(), key, reason))
    }

    fn optional_path(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        v.as_ref().map(|v| self.path(v, key)).transpose()
    }

    fn number(
        &self,
        v: &Option<Spanned<u64>>,
        number: &super::Number,
    ) -> Result<Option<u64>, ConfigError> {
        v.as_ref().map(|v| self.ranged(v, number.key, number.range.clone())).transpose()
    }

    fn ranged(
        &self,
        v: &Spanned<u64>,
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

    fn rule(&self, patterns: &[Spanned<String>], key: &str) -> Result<Rule, ConfigError> {
        patterns
            .iter()
            .map(|p| p.get_ref().parse::<Pattern>().map_err(|e| self.error(p.span(), key, e)))
            .collect::<Result<Vec<_>, _>>()
            .map(Rule)
    }

    fn vm(&self, key: &str, name: &Spanned<String>, vm: &SchemaVm) -> Result<FileVm, ConfigError> {
        let policy = match &vm.policy {
            None => Policy::default(),
            Some(p) => {
                let rule = |r: &Option<Vec<Spanned<String>>>, op: &str| match r {
                    None => Ok(Rule::any()),
                    Some(list) => self.rule(list, &format!("{key}.policy.{op}")),
                };
                let repos = |r: &Option<Vec<Spanned<String>>>, op: &str| {
                    r.iter()
                        .flatten()
                        .map(|p| {
                            RepoPattern::parse(p.get_ref())
                                .map_err(|e| self.error(p.span(), &format!("{key}.policy.{op}"), e))
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                Policy {
                    get: rule(&p.get, "get")?,
                    store: rule(&p.store, "store")?,
                    erase: rule(&p.erase, "erase")?,
                    list: rule(&p.list, "list")?,
                    tokens: TokenPolicy {
                        pull: repos(&p.pull, "pull")?,
                        push: repos(&p.push, "push")?,
                    },
                }
            }
        };
        let endpoint = match &vm.endpoint {
            Some(e) => Some(
                e.get_ref()
                    .parse::<Endpoint>()
                    .map_err(|err| self.error(e.span(), &format!("{key}.endpoint"), err))?,
            ),
            None => None,
        };
        let key_file = self.optional_path(&vm.key, &format!("{key}.key"))?;
        let missing = self.error(
            name.span(),
            &format!("{key}.endpoint"),
            "missing: give endpoint = \"unix:///…\" here or --vm NAME=ENDPOINT",
        );
        Ok(FileVm { endpoint, key_file, policy, missing })
    }

    fn lima(&self, l: &SchemaLima) -> Result<LimaSettings, ConfigError> {
        // $LIMA_HOME > the file > ~/.lima: the environment beats the file, as for every setting.
        let home = match (env_path("LIMA_HOME"), &l.home) {
            (Some(p), _) => p,
            (None, Some(h)) => self.path(h, "lima.home")?,
            (None, None) => {
                home().map_err(|e| ConfigError::ConfigValue(e.to_string()))?.join(".lima")
            }
        };
        let mut instances = Vec::new();
        for i in l.instances.iter().flatten() {
            let name = i.get_ref();
            if name != "*"
                && let Err(e) = name.parse::<VmName>()
            {
                return Err(self.error(
                    i.span(),
                    "lima.instances",
                    format!("{e}, or \"*\" for every instance"),
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
        let template = self.optional_path(&l.template, "lima.template")?;
        let mut shares = Vec::new();
        for s in l.shares.iter().flatten() {
            shares.push(self.path(s, "lima.shares")?);
        }
        let harden = l.harden.unwrap_or(false);
        if harden && template.is_none() {
            return Err(ConfigError::ConfigValue(
                "lima.harden needs lima.template (Finch's template): the mounts are changed there"
                    .to_owned(),
            ));
        }
        Ok(LimaSettings {
            home,
            instances,
            guest_dir,
            keep_fragment: l.keep_fragment.unwrap_or(false),
            template,
            harden,
            shares,
        })
    }

    fn ecr(&self, e: &SchemaEcr) -> Result<EcrSettings, ConfigError> {
        let defaults = EcrSettings::default();
        let timeout = match &e.timeout_secs {
            Some(v) => Duration::from_secs(self.ranged(v, "ecr.timeout_secs", 1..=300)?),
            None => defaults.timeout,
        };
        let mut rules = Vec::new();
        for rule in &e.registry {
            rules.push(self.ecr_rule(rule)?);
        }
        Ok(EcrSettings {
            auto: e.auto.unwrap_or(defaults.auto),
            instance_metadata: e.instance_metadata.unwrap_or(defaults.instance_metadata),
            timeout,
            rules,
        })
    }

    fn ecr_rule(&self, rule: &SchemaEcrRule) -> Result<EcrRule, ConfigError> {
        let r = rule.registry.get_ref();
        let registry = if r.len() == 12 && r.bytes().all(|b| b.is_ascii_digit()) {
            RegistryMatch::Account(r.clone())
        } else {
            RegistryMatch::Pattern(r.parse::<Pattern>().map_err(|err| {
                self.error(
                    rule.registry.span(),
                    "ecr.registry.registry",
                    format!("{err}, or a 12-digit account id"),
                )
            })?)
        };
        let text =
            |v: &Option<Spanned<String>>, key: &str, ok: fn(&str) -> bool, what: &str| match v {
                None => Ok(None),
                Some(v) if ok(v.get_ref()) => Ok(Some(v.get_ref().clone())),
                Some(v) => {
                    Err(self.error(v.span(), key, format!("{:?} is not {what}", v.get_ref())))
                }
            };
        let name_ok =
            |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
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
        Ok(EcrRule {
            registry,
            profile: text(&rule.profile, "ecr.registry.profile", name_ok, "a profile name")?,
            region: text(
                &rule.region,
                "ecr.registry.region",
                region_ok,
                "a region (like us-west-2)",
            )?,
            role_arn: text(
                &rule.role_arn,
                "ecr.registry.role_arn",
                arn_ok,
                "a role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
            )?,
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

/// Why a path in the file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum PathInvalid {
    /// Neither absolute nor `~/…`.
    #[error("{0:?} is not an absolute path (or ~/…)")]
    Relative(String),
    /// `~/…` with no home to expand it.
    #[error("{0}")]
    NoHome(String),
}

/// `~/x` and absolute paths; anything else is refused (the agent's cwd means nothing).
pub fn expand_path(s: &str) -> Result<PathBuf, PathInvalid> {
    if let Some(rest) =
        s.strip_prefix("~/").or_else(|| s.strip_prefix("~\\").filter(|_| cfg!(windows)))
    {
        return home().map(|h| h.join(rest)).map_err(|e| PathInvalid::NoHome(e.to_string()));
    }
    if Path::new(s).is_absolute() {
        return Ok(PathBuf::from(s));
    }
    Err(PathInvalid::Relative(finch_shared::limit::cap(s, 200).into_owned()))
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
