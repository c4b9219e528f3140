//! How the host answers one request: check it, route it to a source in docker/cli's order,
//! check the VM's policy, try every spelling of the registry, and write one audit line.

use std::ffi::OsString;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use finch_shared::message::{ListEntry, MAX_LIST_ENTRIES, Outcome, Request, Response, WireError};
use finch_shared::registry::{registry_key, spellings};

use crate::config::Settings;
use crate::policy::Rule;
use crate::source::docker_config::{DockerConfig, PlainAuths};
use crate::source::ecr::{self, Ecr, EcrSource};
use crate::source::exec_helper::ExecHelper;
use crate::source::{Credential, CredentialSource, SourceError, keychain};
use crate::status::StatusBoard;

/// Longest server string accepted from a guest.
pub const MAX_SERVER_LEN: usize = 1024;
/// Longest username accepted from a guest.
pub const MAX_USERNAME_LEN: usize = 1024;
/// Tracing target of the audit lines.
pub const AUDIT_TARGET: &str = "finch_audit";

/// What the resolver answers from: the settings and the long-lived native keychain.
#[derive(Clone)]
pub struct Current {
    /// The merged settings.
    pub settings: Arc<Settings>,
    /// This OS's keychain, served natively (kept so its connection lives).
    pub keychain: Option<Arc<dyn CredentialSource>>,
    /// Native ECR (one per agent: its token cache outlives reloads).
    pub ecr: Arc<Ecr>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("keychain", &self.keychain.is_some())
            .finish_non_exhaustive()
    }
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
        Current { settings: Arc::new(settings), keychain, ecr }
    }

    /// The source that serves `server` under the docker config's routing: `credHelpers`
    /// first; then native ECR for an ECR hostname (with `[ecr] auto`); then `credsStore`;
    /// then the plaintext `auths`.
    pub fn source_for(
        &self,
        config: &DockerConfig,
        server: &str,
    ) -> Result<Arc<dyn CredentialSource>, SourceError> {
        let routing = &config.routing;
        let explicit = routing.cred_helper_for(server);
        let name = match explicit {
            Some(name) => Some(name),
            None if self.settings.ecr.auto && ecr::host::is_ecr(server) => Some(ecr::HELPER_NAME),
            None => routing.creds_store.as_deref(),
        };
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self.helper(name),
            None => {
                Ok(Arc::new(PlainAuths::new(&self.settings.docker_config, config.auths.clone())))
            }
        }
    }

    /// The source behind helper `name`: the native keychain when it serves that name,
    /// else the host's `docker-credential-<name>`.
    pub fn helper(&self, name: &str) -> Result<Arc<dyn CredentialSource>, SourceError> {
        if name == ecr::HELPER_NAME {
            return Ok(Arc::new(EcrSource(self.ecr.clone())));
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
}

impl Resolver {
    /// A resolver answering from `current`, counting requests on `board`.
    pub fn new(current: Current, board: Arc<StatusBoard>) -> Self {
        Resolver { current: RwLock::new(current), board }
    }

    /// What requests are answered from now.
    pub fn current(&self) -> Current {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Answers from `current` from now on (requests in flight finish with what they had).
    pub fn replace(&self, current: Current) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = current;
    }

    /// Answers `request` from VM `vm` and writes its audit line.
    pub async fn handle(&self, vm: &str, request: Request) -> Outcome {
        let started = Instant::now();
        self.board.count_request(vm);
        let op = request.op();
        let registry = request.server().map(registry_key);
        let current = self.current();
        let (source, outcome) = match check(&request).and_then(|()| allowed(&current, vm, &request))
        {
            Ok(rule) => dispatch(&current, request, rule).await,
            Err(e) => ("-".to_owned(), Err(e)),
        };
        let result = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        let reason = match &outcome {
            Err(
                WireError::Unavailable { reason }
                | WireError::Internal { reason }
                | WireError::Denied { reason },
            ) => reason.as_str(),
            _ => "",
        };
        tracing::info!(
            target: AUDIT_TARGET,
            vm,
            op,
            registry = registry.as_deref().unwrap_or("-"),
            source,
            result,
            reason,
            ms = started.elapsed().as_millis() as u64,
        );
        outcome
    }
}

/// The VM's rule for this request, if the policy allows it at all.
fn allowed<'c>(current: &'c Current, vm: &str, request: &Request) -> Result<&'c Rule, WireError> {
    let op = request.op();
    let denied = |what: String| WireError::Denied {
        reason: format!("the host's policy for VM {vm} does not allow {what}"),
    };
    let Some(vm_settings) = current.settings.vms.get(vm) else {
        return Err(denied(format!("{op} (the VM is no longer configured)")));
    };
    // Every request's op has a rule; none would mean "nothing allowed".
    let Some(rule) = vm_settings.policy.rule(op) else {
        return Err(denied(op.to_owned()));
    };
    match request.server() {
        Some(server) if !rule.allows(server) => {
            Err(denied(format!("{op} for {}", registry_key(server))))
        }
        None if rule.is_empty() => Err(denied(op.to_owned())),
        _ => Ok(rule),
    }
}

