//! How the host answers one request: check it, route it to a source in docker/cli's order,
//! check the VM's policy, try every spelling of the registry, and write one audit line.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use finch_shared::Secret;
use finch_shared::limit::{LogGate, cap};
use finch_shared::message::{
    ListEntry, MAX_LIST_ENTRIES, Op, Outcome, Request, Response, Token, TokenRequest, WireError,
};
use finch_shared::registry::Registry;

use crate::budget::StoreBudget;
use crate::fair::Shares;
use crate::policy::Rule;
use crate::settings::Settings;
use crate::source::docker_config::{ConfigCache, DockerConfig, PlainAuths};
use crate::source::ecr::{self, Ecr, EcrSource};
use crate::source::exec_helper::ExecHelper;
use crate::source::token::{Broker, Scope, Stored};
use crate::source::{Credential, CredentialSource, SourceError, SourceKind, keychain};
use crate::status::{StatusBoard, Via};

/// Longest username accepted from a guest (registry accounts are e-mail addresses at most).
pub const MAX_USERNAME_LEN: usize = 256;
/// Longest secret accepted from a guest: registry passwords and identity tokens (JWTs of a
/// few KiB) fit; Windows' Credential Manager itself keeps at most 2.5 KiB.
pub const MAX_SECRET_LEN: usize = 16 * 1024;
/// Most bytes of names a `list` answer carries (it must fit one link frame).
pub const MAX_LIST_BYTES: usize = 48 * 1024;
/// Tracing target of the audit lines.
pub const AUDIT_TARGET: &str = "finch_audit";
/// Longest reason written in an audit line.
pub const MAX_AUDIT_REASON: usize = 300;
/// Rejected requests of one VM written to the log per [`REJECTION_WINDOW`]; the rest are
/// counted in the next line written.
pub const REJECTION_BURST: u32 = 10;
/// See [`REJECTION_BURST`].
pub const REJECTION_WINDOW: Duration = Duration::from_secs(10);
/// Most VMs whose rejections are counted apart (more, and they share one count).
const MAX_GATES: usize = 256;
/// Audit lines of answered requests written per VM per [`AUDIT_WINDOW`]; past it they are
/// counted, and the count goes in the next line written (`suppressed=N`), so a VM's flood of
/// allowed requests costs the log a bounded rate.
pub const AUDIT_BURST: u32 = 60;
/// See [`AUDIT_BURST`].
pub const AUDIT_WINDOW: Duration = Duration::from_secs(10);

/// What the resolver answers from: the settings and the long-lived native keychain.
#[derive(Clone)]
pub struct Current {
    /// The merged settings.
    pub settings: Arc<Settings>,
    /// This OS's keychain, served natively (kept so its connection lives).
    pub keychain: Option<Arc<dyn CredentialSource>>,
    /// Native ECR (one per agent: its token cache outlives reloads).
    pub ecr: Arc<Ecr>,
    /// What each VM stored (kept across reloads while the state directory is the same).
    pub budget: Arc<StoreBudget>,
    /// The docker config as last read.
    pub configs: Arc<ConfigCache>,
    /// Fair shares of host helper processes between VMs (kept across reloads).
    pub shares: Arc<Shares>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("keychain", &self.keychain.is_some())
            .finish_non_exhaustive()
    }
}

/// Runs blocking file or process work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, WireError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(WireError::Internal { reason: format!("a worker failed: {e}") }))
}

