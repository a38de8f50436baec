//! How this machine authenticates to a registry it reaches with skopeo: anonymously, with a user and
//! password, or with a bearer token of Distribution's token authentication that it fetched itself.
//!
//! A registry with token authentication answers `401` with
//! `WWW-Authenticate: Bearer realm="…",service="…"`, and skopeo would then ask the realm for a token.
//! The chart's embedded registry names its token issuer by a cluster Service name
//! (`http://walt-registry-token.walt-system.svc:5002/token`), which only the cluster's DNS resolves:
//! from outside the cluster the lab reaches the registry through a port-forward, the realm's Service
//! through a second one ([`ServiceUrl`]), asks it for a token scoped to one repository
//! ([`token_path`], `repository:<path>:pull,push`) with the lab credential, and hands the token to
//! skopeo ([`RegistryAuth::skopeo_arg`]), which then sends it as is and never contacts the realm.
//!
//! Everything here is pure but [`http_get`].

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// Why authenticating to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An HTTP request could not be made or answered.
    #[error("GET http://{address}{path}: {source}")]
    Http {
        /// `HOST:PORT` asked.
        address: String,
        /// The path asked.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// An answer could not be understood.
    #[error("GET http://{address}{path}: {what}")]
    Answer {
        /// `HOST:PORT` asked.
        address: String,
        /// The path asked.
        path: String,
        /// What is wrong with the answer.
        what: String,
    },
    /// The registry's `WWW-Authenticate` challenge cannot be followed from here.
    #[error("{0}")]
    Challenge(String),
}

/// How skopeo authenticates to a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No credentials.
    Anonymous,
    /// `user:password`.
    Basic(String),
    /// A bearer token of the registry's token issuer.
    Bearer(String),
}

impl std::fmt::Debug for RegistryAuth {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegistryAuth::Anonymous => "Anonymous",
            RegistryAuth::Basic(_) => "Basic(…)",
            RegistryAuth::Bearer(_) => "Bearer(…)",
        })
    }
}

/// Which registry of a skopeo command an argument is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkopeoSide {
    /// The source of `skopeo copy` (`--src-…`).
    Source,
    /// The destination of `skopeo copy` (`--dest-…`).
    Destination,
    /// The one registry of `skopeo inspect` (no prefix).
    Only,
}

impl RegistryAuth {
    /// The skopeo argument that authenticates `side` this way (`--dest-creds=…`,
    /// `--src-registry-token=…`, …), or None when anonymous.
    pub fn skopeo_arg(&self, side: SkopeoSide) -> Option<String> {
        let prefix = match side {
            SkopeoSide::Source => "--src-",
            SkopeoSide::Destination => "--dest-",
            SkopeoSide::Only => "--",
        };
        match self {
            RegistryAuth::Anonymous => None,
            RegistryAuth::Basic(creds) => Some(format!("{prefix}creds={creds}")),
            RegistryAuth::Bearer(token) => Some(format!("{prefix}registry-token={token}")),
        }
    }
}

/// What a registry asks for, from its answer to `GET /v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// It answered 200: no credentials needed.
    Open,
    /// `Basic`: a user and password.
    Basic,
    /// `Bearer`: a token from `realm` for `service`.
    Bearer {
        /// The token endpoint's URL.
        realm: String,
        /// The `service` the token is for.
        service: String,
    },
}

/// Reads the challenge of a registry's answer to `GET /v2/`: its status and `WWW-Authenticate`.
pub fn challenge(status: u16, www_authenticate: Option<&str>) -> Result<Challenge, Error> {
    if status == 200 {
        return Ok(Challenge::Open);
    }
    let header = match (status, www_authenticate) {
        (401, Some(header)) => header.trim(),
        (401, None) => {
            return Err(Error::Challenge(
                "the registry answered GET /v2/ with 401 but no WWW-Authenticate header".into(),
            ));
        }
        (other, _) => {
            return Err(Error::Challenge(format!(
                "the registry answered GET /v2/ with {other}, neither 200 nor 401: is it a registry (Distribution API v2)?"
            )));
        }
    };
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Ok(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::Challenge(format!(
            "the registry asks for `{scheme}` authentication (WWW-Authenticate: {header}); only Basic and Bearer are known"
        )));
    }
    let params = auth_params(params);
    let find = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
            .ok_or_else(|| {
                Error::Challenge(format!(
                    "the registry's Bearer challenge has no {name} (WWW-Authenticate: {header})"
                ))
            })
    };
    Ok(Challenge::Bearer {
        realm: find("realm")?,
        service: find("service")?,
    })
}

