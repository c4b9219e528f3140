//! Native Amazon ECR and ECR Public: registry tokens from the host's AWS configuration, so
//! no AWS secret ever enters the VM. It replaces `docker-credential-ecr-login`:
//!
//! * [`host`]: which registries are ECR (every partition, FIPS, dual-stack; case-insensitive).
//! * [`aws`]: the AWS SDK clients per identity (profile, role, region) and the token calls.
//! * [`cache`]: tokens in memory only, refreshed ahead of expiry, single flight, bounded.
//!
//! Selected by `ecr-login` in `credsStore`/`credHelpers`, and (with `[ecr] auto = true`, the
//! default) for any ECR hostname whatever `credsStore` says, unless `credHelpers` names
//! another helper for it. Which identity serves a registry comes from the host config's
//! `[[ecr.registry]]` rules (first match), never from the VM. `store` and `erase` are accepted
//! and ignored (tokens are minted, not stored), as the reference does with
//! `AWS_ECR_IGNORE_CREDS_STORAGE=true`; `list` answers the registries with cached tokens.

pub mod aws;
pub mod cache;
pub mod host;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use finch_shared::Secret;
use finch_shared::message::ListEntry;

use self::aws::{ClientPool, Identity};
use self::cache::{CacheKey, Freshness, TokenCache};
use self::host::EcrHost;
use super::{Credential, CredentialSource, SourceError, SourceFuture};
use crate::policy::Pattern;

/// The helper name that selects this source.
pub const HELPER_NAME: &str = "ecr-login";
/// Username of every ECR token.
pub const TOKEN_USERNAME: &str = "AWS";
/// Default bound of one token call, retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Most tokens kept.
pub const MAX_CACHED: usize = 512;
/// Most VMs whose served registries are remembered apart.
const MAX_VMS_SERVED: usize = 256;

/// What kind of failure kept a token from being had; the audit line and `doctor` act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EcrClass {
    /// No AWS credentials for the identity.
    NoCredentials,
    /// The identity's SSO session is missing or expired.
    SsoExpired,
    /// AWS rejected the credentials.
    CredentialsRejected,
    /// The identity may not call GetAuthorizationToken.
    AccessDenied,
    /// AWS throttled the call.
    Throttled,
    /// AWS, or loading credentials, did not answer in time.
    Timeout,
    /// AWS could not be reached.
    Network,
    /// The token AWS sent is not one.
    BadToken,
    /// The AWS configuration is invalid.
    Config,
    /// Any other AWS error.
    Aws,
    /// The VM asked for more new tokens than its budget.
    VmBudget,
}

impl EcrClass {
    /// Its name in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            EcrClass::NoCredentials => "no-credentials",
            EcrClass::SsoExpired => "sso-expired",
            EcrClass::CredentialsRejected => "credentials-rejected",
            EcrClass::AccessDenied => "access-denied",
            EcrClass::Throttled => "throttled",
            EcrClass::Timeout => "timeout",
            EcrClass::Network => "network",
            EcrClass::BadToken => "bad-token",
            EcrClass::Config => "config",
            EcrClass::Aws => "aws",
            EcrClass::VmBudget => "vm-budget",
        }
    }
}

impl std::fmt::Display for EcrClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token could not be had: a class (for the audit line) and a gist (for the user).
/// Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ECR ({class}): {reason}")]
pub struct EcrError {
    /// What kind of failure.
    pub class: EcrClass,
    /// What happened and what to do.
    pub reason: String,
}

impl EcrError {
    /// An error of `class`.
    pub fn new(class: EcrClass, reason: impl Into<String>) -> Self {
        EcrError { class, reason: reason.into() }
    }

