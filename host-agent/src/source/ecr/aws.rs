//! The AWS side: one client pair (ECR, ECR Public) per identity, built from the host's own
//! AWS configuration only, and the `GetAuthorizationToken` calls.
//!
//! Identity: the default chain (the agent's environment, `~/.aws` profiles with static keys,
//! SSO, `credential_process` and `source_profile`/`role_arn`, web identity, ECS), or exactly
//! the profile a `[[ecr.registry]]` rule names, optionally followed by an assumed role. The
//! EC2 instance metadata service is consulted only with `[ecr] instance_metadata = true` (one
//! attempt, 1 s bounds), so a laptop never stalls on it. HTTPS is rustls on ring. Every call
//! is bounded and retried with backoff (standard mode: throttling included) inside the bound.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::Region;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_ecr::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;

use super::cache::Token;
use super::host::EcrHost;
use super::{EcrClass, EcrError};

/// Session name of roles the agent assumes.
pub const ROLE_SESSION_NAME: &str = "finch-host-agent";
/// Attempts per call (standard retry mode, exponential backoff with jitter).
pub const MAX_ATTEMPTS: u32 = 4;
/// Connect bound of every AWS call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Who the agent is towards AWS for one registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Profile, or the default chain.
    pub profile: Option<String>,
    /// Role to assume on top.
    pub role_arn: Option<String>,
    /// Region of the token API.
    pub region: String,
    /// Whether the chain may ask the instance metadata service.
    pub instance_metadata: bool,
    /// Bound of one whole call, retries included.
    pub timeout: Duration,
}

/// The clients of one identity (kept so credential caches, SSO and assumed-role sessions live
/// as long as the agent).
#[derive(Debug, Clone)]
pub struct Clients {
    ecr: aws_sdk_ecr::Client,
    public: aws_sdk_ecrpublic::Client,
    credentials: SharedCredentialsProvider,
}

fn https_client() -> SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}

impl Clients {
    /// Builds the clients for `identity` (no network traffic until a call).
    pub async fn new(identity: &Identity) -> Clients {
        let http = https_client();
        let region = Region::new(identity.region.clone());
        let provider_config = ProviderConfig::without_region()
            .with_region(Some(region.clone()))
            .with_http_client(http.clone());
        let base: SharedCredentialsProvider = match &identity.profile {
            Some(profile) => SharedCredentialsProvider::new(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .configure(&provider_config)
                    .profile_name(profile)
                    .build(),
            ),
            None => {
                let mut chain = CredentialsProviderChain::first_try(
                    "Environment",
                    aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else(
                    "Profile",
                    aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .configure(&provider_config)
                        .build(),
                )
                .or_else(
                    "WebIdentityToken",
                    aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                        .configure(&provider_config)
                        .build(),
                )
                .or_else(
                    "EcsContainer",
                    aws_config::ecs::EcsCredentialsProvider::builder()
                        .configure(&provider_config)
                        .build(),
                );
                if identity.instance_metadata {
                    let imds = aws_config::imds::Client::builder()
                        .configure(&provider_config)
                        .max_attempts(1)
                        .connect_timeout(Duration::from_secs(1))
                        .read_timeout(Duration::from_secs(1))
                        .build();
                    chain = chain.or_else(
                        "Ec2InstanceMetadata",
                        aws_config::imds::credentials::ImdsCredentialsProvider::builder()
                            .configure(&provider_config)
                            .imds_client(imds)
                            .build(),
                    );
                }
                SharedCredentialsProvider::new(chain)
            }
        };
        let loader = |credentials: SharedCredentialsProvider| {
            let mut l = aws_config::defaults(BehaviorVersion::latest())
                .region(region.clone())
                .credentials_provider(credentials)
                .http_client(http.clone())
                .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(CONNECT_TIMEOUT)
                        .operation_timeout(identity.timeout)
                        .build(),
                );
            if let Some(p) = &identity.profile {
                l = l.profile_name(p);
            }
            l
        };
        let credentials = match &identity.role_arn {
            None => base,
            Some(role) => {
                let sts_config = loader(base.clone()).load().await;
                SharedCredentialsProvider::new(
                    aws_config::sts::AssumeRoleProvider::builder(role)
                        .session_name(ROLE_SESSION_NAME)
                        .region(region.clone())
                        .configure(&sts_config)
                        .build_from_provider(base)
                        .await,
                )
            }
        };
        let config = loader(credentials.clone()).load().await;
        Clients {
            ecr: aws_sdk_ecr::Client::new(&config),
            public: aws_sdk_ecrpublic::Client::new(&config),
            credentials,
        }
    }

    /// Resolves the credentials (for `doctor`); never returns them.
    pub async fn check_credentials(&self) -> Result<Option<SystemTime>, EcrError> {
        match self.credentials.provide_credentials().await {
            Ok(c) => Ok(c.expiry()),
            Err(e) => Err(classify_credentials(&e)),
        }
    }

    /// A fresh token for `registry`.
    pub async fn token(&self, registry: &EcrHost) -> Result<Token, EcrError> {
        let fetched = SystemTime::now();
        let (encoded, expires) = match registry {
            EcrHost::Private { .. } => {
                let out = self.ecr.get_authorization_token().send().await.map_err(classify)?;
                let data = out.authorization_data().first().ok_or_else(no_token)?;
                (data.authorization_token().map(str::to_owned), data.expires_at().copied())
            }
            EcrHost::Public { .. } => {
                let out = self.public.get_authorization_token().send().await.map_err(classify)?;
                let data = out.authorization_data().ok_or_else(no_token)?;
                (data.authorization_token().map(str::to_owned), data.expires_at().copied())
            }
        };
        let encoded = zeroize::Zeroizing::new(encoded.ok_or_else(no_token)?);
        let (username, password) = super::decode_token(&encoded)?;
        let expires = expires
            .and_then(|e| SystemTime::try_from(e).ok())
            .unwrap_or(fetched + Duration::from_secs(12 * 3600));
        Ok(Token { username, password, fetched, expires })
    }
}