async fn dispatch(current: &Current, request: Request, rule: &Rule) -> (String, Outcome) {
    let config = match DockerConfig::load(&current.settings.docker_config) {
        Ok(c) => c,
        Err(e) => return ("docker-config".into(), Err(e.into())),
    };
    let Some(server) = request.server().map(str::to_owned) else {
        return ("all".into(), list(current, &config, rule).await);
    };
    let source = match current.source_for(&config, &server) {
        Ok(s) => s,
        Err(e) => {
            return (config.routing.helper_for(&server).unwrap_or("-").to_owned(), Err(e.into()));
        }
    };
    let outcome = match request {
        Request::Get { server } => get(source.as_ref(), &server).await,
        Request::Store { server, username, secret } => {
            let credential = Credential { username, secret };
            source
                .store(&registry_key(&server), &credential)
                .await
                .map(|()| Response::Done)
                .map_err(Into::into)
        }
        Request::Erase { server } => erase(source.as_ref(), &server).await,
        Request::List => list(current, &config, rule).await,
    };
    (source.name(), outcome)
}

/// Every credential's server and username that `rule` lets the VM see: plaintext `auths`,
/// the `credsStore`, and each `credHelpers` helper for the registries routed to it. Never
/// secrets.
async fn list(current: &Current, config: &DockerConfig, rule: &Rule) -> Outcome {
    let routing = &config.routing;
    let mut entries: Vec<ListEntry> =
        PlainAuths::new(&current.settings.docker_config, config.auths.clone()).list().await?;
    // A store that cannot list is left out (and logged) rather than failing the whole list;
    // if every store failed, the first failure is the answer.
    let mut failure: Option<SourceError> = None;
    let mut listed_any = false;
    let mut add = |name: &str,
                   result: Result<Vec<ListEntry>, SourceError>,
                   only: Option<&[&String]>| match result {
        Ok(found) => {
            listed_any = true;
            for e in found {
                if only.is_none_or(|mine| mine.contains(&&registry_key(&e.server)))
                    && !entries.contains(&e)
                {
                    entries.push(e);
                }
            }
        }
        Err(e) => {
            tracing::warn!(store = name, error = %e, "left out of list");
            failure.get_or_insert(e);
        }
    };
    if let Some(store) = routing.creds_store.as_deref().filter(|s| !s.is_empty()) {
        let result = match current.helper(store) {
            Ok(source) => source.list().await,
            Err(e) => Err(e),
        };
        add(store, result, None);
    }
    // ECR tokens served under `auto` appear too.
    if current.settings.ecr.auto && routing.creds_store.as_deref() != Some(ecr::HELPER_NAME) {
        add(ecr::HELPER_NAME, EcrSource(current.ecr.clone()).list().await, None);
    }
    let mut helpers: Vec<&String> =
        routing.cred_helpers.values().filter(|h| !h.is_empty()).collect();
    helpers.sort();
    helpers.dedup();
    for name in helpers {
        if routing.creds_store.as_ref() == Some(name) {
            continue;
        }
        let mine: Vec<&String> =
            routing.cred_helpers.iter().filter(|(_, h)| *h == name).map(|(r, _)| r).collect();
        let result = match current.helper(name) {
            Ok(source) => source.list().await,
            Err(e) => Err(e),
        };
        add(name, result, Some(&mine));
    }
    if let Some(e) = failure
        && !listed_any
        && entries.is_empty()
    {
        return Err(e.into());
    }
    entries.retain(|e| rule.allows(&e.server));
    if entries.len() > MAX_LIST_ENTRIES {
        tracing::warn!(count = entries.len(), kept = MAX_LIST_ENTRIES, "list truncated");
        entries.truncate(MAX_LIST_ENTRIES);
    }
    Ok(Response::List { entries })
}

/// Tries every spelling; the first hit wins. Errors on one spelling don't hide a hit on
/// another (as nerdctl does); if nothing is found and something failed, the failure is told.
async fn get(source: &dyn CredentialSource, server: &str) -> Outcome {
    let mut failure = None;
    for spelling in spellings(server) {
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
async fn erase(source: &dyn CredentialSource, server: &str) -> Outcome {
    for spelling in spellings(server) {
        source.erase(&spelling).await?;
    }
    Ok(Response::Done)
}

/// Refuses requests no registry client would send.
fn check(request: &Request) -> Result<(), WireError> {
    let bad = |reason: &str| Err(WireError::BadRequest { reason: reason.to_owned() });
    if let Some(server) = request.server() {
        if server.is_empty() || server.len() > MAX_SERVER_LEN {
            return bad("server name is empty or too long");
        }
        if server.chars().any(char::is_control) {
            return bad("server name contains control characters");
        }
    }
    if let Request::Store { username, .. } = request
        && (username.is_empty()
            || username.len() > MAX_USERNAME_LEN
            || username.chars().any(char::is_control))
    {
        return bad("username is empty, too long or contains control characters");
    }
    Ok(())
}
