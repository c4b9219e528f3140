//! How the host answers one request: check it, route it to a source in docker/cli's order,
//! try every spelling of the registry, and write one audit line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use finch_shared::message::{ListEntry, MAX_LIST_ENTRIES, Outcome, Request, Response, WireError};
use finch_shared::registry::{registry_key, spellings};

use crate::source::docker_config::{DockerConfig, PlainAuths};
use crate::source::exec_helper::ExecHelper;
use crate::source::{Credential, CredentialSource, SourceError};

/// Longest server string accepted from a guest.
pub const MAX_SERVER_LEN: usize = 1024;
/// Longest username accepted from a guest.
pub const MAX_USERNAME_LEN: usize = 1024;
/// Tracing target of the audit lines.
pub const AUDIT_TARGET: &str = "finch_audit";

/// Settings of the resolver.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// The host's docker config directory (`~/.finch`).
    pub docker_config: PathBuf,
    /// Where host helpers are looked up (`PATH`).
    pub helper_path: OsString,
    /// Time a host helper may take.
    pub helper_timeout: Duration,
}

/// Answers requests from every VM.
#[derive(Debug)]
pub struct Resolver {
    settings: ResolverSettings,
}

impl Resolver {
    /// A resolver with these settings.
    pub fn new(settings: ResolverSettings) -> Self {
        Resolver { settings }
    }

    /// Answers `request` from VM `vm` and writes its audit line.
    pub async fn handle(&self, vm: &str, request: Request) -> Outcome {
        let started = Instant::now();
        let op = request.op();
        let registry = request.server().map(registry_key);
        let (source, outcome) = match check(&request) {
            Ok(()) => self.dispatch(request).await,
            Err(e) => ("-".to_owned(), Err(e)),
        };
        let result = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        let reason = match &outcome {
            Err(WireError::Unavailable { reason } | WireError::Internal { reason }) => {
                reason.as_str()
            }
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

    fn source_for(
        &self,
        config: &DockerConfig,
        server: &str,
    ) -> Result<Box<dyn CredentialSource>, SourceError> {
        Ok(match config.routing.helper_for(server) {
            Some(name) => Box::new(ExecHelper::find(
                name,
                &self.settings.helper_path,
                self.settings.helper_timeout,
            )?),
            None => Box::new(PlainAuths::new(&self.settings.docker_config, config.auths.clone())),
        })
    }

    async fn dispatch(&self, request: Request) -> (String, Outcome) {
        let config = match DockerConfig::load(&self.settings.docker_config) {
            Ok(c) => c,
            Err(e) => return ("docker-config".into(), Err(e.into())),
        };
        if let Request::List = request {
            return ("all".into(), self.list(&config).await);
        }
        let server = request.server().unwrap_or_default().to_owned();
        let source = match self.source_for(&config, &server) {
            Ok(s) => s,
            Err(e) => {
                return (
                    config.routing.helper_for(&server).unwrap_or("-").to_owned(),
                    Err(e.into()),
                );
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
            Request::List => self.list(&config).await,
        };
        (source.name(), outcome)
    }

    /// Every credential's server and username: plaintext `auths`, the `credsStore`, and each
    /// `credHelpers` helper for the registries routed to it. Never secrets.
    async fn list(&self, config: &DockerConfig) -> Outcome {
        let routing = &config.routing;
        let mut entries: Vec<ListEntry> =
            PlainAuths::new(&self.settings.docker_config, config.auths.clone()).list().await?;
        if let Some(store) = routing.creds_store.as_deref().filter(|s| !s.is_empty()) {
            let helper =
                ExecHelper::find(store, &self.settings.helper_path, self.settings.helper_timeout)?;
            entries.extend(helper.list().await?);
        }
        let mut helpers: Vec<&String> = routing.cred_helpers.values().collect();
        helpers.sort();
        helpers.dedup();
        for name in helpers {
            if routing.creds_store.as_ref() == Some(name) {
                continue;
            }
            let helper =
                ExecHelper::find(name, &self.settings.helper_path, self.settings.helper_timeout)?;
            let mine: Vec<&String> =
                routing.cred_helpers.iter().filter(|(_, h)| *h == name).map(|(r, _)| r).collect();
            entries.extend(
                helper
                    .list()
                    .await?
                    .into_iter()
                    .filter(|e| mine.contains(&&registry_key(&e.server))),
            );
        }
        if entries.len() > MAX_LIST_ENTRIES {
            tracing::warn!(count = entries.len(), kept = MAX_LIST_ENTRIES, "list truncated");
            entries.truncate(MAX_LIST_ENTRIES);
        }
        Ok(Response::List { entries })
    }
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
                let stop =
                    matches!(e, SourceError::HelperTimeout { .. } | SourceError::HelperMissing(_));
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
