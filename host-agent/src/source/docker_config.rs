//! The host's docker config file (`<dir>/config.json`): which helper serves which registry,
//! and the plaintext `auths` fallback, read and written the way docker/cli does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use finch_shared::message::ListEntry;
use finch_shared::registry::Registry;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::{Credential, CredentialSource, SourceError, SourceFuture};

/// File name inside the docker config directory.
pub const CONFIG_FILE: &str = "config.json";

/// Largest config file read; a write that would make the file larger is refused, so the
/// file always stays readable.
pub use finch_shared::docker_config::MAX_CONFIG;

/// Largest the file may become through a VM's store: half of what is read, so the host user's
/// own `docker login`s always have room, whatever the VMs stored.
pub const MAX_VM_STORE_CONFIG: u64 = MAX_CONFIG / 2;

/// The advisory lock file next to the config, held while the agent rewrites it.
pub const LOCK_FILE: &str = ".config.json.finch-lock";

/// Serializes the agent's own rewrites of any docker config (the lock file covers other
/// processes that take it).
static WRITERS: Mutex<()> = Mutex::new(());

/// The routing part of a docker config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// `credsStore`.
    pub creds_store: Option<String>,
    /// `credHelpers`: registry → helper name.
    pub cred_helpers: BTreeMap<String, String>,
}

impl Routing {
    /// The `credHelpers` entry for `server`, by any spelling. An empty entry is `Some("")`:
    /// as in docker/cli, it sends the registry to the plaintext `auths`, not to `credsStore`.
    pub fn cred_helper_for(&self, registry: &Registry) -> Option<&str> {
        registry
            .spellings()
            .iter()
            .find_map(|s| {
                self.cred_helpers.get(s).or_else(|| {
                    let key = Registry::parse(s).ok()?.key();
                    self.cred_helpers.get(&key)
                })
            })
            .map(String::as_str)
    }

    /// The helper docker/cli would use for `server`: `credHelpers` by registry key, trying
    /// every spelling of the registry (so nerdctl's `host:443` finds an entry for `host`),
    /// else `credsStore`; `None` means plaintext `auths`.
    pub fn helper_for(&self, registry: &Registry) -> Option<&str> {
        self.cred_helper_for(registry)
            .or(self.creds_store.as_deref())
            .filter(|name| !name.is_empty())
    }
}

/// Reads `config.json` from `dir`; a missing file is an empty config.
pub fn read_config(dir: &Path) -> Result<Map<String, Value>, SourceError> {
    use std::io::Read;
    let path = dir.join(CONFIG_FILE);
    let err = |reason: String| SourceError::ConfigRead { path: path.display().to_string(), reason };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut text = Zeroizing::new(Vec::new());
    file.take(MAX_CONFIG + 1).read_to_end(&mut text).map_err(|e| err(e.to_string()))?;
    finch_shared::docker_config::parse(&text).map_err(|e| err(e.to_string()))
}

/// One read of the docker config: how to route, and the plaintext `auths` as they were.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    /// `credsStore` and `credHelpers`.
    pub routing: Routing,
    /// The `auths` object.
    pub auths: Arc<Map<String, Value>>,
}

impl DockerConfig {
    /// Reads `<dir>/config.json` once.
    pub fn load(dir: &Path) -> Result<Self, SourceError> {
        let mut map = read_config(dir)?;
        let creds_store = finch_shared::docker_config::creds_store(&map);
        let cred_helpers = finch_shared::docker_config::cred_helpers(&map);
        let auths = match map.remove("auths") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        Ok(DockerConfig { routing: Routing { creds_store, cred_helpers }, auths: Arc::new(auths) })
    }

    /// `config` with every `finchhost` (the bridge's helper) in its routing read as `store`,
    /// the host's own (`None`: the plaintext `auths`). Unchanged, not copied, when it names
    /// no `finchhost`.
    pub fn bridge_as(config: Arc<DockerConfig>, store: Option<&str>) -> Arc<DockerConfig> {
        let bridge = |h: &String| h == crate::settings::BRIDGE_HELPER;
        let routing = &config.routing;
        if !routing.creds_store.as_ref().is_some_and(bridge)
            && !routing.cred_helpers.values().any(bridge)
        {
            return config;
        }
        let to = || store.unwrap_or_default().to_owned();
        let mut routing = routing.clone();
        if routing.creds_store.as_ref().is_some_and(bridge) {
            routing.creds_store = store.map(str::to_owned);
        }
        for helper in routing.cred_helpers.values_mut().filter(|h| bridge(h)) {
            *helper = to(); // "" sends the registry to the plaintext auths
        }
        Arc::new(DockerConfig { routing, auths: config.auths.clone() })
    }
}

/// The docker config as last read, re-read only when the file changes (by modification time,
/// size and file identity), so a request does not parse the file again.
#[derive(Debug, Default)]
pub struct ConfigCache {
    last: Mutex<Option<(Option<crate::platform::FileStamp>, Arc<DockerConfig>)>>,
}

