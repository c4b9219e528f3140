//! The Linux Secret Service (gnome-keyring, KeePassXC, …) over D-Bus, with items exactly as
//! `docker-credential-secretservice` writes them:
//!
//! * attributes `xdg:schema` = `io.docker.Credentials`, `label` = `Docker Credentials`,
//!   `server` = the server string as given, `username`, `docker_cli` = `1`;
//! * item label = the server string; secret = the password or token, `text/plain`;
//! * in the default collection.
//!
//! Two things differ on purpose from the reference: storing again with another username
//! replaces the old item instead of adding a second one that `get` would never return, and
//! where such duplicates already exist `get` answers the most recently modified item.
//!
//! One D-Bus connection (with its encrypted session) is kept and dropped after any failure,
//! so a restarted keyring daemon is found again by the next call.

use std::collections::HashMap;
use std::time::Duration;

use finch_shared::Secret;
use finch_shared::message::ListEntry;
use secret_service::{EncryptionType, Error as SsError, Item};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{DOCKER_LABEL, KeychainError, shorten};
use crate::source::{Credential, CredentialSource, SourceError, SourceFuture};

/// The libsecret schema docker's helper uses (stored as the `xdg:schema` attribute).
pub const SCHEMA: &str = "io.docker.Credentials";
const STORE: &str = "secretservice";

type Service = secret_service::SecretService<'static>;

/// The native `secretservice` source.
pub struct SecretService {
    service: Mutex<Option<Service>>,
    timeout: Duration,
}

impl std::fmt::Debug for SecretService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretService").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl SecretService {
    /// A source whose every call is bounded by `timeout`; it connects on first use.
    pub fn new(timeout: Duration) -> Self {
        SecretService { service: Mutex::new(None), timeout }
    }
}

/// Runs `$body` (with `$s` the kept connection, connecting first if needed), bounded by the
/// source's timeout; a failure inside drops the connection, so the next call reconnects.
macro_rules! with_service {
    ($source:expr, |$s:ident| $body:expr) => {{
        let source = $source;
        // The bound covers the wait for the connection too: calls queue on one connection,
        // and a queue behind a hung keyring must not grow past the bound either.
        let result = tokio::time::timeout(source.timeout, async {
            let mut slot = source.service.lock().await;
            if slot.is_none() {
                *slot = Some(connect().await?);
            }
            let result = match slot.as_ref() {
                Some($s) => $body.await,
                None => Err(failed("no connection")),
            };
            if result.is_err() {
                *slot = None;
            }
            result
        })
        .await
        .unwrap_or(Err(KeychainError::KeychainTimeout {
            store: STORE,
            secs: source.timeout.as_secs(),
        }));
        result.map_err(SourceError::from)
    }};
}

async fn connect() -> Result<Service, KeychainError> {
    secret_service::SecretService::connect(EncryptionType::Dh).await.map_err(|e| {
        let reason = match e {
            SsError::Unavailable => {
                "no Secret Service on the D-Bus session bus (is gnome-keyring or KeePassXC running?)"
                    .to_owned()
            }
            other => format!(
                "cannot connect to the D-Bus session bus ({}); is DBUS_SESSION_BUS_ADDRESS set?",
                shorten(other)
            ),
        };
        KeychainError::KeychainUnreachable { store: STORE, reason }
    })
}

fn failed(reason: impl std::fmt::Display) -> KeychainError {
    KeychainError::KeychainFailed { store: STORE, reason: shorten(reason) }
}

/// Maps a Secret Service failure to what the user can do about it.
fn classify(e: SsError) -> KeychainError {
    match e {
        SsError::Locked | SsError::Prompt | SsError::PromptDisconnected => {
            KeychainError::KeychainLocked { store: STORE }
        }
        SsError::Unavailable => KeychainError::KeychainUnreachable {
            store: STORE,
            reason: "the Secret Service went away".into(),
        },
        other => {
            let text = other.to_string();
            if text.contains("IsLocked") {
                KeychainError::KeychainLocked { store: STORE }
            } else if text.contains("AccessDenied") || text.contains("NotAuthorized") {
                KeychainError::KeychainDenied { store: STORE, reason: shorten(text) }
            } else {
                failed(text)
            }
        }
    }
}