fn no_token() -> EcrError {
    EcrError::new(EcrClass::BadToken, "GetAuthorizationToken answered without a token")
}

/// The gist of a credentials failure, with what to do about it.
fn classify_credentials(e: &CredentialsError) -> EcrError {
    let text = chain_text(e);
    let lower = text.to_ascii_lowercase();
    match e {
        CredentialsError::CredentialsNotLoaded(_) => EcrError::new(
            EcrClass::NoCredentials,
            "no AWS credentials on the host: configure them (aws configure, or aws sso login) for the host agent's user",
        ),
        _ if lower.contains("sso") && (lower.contains("expired") || lower.contains("token")) => {
            EcrError::new(
                EcrClass::SsoExpired,
                format!(
                    "the AWS SSO session is missing or expired: run `aws sso login` for the profile ({})",
                    short(&text)
                ),
            )
        }
        CredentialsError::ProviderTimedOut(_) => {
            EcrError::new(EcrClass::Timeout, "loading AWS credentials timed out")
        }
        CredentialsError::InvalidConfiguration(_) => EcrError::new(
            EcrClass::Config,
            format!("the host's AWS configuration is invalid: {}", short(&text)),
        ),
        _ => EcrError::new(
            EcrClass::NoCredentials,
            format!("cannot load AWS credentials: {}", short(&text)),
        ),
    }
}

/// Every message in an error's source chain, joined.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn short(text: &str) -> String {
    crate::source::keychain::shorten(text)
}

/// The `<Code>` of an XML error body (some services and mocks answer JSON operations so).
fn xml_code(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let end = text[start..].find("</Code>")? + start;
    Some(text[start..end].trim().to_owned()).filter(|c| !c.is_empty() && c.len() < 100)
}

/// The class and gist of a failed call.
fn classify<E>(e: SdkError<E, HttpResponse>) -> EcrError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // A credentials failure surfaces somewhere in the chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<CredentialsError>() {
            return classify_credentials(c);
        }
        source = s.source();
    }
    match &e {
        SdkError::TimeoutError(_) => EcrError::new(EcrClass::Timeout, "AWS did not answer in time"),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            EcrError::new(EcrClass::Timeout, "AWS did not answer in time")
        }
        SdkError::DispatchFailure(_) => EcrError::new(
            EcrClass::Network,
            format!("cannot reach AWS: {}", short(&chain_text(&e))),
        ),
        SdkError::ServiceError(s) => {
            let err = s.err();
            let body_code = s.raw().body().bytes().and_then(xml_code);
            let code = err.code().map(str::to_owned).or(body_code).unwrap_or_default();
            let message = err.message().unwrap_or_default();
            let detail =
                if message.is_empty() { code.clone() } else { format!("{code}: {message}") };
            let class = match code.as_str() {
                "AccessDeniedException" | "AccessDenied" => EcrClass::AccessDenied,
                "ThrottlingException"
                | "Throttling"
                | "TooManyRequestsException"
                | "RequestLimitExceeded" => EcrClass::Throttled,
                "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredTokenException"
                | "InvalidSignatureException"
                | "IncompleteSignature" => EcrClass::CredentialsRejected,
                _ => EcrClass::Aws,
            };
            EcrError::new(class, short(&detail))
        }
        _ => EcrError::new(EcrClass::Aws, short(&chain_text(&e))),
    }
}

/// Most client sets kept (each about 200 KB). Regions come from the guest's server name, but
/// only real ones parse, and identities come from the host's config; past this bound the one
/// used longest ago is dropped (its credential cache with it).
pub const MAX_CLIENT_SETS: usize = 32;

/// Builds (once) and hands out the clients of each identity; at most `max` are kept.
#[derive(Debug)]
pub struct ClientPool {
    clients: tokio::sync::Mutex<std::collections::HashMap<Identity, (Arc<Clients>, u64)>>,
    max: usize,
    clock: std::sync::atomic::AtomicU64,
}

impl ClientPool {
    /// A pool of at most `max` client sets.
    pub fn new(max: usize) -> Self {
        ClientPool { clients: Default::default(), max: max.max(1), clock: Default::default() }
    }

    /// The clients of `identity`.
    pub async fn get(&self, identity: &Identity) -> Arc<Clients> {
        let now = self.clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.clients.lock().await;
        if let Some((c, used)) = map.get_mut(identity) {
            *used = now;
            return c.clone();
        }
        let clients = Arc::new(Clients::new(identity).await);
        if map.len() >= self.max
            && let Some(oldest) =
                map.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(identity.clone(), (clients.clone(), now));
        clients
    }

    /// How many client sets are kept.
    #[cfg(test)]
    pub async fn len(&self) -> usize {
        self.clients.lock().await.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_bound() {
        let pool = ClientPool::new(3);
        for region in ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "us-east-1"] {
            let identity = Identity {
                profile: None,
                role_arn: None,
                region: region.into(),
                instance_metadata: false,
                timeout: Duration::from_secs(1),
            };
            pool.get(&identity).await;
            assert!(pool.len().await <= 3);
        }
        assert_eq!(pool.len().await, 3);
    }

    #[test]
    fn xml_error_codes() {
        let body = b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code><Message>bad</Message></Error></ErrorResponse>";
        assert_eq!(xml_code(body).as_deref(), Some("InvalidClientTokenId"));
        assert_eq!(xml_code(b"{\"__type\":\"x\"}"), None);
        assert_eq!(xml_code(b"<Code></Code>"), None);
    }
}
