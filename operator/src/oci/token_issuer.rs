//! The lab registry's token issuer (Distribution's token authentication: the registry sends clients
//! here with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`; they come back with a short-lived
//! JWT that names the repositories and actions they may use).
//!
//! Who gets what:
//! - the lab credential (the operator's own, `--registry-credentials-secret`): every action asked for;
//! - a namespace credential (user `tenant/<namespace>`, password derived from the issuer's secret, see
//!   [`TokenIssuer::tenant_password`]): `pull` and `push` on `<prefix>/<namespace>/…`, `pull` on the
//!   catalog `<prefix>/<catalog namespace>/…`, nothing else (no delete, no listing of the registry);
//! - anyone else: 401.
//!
//! Tokens are ES256 JWTs signed with the issuer key; the registry trusts them through the
//! certificate of that key in its `auth.token.rootcertbundle` (the JWT header's `kid` is the
//! key's libtrust id, which is how Distribution 2.x finds the key). Pure apart from the clock and
//! the random nonce, which are passed in.

use std::fmt::Write as _;

use base64::Engine as _;
use ring::rand::SecureRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

/// User name prefix of namespace credentials: `tenant/<namespace>`.
pub const TENANT_USER_PREFIX: &str = "tenant/";

/// Why the issuer cannot start or cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The signing key is not an ECDSA P-256 private key.
    #[error("the registry token key: {0}")]
    Key(String),
    /// The request carried no credentials, or wrong ones.
    #[error("{0}")]
    Unauthorized(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
}

/// Actions a token may grant on a repository.
const PULL: &str = "pull";
const PUSH: &str = "push";

/// One `type:name:actions` scope, as asked and as granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `repository` (or `registry` for `registry:catalog:*`).
    pub kind: String,
    /// The repository path (or `catalog`).
    pub name: String,
    /// `pull`, `push`, `delete`, `*`.
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses `type:name:action,action` (the name may hold a port-free `:`-less path; the type is
    /// everything before the first colon, the actions after the last).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let (kind, rest) = text
            .split_once(':')
            .ok_or_else(|| TokenError::BadRequest(format!("scope `{text}` is not type:name:actions")))?;
        let (name, actions) = rest
            .rsplit_once(':')
            .ok_or_else(|| TokenError::BadRequest(format!("scope `{text}` is not type:name:actions")))?;
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// Who presented which credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// The lab credential: anything.
    Lab(String),
    /// A namespace's credential.
    Tenant(String),
}

/// What the issuer is configured with.
pub struct IssuerConfig {
    /// PEM of the ECDSA P-256 signing key (SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
    /// The secret namespace passwords are derived from.
    pub tenant_secret: Vec<u8>,
    /// `iss` of the tokens (the registry's `auth.token.issuer`).
    pub issuer: String,
    /// `aud` of the tokens (the registry's `auth.token.service`).
    pub service: String,
    /// The lab credential (user, password), if any.
    pub lab_credential: Option<(String, String)>,
    /// Repository prefix of lab images (`walt`, may be empty).
    pub prefix: String,
    /// The catalog namespace (read-only to tenants).
    pub catalog_namespace: String,
    /// How long a token lives.
    pub lifetime: std::time::Duration,
}

/// Issues registry tokens.
pub struct TokenIssuer {
    key: EcdsaKeyPair,
    kid: String,
    rng: ring::rand::SystemRandom,
    config: IssuerConfig,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("kid", &self.kid)
            .field("issuer", &self.config.issuer)
            .field("service", &self.config.service)
            .finish_non_exhaustive()
    }
}

/// DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// RFC 4648 base32 (no padding: callers give multiples of 5 bytes).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer: u64 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u64::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(
                ALPHABET[usize::try_from((buffer >> bits) & 31).unwrap_or(0)],
            ));
        }
    }
    if bits > 0 {
        out.push(char::from(
            ALPHABET[usize::try_from((buffer << (5 - bits)) & 31).unwrap_or(0)],
        ));
    }
    out
}