impl Current {
    /// The state for `settings`; the keychain of `previous` is kept when its settings match.
    pub fn new(settings: Settings, previous: Option<&Current>) -> Current {
        let wanted = settings.native_keychain.then_some(()).and(keychain::NATIVE_NAME);
        let keychain = match previous {
            Some(p)
                if p.settings.native_keychain == settings.native_keychain
                    && p.settings.keychain_timeout == settings.keychain_timeout =>
            {
                p.keychain.clone()
            }
            _ => wanted.and_then(|name| keychain::open(name, settings.keychain_timeout)),
        };
        let ecr = match previous {
            Some(p) => p.ecr.clone(),
            None => Ecr::new(settings.ecr.clone()),
        };
        ecr.configure(settings.ecr.clone());
        let budget = match previous {
            Some(p) if p.settings.state_dir == settings.state_dir => p.budget.clone(),
            _ => Arc::new(StoreBudget::new(&settings.state_dir)),
        };
        let configs = match previous {
            Some(p) if p.settings.docker_config == settings.docker_config => p.configs.clone(),
            _ => Arc::default(),
        };
        let shares = previous.map(|p| p.shares.clone()).unwrap_or_default();
        Current { settings: Arc::new(settings), keychain, ecr, budget, configs, shares }
    }

    /// The docker config, read off the runtime (and only again when the file changed), with
    /// `finchhost` read as the host's own store: in a config.json the VM shares (Finch on
    /// Windows) it means the bridge, which is this process, so `host_creds_store` serves it
    /// (none: the plaintext `auths`), and the bridge's helper never runs on the host.
    pub async fn docker_config(&self) -> Result<Arc<DockerConfig>, WireError> {
        let (configs, dir) = (self.configs.clone(), self.settings.docker_config.clone());
        let config = blocking(move || configs.load(&dir).map_err(Into::into)).await?;
        Ok(DockerConfig::bridge_as(config, self.settings.host_creds_store.as_deref()))
    }

    /// The source that serves `registry` under the docker config's routing: `credHelpers`
    /// first; then native ECR for an ECR hostname (with `[ecr] auto`); then `credsStore`;
    /// then the plaintext `auths`.
    pub async fn source_for(
        &self,
        config: &DockerConfig,
        vm: &str,
        registry: &Registry,
    ) -> Result<Arc<dyn CredentialSource>, SourceError> {
        let routing = &config.routing;
        let explicit = routing.cred_helper_for(registry);
        let name = match explicit {
            Some(name) => Some(name),
            None if self.settings.ecr.auto && ecr::host::EcrHost::of(registry).is_some() => {
                Some(ecr::HELPER_NAME)
            }
            None => routing.creds_store.as_deref(),
        };
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.helper_async(vm, name).await,
            None => {
                Ok(Arc::new(PlainAuths::new(&self.settings.docker_config, config.auths.clone())))
            }
        }
    }

    /// [`Current::helper`], with the search for a host helper off the runtime.
    pub async fn helper_async(
        &self,
        vm: &str,
        name: &str,
    ) -> Result<Arc<dyn CredentialSource>, SourceError> {
        let (this, vm, name) = (self.clone(), vm.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || this.helper(&vm, &name)).await.unwrap_or_else(|e| {
            Err(SourceError::HelperSpawn { name: String::new(), source: std::io::Error::other(e) })
        })
    }

    /// The source behind helper `name`: the native keychain when it serves that name,
    /// else the host's `docker-credential-<name>` (found on `PATH`: blocking).
    pub fn helper(&self, vm: &str, name: &str) -> Result<Arc<dyn CredentialSource>, SourceError> {
        if name == ecr::HELPER_NAME {
            return Ok(Arc::new(EcrSource { ecr: self.ecr.clone(), vm: vm.to_owned() }));
        }
        if let Some(k) = &self.keychain
            && self.settings.native_keychain
            && keychain::NATIVE_NAME == Some(name)
        {
            return Ok(k.clone());
        }
        Ok(Arc::new(ExecHelper::find(name, &helper_path(), self.settings.helper_timeout)?))
    }
}

/// Where host helpers are looked up: the host agent's own `PATH`.
pub fn helper_path() -> OsString {
    std::env::var_os("PATH").unwrap_or_default()
}

/// Answers requests from every VM.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Current>,
    board: Arc<StatusBoard>,
    gates: Gates,
    audit_gates: Gates,
    broker: std::sync::OnceLock<Result<Broker, WireError>>,
}

/// A log gate per VM, bounded in number.
#[derive(Debug)]
struct Gates {
    gates: Mutex<HashMap<String, LogGate>>,
    window: Duration,
    burst: u32,
}

