//! macOS Keychain, with items as docker-credential-osxkeychain writes them: internet
//! passwords labelled `Docker Credentials`; server = the registry host; protocol `htps` (or
//! `http` for `http://` servers); port and path when present; account = the username;
//! authentication type `dflt` (left unset by docker-credential-osxkeychain 0.9.0–0.9.2, so
//! lookups also try "any").
//!
//! Written against `security-framework` 3 (`item::ItemSearchOptions`,
//! `passwords::{get,delete}_internet_password`, `passwords_options::PasswordOptions`,
//! `passwords::set_generic_password_options`). CI type-checks and lints it for both macOS
//! targets on Linux (`.ci/zig-cc`); it is linked and run only on macOS (the upstream
//! workflow). The URL splitting it relies on ([`ServerUrl`]) and the
//! [`Blocking`](super::Blocking) adapter around it are tested on every OS.

use finch_shared::Secret;
use finch_shared::message::ListEntry;
use security_framework::item::{ItemClass, ItemSearchOptions, Limit, SearchResult};
use security_framework::os::macos::passwords::{SecAuthenticationType, SecProtocolType};
use security_framework::passwords::{self, PasswordOptions};

use super::{DOCKER_LABEL, KeychainError, ServerUrl, SyncKeychain, shorten};
use crate::source::Credential;

const STORE: &str = "osxkeychain";
/// `errSecItemNotFound`.
const NOT_FOUND: i32 = -25300;
/// `errSecInteractionNotAllowed` (locked keychain, no UI).
const INTERACTION_NOT_ALLOWED: i32 = -25308;
/// `errSecAuthFailed`.
const AUTH_FAILED: i32 = -25293;

/// The native `osxkeychain` source.
#[derive(Debug)]
pub struct OsxKeychain;

fn classify(e: security_framework::base::Error) -> KeychainError {
    match e.code() {
        INTERACTION_NOT_ALLOWED => KeychainError::KeychainLocked { store: STORE },
        AUTH_FAILED => KeychainError::KeychainDenied { store: STORE, reason: shorten(e) },
        _ => KeychainError::KeychainFailed { store: STORE, reason: shorten(e) },
    }
}

fn protocol(url: &ServerUrl) -> SecProtocolType {
    if url.scheme == "http" { SecProtocolType::HTTP } else { SecProtocolType::HTTPS }
}

/// The attributes of every internet password labelled `Docker Credentials`.
fn docker_items() -> Result<Vec<std::collections::HashMap<String, String>>, KeychainError> {
    let found = ItemSearchOptions::new()
        .class(ItemClass::internet_password())
        .label(DOCKER_LABEL)
        .load_attributes(true)
        .limit(Limit::All)
        .search();
    match found {
        Ok(r) => Ok(r.iter().filter_map(SearchResult::simplify_dict).collect()),
        Err(e) if e.code() == NOT_FOUND => Ok(Vec::new()),
        Err(e) => Err(classify(e)),
    }
}

/// The docker items for `url` (server, protocol, port, path): account per item.
fn accounts(url: &ServerUrl) -> Result<Vec<String>, KeychainError> {
    let results = docker_items()?;
    let want_port = url.port.map(|p| p.to_string()).unwrap_or_else(|| "0".into());
    let want_ptcl = if url.scheme == "http" { "http" } else { "htps" };
    Ok(results
        .into_iter()
        .filter(|a| {
            a.get("srvr").map(String::as_str) == Some(url.host.as_str())
                && a.get("ptcl").is_none_or(|p| p == want_ptcl)
                && a.get("port").is_none_or(|p| *p == want_port)
                && a.get("path").map_or(url.path.is_empty(), |p| *p == url.path)
        })
        .filter_map(|a| a.get("acct").cloned())
        .collect())
}

/// Runs `call` with authentication type `dflt`, then "any" (docker-credential-osxkeychain
/// 0.9.0–0.9.2 left it unset); `None` when neither finds an item.
fn by_auth_type<T>(
    call: impl Fn(SecAuthenticationType) -> Result<T, security_framework::base::Error>,
) -> Result<Option<T>, KeychainError> {
    for auth in [SecAuthenticationType::Default, SecAuthenticationType::Any] {
        match call(auth) {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.code() == NOT_FOUND => continue,
            Err(e) => return Err(classify(e)),
        }
    }
    Ok(None)
}