/// The libtrust key id of a P-256 public key (what Distribution 2.x matches a JWT's `kid`
/// against): base32 of the first 30 bytes of the SHA-256 of its SubjectPublicKeyInfo DER, in
/// twelve groups of four joined by `:`.
pub fn libtrust_key_id(uncompressed_point: &[u8]) -> String {
    use sha2::Digest as _;
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(uncompressed_point);
    let digest = sha2::Sha256::digest(&spki);
    let encoded = base32(&digest[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares two byte strings in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenIssuer {
    /// An issuer signing with `config.key_pem`.
    pub fn new(config: IssuerConfig) -> Result<Self, TokenError> {
        let key = russh::keys::decode_secret_key(&config.key_pem, None)
            .map_err(|error| TokenError::Key(format!("not a PEM private key: {error}")))?;
        let ecdsa = key
            .key_data()
            .ecdsa()
            .ok_or_else(|| TokenError::Key("not an ECDSA key: use a P-256 (prime256v1) key".into()))?;
        let public = ecdsa.public_key_bytes().to_vec();
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            ecdsa.private_key_bytes(),
            &public,
            &rng,
        )
        .map_err(|error| TokenError::Key(format!("not a P-256 key pair: {error}")))?;
        if config.tenant_secret.len() < 16 {
            return Err(TokenError::Key(
                "the tenant secret must be at least 16 bytes".into(),
            ));
        }
        Ok(Self {
            key: pair,
            kid: libtrust_key_id(&public),
            rng,
            config,
        })
    }

    /// The key id tokens carry.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The password of namespace `namespace`'s credential (user `tenant/<namespace>`): an HMAC of
    /// the namespace under the issuer's secret, so nothing per namespace is stored but the copy the
    /// namespace's pods mount; changing the secret revokes every one of them.
    pub fn tenant_password(&self, namespace: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.config.tenant_secret);
        let tag = ring::hmac::sign(&key, format!("walt-registry-tenant:{namespace}").as_bytes());
        b64url(tag.as_ref())
    }

    /// Who a `user:password` pair is.
    pub fn authenticate(&self, user: &str, password: &str) -> Result<Subject, TokenError> {
        if let Some((lab_user, lab_password)) = &self.config.lab_credential
            && user == lab_user
        {
            return if same_secret(password.as_bytes(), lab_password.as_bytes()) {
                Ok(Subject::Lab(user.to_owned()))
            } else {
                Err(TokenError::Unauthorized("wrong password".into()))
            };
        }
        let namespace = user
            .strip_prefix(TENANT_USER_PREFIX)
            .filter(|ns| !ns.is_empty() && !ns.contains('/'))
            .ok_or_else(|| TokenError::Unauthorized(format!("unknown user `{user}`")))?;
        if same_secret(password.as_bytes(), self.tenant_password(namespace).as_bytes()) {
            Ok(Subject::Tenant(namespace.to_owned()))
        } else {
            Err(TokenError::Unauthorized("wrong password".into()))
        }
    }

    fn path_of(&self, namespace: &str) -> String {
        if self.config.prefix.is_empty() {
            format!("{namespace}/")
        } else {
            format!("{}/{namespace}/", self.config.prefix)
        }
    }

    /// What `subject` gets of what it asked (pure): the lab everything; a tenant pull and push
    /// under its own path, pull under the catalog's, nothing else.
    pub fn grant(&self, subject: &Subject, asked: &[Scope]) -> Vec<Scope> {
        asked
            .iter()
            .filter_map(|scope| {
                let allowed: &[&str] = match subject {
                    Subject::Lab(_) => return Some(scope.clone()),
                    Subject::Tenant(namespace) => {
                        let valid = scope.kind == "repository"
                            && !scope.name.split('/').any(|part| part.is_empty() || part == "..");
                        if valid && scope.name.starts_with(&self.path_of(namespace)) {
                            &[PULL, PUSH]
                        } else if valid
                            && scope
                                .name
                                .starts_with(&self.path_of(&self.config.catalog_namespace))
                        {
                            &[PULL]
                        } else {
                            &[]
                        }
                    }
                };
                let actions: Vec<String> = scope
                    .actions
                    .iter()
                    .filter(|action| allowed.contains(&action.as_str()))
                    .cloned()
                    .collect();
                (!actions.is_empty()).then(|| Scope {
                    actions,
                    ..scope.clone()
                })
            })
            .collect()
    }

    /// A signed token for `subject` with `access`, valid from `now` (Unix seconds) for the
    /// configured lifetime; `service` must be this issuer's.
    pub fn token(
        &self,
        subject: &Subject,
        service: &str,
        access: &[Scope],
        now: u64,
    ) -> Result<String, TokenError> {
        if service != self.config.service {
            return Err(TokenError::BadRequest(format!(
                "service `{service}` is not this issuer's (`{}`)",
                self.config.service
            )));
        }
        let mut nonce = [0u8; 16];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| TokenError::Key("no randomness for the token id".into()))?;
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let subject_name = match subject {
            Subject::Lab(user) => user.clone(),
            Subject::Tenant(namespace) => format!("{TENANT_USER_PREFIX}{namespace}"),
        };
        let claims = serde_json::json!({
            "iss": self.config.issuer,
            "sub": subject_name,
            "aud": service,
            "exp": now + self.config.lifetime.as_secs(),
            "nbf": now.saturating_sub(10),
            "iat": now,
            "jti": b64url(&nonce),
            "access": access.iter().map(|scope| serde_json::json!({
                "type": scope.kind, "name": scope.name, "actions": scope.actions,
            })).collect::<Vec<_>>(),
        });
        let mut signing_input = String::new();
        let _ = write!(
            signing_input,
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| TokenError::Key("signing the token failed".into()))?;
        Ok(format!("{signing_input}.{}", b64url(signature.as_ref())))
    }

    /// Answers one token request: `authorization` is the request's `Authorization` header,
    /// `query` its query string (`service=…&scope=…&scope=…`). Returns the JSON body.
    pub fn respond(&self, authorization: Option<&str>, query: &str, now: u64) -> Result<String, TokenError> {
        let (user, password) = basic_credentials(authorization)?;
        let subject = self.authenticate(&user, &password)?;
        let mut service = None;
        let mut asked = Vec::new();
        for (key, value) in url_pairs(query) {
            match key.as_str() {
                "service" => service = Some(value),
                "scope" => {
                    // Several scopes may also come space-separated in one parameter.
                    for one in value.split(' ').filter(|s| !s.is_empty()) {
                        asked.push(Scope::parse(one)?);
                    }
                }
                _ => {}
            }
        }
        let service = service.ok_or_else(|| TokenError::BadRequest("no service parameter".into()))?;
        let granted = self.grant(&subject, &asked);
        let token = self.token(&subject, &service, &granted, now)?;
        Ok(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": self.config.lifetime.as_secs(),
        })
        .to_string())
    }
}

