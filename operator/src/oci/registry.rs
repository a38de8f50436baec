//! Registry access: credentials, plain-HTTP registries, and error messages that say who answered what.

use std::collections::BTreeMap;
use std::str::FromStr as _;

use base64::Engine as _;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use super::Error;

/// Credentials per registry host. Hosts without an entry are accessed anonymously.
#[derive(Clone, Default)]
pub struct Credentials {
    by_host: BTreeMap<String, RegistryAuth>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets: only which hosts have credentials.
        f.debug_struct("Credentials")
            .field("hosts", &self.by_host.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Docker's aliases for Docker Hub, all mapped to the host oci-client talks to.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(host);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "index.docker.io".to_owned(),
        other => other.to_owned(),
    }
}

impl Credentials {
    /// No credentials: anonymous everywhere.
    pub fn anonymous() -> Self {
        Credentials::default()
    }

    /// Adds basic-auth credentials for `host` (e.g. `127.0.0.1:5000`).
    #[must_use]
    pub fn with_basic(mut self, host: &str, username: &str, password: &str) -> Self {
        self.by_host.insert(
            normalize_host(host),
            RegistryAuth::Basic(username.to_owned(), password.to_owned()),
        );
        self
    }

    /// Adds a bearer token for `host` (sent as is).
    #[must_use]
    pub fn with_bearer(mut self, host: &str, token: &str) -> Self {
        self.by_host
            .insert(normalize_host(host), RegistryAuth::Bearer(token.to_owned()));
        self
    }

    /// Reads a Docker `config.json`, or the `.dockerconfigjson` bytes of a Kubernetes Secret:
    /// `{"auths": {"host": {"auth": base64("user:password")}}}` or `{"username", "password"}`, or
    /// `"registrytoken"` (bearer). Entries with none of these are ignored.
    pub fn from_docker_config_json(bytes: &[u8]) -> Result<Self, Error> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Credentials(format!("not a Docker config JSON document: {e}")))?;
        let auths = value
            .get("auths")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| Error::Credentials("no \"auths\" object in the Docker config JSON".into()))?;
        let mut credentials = Credentials::default();
        for (host, entry) in auths {
            if let Some(token) = entry.get("registrytoken").and_then(serde_json::Value::as_str) {
                credentials = credentials.with_bearer(host, token);
            } else if let Some(auth) = entry.get("auth").and_then(serde_json::Value::as_str) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| Error::Credentials(format!("auths.{host}.auth is not base64: {e}")))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| Error::Credentials(format!("auths.{host}.auth is not UTF-8")))?;
                let (user, password) = decoded.split_once(':').ok_or_else(|| {
                    Error::Credentials(format!("auths.{host}.auth is not base64(\"user:password\")"))
                })?;
                credentials = credentials.with_basic(host, user, password);
            } else if let (Some(user), Some(password)) = (
                entry.get("username").and_then(serde_json::Value::as_str),
                entry.get("password").and_then(serde_json::Value::as_str),
            ) {
                credentials = credentials.with_basic(host, user, password);
            }
        }
        Ok(credentials)
    }

    /// These credentials plus `other`'s; for a host both have, `other`'s win.
    #[must_use]
    pub fn merged(mut self, other: Credentials) -> Self {
        self.by_host.extend(other.by_host);
        self
    }

    /// The credentials used for `host` (anonymous when none).
    pub fn for_host(&self, host: &str) -> RegistryAuth {
        self.by_host
            .get(&normalize_host(host))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }
}

/// How a [`RegistryClient`] reaches registries.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Credentials per registry host.
    pub credentials: Credentials,
    /// Registry hosts (`host:port`) reached over plain HTTP; all others use HTTPS.
    pub insecure_registries: Vec<String>,
    /// How long a registry may stay silent (default [`DEFAULT_TIMEOUT`]): no answer to a request (its
    /// status line and headers) within it, no byte of an answer's body for it, or none of an upload
    /// taken for it, and the request fails, saying so (a registry error that may pass).
    pub timeout: Option<std::time::Duration>,
}

impl ClientOptions {
    /// Anonymous access, plain HTTP for these hosts.
    pub fn insecure<I: IntoIterator<Item = S>, S: Into<String>>(hosts: I) -> Self {
        ClientOptions {
            credentials: Credentials::default(),
            insecure_registries: hosts.into_iter().map(Into::into).collect(),
            timeout: None,
        }
    }
}