    /// Names the profile in errors about credentials, with the commands that fix them.
    pub fn for_profile(self, profile: Option<&str>) -> Self {
        let name = profile.unwrap_or("default");
        let flag = profile.map(|p| format!(" --profile {p}")).unwrap_or_default();
        let reason = match self.class {
            EcrClass::NoCredentials => format!(
                "no AWS credentials for profile {name:?} on the host: configure them (aws configure{flag}, or aws sso login{flag}); {}",
                self.reason
            ),
            EcrClass::SsoExpired => format!(
                "the AWS SSO session of profile {name:?} is missing or expired: run `aws sso login{flag}` on the host; {}",
                self.reason
            ),
            EcrClass::CredentialsRejected => format!(
                "AWS rejected the credentials of profile {name:?}: {}; check them (aws sts get-caller-identity{flag})",
                self.reason
            ),
            _ => return self,
        };
        EcrError { class: self.class, reason }
    }
}

/// Decodes a `GetAuthorizationToken` token: base64 of `USER:PASSWORD`, split at the first
/// colon (the password may hold more).
pub fn decode_token(encoded: &str) -> Result<(String, Secret), EcrError> {
    let bad = |why: &str| {
        EcrError::new(EcrClass::BadToken, format!("the authorization token is malformed ({why})"))
    };
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| bad("not base64"))?,
    );
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8"))?;
    let (user, password) = text.split_once(':').ok_or_else(|| bad("no colon"))?;
    if user.is_empty() || password.is_empty() {
        return Err(bad("empty user or password"));
    }
    Ok((user.to_owned(), Secret::new(password.to_owned())))
}

/// Which registries a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryMatch {
    /// Every private registry of this 12-digit account.
    Account(String),
    /// A registry pattern (`*`, `*.suffix`, `host`).
    Pattern(Pattern),
}

/// One `[[ecr.registry]]` rule: the identity used for the registries it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrRule {
    /// What it matches.
    pub registry: RegistryMatch,
    /// AWS profile (alone: no fallback to the default chain).
    pub profile: Option<String>,
    /// Region override of the token API.
    pub region: Option<String>,
    /// Role to assume.
    pub role_arn: Option<String>,
}

/// The `[ecr]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrSettings {
    /// Serve every ECR hostname natively, whatever `credsStore` says.
    pub auto: bool,
    /// Let the default chain ask the EC2 instance metadata service.
    pub instance_metadata: bool,
    /// Bound of one token call.
    pub timeout: Duration,
    /// Identity rules, first match wins.
    pub rules: Vec<EcrRule>,
}

impl Default for EcrSettings {
    fn default() -> Self {
        EcrSettings {
            auto: true,
            instance_metadata: false,
            timeout: DEFAULT_TIMEOUT,
            rules: Vec::new(),
        }
    }
}

impl EcrSettings {
    /// The identity serving `registry`.
    pub fn identity(&self, registry: &EcrHost) -> Identity {
        let rule = self.rules.iter().find(|r| match &r.registry {
            RegistryMatch::Account(a) => registry.account() == Some(a.as_str()),
            RegistryMatch::Pattern(p) => finch_shared::registry::Registry::parse(registry.host())
                .is_ok_and(|r| p.matches(&r)),
        });
        Identity {
            profile: rule.and_then(|r| r.profile.clone()),
            role_arn: rule.and_then(|r| r.role_arn.clone()),
            region: rule
                .and_then(|r| r.region.clone())
                .unwrap_or_else(|| registry.region().to_owned()),
            instance_metadata: self.instance_metadata,
            timeout: self.timeout,
        }
    }
}

/// The ECR source; one per agent, so its cache and clients outlive reloads.
#[derive(Debug)]
pub struct Ecr {
    settings: RwLock<EcrSettings>,
    cache: TokenCache,
    pool: ClientPool,
    /// The registries each VM was served a token for (what its `list` may show).
    served: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Each VM's budget of calls for new tokens.
    upstream: Mutex<HashMap<String, UpstreamBudget>>,
    /// Refreshes ahead of expiry under way (one per cached token at most: each holds the
    /// token's flight); aborted by [`Ecr::stop`].
    refreshes: Mutex<tokio::task::JoinSet<()>>,
}

