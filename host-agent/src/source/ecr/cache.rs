//! ECR tokens in memory only (never on disk, unlike the reference helper's plaintext
//! `~/.ecr/cache.json`), keyed by the resolved identity and the registry, so assumed roles and
//! profiles never share a token.
//!
//! A token's life runs from when it was fetched to its `expiresAt`:
//! * in its first half it is served as is;
//! * in its second half it is still served, and one background refresh is started;
//! * in its last `min(60 s, life/10)` it is never served: the request waits for a new one, and
//!   if that fails, it fails (no stale token, ever).
//!
//! Any number of concurrent requests for one key make one upstream call (single flight). The
//! cache holds at most `max` entries, and each VM (the owner, who asked first) at most
//! [`MAX_PER_OWNER`]: a VM over its share makes room among its own tokens; when the cache is
//! full, expired tokens go first, then the soonest to expire of the VM holding the most, so
//! one VM naming many registries cannot push another VM's tokens out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use finch_shared::Secret;

/// What a token is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    /// AWS profile (`None`: the default chain).
    pub profile: Option<String>,
    /// Role assumed, if any.
    pub role_arn: Option<String>,
    /// Region the token API is called in.
    pub region: String,
    /// Registry host.
    pub registry: String,
}

/// A registry token.
#[derive(Debug, Clone)]
pub struct Token {
    /// Username (`AWS`).
    pub username: String,
    /// The password.
    pub password: Secret,
    /// When it was fetched.
    pub fetched: SystemTime,
    /// When AWS says it expires.
    pub expires: SystemTime,
}

/// How usable a cached token is at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh in the background.
    Refresh,
    /// Do not serve it.
    Expired,
}

impl Token {
    /// Its freshness at `now`.
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        let life = self.expires.duration_since(self.fetched).unwrap_or(Duration::ZERO);
        let margin = (life / 10).min(Duration::from_secs(60));
        let Some(last_servable) = self.expires.checked_sub(margin) else {
            return Freshness::Expired;
        };
        if life.is_zero() || now >= last_servable {
            Freshness::Expired
        } else if now >= self.fetched + life / 2 {
            Freshness::Refresh
        } else {
            Freshness::Fresh
        }
    }
}

/// Why a fetch failed (cloned to every request that waited on it).
pub type FetchError = super::EcrError;

/// Most tokens one VM may own in the cache.
pub const MAX_PER_OWNER: usize = 64;

#[derive(Debug, Default)]
struct Inner {
    /// Servable tokens; at most `max`.
    tokens: HashMap<CacheKey, Token>,
    /// Who asked for each token first (a key of `tokens`, always).
    owners: HashMap<CacheKey, String>,
    /// The single-flight lock of each key being fetched now; an entry lives only while a
    /// fetch or refresh holds it (so this map is bounded by the requests in flight).
    flights: HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>,
}

/// The cache.
#[derive(Debug)]
pub struct TokenCache {
    inner: Arc<Mutex<Inner>>,
    max: usize,
}

/// A key's flight: held while its token is fetched; its entry goes when the last holder
/// drops it.
#[derive(Debug)]
pub struct Flight {
    inner: Arc<Mutex<Inner>>,
    key: CacheKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.guard = None;
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's handle and ours: nobody else waits on this flight.
        if Arc::strong_count(&self.lock) <= 2
            && inner.flights.get(&self.key).is_some_and(|l| Arc::ptr_eq(l, &self.lock))
        {
            inner.flights.remove(&self.key);
        }
    }
}