fn server_query(server: &str) -> HashMap<&str, &str> {
    HashMap::from([("xdg:schema", SCHEMA), ("server", server), ("docker_cli", "1")])
}

/// Every docker item for `server`, unlocking locked ones (which may prompt, within the bound).
async fn items_for<'s>(
    service: &'s Service,
    query: HashMap<&str, &str>,
) -> Result<Vec<Item<'s>>, KeychainError> {
    let found = service.search_items(query).await.map_err(classify)?;
    let mut items = found.unlocked;
    if !found.locked.is_empty() {
        let locked: Vec<&Item<'_>> = found.locked.iter().collect();
        match service.unlock_all(&locked).await {
            Ok(()) => items.extend(found.locked),
            Err(e) => {
                let e = classify(e);
                if items.is_empty() {
                    return Err(match e {
                        KeychainError::KeychainFailed { .. } => {
                            KeychainError::KeychainLocked { store: STORE }
                        }
                        other => other,
                    });
                }
                tracing::debug!(error = %e, "locked keychain items left out");
            }
        }
    }
    Ok(items)
}

async fn lookup(service: &Service, server: &str) -> Result<Option<Credential>, KeychainError> {
    let items = items_for(service, server_query(server)).await?;
    let mut newest: Option<(u64, &Item<'_>)> = None;
    for item in &items {
        let modified = item.get_modified().await.map_err(classify)?;
        if newest.is_none_or(|(m, _)| modified >= m) {
            newest = Some((modified, item));
        }
    }
    let Some((_, item)) = newest else { return Ok(None) };
    let attributes = item.get_attributes().await.map_err(classify)?;
    let username = attributes.get("username").cloned().unwrap_or_default();
    let bytes = Zeroizing::new(item.get_secret().await.map_err(classify)?);
    let secret = std::str::from_utf8(&bytes)
        .map_err(|_| failed(format!("the item for {server:?} holds a secret that is not UTF-8")))?;
    Ok(Some(Credential { username, secret: Secret::new(secret.to_owned()) }))
}

async fn store(service: &Service, server: &str, c: &Credential) -> Result<(), KeychainError> {
    let collection = default_collection(service).await?;
    let attributes = HashMap::from([
        ("xdg:schema", SCHEMA),
        ("label", DOCKER_LABEL),
        ("server", server),
        ("username", c.username.as_str()),
        ("docker_cli", "1"),
    ]);
    let created = collection
        .create_item(server, attributes, c.secret.expose().as_bytes(), true, "text/plain")
        .await
        .map_err(classify)?;
    // One credential per server: whatever else is stored for it (another username) goes.
    for other in items_for(service, server_query(server)).await? {
        if other.item_path != created.item_path {
            other.delete().await.map_err(classify)?;
        }
    }
    Ok(())
}

async fn erase(service: &Service, server: &str) -> Result<(), KeychainError> {
    for item in items_for(service, server_query(server)).await? {
        item.delete().await.map_err(classify)?;
    }
    Ok(())
}

async fn list(service: &Service) -> Result<Vec<ListEntry>, KeychainError> {
    let items = items_for(service, HashMap::from([("docker_cli", "1")])).await?;
    let mut entries = Vec::with_capacity(items.len());
    for item in &items {
        let attributes = item.get_attributes().await.map_err(classify)?;
        if attributes.get("label").map(String::as_str) != Some(DOCKER_LABEL) {
            continue;
        }
        entries.push(ListEntry {
            server: item.get_label().await.map_err(classify)?,
            username: attributes.get("username").cloned().unwrap_or_default(),
        });
    }
    Ok(entries)
}

impl CredentialSource for SecretService {
    fn name(&self) -> String {
        format!("keychain:{STORE}")
    }

    fn kind(&self) -> crate::source::SourceKind {
        crate::source::SourceKind::Keychain
    }

    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>> {
        Box::pin(async move { with_service!(self, |s| lookup(s, server)) })
    }

    fn store<'a>(&'a self, server: &'a str, credential: &'a Credential) -> SourceFuture<'a, ()> {
        Box::pin(async move { with_service!(self, |s| store(s, server, credential)) })
    }

    fn erase<'a>(&'a self, server: &'a str) -> SourceFuture<'a, ()> {
        Box::pin(async move { with_service!(self, |s| erase(s, server)) })
    }

    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>> {
        Box::pin(async move { with_service!(self, |s| list(s)) })
    }
}