/// New-token calls one VM may make at once; it regains one per [`UPSTREAM_REFILL`]. Tokens
/// live hours and are cached, so a VM pulling from a handful of registries never meets it; a
/// VM naming thousands of made-up accounts costs AWS this much and no more.
pub const UPSTREAM_BURST: u32 = 32;
/// See [`UPSTREAM_BURST`].
pub const UPSTREAM_REFILL: Duration = Duration::from_secs(30);

/// A token bucket of new-token calls.
#[derive(Debug, Clone, Copy)]
struct UpstreamBudget {
    left: u32,
    since: std::time::Instant,
}

impl UpstreamBudget {
    fn full() -> Self {
        UpstreamBudget { left: UPSTREAM_BURST, since: std::time::Instant::now() }
    }

    /// Takes one call at `now`, or says how long until one is there.
    fn spend(&mut self, now: std::time::Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.since);
        let regained = (elapsed.as_secs() / UPSTREAM_REFILL.as_secs()) as u32;
        if regained > 0 {
            self.left = self.left.saturating_add(regained).min(UPSTREAM_BURST);
            self.since += UPSTREAM_REFILL * regained;
        }
        if self.left == UPSTREAM_BURST {
            self.since = now;
        }
        if self.left == 0 {
            return Err(UPSTREAM_REFILL.saturating_sub(now.saturating_duration_since(self.since)));
        }
        self.left -= 1;
        Ok(())
    }
}

impl Ecr {
    /// A source with `settings`.
    pub fn new(settings: EcrSettings) -> Arc<Ecr> {
        Arc::new(Ecr {
            settings: RwLock::new(settings),
            cache: TokenCache::new(MAX_CACHED),
            pool: ClientPool::new(aws::MAX_CLIENT_SETS),
            served: Mutex::new(HashMap::new()),
            upstream: Mutex::new(HashMap::new()),
            refreshes: Mutex::new(tokio::task::JoinSet::new()),
        })
    }