/// A registry client (oci-client underneath) with credentials and plain-HTTP hosts.
#[derive(Clone)]
pub struct RegistryClient {
    pub(crate) inner: oci_client::Client,
    pub(crate) credentials: Credentials,
    /// For the requests oci-client cannot make (a layer upload in one streamed request, see `upload.rs`);
    /// built on first use (loading the TLS roots costs milliseconds that a pull does not need).
    pub(crate) http: std::sync::OnceLock<reqwest::Client>,
    /// Registry hosts reached over plain HTTP.
    pub(crate) insecure_registries: Vec<String>,
    /// How long a registry may stay silent ([`ClientOptions::timeout`]).
    pub(crate) timeout: std::time::Duration,
    /// Image configs read, by repository and digest (shared by the clones of this client).
    pub(crate) configs: std::sync::Arc<ConfigCache>,
}

/// Image configs already read and checked, by registry, repository and digest: a config is
/// content-addressed, so an Image resolved again (every `--resolve-interval`) or many Images of one
/// repository sharing a config read it once. Keyed by repository too, never by digest alone: a
/// manifest naming another repository's config digest must not be answered from it.
#[derive(Debug, Default)]
pub struct ConfigCache(std::sync::Mutex<std::collections::HashMap<String, bytes::Bytes>>);

/// Configs kept (past this the cache starts again), and the largest one kept: at most 16 MiB.
const CONFIGS_KEPT: usize = 1024;
const CONFIG_KEPT_BYTES: usize = 16 * 1024;

impl ConfigCache {
    /// The key of a config (pure).
    fn key(registry: &str, repository: &str, digest: &str) -> String {
        format!("{registry}/{repository}@{digest}")
    }

    /// The config of `repository` at `registry` with `digest`, if read before.
    pub fn get(&self, registry: &str, repository: &str, digest: &str) -> Option<bytes::Bytes> {
        let configs = self.0.lock().ok()?;
        configs.get(&Self::key(registry, repository, digest)).cloned()
    }

    /// Keeps a config read and checked against its digest (a large one is not kept).
    pub fn keep(&self, registry: &str, repository: &str, digest: &str, config: &[u8]) {
        if config.len() > CONFIG_KEPT_BYTES {
            return;
        }
        let Ok(mut configs) = self.0.lock() else { return };
        if configs.len() >= CONFIGS_KEPT {
            configs.clear();
        }
        configs.insert(
            Self::key(registry, repository, digest),
            bytes::Bytes::copy_from_slice(config),
        );
    }
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// Parses an image reference, with an error that says what is expected.
pub(crate) fn parse_reference(reference: &str) -> Result<Reference, Error> {
    Reference::from_str(reference.trim()).map_err(|e| Error::BadReference {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })
}

/// Turns an oci-client error into one that names the registry, the repository and what it answered.
pub(crate) fn registry_error(
    reference: &Reference,
    action: impl Into<String>,
    error: &OciDistributionError,
) -> Error {
    let answer = match error {
        OciDistributionError::ServerError { code, message, url } => {
            format!("HTTP {code} from {url}: {}", message.trim())
        }
        OciDistributionError::RegistryError { envelope, url } => format!("{url}: {envelope}"),
        OciDistributionError::AuthenticationFailure(message) => {
            format!(
                "authentication failed ({message}): check the credentials for {}",
                reference.resolve_registry()
            )
        }
        OciDistributionError::UnauthorizedError { url } => {
            format!(
                "unauthorized at {url}: check the credentials for {}",
                reference.resolve_registry()
            )
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    };
    let not_found = match error {
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound
            )
        }),
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        _ => false,
    };
    let answer = if says_disk_full(&answer) {
        format!("the registry's storage is full (free space there, then try again): {answer}")
    } else {
        answer
    };
    Error::Registry {
        registry: reference.resolve_registry().to_owned(),
        repository: reference.repository().to_owned(),
        action: action.into(),
        answer,
        not_found,
        transient: is_transient(error),
    }
}

/// Whether a registry's answer says its disk is full (pure): Distribution passes the storage driver's
/// error on, e.g. `write /var/lib/registry/…/_uploads/…/data: no space left on device`.
pub(crate) fn says_disk_full(answer: &str) -> bool {
    answer.to_ascii_lowercase().contains("no space left on device")
}