impl TokenCache {
    /// A cache of at most `max` tokens.
    pub fn new(max: usize) -> Self {
        TokenCache { inner: Arc::default(), max: max.max(1) }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The servable token for `key` and its freshness (inserts nothing).
    fn peek(&self, key: &CacheKey, now: SystemTime) -> Option<(Token, Freshness)> {
        let inner = self.inner();
        inner.tokens.get(key).and_then(|t| match t.freshness(now) {
            Freshness::Expired => None,
            f => Some((t.clone(), f)),
        })
    }

    /// `key`'s flight, unlocked.
    fn flight(&self, key: &CacheKey) -> Flight {
        let lock = self.inner().flights.entry(key.clone()).or_default().clone();
        Flight { inner: self.inner.clone(), key: key.clone(), lock, guard: None }
    }

    fn put(&self, key: &CacheKey, owner: &str, token: &Token) {
        let now = SystemTime::now();
        let mut inner = self.inner();
        if !inner.tokens.contains_key(key) {
            let mine = inner.owners.values().filter(|o| *o == owner).count();
            if mine >= MAX_PER_OWNER {
                evict(&mut inner, now, Some(owner));
            } else if inner.tokens.len() >= self.max {
                evict(&mut inner, now, None);
            }
            inner.owners.insert(key.clone(), owner.to_owned());
        }
        inner.tokens.insert(key.clone(), token.clone());
    }

    /// The token for `key` and its freshness: cached if servable, else fetched by `fetch`
    /// (one call for any number of concurrent callers). A caller served a token in its
    /// [`Freshness::Refresh`] half starts the background refresh (see [`Self::try_flight`]).
    pub async fn get<F, Fut>(
        &self,
        key: &CacheKey,
        owner: &str,
        fetch: F,
    ) -> Result<(Token, Freshness), FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, FetchError>>,
    {
        if let Some(hit) = self.peek(key, SystemTime::now()) {
            return Ok(hit);
        }
        let mut flight = self.flight(key);
        flight.guard = Some(flight.lock.clone().lock_owned().await);
        // Whoever held the flight may have filled the slot.
        if let Some(hit) = self.peek(key, SystemTime::now()) {
            return Ok(hit);
        }
        let token = fetch().await?;
        self.store(key, owner, &token);
        Ok((token, Freshness::Fresh))
    }

    /// Caches `token` for `owner` if it can be served (a token AWS dates in the past is used
    /// once by whoever fetched it, never cached).
    pub fn store(&self, key: &CacheKey, owner: &str, token: &Token) {
        if token.freshness(SystemTime::now()) != Freshness::Expired {
            self.put(key, owner, token);
        }
    }

    /// `key`'s flight, held, if no refresh or fetch holds it now.
    pub fn try_flight(&self, key: &CacheKey) -> Option<Flight> {
        let mut flight = self.flight(key);
        flight.guard = Some(flight.lock.clone().try_lock_owned().ok()?);
        Some(flight)
    }

    /// The keys whose tokens can be served now.
    pub fn servable(&self) -> Vec<CacheKey> {
        let now = SystemTime::now();
        let mut keys: Vec<CacheKey> = self
            .inner()
            .tokens
            .iter()
            .filter(|(_, t)| t.freshness(now) != Freshness::Expired)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    /// Entries held: tokens and flights (for tests and `status`).
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.tokens.len(), inner.flights.len())
    }
}