impl Gates {
    fn new(window: Duration, burst: u32) -> Self {
        Gates { gates: Mutex::default(), window, burst }
    }

    /// Whether `vm` may write a line now; if so, how many it was held back before it.
    fn admit(&self, vm: &str) -> Option<u64> {
        let mut gates = self.gates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if gates.len() >= MAX_GATES && !gates.contains_key(vm) {
            gates.clear();
        }
        gates
            .entry(vm.to_owned())
            .or_insert_with(|| LogGate::new(self.window, self.burst))
            .admit(Instant::now())
    }
}

impl Resolver {
    /// A resolver answering from `current`, counting requests on `board`.
    pub fn new(current: Current, board: Arc<StatusBoard>) -> Self {
        Resolver {
            current: RwLock::new(current),
            board,
            gates: Gates::new(REJECTION_WINDOW, REJECTION_BURST),
            audit_gates: Gates::new(AUDIT_WINDOW, AUDIT_BURST),
            broker: std::sync::OnceLock::new(),
        }
    }

    /// A scoped token for VM `vm` (link version 4): the scopes asked for are cut to what the
    /// VM's `pull`/`push` policy grants (nothing by default), and the registry's stored
    /// credential (found as a `get` would find it; none: anonymously) is exchanged at the
    /// registry's own token realm. One audit line per token: scopes granted and refused, the
    /// token's lifetime; never the token.
    pub async fn token(&self, vm: &str, request: TokenRequest) -> Result<Token, WireError> {
        let started = Instant::now();
        self.board.count_request(vm);
        let current = self.current();
        let checked = (|| {
            let registry = Registry::parse(&request.registry)
                .map_err(|e| WireError::BadRequest { reason: e.to_string() })?;
            let scopes =
                request.scopes.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>, _>>()?;
            if scopes.is_empty() {
                return Err(WireError::BadRequest {
                    reason: "a token request names no scope".into(),
                });
            }
            let Some(vm_settings) = current.settings.vms.get(vm) else {
                return Err(WireError::Denied {
                    reason: format!("VM {vm} is no longer configured"),
                });
            };
            Ok((registry, scopes, vm_settings.policy.tokens.clone()))
        })();
        let (registry, scopes, policy) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                self.rejected_as(vm, "token", &e);
                return Err(e);
            }
        };
        let (granted, refused) = policy.intersect(&registry, &scopes);
        let text = |v: &[Scope]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let (granted_text, refused_text) = (text(&granted), text(&refused));
        let (source, outcome) = if granted.is_empty() {
            let reason = format!(
                "the host's policy for VM {vm} grants no token for {} on {registry}",
                refused_text.join(" ")
            );
            ("-".to_owned(), Err(WireError::Denied { reason }))
        } else {
            self.exchange(&current, vm, &registry, &granted).await
        };
        let outcome = outcome.map(|(token, expires_in)| Token {
            token,
            expires_in,
            granted: granted_text.clone(),
        });
        if outcome.is_ok() {
            self.board.count_path(vm, &registry.key(), Via::Token);
        }
        if let Some(suppressed) = self.audit_gates.admit(vm) {
            tracing::info!(
                target: AUDIT_TARGET,
                vm,
                op = "token",
                registry = registry.key(),
                source,
                result = outcome.as_ref().map_or_else(WireError::class, |_| "ok"),
                granted = ?granted_text,
                refused = ?refused_text,
                lifetime_s = outcome.as_ref().map_or(0, |t| t.expires_in),
                reason = ?cap(outcome.as_ref().err().map_or("", reason_text), MAX_AUDIT_REASON),
                ms = started.elapsed().as_millis() as u64,
                suppressed,
            );
        }
        outcome
    }

    /// The exchange behind [`Resolver::token`]: the cache, else the stored credential and
    /// the broker. The first item names where the token came from, for the audit line.
    async fn exchange(
        &self,
        current: &Current,
        vm: &str,
        registry: &Registry,
        granted: &[Scope],
    ) -> (String, Result<(Secret, u32), WireError>) {
        let broker = match self.broker.get_or_init(Broker::new) {
            Ok(b) => b,
            Err(e) => return ("-".to_owned(), Err(e.clone())),
        };
        if let Some(hit) = broker.cached(vm, registry, granted) {
            return ("cache".to_owned(), Ok(hit));
        }
        let get = Request::Get { server: registry.key() };
        let (source, stored) = match dispatch(current, vm, get, Some(registry), &Rule::any()).await
        {
            (source, Ok(Response::Credential { username, secret })) => {
                (source, Some(Stored { username, secret }))
            }
            (source, Err(WireError::NotFound)) => (source, None),
            (source, Err(e)) => return (source, Err(e)),
            (source, Ok(_)) => {
                return (
                    source,
                    Err(WireError::Internal { reason: "a get answered no credential".into() }),
                );
            }
        };
        (source, broker.fetch(vm, registry, granted, stored.as_ref()).await)
    }

    /// What requests are answered from now.
    pub fn current(&self) -> Current {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Answers from `current` from now on (requests in flight finish with what they had).
    pub fn replace(&self, current: Current) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = current;
    }

    /// Answers `request` from VM `vm` and writes its audit line. The request is checked
    /// before anything of it is logged; rejections are rate-limited per VM in the log.
    pub async fn handle(&self, vm: &str, request: Request) -> Outcome {
        let started = Instant::now();
        self.board.count_request(vm);
        let op = request.op();
        let current = self.current();
        let checked = check(&request).and_then(|registry| {
            let rule = allowed(&current, vm, op, registry.as_ref())?;
            Ok((registry, rule))
        });
        let (registry, rule) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                self.rejected(vm, op, &e);
                return Err(e);
            }
        };
        let (source, outcome) = dispatch(&current, vm, request, registry.as_ref(), &rule).await;
        if let (Ok(Response::Credential { .. }), Some(r)) = (&outcome, &registry) {
            self.board.count_path(vm, &r.key(), Via::Secret);
        }
        let result = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        let Some(suppressed) = self.audit_gates.admit(vm) else { return outcome };
        let registry = registry.as_ref().map(Registry::key);
        tracing::info!(
            target: AUDIT_TARGET,
            vm,
            op = op.as_str(),
            registry = registry.as_deref().unwrap_or("-"),
            source,
            result,
            reason = ?cap(reason_of(&outcome), MAX_AUDIT_REASON),
            ms = started.elapsed().as_millis() as u64,
            suppressed,
        );
        outcome
    }

    /// The audit line of a refused request, if the VM's log gate lets it through.
    fn rejected(&self, vm: &str, op: Op, e: &WireError) {
        self.rejected_as(vm, op.as_str(), e);
    }

    /// [`Resolver::rejected`] for an operation named `op`.
    fn rejected_as(&self, vm: &str, op: &str, e: &WireError) {
        if let Some(suppressed) = self.gates.admit(vm) {
            let reason = match e {
                WireError::BadRequest { reason } | WireError::Denied { reason } => reason.as_str(),
                _ => "",
            };
            tracing::info!(
                target: AUDIT_TARGET,
                vm,
                op,
                registry = "-",
                source = "-",
                result = e.class(),
                reason = ?cap(reason, MAX_AUDIT_REASON),
                suppressed,
                "request refused"
            );
        }
    }
}