/// `user`, `password` of a `Basic` Authorization header.
fn basic_credentials(authorization: Option<&str>) -> Result<(String, String), TokenError> {
    let encoded = authorization
        .and_then(|value| {
            value
                .strip_prefix("Basic ")
                .or_else(|| value.strip_prefix("basic "))
        })
        .ok_or_else(|| TokenError::Unauthorized("basic credentials required".into()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| TokenError::Unauthorized("malformed basic credentials".into()))?;
    let text = String::from_utf8(decoded)
        .map_err(|_| TokenError::Unauthorized("malformed basic credentials".into()))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| TokenError::Unauthorized("malformed basic credentials".into()))?;
    Ok((user.to_owned(), password.to_owned()))
}

/// Decodes `a=b&c=d` (percent-encoding and `+` as space).
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The HTTP answer to one request (pure apart from the clock): `GET /token` → 200 and the token
/// JSON; no or wrong credentials → 401 with a Basic challenge; a malformed request → 400.
pub fn answer(
    issuer: &TokenIssuer,
    method: &http::Method,
    uri: &http::Uri,
    authorization: Option<&str>,
    now: u64,
) -> (http::StatusCode, String) {
    if method != http::Method::GET || uri.path() != "/token" {
        return (
            http::StatusCode::NOT_FOUND,
            serde_json::json!({"errors": [{"code": "NOT_FOUND", "message": "the registry token endpoint is GET /token"}]})
                .to_string(),
        );
    }
    match issuer.respond(authorization, uri.query().unwrap_or_default(), now) {
        Ok(body) => (http::StatusCode::OK, body),
        Err(error) => {
            let (status, code) = match error {
                TokenError::Unauthorized(_) => (http::StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
                TokenError::BadRequest(_) => (http::StatusCode::BAD_REQUEST, "BAD_REQUEST"),
                TokenError::Key(_) => (http::StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
            };
            (
                status,
                serde_json::json!({"errors": [{"code": code, "message": error.to_string()}]}).to_string(),
            )
        }
    }
}

/// Binds `addr` and serves `GET /token` until `shutdown` is cancelled; returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    issuer: std::sync::Arc<TokenIssuer>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _peer)) = accepted else {
                continue;
            };
            let issuer = issuer.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |elapsed| elapsed.as_secs());
                        let authorization = request
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|value| value.to_str().ok());
                        let (status, body) =
                            answer(&issuer, request.method(), request.uri(), authorization, now);
                        let mut response =
                            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                        *response.status_mut() = status;
                        let headers = response.headers_mut();
                        headers.insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        if status == http::StatusCode::UNAUTHORIZED {
                            headers.insert(
                                http::header::WWW_AUTHENTICATE,
                                http::HeaderValue::from_static("Basic realm=\"walt registry tokens\""),
                            );
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "registry token connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway P-256 key (generated for these tests with `openssl ecparam -name prime256v1 -genkey -noout`).
    const KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIAL8s88rlusrsUjUb27Ldry8Ao9MDsT2AoURsYB0G4u4oAoGCCqGSM49
AwEHoUQDQgAEUncnBH65aiOSCm6dJutSjrye0YJxeZzzCIMGQz1Hx6cDuVnMNUg0
OwRwZUtjmascNnKG3j7hMk4GnlvhdFAZtg==
-----END EC PRIVATE KEY-----
";

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(IssuerConfig {
            key_pem: KEY.into(),
            tenant_secret: b"0123456789abcdef0123".to_vec(),
            issuer: "walt".into(),
            service: "walt-registry".into(),
            lab_credential: Some(("walt".into(), "lab-secret".into())),
            prefix: "walt".into(),
            catalog_namespace: "walt-catalog".into(),
            lifetime: std::time::Duration::from_mins(5),
        })
        .expect("issuer")
    }

    fn scope(text: &str) -> Scope {
        Scope::parse(text).expect("scope")
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("repository%3Awalt%2Falice%2Fx%3Apull%2Cpush"),
            "repository:walt/alice/x:pull,push"
        );
        assert_eq!(percent_decode("a+b%zz%"), "a b%zz%");
    }

    #[test]
    fn a_tenant_gets_its_path_and_catalog_pulls_only() {
        let issuer = issuer();
        let alice = Subject::Tenant("alice".into());
        let granted = issuer.grant(
            &alice,
            &[
                scope("repository:walt/alice/debian:pull,push,delete"),
                scope("repository:walt/walt-catalog/debian:pull,push"),
                scope("repository:walt/bob/debian:pull"),
                scope("repository:walt/alice-2/debian:pull"),
                scope("repository:walt/alice/../bob/x:pull"),
                scope("registry:catalog:*"),
            ],
        );
        assert_eq!(
            granted,
            [
                scope("repository:walt/alice/debian:pull,push"),
                scope("repository:walt/walt-catalog/debian:pull"),
            ]
        );
        let lab = Subject::Lab("walt".into());
        assert_eq!(
            issuer.grant(&lab, &[scope("repository:walt/bob/x:pull,push,delete")]),
            [scope("repository:walt/bob/x:pull,push,delete")]
        );
    }

    #[test]
    fn credentials_are_checked() {
        let issuer = issuer();
        let password = issuer.tenant_password("alice");
        assert_eq!(
            issuer.authenticate("tenant/alice", &password).expect("alice"),
            Subject::Tenant("alice".into())
        );
        issuer
            .authenticate("tenant/bob", &password)
            .expect_err("alice's password is not bob's");
        issuer
            .authenticate("walt", "nope")
            .expect_err("wrong lab password");
        assert_eq!(
            issuer.authenticate("walt", "lab-secret").expect("lab"),
            Subject::Lab("walt".into())
        );
        issuer.authenticate("someone", "x").expect_err("unknown user");
        assert!(matches!(
            issuer.respond(None, "service=walt-registry", 0),
            Err(TokenError::Unauthorized(_))
        ));
    }

    #[test]
    fn tokens_are_es256_jwts_with_the_granted_access() {
        let issuer = issuer();
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("tenant/alice:{}", issuer.tenant_password("alice")));
        let body = issuer
            .respond(
                Some(&format!("Basic {basic}")),
                "service=walt-registry&scope=repository%3Awalt%2Falice%2Fx%3Apull%2Cpush&scope=repository:walt/bob/x:pull",
                1_000_000,
            )
            .expect("a token");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        let token = body["token"].as_str().expect("token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |part: &str| -> serde_json::Value {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(part)
                    .expect("b64"),
            )
            .expect("json")
        };
        let header = decode(parts[0]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], issuer.key_id());
        let claims = decode(parts[1]);
        assert_eq!(claims["aud"], "walt-registry");
        assert_eq!(claims["iss"], "walt");
        assert_eq!(claims["exp"], 1_000_300);
        assert_eq!(
            claims["access"],
            serde_json::json!([{"type": "repository", "name": "walt/alice/x", "actions": ["pull", "push"]}])
        );
        // The signature verifies with the key's public half (fixed-size r||s, as JWS wants).
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .expect("b64");
        assert_eq!(signature.len(), 64);
        let public = ring::signature::KeyPair::public_key(&issuer.key)
            .as_ref()
            .to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("the signature verifies");
        let kid = issuer.key_id();
        assert_eq!(kid.len(), 59, "{kid}");
        assert_eq!(kid.split(':').count(), 12, "{kid}");
    }
}