/// Makes room for one token: among `owner`'s tokens if given, else an expired one if any,
/// else the soonest to expire of the owner holding the most.
fn evict(inner: &mut Inner, now: SystemTime, owner: Option<&str>) {
    let largest = match owner {
        Some(o) => Some(o.to_owned()),
        None => {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for o in inner.owners.values() {
                *counts.entry(o.as_str()).or_default() += 1;
            }
            counts.into_iter().max_by_key(|(o, n)| (*n, *o)).map(|(o, _)| o.to_owned())
        }
    };
    let Inner { tokens, owners, .. } = inner;
    let owned_by = |k: &CacheKey, who: &str| owners.get(k).is_some_and(|o| o == who);
    let victim = tokens
        .iter()
        .filter(|(k, _)| owner.is_none_or(|o| owned_by(k, o)))
        .min_by_key(|(k, t)| {
            let expired = t.freshness(now) == Freshness::Expired;
            let theirs = largest.as_deref().is_some_and(|l| owned_by(k, l));
            (!expired, !theirs, t.expires)
        })
        .map(|(k, _)| k.clone());
    if let Some(k) = victim {
        tokens.remove(&k);
        owners.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::source::ecr::EcrError;

    fn key(registry: &str) -> CacheKey {
        CacheKey {
            profile: None,
            role_arn: None,
            region: "us-west-2".into(),
            registry: registry.into(),
        }
    }

    fn token(life: Duration, pw: &str) -> Token {
        let now = SystemTime::now();
        Token {
            username: "AWS".into(),
            password: Secret::new(pw.into()),
            fetched: now,
            expires: now + life,
        }
    }

    #[test]
    fn freshness_table() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = Token {
            username: "AWS".into(),
            password: Secret::new("p".into()),
            fetched: t0,
            expires: t0 + Duration::from_secs(12 * 3600),
        };
        let at = |s: u64| t.freshness(t0 + Duration::from_secs(s));
        assert_eq!(at(0), Freshness::Fresh);
        assert_eq!(at(6 * 3600 - 1), Freshness::Fresh);
        assert_eq!(at(6 * 3600), Freshness::Refresh);
        assert_eq!(at(12 * 3600 - 61), Freshness::Refresh);
        assert_eq!(at(12 * 3600 - 60), Freshness::Expired);
        assert_eq!(at(13 * 3600), Freshness::Expired);
        // Short lives keep a tenth as the margin.
        let short = Token { expires: t0 + Duration::from_secs(10), ..t.clone() };
        assert_eq!(short.freshness(t0 + Duration::from_secs(8)), Freshness::Refresh);
        assert_eq!(short.freshness(t0 + Duration::from_secs(9)), Freshness::Expired);
        // Dated in the past (moto): never servable.
        let past = Token { expires: t0 - Duration::from_secs(1), ..t };
        assert_eq!(past.freshness(t0), Freshness::Expired);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_upstream_call_for_concurrent_cold_lookups() {
        let cache = Arc::new(TokenCache::new(16));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key("r"), "vm", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(token(Duration::from_secs(3600), "pw"))
                    })
                    .await
                    .map(|(t, _)| t.password.expose().to_owned())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "pw");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.servable(), vec![key("r")]);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_past_tokens_are_served_once() {
        let cache = TokenCache::new(16);
        let err = cache
            .get(&key("r"), "vm", || async {
                Err(EcrError::new(super::super::EcrClass::Throttled, "slow down"))
            })
            .await;
        assert!(err.is_err());
        let past = Token {
            expires: SystemTime::now() - Duration::from_secs(10),
            ..token(Duration::ZERO, "old")
        };
        let (t, _) = cache.get(&key("r"), "vm", || async { Ok(past) }).await.unwrap();
        assert_eq!(t.password.expose(), "old");
        assert!(cache.servable().is_empty(), "a token dated in the past was cached");
    }

    /// The class of the leak: every path that could add an entry (a miss that fails, a miss
    /// that succeeds, a refresh) leaves the cache within its bound and no flight behind.
    #[tokio::test]
    async fn every_insertion_path_is_bounded_and_flights_go() {
        let cache = TokenCache::new(8);
        for i in 0..100 {
            let _ = cache
                .get(&key(&format!("fail{i}")), "vm", || async {
                    Err(EcrError::new(super::super::EcrClass::Aws, "no"))
                })
                .await;
            cache
                .get(&key(&format!("ok{i}")), "vm", || async {
                    Ok(token(Duration::from_secs(3600), "p"))
                })
                .await
                .unwrap();
            drop(cache.try_flight(&key(&format!("refresh{i}"))));
        }
        assert_eq!(cache.len(), (8, 0));
        // A flight held by a refresh blocks only that key, and goes with it.
        let held = cache.try_flight(&key("r")).unwrap();
        assert!(cache.try_flight(&key("r")).is_none());
        assert_eq!(cache.len().1, 1);
        drop(held);
        assert_eq!(cache.len().1, 0);
    }

    /// One VM naming many registries keeps to its share and never pushes out another VM's
    /// tokens; a full cache makes room among the VM holding the most.
    #[test]
    fn each_vm_keeps_to_its_share() {
        let cache = TokenCache::new(MAX_PER_OWNER + 8);
        let long = token(Duration::from_secs(7200), "x");
        for i in 0..4 {
            cache.store(&key(&format!("quiet{i}")), "quiet", &long);
        }
        for i in 0..1000 {
            cache.store(&key(&format!("flood{i}")), "flood", &long);
        }
        let held = cache.servable();
        let quiet = held.iter().filter(|k| k.registry.starts_with("quiet")).count();
        let flood = held.iter().filter(|k| k.registry.starts_with("flood")).count();
        assert_eq!((quiet, flood), (4, MAX_PER_OWNER));
        // Full: a third VM's token takes the flooder's place, not the quiet VM's.
        for i in 0..8 {
            cache.store(&key(&format!("third{i}")), "third", &long);
        }
        let held = cache.servable();
        assert_eq!(held.iter().filter(|k| k.registry.starts_with("quiet")).count(), 4);
        assert_eq!(held.iter().filter(|k| k.registry.starts_with("third")).count(), 8);
        assert_eq!(held.len(), MAX_PER_OWNER + 8);
        assert_eq!(cache.inner().owners.len(), held.len());
    }

    #[test]
    fn bounded_expired_first_then_soonest() {
        let cache = TokenCache::new(2);
        cache.store(&key("long"), "vm", &token(Duration::from_secs(7200), "a"));
        cache.store(&key("short"), "vm", &token(Duration::from_secs(600), "b"));
        cache.store(&key("new"), "vm", &token(Duration::from_secs(3600), "c"));
        assert_eq!(cache.servable(), vec![key("long"), key("new")]);
    }
}