fn reason_of(outcome: &Outcome) -> &str {
    outcome.as_ref().err().map_or("", reason_text)
}

/// An error's reason, for the audit line.
fn reason_text(e: &WireError) -> &str {
    match e {
        WireError::Unavailable { reason }
        | WireError::Internal { reason }
        | WireError::Denied { reason }
        | WireError::BadRequest { reason } => reason.as_str(),
        WireError::NotFound => "",
    }
}

/// The VM's rule for this request, if the policy allows it at all.
fn allowed(
    current: &Current,
    vm: &str,
    op: Op,
    registry: Option<&Registry>,
) -> Result<Rule, WireError> {
    let denied = |what: String| WireError::Denied {
        reason: format!("the host's policy for VM {vm} does not allow {what}"),
    };
    let Some(vm_settings) = current.settings.vms.get(vm) else {
        return Err(denied(format!("{op} (the VM is no longer configured)")));
    };
    let rule = vm_settings.policy.rule(op);
    match registry {
        Some(registry) if !rule.allows(registry) => Err(denied(format!("{op} for {registry}"))),
        None if rule.is_empty() => Err(denied(op.to_string())),
        _ => Ok(rule.clone()),
    }
}

async fn dispatch(
    current: &Current,
    vm: &str,
    request: Request,
    registry: Option<&Registry>,
    rule: &Rule,
) -> (String, Outcome) {
    let config = match current.docker_config().await {
        Ok(c) => c,
        Err(e) => return ("docker-config".into(), Err(e)),
    };
    let Some(registry) = registry else {
        return ("all".into(), list(current, vm, &config, rule).await);
    };
    let source = match current.source_for(&config, vm, registry).await {
        Ok(s) => s,
        Err(e) => {
            let name = config.routing.helper_for(registry).unwrap_or("-").to_owned();
            return (name, Err(e.into()));
        }
    };
    let name = source.name();
    let kind = source.kind();
    // A host helper is a process: the VM waits for one of its own slots (and one of all).
    let _slot = match kind {
        SourceKind::Helper => match current.shares.helper(vm).await {
            Some(slot) => Some(slot),
            None => {
                let reason = format!(
                    "host busy: VM {vm} already runs {} host credential helpers and more wait",
                    crate::fair::MAX_HELPERS_PER_VM
                );
                return (name, Err(WireError::unavailable(reason)));
            }
        },
        _ => None,
    };
    let outcome = match request {
        Request::Get { .. } => {
            let outcome = get(source.as_ref(), registry).await;
            if outcome.is_ok() && kind == SourceKind::Ecr {
                current.ecr.served(vm, registry.host());
            }
            outcome
        }
        Request::Store { username, secret, .. } => {
            let _turn = current.budget.turn(vm).await;
            store(current, vm, source.as_ref(), registry, Credential { username, secret }).await
        }
        Request::Erase { .. } => {
            let _turn = current.budget.turn(vm).await;
            let outcome = erase(source.as_ref(), registry).await;
            if outcome.is_ok() && kind != SourceKind::Ecr {
                let (budget, vm, key) = (current.budget.clone(), vm.to_owned(), registry.key());
                let _ = blocking(move || {
                    budget.release(&vm, &key);
                    Ok(())
                })
                .await;
            }
            outcome
        }
        Request::List => list(current, vm, &config, rule).await,
    };
    (name, outcome)
}