impl ConfigCache {
    /// The config of `dir`, read again only if its file changed. Blocking: call it off the
    /// async runtime.
    pub fn load(&self, dir: &Path) -> Result<Arc<DockerConfig>, SourceError> {
        let stamp = crate::platform::stamp(&dir.join(CONFIG_FILE));
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, config)) = last.as_ref()
            && *s == stamp
            && stamp.is_some()
        {
            return Ok(config.clone());
        }
        let config = Arc::new(DockerConfig::load(dir)?);
        *last = Some((stamp, config.clone()));
        Ok(config)
    }
}

/// The plaintext `auths` of a docker config file: lookups use the snapshot taken when the
/// request started; writes re-read the file and replace it atomically.
#[derive(Debug, Clone)]
pub struct PlainAuths {
    dir: PathBuf,
    snapshot: Arc<Map<String, Value>>,
}

impl PlainAuths {
    /// The `auths` of `<dir>/config.json`, as read into `snapshot`.
    pub fn new(dir: &Path, snapshot: Arc<Map<String, Value>>) -> Self {
        PlainAuths { dir: dir.to_owned(), snapshot }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// Rewrites the config with `edit` applied to `auths`, off the async runtime; the file
    /// may not grow past `limit` bytes.
    async fn update(
        &self,
        limit: u64,
        edit: impl FnOnce(&mut Map<String, Value>) -> bool + Send + 'static,
    ) -> Result<(), SourceError> {
        let this = self.clone();
        let path = self.path();
        tokio::task::spawn_blocking(move || this.update_now(limit, edit)).await.unwrap_or_else(
            |e| {
                Err(SourceError::ConfigWrite {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            },
        )
    }

    /// Rewrites the config with `edit` applied to `auths`, atomically, mode 0600: one writer
    /// at a time in this agent, under an advisory lock on [`LOCK_FILE`] against other
    /// processes that take it, re-reading the file under the lock so no write is lost. An
    /// `edit` that changed nothing (it says so) writes nothing.
    fn update_now(
        &self,
        limit: u64,
        edit: impl FnOnce(&mut Map<String, Value>) -> bool,
    ) -> Result<(), SourceError> {
        let path = self.path();
        let err =
            |reason: String| SourceError::ConfigWrite { path: path.display().to_string(), reason };
        let _one = WRITERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::fs::create_dir_all(&self.dir).map_err(|e| err(e.to_string()))?;
        let lock = open_lock(&self.dir.join(LOCK_FILE))
            .map_err(|e| err(format!("cannot open the lock file: {e}")))?;
        lock.lock().map_err(|e| err(format!("cannot lock: {e}")))?;
        let mut config = read_config(&self.dir)?;
        let auths = config.entry("auths").or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            *auths = Value::Object(Map::new());
        }
        let changed = match auths {
            Value::Object(m) => edit(m),
            _ => false,
        };
        if !changed {
            return Ok(());
        }
        let text = Zeroizing::new(
            serde_json::to_vec_pretty(&Value::Object(config)).map_err(|e| err(e.to_string()))?,
        );
        if text.len() as u64 > limit {
            return Err(err(format!(
                "the file would grow past {limit} bytes, the most a VM's store may make it; nothing was written"
            )));
        }
        finch_shared::private::write_atomic(&path, &text, 0o600).map_err(|e| err(e.to_string()))
    }
}

/// The lock file (empty; created private when missing).
fn open_lock(path: &Path) -> std::io::Result<std::fs::File> {
    match finch_shared::private::create_new(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::OpenOptions::new().write(true).open(path)
        }
        other => other,
    }
}

/// A new private file (mode 0600, or an owner-only DACL) next to the config, for an atomic
/// replace.
/// Decodes one `auths` entry as docker/cli does.
fn decode_entry(entry: &Value) -> Option<Credential> {
    finch_shared::docker_config::decode_entry(entry)
        .map(|(username, secret)| Credential { username, secret })
}

fn encode_entry(credential: &Credential) -> Value {
    finch_shared::docker_config::encode_entry(&credential.username, &credential.secret)
}

impl CredentialSource for PlainAuths {
    fn name(&self) -> String {
        "auths".into()
    }

    fn kind(&self) -> super::SourceKind {
        super::SourceKind::Auths
    }

    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>> {
        Box::pin(async move { Ok(self.snapshot.get(server).and_then(decode_entry)) })
    }