fn url(server: &str) -> Result<ServerUrl, KeychainError> {
    ServerUrl::parse(server).map_err(|e| KeychainError::KeychainFailed {
        store: STORE,
        reason: format!("{:?}: {e}", finch_shared::limit::cap(server, 80)),
    })
}

impl SyncKeychain for OsxKeychain {
    fn get(&self, server: &str) -> Result<Option<Credential>, KeychainError> {
        let url = url(server)?;
        let Some(account) = accounts(&url)?.into_iter().next() else { return Ok(None) };
        let found = by_auth_type(|auth| {
            passwords::get_internet_password(
                &url.host,
                None,
                &account,
                &url.path,
                url.port,
                protocol(&url),
                auth,
            )
        })?;
        let Some(bytes) = found else { return Ok(None) };
        let bytes = zeroize::Zeroizing::new(bytes);
        let secret = std::str::from_utf8(&bytes).map_err(|_| KeychainError::KeychainFailed {
            store: STORE,
            reason: format!("the item for {server:?} is not UTF-8"),
        })?;
        Ok(Some(Credential { username: account, secret: Secret::new(secret.to_owned()) }))
    }

    fn store(&self, server: &str, credential: &Credential) -> Result<(), KeychainError> {
        self.erase(server)?;
        let url = url(server)?;
        let mut options = PasswordOptions::new_internet_password(
            &url.host,
            None,
            &credential.username,
            &url.path,
            url.port,
            protocol(&url),
            SecAuthenticationType::Default,
        );
        options.set_label(DOCKER_LABEL);
        // security-framework 3 has one setter for any `PasswordOptions`: despite its name it
        // adds an item of the options' own class (here kSecClassInternetPassword, with the
        // label `set_internet_password` cannot give), updating one that exists.
        passwords::set_generic_password_options(credential.secret.expose().as_bytes(), options)
            .map_err(classify)
    }

    fn erase(&self, server: &str) -> Result<(), KeychainError> {
        let url = url(server)?;
        for account in accounts(&url)? {
            by_auth_type(|auth| {
                passwords::delete_internet_password(
                    &url.host,
                    None,
                    &account,
                    &url.path,
                    url.port,
                    protocol(&url),
                    auth,
                )
            })?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<ListEntry>, KeychainError> {
        Ok(docker_items()?
            .into_iter()
            .filter_map(|a| {
                let host = a.get("srvr")?;
                let scheme = if a.get("ptcl").map(String::as_str) == Some("http") {
                    "http"
                } else {
                    "https"
                };
                let port = a
                    .get("port")
                    .filter(|p| *p != "0")
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                let path = a.get("path").cloned().unwrap_or_default();
                Some(ListEntry {
                    server: format!("{scheme}://{host}{port}{path}"),
                    username: a.get("acct")?.clone(),
                })
            })
            .collect())
    }
}

/// VM link keys in the login keychain (`crate::vm_keys`): generic passwords of service
/// [`SERVICE`](super::vault::SERVICE), account = the VM's name; docker's items are internet
/// passwords, so the docker source never sees these.
#[derive(Debug)]
pub struct OsxKeyVault;

impl super::vault::Vault for OsxKeyVault {
    fn name(&self) -> &'static str {
        STORE
    }

    fn get(&self, vm: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, KeychainError> {
        match passwords::get_generic_password(super::vault::SERVICE, vm) {
            Ok(bytes) => Ok(Some(zeroize::Zeroizing::new(bytes))),
            Err(e) if e.code() == NOT_FOUND => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    fn put(&self, vm: &str, key: &[u8]) -> Result<(), KeychainError> {
        let mut options = PasswordOptions::new_generic_password(super::vault::SERVICE, vm);
        options.set_label(&super::vault::label(vm));
        passwords::set_generic_password_options(key, options).map_err(classify)
    }

    fn remove(&self, vm: &str) -> Result<(), KeychainError> {
        match passwords::delete_generic_password(super::vault::SERVICE, vm) {
            Err(e) if e.code() != NOT_FOUND => Err(classify(e)),
            _ => Ok(()),
        }
    }
}