/// Stores under docker/cli's key, within the VM's budget (ECR ignores stores: not counted).
async fn store(
    current: &Current,
    vm: &str,
    source: &dyn CredentialSource,
    registry: &Registry,
    credential: Credential,
) -> Outcome {
    let key = registry.key();
    let reserved = if source.kind() == SourceKind::Ecr {
        None
    } else {
        let bytes =
            (key.len() + credential.username.len() + credential.secret.expose().len()) as u64;
        let (budget, vm, k) = (current.budget.clone(), vm.to_owned(), key.clone());
        Some(blocking(move || budget.reserve(&vm, &k, bytes)).await?)
    };
    match source.store(&key, &credential).await {
        Ok(()) => Ok(Response::Done),
        Err(e) => {
            if let Some(r) = reserved {
                let budget = current.budget.clone();
                let _ = blocking(move || {
                    budget.undo(r);
                    Ok(())
                })
                .await;
            }
            Err(e.into())
        }
    }
}

/// Every credential's server and username that `rule` lets the VM see: plaintext `auths`,
/// the `credsStore`, each `credHelpers` helper for the registries routed to it, and the ECR
/// registries this VM was served. Never secrets. Names that are not registries are left out;
/// the answer is cut to [`MAX_LIST_BYTES`] and says so.
async fn list(current: &Current, vm: &str, config: &DockerConfig, rule: &Rule) -> Outcome {
    let routing = &config.routing;
    let mut entries: Vec<ListEntry> =
        PlainAuths::new(&current.settings.docker_config, config.auths.clone()).list().await?;
    // A store that cannot list is left out (and logged) rather than failing the whole list;
    // if every store failed, the first failure is the answer.
    let mut failure: Option<SourceError> = None;
    let mut listed_any = false;
    let mut add = |name: &str,
                   result: Result<Vec<ListEntry>, SourceError>,
                   only: Option<&[String]>| match result {
        Ok(found) => {
            listed_any = true;
            for e in found {
                let key = Registry::parse(&e.server).map(|r| r.key());
                let mine = only.is_none_or(|mine| key.as_ref().is_ok_and(|k| mine.contains(k)));
                if mine && !entries.contains(&e) {
                    entries.push(e);
                }
            }
        }
        Err(e) => {
            tracing::warn!(store = name, error = %e, "left out of list");
            failure.get_or_insert(e);
        }
    };
    let ecr_entries = || {
        current
            .ecr
            .listed_for(vm)
            .into_iter()
            .map(|server| ListEntry { server, username: ecr::TOKEN_USERNAME.into() })
            .collect::<Vec<_>>()
    };
    let creds_store = routing.creds_store.as_deref().filter(|s| !s.is_empty());
    if let Some(store) = creds_store {
        let result = if store == ecr::HELPER_NAME {
            Ok(ecr_entries())
        } else {
            match current.helper_async(vm, store).await {
                Ok(source) => source.list().await,
                Err(e) => Err(e),
            }
        };
        add(store, result, None);
    }
    // ECR tokens served under `auto` appear too.
    if current.settings.ecr.auto && creds_store != Some(ecr::HELPER_NAME) {
        add(ecr::HELPER_NAME, Ok(ecr_entries()), None);
    }
    let mut helpers: Vec<&String> =
        routing.cred_helpers.values().filter(|h| !h.is_empty()).collect();
    helpers.sort();
    helpers.dedup();
    for name in helpers {
        if routing.creds_store.as_ref() == Some(name) {
            continue;
        }
        let mine: Vec<String> = routing
            .cred_helpers
            .iter()
            .filter(|(_, h)| *h == name)
            .filter_map(|(r, _)| Registry::parse(r).ok().map(|r| r.key()))
            .collect();
        let result = if name == ecr::HELPER_NAME {
            Ok(ecr_entries())
        } else {
            match current.helper_async(vm, name).await {
                Ok(source) => source.list().await,
                Err(e) => Err(e),
            }
        };
        add(name, result, Some(&mine));
    }
    if let Some(e) = failure
        && !listed_any
        && entries.is_empty()
    {
        return Err(e.into());
    }
    entries.retain(|e| Registry::parse(&e.server).is_ok_and(|r| rule.allows(&r)));
    entries.sort_by(|a, b| a.server.cmp(&b.server).then_with(|| a.username.cmp(&b.username)));
    let found = entries.len();
    let mut bytes = 0;
    let mut keep = 0;
    for e in &entries {
        bytes += e.server.len() + e.username.len() + 8;
        if bytes > MAX_LIST_BYTES || keep == MAX_LIST_ENTRIES {
            break;
        }
        keep += 1;
    }
    entries.truncate(keep);
    if keep < found {
        tracing::warn!(vm, found, kept = keep, "list cut to fit one answer");
        return Ok(Response::ListCut { entries, omitted: (found - keep) as u64 });
    }
    Ok(Response::List { entries })
}