/// `key=value` or `key="value"` pairs separated by commas (commas inside quotes belong to the value).
fn auth_params(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (
                quoted[..end].to_owned(),
                quoted.get(end + 1..).unwrap_or_default(),
            )
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        pairs.push((key, value));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    pairs
}

/// An `http://` URL whose host is a cluster Service name: `http://NAME.NAMESPACE.svc[.DOMAIN][:PORT]/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    /// The Service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The Service port (80 when the URL names none).
    pub port: u16,
    /// Path of the URL (`/token`), with its query if it has one.
    pub path: String,
}

impl ServiceUrl {
    /// Parses `url`; the error says why it cannot be reached through a port-forward.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let not_a_service = |why: &str| {
            Error::Challenge(format!(
                "the registry's token realm {url} {why}: the lab reaches a realm from outside the cluster \
                 through kubectl port-forward, so it must be http://NAME.NAMESPACE.svc[:PORT]/PATH (the \
                 chart's embedded registry is); for another registry, push with your own credentials"
            ))
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| not_a_service("is not a plain http:// URL"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .map_err(|_| not_a_service(&format!("has a bad port `{port}`")))?,
            ),
            None => (authority, 80),
        };
        let mut labels = host.split('.');
        let (Some(name), Some(namespace), Some("svc")) = (labels.next(), labels.next(), labels.next()) else {
            return Err(not_a_service("does not name a cluster Service"));
        };
        if name.is_empty() || namespace.is_empty() {
            return Err(not_a_service("does not name a cluster Service"));
        }
        Ok(ServiceUrl {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.to_owned()
            },
        })
    }
}

/// The request path asking `realm_path` for a token of `service` with pull and push on `repository`.
pub fn token_path(realm_path: &str, service: &str, repository: &str) -> String {
    let separator = if realm_path.contains('?') { '&' } else { '?' };
    format!(
        "{realm_path}{separator}service={}&scope={}",
        percent_encode(service),
        percent_encode(&format!("repository:{repository}:pull,push"))
    )
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The token of a token endpoint's JSON answer (`token`, or OAuth's `access_token`).
pub fn token_of(body: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("the answer is not JSON ({e}): {body}"))?;
    ["token", "access_token"]
        .iter()
        .find_map(|key| value.get(key).and_then(serde_json::Value::as_str))
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("the answer has no token: {body}"))
}

/// The repository of an image reference: without the registry host and the tag or digest
/// (`127.0.0.1:4000/walt/lab/demo:latest` → `walt/lab/demo`).
pub fn repository_of(reference: &str) -> &str {
    let path = reference.split_once('/').map_or(reference, |(_, path)| path);
    let path = path.split_once('@').map_or(path, |(path, _)| path);
    match path.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => path,
    }
}

/// An HTTP answer: status, `WWW-Authenticate` header, body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The `WWW-Authenticate` header, if any.
    pub www_authenticate: Option<String>,
    /// The body.
    pub body: String,
}

/// `GET path` from `address` (`HOST:PORT`, plain HTTP), with an `Authorization` header when given.
pub fn http_get(address: &str, path: &str, authorization: Option<&str>) -> Result<Answer, Error> {
    let failed = |source| Error::Http {
        address: address.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect(address).map_err(failed)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(failed)?;
    let authorization = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
    )
    .map_err(failed)?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).map_err(failed)?;
    parse_answer(&String::from_utf8_lossy(&bytes)).map_err(|what| Error::Answer {
        address: address.to_owned(),
        path: path.to_owned(),
        what,
    })
}