/// VM link keys in the Secret Service (`crate::vm_keys`): items of the bridge's own
/// schema, never docker's. Calls block: each runs on a runtime of its own, bounded by the
/// keychain timeout, so it works from the CLI and from the agent's blocking pool alike.
/// Without `DBUS_SESSION_BUS_ADDRESS` there is no session to look in (a daemon started by a
/// login session has it), and the call fails at once.
#[derive(Debug)]
pub struct KeyVault {
    timeout: Duration,
}

impl KeyVault {
    /// A vault whose every call is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        KeyVault { timeout }
    }

    fn run<T>(
        &self,
        call: impl AsyncFnOnce(&Service) -> Result<T, KeychainError>,
    ) -> Result<T, KeychainError> {
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
            return Err(KeychainError::KeychainUnreachable {
                store: STORE,
                reason: "no D-Bus session (DBUS_SESSION_BUS_ADDRESS is not set)".into(),
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start a runtime for the keychain call: {e}")))?;
        runtime.block_on(async {
            let work = async {
                let service = connect().await?;
                call(&service).await
            };
            tokio::time::timeout(self.timeout, work).await.unwrap_or(Err(
                KeychainError::KeychainTimeout { store: STORE, secs: self.timeout.as_secs() },
            ))
        })
    }
}

fn key_query(vm: &str) -> HashMap<&str, &str> {
    HashMap::from([("xdg:schema", super::vault::SCHEMA), ("vm", vm)])
}

async fn default_collection(
    service: &Service,
) -> Result<secret_service::Collection<'_>, KeychainError> {
    let collection = match service.get_default_collection().await {
        Ok(c) => c,
        Err(SsError::NoResult) => service.get_any_collection().await.map_err(classify)?,
        Err(e) => return Err(classify(e)),
    };
    if collection.is_locked().await.map_err(classify)? {
        collection.unlock().await.map_err(|e| match classify(e) {
            KeychainError::KeychainFailed { .. } => KeychainError::KeychainLocked { store: STORE },
            other => other,
        })?;
    }
    Ok(collection)
}

impl super::vault::Vault for KeyVault {
    fn name(&self) -> &'static str {
        STORE
    }

    fn get(&self, vm: &str) -> Result<Option<Zeroizing<Vec<u8>>>, KeychainError> {
        self.run(async |s| {
            let items = items_for(s, key_query(vm)).await?;
            match items.first() {
                Some(item) => Ok(Some(Zeroizing::new(item.get_secret().await.map_err(classify)?))),
                None => Ok(None),
            }
        })
    }

    fn put(&self, vm: &str, key: &[u8]) -> Result<(), KeychainError> {
        let label = super::vault::label(vm);
        self.run(async |s| {
            let collection = default_collection(s).await?;
            collection
                .create_item(&label, key_query(vm), key, true, "application/octet-stream")
                .await
                .map_err(classify)?;
            Ok(())
        })
    }

    fn remove(&self, vm: &str) -> Result<(), KeychainError> {
        self.run(async |s| {
            for item in items_for(s, key_query(vm)).await? {
                item.delete().await.map_err(classify)?;
            }
            Ok(())
        })
    }
}