/// Tries every spelling; the first hit wins. Errors on one spelling don't hide a hit on
/// another (as nerdctl does); if nothing is found and something failed, the failure is told.
async fn get(source: &dyn CredentialSource, registry: &Registry) -> Outcome {
    let mut failure = None;
    for spelling in registry.spellings() {
        match source.get(&spelling).await {
            Ok(Some(c)) => {
                return Ok(Response::Credential { username: c.username, secret: c.secret });
            }
            Ok(None) => {}
            Err(e) => {
                // A timeout would repeat for every spelling: stop at the first.
                let stop = matches!(
                    e,
                    SourceError::HelperTimeout { .. }
                        | SourceError::HelperMissing(_)
                        | SourceError::Keychain(_)
                        | SourceError::Ecr(_)
                );
                failure.get_or_insert(e);
                if stop {
                    break;
                }
            }
        }
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Err(WireError::NotFound),
    }
}

/// Erases every spelling, as `docker logout` does for the ones it knows.
async fn erase(source: &dyn CredentialSource, registry: &Registry) -> Outcome {
    for spelling in registry.spellings() {
        source.erase(&spelling).await?;
    }
    Ok(Response::Done)
}

/// Refuses requests no registry client would send; the server name becomes a [`Registry`]
/// here, once, for everything after.
fn check(request: &Request) -> Result<Option<Registry>, WireError> {
    let bad = |reason: String| WireError::BadRequest { reason };
    let registry = match request.server() {
        Some(server) => Some(Registry::parse(server).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    if let Request::Store { username, secret, .. } = request {
        if username.is_empty()
            || username.len() > MAX_USERNAME_LEN
            || username.chars().any(char::is_control)
        {
            return Err(bad(format!(
                "the username is empty, longer than {MAX_USERNAME_LEN} bytes or contains control characters"
            )));
        }
        if secret.expose().len() > MAX_SECRET_LEN {
            return Err(bad(format!("the secret is longer than {MAX_SECRET_LEN} bytes")));
        }
    }
    Ok(registry)
}

/// The resolver on its own, no process and no link: a config file and a docker config in a
/// temporary directory, requests handed to [`Resolver::handle`] as a link would.
#[cfg(test)]
pub(crate) mod tests {
    use finch_shared::Secret;
    use finch_shared::message::{ListEntry, Request, Response, WireError};

    use super::*;
    use crate::settings::{Overrides, toml_string};

    pub(crate) struct Fixture {
        _dir: tempfile::TempDir,
        docker: std::path::PathBuf,
        resolver: Arc<Resolver>,
    }

    impl Fixture {
        /// The resolver, to run elsewhere while the fixture keeps its files.
        pub(crate) fn take_resolver(&mut self) -> Arc<Resolver> {
            self.resolver.clone()
        }
    }

    /// VM `a` may do anything; VM `b` may get `ghcr.io` only. The docker config holds one
    /// plaintext credential for `registry.example:5000`.
    pub(crate) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let docker = dir.path().join("docker");
        std::fs::create_dir(&docker).unwrap();
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:pw");
        std::fs::write(
            docker.join("config.json"),
            format!("{{\"auths\":{{\"registry.example:5000\":{{\"auth\":\"{auth}\"}}}}}}"),
        )
        .unwrap();
        let path = |p: &std::path::Path| toml_string(&p.display().to_string());
        let config = dir.path().join("host-agent.toml");
        std::fs::write(
            &config,
            format!(
                "docker_config = {}\nstate_dir = {}\nnative_keychain = false\n\
                 [ecr]\nauto = false\n\
                 [vm.a]\nendpoint = \"unix:///a.sock\"\n\
                 [vm.b]\nendpoint = \"unix:///b.sock\"\n\
                 [vm.b.policy]\nget = [\"ghcr.io\"]\nstore = []\nerase = []\nlist = []\n",
                path(&docker),
                path(&dir.path().join("state")),
            ),
        )
        .unwrap();
        let settings =
            Settings::load(&Overrides { config: Some(config), ..Overrides::default() }).unwrap();
        // The store ledger lives here (the agent makes it private; not what is tested here,
        // and Wine reads a private DACL back as open).
        std::fs::create_dir_all(&settings.state_dir).unwrap();
        let resolver =
            Resolver::new(Current::new(settings, None), Arc::new(StatusBoard::default()));
        Fixture { _dir: dir, docker, resolver: Arc::new(resolver) }
    }

    fn get(server: &str) -> Request {
        Request::Get { server: server.into() }
    }

    fn credential(outcome: Outcome) -> (String, String) {
        match outcome {
            Ok(Response::Credential { username, secret }) => (username, secret.expose().to_owned()),
            other => panic!("not a credential: {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_spelling_of_a_registry_finds_its_credential() {
        let f = fixture();
        for server in [
            "registry.example:5000",
            "https://registry.example:5000",
            "https://registry.example:5000/v2/",
            "REGISTRY.example:5000",
        ] {
            let answer = f.resolver.handle("a", get(server)).await;
            assert_eq!(credential(answer), ("alice".into(), "pw".into()), "{server}");
        }
        let answer = f.resolver.handle("a", get("registry.example")).await;
        assert_eq!(answer, Err(WireError::NotFound), "another port is another registry");
    }

    #[tokio::test]
    async fn policy_is_per_vm_and_per_operation() {
        let f = fixture();
        let answer = f.resolver.handle("b", get("registry.example:5000")).await;
        assert!(matches!(answer, Err(WireError::Denied { .. })), "{answer:?}");
        let store = Request::Store {
            server: "ghcr.io".into(),
            username: "u".into(),
            secret: Secret::from("s"),
        };
        let answer = f.resolver.handle("b", store).await;
        assert!(matches!(answer, Err(WireError::Denied { .. })), "{answer:?}");
        let answer = f.resolver.handle("b", Request::List).await;
        assert!(matches!(answer, Err(WireError::Denied { .. })), "{answer:?}");
        // A VM the config does not name may do nothing.
        let answer = f.resolver.handle("zz", get("registry.example:5000")).await;
        assert!(matches!(answer, Err(WireError::Denied { .. })), "{answer:?}");
    }

    #[tokio::test]
    async fn a_malformed_server_is_refused_before_any_source() {
        let f = fixture();
        for server in ["", "https://", "a b", "host:port", "x:99999"] {
            let answer = f.resolver.handle("a", get(server)).await;
            assert!(matches!(answer, Err(WireError::BadRequest { .. })), "{server:?}: {answer:?}");
        }
    }

    #[tokio::test]
    async fn store_then_get_then_erase_goes_through_the_file() {
        let f = fixture();
        let store = Request::Store {
            server: "https://ghcr.io/v2/".into(),
            username: "bob".into(),
            secret: Secret::from("tok"),
        };
        assert_eq!(f.resolver.handle("a", store).await, Ok(Response::Done));
        let on_disk = std::fs::read_to_string(f.docker.join("config.json")).unwrap();
        assert!(on_disk.contains("\"ghcr.io\""), "stored under docker/cli's key: {on_disk}");
        assert_eq!(
            credential(f.resolver.handle("a", get("ghcr.io")).await),
            ("bob".into(), "tok".into())
        );
        let listed = f.resolver.handle("a", Request::List).await;
        let Ok(Response::List { entries }) = listed else { panic!("{listed:?}") };
        assert!(entries.contains(&ListEntry { server: "ghcr.io".into(), username: "bob".into() }));
        let erase = Request::Erase { server: "ghcr.io".into() };
        assert_eq!(f.resolver.handle("a", erase).await, Ok(Response::Done));
        assert_eq!(f.resolver.handle("a", get("ghcr.io")).await, Err(WireError::NotFound));
        // The other credential was left alone.
        let (user, _) = credential(f.resolver.handle("a", get("registry.example:5000")).await);
        assert_eq!(user, "alice");
    }

    #[tokio::test]
    async fn a_new_config_applies_to_the_next_request() {
        let f = fixture();
        let mut current = f.resolver.current();
        let mut settings = (*current.settings).clone();
        settings.vms.get_mut("a").unwrap().policy.get = Rule(Vec::new());
        current = Current::new(settings, Some(&current));
        f.resolver.replace(current);
        let answer = f.resolver.handle("a", get("registry.example:5000")).await;
        assert!(matches!(answer, Err(WireError::Denied { .. })), "{answer:?}");
    }
}