    fn store<'a>(&'a self, server: &'a str, credential: &'a Credential) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            tracing::warn!(
                file = %self.path().display(),
                registry = ?server,
                "no credential helper configured: storing the credential unencrypted in the docker config"
            );
            let (server, entry) = (server.to_owned(), encode_entry(credential));
            self.update(MAX_VM_STORE_CONFIG, move |auths| {
                auths.insert(server, entry);
                true
            })
            .await
        })
    }

    /// Erases from the file as it is now, never from the snapshot: an entry a concurrent
    /// store just wrote is gone when this answers.
    fn erase<'a>(&'a self, server: &'a str) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            let server = server.to_owned();
            self.update(MAX_CONFIG, move |auths| auths.remove(&server).is_some()).await
        })
    }

    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>> {
        Box::pin(async move {
            Ok(self
                .snapshot
                .iter()
                .filter_map(|(server, entry)| {
                    decode_entry(entry)
                        .map(|c| ListEntry { server: server.clone(), username: c.username })
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use finch_shared::Secret;
    use finch_shared::docker_config::TOKEN_USERNAME;

    use super::*;

    fn reg(s: &str) -> Registry {
        Registry::parse(s).unwrap()
    }

    #[test]
    fn finchhost_in_a_shared_config_is_the_hosts_own_store_never_the_helper() {
        let shared = Arc::new(DockerConfig {
            routing: Routing {
                creds_store: Some("finchhost".into()),
                cred_helpers: [
                    ("a.example".to_owned(), "finchhost".to_owned()),
                    ("b.example".to_owned(), "pass".to_owned()),
                ]
                .into(),
            },
            auths: Arc::default(),
        });
        let wincred = DockerConfig::bridge_as(shared.clone(), Some("wincred"));
        assert_eq!(wincred.routing.helper_for(&reg("x.example")), Some("wincred"));
        assert_eq!(wincred.routing.helper_for(&reg("a.example")), Some("wincred"));
        assert_eq!(wincred.routing.helper_for(&reg("b.example")), Some("pass"));
        let plain = DockerConfig::bridge_as(shared, None);
        assert_eq!(plain.routing.helper_for(&reg("x.example")), None);
        assert_eq!(plain.routing.helper_for(&reg("a.example")), None);
        assert_eq!(plain.routing.helper_for(&reg("b.example")), Some("pass"));
        // A config without finchhost is the same value, not a copy.
        let own = Arc::new(DockerConfig::default());
        assert!(Arc::ptr_eq(&own, &DockerConfig::bridge_as(own.clone(), Some("wincred"))));
    }

    #[test]
    fn routing_follows_docker_cli() {
        let r = Routing {
            creds_store: Some("secretservice".into()),
            cred_helpers: [("reg.example:5000".to_owned(), "pass".to_owned())].into(),
        };
        assert_eq!(r.helper_for(&reg("reg.example:5000")), Some("pass"));
        assert_eq!(r.helper_for(&reg("https://reg.example:5000/v2/")), Some("pass"));
        assert_eq!(r.helper_for(&reg("other.example")), Some("secretservice"));
        let r = Routing {
            creds_store: None,
            cred_helpers: [("plain.example".to_owned(), "pass".to_owned())].into(),
        };
        assert_eq!(r.helper_for(&reg("plain.example:443")), Some("pass"));
        assert_eq!(r.helper_for(&reg("https://plain.example:443/v2/")), Some("pass"));
        assert_eq!(r.helper_for(&reg("plain.example:5000")), None);
        assert_eq!(Routing::default().helper_for(&reg("x")), None);
        let empty = Routing { creds_store: Some(String::new()), ..Routing::default() };
        assert_eq!(empty.helper_for(&reg("x")), None);
        // An empty credHelpers entry means the plaintext auths, not credsStore (docker/cli).
        let r = Routing {
            creds_store: Some("secretservice".into()),
            cred_helpers: [("plain.example".to_owned(), String::new())].into(),
        };
        assert_eq!(r.cred_helper_for(&reg("plain.example")), Some(""));
        assert_eq!(r.helper_for(&reg("plain.example")), None);
        assert_eq!(r.helper_for(&reg("other.example")), Some("secretservice"));
    }

    #[tokio::test]
    async fn auths_round_trip_and_keep_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"proxies":{"x":1},"auths":{}}"#).unwrap();
        let fresh = || PlainAuths::new(dir.path(), DockerConfig::load(dir.path()).unwrap().auths);
        let cred = Credential { username: "u".into(), secret: Secret::from("p:w") };
        fresh().store("reg.example", &cred).await.unwrap();
        let tok = Credential { username: TOKEN_USERNAME.into(), secret: Secret::from("tok") };
        fresh().store("tok.example", &tok).await.unwrap();
        let src = fresh();
        assert_eq!(src.get("reg.example").await.unwrap(), Some(cred));
        assert_eq!(src.get("tok.example").await.unwrap(), Some(tok.clone()));
        assert_eq!(src.get("missing").await.unwrap(), None);
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["proxies"]["x"], 1);
        assert_eq!(v["auths"]["reg.example"]["auth"], STANDARD.encode("u:p:w"));
        // Wine reads an owner-only DACL back as shared (it maps DACLs to mode bits).
        #[cfg(unix)]
        assert_eq!(
            finch_shared::private::path_exposure(&dir.path().join(CONFIG_FILE)).unwrap(),
            None,
            "the config is private"
        );
        let mut names: Vec<_> = src.list().await.unwrap().into_iter().map(|e| e.server).collect();
        names.sort();
        assert_eq!(names, ["reg.example", "tok.example"]);
        src.erase("reg.example").await.unwrap();
        src.erase("never.example").await.unwrap();
        assert_eq!(fresh().get("reg.example").await.unwrap(), None);
        assert_eq!(fresh().get("tok.example").await.unwrap(), Some(tok));
    }

    #[test]
    fn bad_config_names_the_file_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "{\"auths\": {\"x\": \"s3cret").unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("line 1"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