/// Parses a whole HTTP/1.x answer.
fn parse_answer(text: &str) -> Result<Answer, String> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
    let www_authenticate = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("www-authenticate")
            .then(|| value.trim().to_owned())
    });
    Ok(Answer {
        status,
        www_authenticate,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_registrys_challenge_names_its_realm_and_service() {
        let challenge = challenge(
            401,
            Some(r#"Bearer realm="http://walt-registry-token.walt-system.svc:5002/token",service="walt-registry""#),
        )
        .unwrap();
        assert_eq!(
            challenge,
            Challenge::Bearer {
                realm: "http://walt-registry-token.walt-system.svc:5002/token".into(),
                service: "walt-registry".into()
            }
        );
        assert_eq!(
            super::challenge(
                401,
                Some(r#"Bearer realm="http://r/t",service="s",scope="repository:a/b:pull,push""#)
            )
            .unwrap(),
            Challenge::Bearer {
                realm: "http://r/t".into(),
                service: "s".into()
            }
        );
        assert_eq!(
            super::challenge(401, Some(r#"Basic realm="walt""#)).unwrap(),
            Challenge::Basic
        );
        assert_eq!(super::challenge(200, None).unwrap(), Challenge::Open);
    }

    #[test]
    fn a_challenge_that_cannot_be_followed_says_why() {
        let error = challenge(401, Some(r#"Bearer service="s""#))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no realm"), "{error}");
        let error = challenge(401, None).unwrap_err().to_string();
        assert!(error.contains("no WWW-Authenticate"), "{error}");
        let error = challenge(404, None).unwrap_err().to_string();
        assert!(error.contains("404"), "{error}");
        let error = challenge(401, Some("Negotiate x")).unwrap_err().to_string();
        assert!(error.contains("Negotiate"), "{error}");
    }

    #[test]
    fn a_realm_on_a_service_name_is_reached_through_that_service() {
        assert_eq!(
            ServiceUrl::parse("http://walt-registry-token.walt-system.svc:5002/token").unwrap(),
            ServiceUrl {
                name: "walt-registry-token".into(),
                namespace: "walt-system".into(),
                port: 5002,
                path: "/token".into()
            }
        );
        let url = ServiceUrl::parse("http://auth.sys.svc.cluster.local").unwrap();
        assert_eq!((url.port, url.path.as_str()), (80, "/"));
        for bad in [
            "https://auth.sys.svc/token",
            "http://auth.example.org/token",
            "http://auth/token",
            "http://auth.sys.svc:x/token",
            "http://.sys.svc/token",
        ] {
            let error = ServiceUrl::parse(bad).unwrap_err().to_string();
            assert!(
                error.contains(bad) && error.contains("port-forward"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn the_token_request_asks_pull_and_push_on_one_repository() {
        assert_eq!(
            token_path("/token", "walt-registry", "walt/lab/demo-amd64"),
            "/token?service=walt-registry&scope=repository%3Awalt/lab/demo-amd64%3Apull%2Cpush"
        );
        assert_eq!(
            token_path("/auth?x=1", "s", "a"),
            "/auth?x=1&service=s&scope=repository%3Aa%3Apull%2Cpush"
        );
    }

    #[test]
    fn a_token_is_read_from_either_field() {
        assert_eq!(token_of(r#"{"token":"t1","expires_in":300}"#).unwrap(), "t1");
        assert_eq!(token_of(r#"{"access_token":"t2"}"#).unwrap(), "t2");
        assert!(token_of(r#"{"token":""}"#).unwrap_err().contains("no token"));
        assert!(token_of("nope").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn repositories_lose_host_tag_and_digest() {
        assert_eq!(
            repository_of("127.0.0.1:4000/walt/lab/demo:latest"),
            "walt/lab/demo"
        );
        assert_eq!(repository_of("127.0.0.1:4000/walt/lab/demo"), "walt/lab/demo");
        assert_eq!(repository_of("r:1/a/b@sha256:00"), "a/b");
        assert_eq!(repository_of("r/a/b:v1@sha256:00"), "a/b");
    }

    #[test]
    fn skopeo_gets_the_flag_of_its_side_and_debug_hides_secrets() {
        let token = RegistryAuth::Bearer("tok".into());
        assert_eq!(
            token.skopeo_arg(SkopeoSide::Destination).as_deref(),
            Some("--dest-registry-token=tok")
        );
        assert_eq!(
            token.skopeo_arg(SkopeoSide::Only).as_deref(),
            Some("--registry-token=tok")
        );
        assert_eq!(
            RegistryAuth::Basic("u:p".into())
                .skopeo_arg(SkopeoSide::Source)
                .as_deref(),
            Some("--src-creds=u:p")
        );
        assert_eq!(RegistryAuth::Anonymous.skopeo_arg(SkopeoSide::Only), None);
        assert!(!format!("{token:?}").contains("tok"));
    }

    #[test]
    fn answers_are_parsed_for_status_challenge_and_body() {
        let answer = parse_answer(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nWww-Authenticate: Bearer realm=\"x\",service=\"y\"\r\n\r\n{\"errors\":[]}",
        )
        .unwrap();
        assert_eq!(answer.status, 401);
        assert_eq!(
            answer.www_authenticate.as_deref(),
            Some("Bearer realm=\"x\",service=\"y\"")
        );
        assert_eq!(answer.body, "{\"errors\":[]}");
        assert!(parse_answer("garbage").is_err());
    }
}