/// Whether a registry error may go away by itself (pure): no connection, a cut transfer, a 5xx
/// or 429 answer, or an upload session the registry no longer knows (it restarted).
pub(crate) fn is_transient(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::Toomanyrequests | OciErrorCode::BlobUploadUnknown
            )
        }),
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Whether a registry error is the registry's silence past the bound (pure): a request that timed
/// out, or an upload it stopped taking (see `upload.rs`).
pub(crate) fn timed_out(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::RequestError(e) => e.is_timeout(),
        OciDistributionError::IoError(e) => e.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    }
}

/// How long a registry may stay silent unless told otherwise ([`ClientOptions::timeout`]).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(5);
/// How long connecting to a registry may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// TLS of the registry clients is rustls with ring, the workspace's one crypto provider: reqwest is
/// built without a provider of its own (`rustls-no-provider`) and takes the process default, so ring is
/// installed as that default here, unless one already is (kube, built with ring alone, picks it by itself).
fn use_ring_for_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    /// A client; nothing is contacted until the first call.
    pub fn new(options: ClientOptions) -> Result<Self, Error> {
        use_ring_for_tls();
        let protocol = if options.insecure_registries.is_empty() {
            oci_client::client::ClientProtocol::Https
        } else {
            oci_client::client::ClientProtocol::HttpsExcept(options.insecure_registries.clone())
        };
        let timeout = options.timeout.unwrap_or(DEFAULT_TIMEOUT);
        // reqwest's read timeout runs from the request's start to the answer's headers, then anew for
        // every read of its body: it bounds oci-client's requests, whose bodies are small or chunked.
        let config = oci_client::client::ClientConfig {
            protocol,
            read_timeout: Some(timeout),
            connect_timeout: Some(CONNECT_TIMEOUT),
            ..Default::default()
        };
        Ok(RegistryClient {
            inner: oci_client::Client::new(config),
            credentials: options.credentials,
            http: std::sync::OnceLock::new(),
            insecure_registries: options.insecure_registries,
            timeout,
            configs: std::sync::Arc::default(),
        })
    }

    /// [`registry_error`], saying the bound when the registry stayed silent past it.
    pub(crate) fn error(
        &self,
        reference: &Reference,
        action: impl Into<String>,
        error: &OciDistributionError,
    ) -> Error {
        let mut converted = registry_error(reference, action, error);
        if timed_out(error)
            && let Error::Registry { answer, .. } = &mut converted
        {
            *answer = format!(
                "silent for {} s (--registry-timeout): {answer}",
                self.timeout.as_secs_f64()
            );
        }
        converted
    }

    /// The HTTP client for our own requests (connect timeout as oci-client's; the silence bound is
    /// set per request, see `upload.rs`).
    pub(crate) fn http(&self) -> Result<&reqwest::Client, reqwest::Error> {
        if let Some(client) = self.http.get() {
            return Ok(client);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("walt-operator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(self.http.get_or_init(|| client))
    }

    /// The credentials used for the registry of `reference`.
    pub(crate) fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        self.credentials.for_host(reference.resolve_registry())
    }

    /// Runs `request` (an oci-client call on `reference`), and when the registry answers 401, authenticates
    /// explicitly and runs it once more. oci-client fetches a bearer token by itself before a request, but
    /// when that fetch fails (the token service unreachable, restarting, or overloaded) it says nothing and
    /// sends the request without a token: the registry's 401 then reads as "check the credentials", a
    /// permanent failure, while the cause was a token service away for a moment. [`Self::login`] reports
    /// the token service's own answer (a connection refused is transient and retried; a refused password
    /// is not), and a token it gets is cached for the retry. `action` says what was being done.
    pub(crate) async fn authorized<T, F, Fut>(
        &self,
        reference: &Reference,
        operation: RegistryOperation,
        action: &str,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        match request().await {
            Err(OciDistributionError::UnauthorizedError { .. }) => {
                self.login(reference, operation).await?;
                request().await.map_err(|e| self.error(reference, action, &e))
            }
            answered => answered.map_err(|e| self.error(reference, action, &e)),
        }
    }

    /// Authenticates for an operation on a repository (fetches a bearer token when the registry wants one).
    pub(crate) async fn login(
        &self,
        reference: &Reference,
        operation: RegistryOperation,
    ) -> Result<(), Error> {
        let auth = self.auth_for(reference);
        self.inner
            .auth(reference, &auth, operation)
            .await
            .map(|_| ())
            .map_err(|e| self.error(reference, format!("authenticating for {operation:?}"), &e))
    }
}