    /// Aborts the refreshes under way (the agent is stopping).
    pub fn stop(&self) {
        self.refreshes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).abort_all();
    }

    /// Runs `refresh` as a tracked task, reaping the finished ones first.
    fn spawn_refresh(&self, refresh: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.refreshes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(refresh);
    }

    /// Notes that `vm` was served a token for `host`. Bounded like the cache: a VM's set
    /// keeps only registries whose tokens are still cached once it is full.
    pub fn served(&self, vm: &str, host: &str) {
        let servable: Option<BTreeSet<String>> = {
            let served = self.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let full = served.get(vm).is_some_and(|s| s.len() >= MAX_CACHED);
            full.then(|| self.cache.servable().into_iter().map(|k| k.registry).collect())
        };
        let mut served = self.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if served.len() >= MAX_VMS_SERVED && !served.contains_key(vm) {
            served.clear();
        }
        let mine = served.entry(vm.to_owned()).or_default();
        if let Some(keep) = servable {
            mine.retain(|h| keep.contains(h));
        }
        if mine.len() < MAX_CACHED {
            mine.insert(host.to_owned());
        }
    }

    /// The registries `vm` was served whose tokens are cached now.
    pub fn listed_for(&self, vm: &str) -> Vec<String> {
        let servable: BTreeSet<String> =
            self.cache.servable().into_iter().map(|k| k.registry).collect();
        let served = self.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        served
            .get(vm)
            .map(|mine| mine.intersection(&servable).cloned().collect())
            .unwrap_or_default()
    }

    /// Uses `settings` from now on (cached tokens stay under their identities).
    pub fn configure(&self, settings: EcrSettings) {
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    /// The settings in force.
    pub fn settings(&self) -> EcrSettings {
        self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// How many tokens can be served from memory now.
    pub fn cached(&self) -> usize {
        self.cache.servable().len()
    }

    /// The identities the rules name, and the default chain if `with_default` (for `doctor`).
    pub fn identities(&self, with_default: bool) -> Vec<(String, Identity)> {
        let settings = self.settings();
        let mut out = Vec::new();
        if with_default {
            out.push((
                "default chain".to_owned(),
                Identity {
                    profile: None,
                    role_arn: None,
                    region: host::PUBLIC_REGION.to_owned(),
                    instance_metadata: settings.instance_metadata,
                    timeout: settings.timeout,
                },
            ));
        }
        for rule in &settings.rules {
            let label = match (&rule.profile, &rule.role_arn) {
                (Some(p), Some(r)) => format!("profile {p}, role {r}"),
                (Some(p), None) => format!("profile {p}"),
                (None, Some(r)) => format!("default chain, role {r}"),
                (None, None) => "default chain".to_owned(),
            };
            let identity = Identity {
                profile: rule.profile.clone(),
                role_arn: rule.role_arn.clone(),
                region: rule.region.clone().unwrap_or_else(|| host::PUBLIC_REGION.to_owned()),
                instance_metadata: settings.instance_metadata,
                timeout: settings.timeout,
            };
            if !out.iter().any(|(l, _)| *l == label) {
                out.push((label, identity));
            }
        }
        out
    }

    /// Resolves `identity`'s credentials without printing them (for `doctor`).
    pub async fn check(
        &self,
        identity: &Identity,
    ) -> Result<Option<std::time::SystemTime>, EcrError> {
        self.pool
            .get(identity)
            .await
            .check_credentials()
            .await
            .map_err(|e| e.for_profile(identity.profile.as_deref()))
    }

    /// Takes one of `vm`'s new-token calls, or says when the next one comes.
    fn spend(&self, vm: &str) -> Result<(), EcrError> {
        let mut budgets = self.upstream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if budgets.len() >= MAX_VMS_SERVED && !budgets.contains_key(vm) {
            budgets.clear();
        }
        let bucket = budgets.entry(vm.to_owned()).or_insert_with(UpstreamBudget::full);
        bucket.spend(std::time::Instant::now()).map_err(|wait| {
            EcrError::new(
                EcrClass::VmBudget,
                format!(
                    "VM {vm} asked for more than {UPSTREAM_BURST} new ECR tokens in a short time; \
                     the next one can be had in {} s (tokens already served stay cached)",
                    wait.as_secs().max(1)
                ),
            )
        })
    }

    /// A servable token for `registry`; a token not cached yet costs `vm` one call of its
    /// budget ([`UPSTREAM_BURST`], then one per [`UPSTREAM_REFILL`]).
    pub async fn token(
        self: &Arc<Self>,
        vm: &str,
        registry: &EcrHost,
    ) -> Result<cache::Token, EcrError> {
        let identity = self.settings().identity(registry);
        let key = CacheKey {
            profile: identity.profile.clone(),
            role_arn: identity.role_arn.clone(),
            region: identity.region.clone(),
            registry: registry.host().to_owned(),
        };
        let (token, freshness) = self
            .cache
            .get(&key, vm, || async {
                self.spend(vm)?;
                let clients = self.pool.get(&identity).await;
                clients.token(registry).await
            })
            .await
            .map_err(|e| e.for_profile(identity.profile.as_deref()))?;
        if freshness == Freshness::Refresh
            && let Some(flight) = self.cache.try_flight(&key)
        {
            let (ecr, registry, vm) = (self.clone(), registry.clone(), vm.to_owned());
            self.spawn_refresh(async move {
                let _flight = flight;
                let clients = ecr.pool.get(&identity).await;
                match clients.token(&registry).await {
                    Ok(t) => {
                        ecr.cache.store(&key, &vm, &t);
                        tracing::debug!(registry = %registry.host(), "ECR token refreshed ahead of expiry");
                    }
                    Err(e) => {
                        tracing::warn!(registry = %registry.host(), error = %e, "ECR token refresh failed; the current token is served until it expires")
                    }
                }
            });
        }
        Ok(token)
    }
}

/// [`Ecr`] behind the credential-source trait, for one VM (whose budget pays for new tokens).
#[derive(Debug, Clone)]
pub struct EcrSource {
    /// The tokens.
    pub ecr: Arc<Ecr>,
    /// The VM asking.
    pub vm: String,
}

impl CredentialSource for EcrSource {
    fn name(&self) -> String {
        "ecr".into()
    }

    fn kind(&self) -> crate::source::SourceKind {
        crate::source::SourceKind::Ecr
    }

    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>> {
        Box::pin(async move {
            let Some(registry) = EcrHost::parse(server) else { return Ok(None) };
            let token = self.ecr.token(&self.vm, &registry).await.map_err(SourceError::Ecr)?;
            Ok(Some(Credential { username: token.username, secret: token.password }))
        })
    }

    fn store<'a>(&'a self, server: &'a str, _credential: &'a Credential) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            tracing::debug!(server, "store for an ECR registry ignored: tokens are minted by AWS");
            Ok(())
        })
    }

    fn erase<'a>(&'a self, _server: &'a str) -> SourceFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>> {
        Box::pin(async {
            let mut entries: Vec<ListEntry> = self
                .ecr
                .cache
                .servable()
                .into_iter()
                .map(|k| ListEntry { server: k.registry, username: TOKEN_USERNAME.into() })
                .collect();
            entries.dedup();
            Ok(entries)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn a_vm_spends_its_burst_then_one_call_per_refill() {
        let start = std::time::Instant::now();
        let mut budget = UpstreamBudget { left: UPSTREAM_BURST, since: start };
        for _ in 0..UPSTREAM_BURST {
            budget.spend(start).unwrap();
        }
        let wait = budget.spend(start).unwrap_err();
        assert_eq!(wait, UPSTREAM_REFILL);
        let later = start + UPSTREAM_REFILL + Duration::from_secs(1);
        budget.spend(later).unwrap();
        assert!(budget.spend(later).is_err(), "two calls regained in one refill");
        // A long quiet spell refills to the burst, never past it.
        let much_later = later + UPSTREAM_REFILL * 1000;
        for _ in 0..UPSTREAM_BURST {
            budget.spend(much_later).unwrap();
        }
        assert!(budget.spend(much_later).is_err());
    }

    #[test]
    fn tokens_split_once_and_bad_ones_are_errors() {
        let (user, pw) = decode_token(&b64("AWS:pass:with:colons")).unwrap();
        assert_eq!((user.as_str(), pw.expose()), ("AWS", "pass:with:colons"));
        for bad in [
            "%%%",
            &b64("s3cr3tnocolon"),
            &b64(":s3cr3t"),
            &b64("AWS:"),
            &base64::engine::general_purpose::STANDARD.encode([0xff, b':', b'x']),
        ] {
            let e = decode_token(bad).unwrap_err();
            assert_eq!(e.class, EcrClass::BadToken, "{bad}");
            assert!(!e.to_string().contains("s3cr3t") && !e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn identity_rules_first_match() {
        let settings = EcrSettings {
            rules: vec![
                EcrRule {
                    registry: RegistryMatch::Account("210987654321".into()),
                    profile: Some("cross".into()),
                    region: None,
                    role_arn: Some("arn:aws:iam::210987654321:role/pull".into()),
                },
                EcrRule {
                    registry: RegistryMatch::Pattern(
                        "*.dkr.ecr.eu-west-1.amazonaws.com".parse().unwrap(),
                    ),
                    profile: Some("eu".into()),
                    region: Some("eu-central-1".into()),
                    role_arn: None,
                },
            ],
            ..EcrSettings::default()
        };
        let id = settings
            .identity(&EcrHost::parse("210987654321.dkr.ecr.eu-west-1.amazonaws.com").unwrap());
        assert_eq!((id.profile.as_deref(), id.region.as_str()), (Some("cross"), "eu-west-1"));
        assert!(id.role_arn.is_some());
        let id = settings
            .identity(&EcrHost::parse("123456789012.dkr.ecr.eu-west-1.amazonaws.com").unwrap());
        assert_eq!((id.profile.as_deref(), id.region.as_str()), (Some("eu"), "eu-central-1"));
        let id = settings.identity(&EcrHost::parse("public.ecr.aws").unwrap());
        assert_eq!((id.profile, id.region.as_str()), (None, "us-east-1"));
        assert!(!id.instance_metadata);
    }
}
