//! The Secrets the operator creates when those its flags name are missing, so that an installation
//! applied from git alone (Argo CD, Flux, `kubectl apply -k`) needs no secret in git: the lab's node key
//! (`--node-key-secret`), the registry token issuer's key, certificate and tenant secret
//! (`--registry-token-secret`), the lab registry credential (`--registry-credentials-secret`) when walt
//! itself checks it (its token issuer, or the embedded registry's htpasswd), and that htpasswd
//! (`--registry-htpasswd-secret`, registry without token auth) made from the stored credential.
//!
//! Rules: a Secret that exists is never changed (only `create` is ever sent; a Secret another replica
//! created in the meantime is taken as it is); each creation is logged and published as an Event on the
//! Secret; everything happens in the operator's own namespace. Credentials a registry checks by itself
//! are never invented: without `--registry-token-secret` or `--registry-htpasswd-secret` they must come
//! from the admin (sealed-secrets, external-secrets, `kubectl create secret docker-registry`). `--create-missing-secrets=false` turns
//! all of this off (the operator then waits for the admin's Secrets).
//!
//! [`plan`] is the pure decision (what exists → what to create next); [`ensure`] applies it one
//! creation at a time, observing again after each, so two replicas starting together agree.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource as _};
use sha2::{Digest as _, Sha256};

use super::config::{Args, secret_key, split_registry};
use super::shared::error::{Error, Result};
use super::shared::events::EventPublisher;

/// User name of the registry credentials the operator creates (the chart's default).
pub const REGISTRY_USERNAME: &str = "walt";
/// Annotation set on every Secret the operator created, naming it as their author.
pub const CREATED_BY_ANNOTATION: &str = "walt.dev/created-by";
/// Reason of the Event published when a Secret is created.
pub const REASON_CREATED: &str = "SecretCreated";
/// Creations in one run at most (four Secrets, plus re-observations after conflicts).
const MAX_STEPS: usize = 10;
/// Common name (and DNS name) of the certificate of a registry token key the operator creates.
pub const TOKEN_CERT_NAME: &str = "walt-registry-token";
/// Validity of that certificate, in days (the chart's: ten years).
const TOKEN_CERT_DAYS: i64 = 3650;

/// What the operator found under one Secret name.
#[derive(Clone, Copy, Debug)]
pub enum Slot<'a> {
    /// No flag names this Secret.
    NotConfigured,
    /// Named, and absent from the namespace.
    Missing,
    /// Named and present.
    Present(&'a Secret),
}

impl Slot<'_> {
    fn is_missing(self) -> bool {
        matches!(self, Slot::Missing)
    }

    fn is_configured(self) -> bool {
        !matches!(self, Slot::NotConfigured)
    }
}

/// The Secrets the flags name, as found.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// `--node-key-secret`.
    pub node_key: Slot<'a>,
    /// `--registry-token-secret`.
    pub token: Slot<'a>,
    /// `--registry-credentials-secret`.
    pub credentials: Slot<'a>,
    /// `--registry-htpasswd-secret`.
    pub htpasswd: Slot<'a>,
}

/// One Secret to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Creation {
    /// A new node key.
    NodeKey,
    /// A new registry token key (ECDSA P-256), its self-signed certificate and a new tenant secret.
    RegistryToken,
    /// Registry credentials with this password (user [`REGISTRY_USERNAME`]).
    RegistryCredentials {
        /// The new password.
        password: String,
    },
    /// The embedded registry's htpasswd for these credentials.
    Htpasswd {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
}

/// Why the operator will not create a missing Secret although it was asked to create missing ones.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The htpasswd exists, the credentials do not: new credentials would not match it.
    #[error(
        "the registry's htpasswd Secret exists but the registry credentials Secret is missing: new credentials would not match the htpasswd; delete the htpasswd Secret (both are then made again) or create the credentials Secret"
    )]
    HtpasswdWithoutCredentials,
    /// The credentials exist but hold no username and password to make the htpasswd from.
    #[error(
        "the registry credentials Secret has no `username` and `password` keys to make the registry's htpasswd from: add them, or create the htpasswd Secret yourself"
    )]
    CredentialsUnreadable,
}

/// Decides the next Secret to create (at most one: the caller observes again after creating it), in
/// the order node key, token key, credentials, htpasswd. `fresh_password` is the password new registry
/// credentials get. Nothing is created when `create_missing` is false, and nothing present is ever
/// replaced. Registry credentials are made only when walt itself checks them (`token` or `htpasswd`
/// configured): those of a registry that checks them by itself cannot be invented.
pub fn plan(
    observed: Observed<'_>,
    create_missing: bool,
    fresh_password: &str,
) -> std::result::Result<Option<Creation>, Refusal> {
    if !create_missing {
        return Ok(None);
    }
    if observed.node_key.is_missing() {
        return Ok(Some(Creation::NodeKey));
    }
    if observed.token.is_missing() {
        return Ok(Some(Creation::RegistryToken));
    }
    let walt_checks_credentials = observed.token.is_configured() || observed.htpasswd.is_configured();
    match (observed.credentials, observed.htpasswd) {
        (Slot::Missing, Slot::Present(_)) => Err(Refusal::HtpasswdWithoutCredentials),
        // Credentials first: the htpasswd is made from whatever credentials are stored.
        (Slot::Missing, _) if walt_checks_credentials => Ok(Some(Creation::RegistryCredentials {
            password: fresh_password.to_owned(),
        })),
        (Slot::Present(credentials), Slot::Missing) => {
            let read = |key| secret_key(credentials, key).and_then(|bytes| String::from_utf8(bytes).ok());
            match (read("username"), read("password")) {
                (Some(username), Some(password)) if !username.is_empty() && !password.is_empty() => {
                    Ok(Some(Creation::Htpasswd { username, password }))
                }
                _ => Err(Refusal::CredentialsUnreadable),
            }
        }
        // Nothing missing, credentials the registry checks itself (the admin's), or an htpasswd alone.
        _ => Ok(None),
    }
}

fn metadata(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "walt".to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "walt".to_owned()),
        ])),
        annotations: Some(BTreeMap::from([(
            CREATED_BY_ANNOTATION.to_owned(),
            "walt-operator".to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

fn data(entries: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
    entries
        .iter()
        .map(|(key, value)| ((*key).to_owned(), ByteString(value.to_vec())))
        .collect()
}

/// The node key Secret (type `kubernetes.io/ssh-auth`, key `ssh-privatekey`).
pub fn node_key_secret(name: &str, namespace: &str, private_key: &str) -> Secret {
    Secret {
        metadata: metadata(name, namespace),
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(data(&[("ssh-privatekey", private_key.as_bytes())])),
        ..Secret::default()
    }
}

/// The registry credentials Secret, as the chart makes it: `.dockerconfigjson` for `host`, `username`,
/// `password`.
pub fn registry_credentials_secret(
    name: &str,
    namespace: &str,
    host: &str,
    username: &str,
    password: &str,
) -> Secret {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let document = serde_json::json!({
        "auths": {host: {"username": username, "password": password, "auth": auth}}
    })
    .to_string();
    Secret {
        metadata: metadata(name, namespace),
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(data(&[
            (".dockerconfigjson", document.as_bytes()),
            ("username", username.as_bytes()),
            ("password", password.as_bytes()),
        ])),
        ..Secret::default()
    }
}

/// The embedded registry's htpasswd Secret, as the chart makes it: `htpasswd` (one `user:bcrypt` line)
/// and `password-sha256` (so a Helm upgrade keeps it while the password is unchanged).
pub fn htpasswd_secret(name: &str, namespace: &str, line: &str, password: &str) -> Secret {
    let digest = hex::encode(Sha256::digest(password.as_bytes()));
    Secret {
        metadata: metadata(name, namespace),
        type_: Some("Opaque".into()),
        data: Some(data(&[
            ("htpasswd", line.as_bytes()),
            ("password-sha256", digest.as_bytes()),
        ])),
        ..Secret::default()
    }
}

/// The registry token Secret, as the chart makes it: `tls.key` (PEM), `tls.crt` (PEM, the registry's
/// `rootcertbundle`), `tenant-secret`.
pub fn registry_token_secret(
    name: &str,
    namespace: &str,
    key_pem: &str,
    cert_pem: &str,
    tenant_secret: &str,
) -> Secret {
    Secret {
        metadata: metadata(name, namespace),
        type_: Some("Opaque".into()),
        data: Some(data(&[
            ("tls.key", key_pem.as_bytes()),
            ("tls.crt", cert_pem.as_bytes()),
            ("tenant-secret", tenant_secret.as_bytes()),
        ])),
        ..Secret::default()
    }
}

/// A new ECDSA P-256 key (PKCS#8 PEM) and its self-signed certificate (PEM), named [`TOKEN_CERT_NAME`],
/// valid from now for ten years.
pub fn token_key_and_certificate() -> Result<(String, String)> {
    let failed = |what: &str, error: rcgen::Error| Error::Config(format!("{what}: {error}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| failed("generating the registry token key", e))?;
    let mut params = rcgen::CertificateParams::new(vec![TOKEN_CERT_NAME.to_owned()])
        .map_err(|e| failed("the registry token certificate", e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, TOKEN_CERT_NAME);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(TOKEN_CERT_DAYS);
    let cert = params
        .self_signed(&key)
        .map_err(|e| failed("self-signing the registry token certificate", e))?;
    Ok((key.serialize_pem(), cert.pem()))
}

fn random_text(length: usize) -> String {
    use rand::RngExt as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

fn random_password() -> String {
    random_text(32)
}

async fn observe(api: &Api<Secret>, name: Option<&str>) -> Result<Option<Secret>> {
    match name {
        None => Ok(None),
        Some(name) => api
            .get_opt(name)
            .await
            .map_err(|source| Error::kube(format!("reading Secret {name}"), source)),
    }
}

fn slot<'a>(name: Option<&str>, found: Option<&'a Secret>) -> Slot<'a> {
    match (name, found) {
        (None, _) => Slot::NotConfigured,
        (Some(_), None) => Slot::Missing,
        (Some(_), Some(secret)) => Slot::Present(secret),
    }
}

/// Builds the Secret of `creation` (generating the key or hashing the password) and what to say about it.
fn materialize(args: &Args, creation: &Creation) -> Result<(Secret, String)> {
    let namespace = &args.namespace;
    match creation {
        Creation::NodeKey => {
            let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .map_err(|error| Error::Config(format!("generating a node key: {error}")))?;
            let private = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|error| Error::Config(format!("encoding the new node key: {error}")))?;
            let public = key
                .public_key()
                .to_openssh()
                .map_err(|error| Error::Config(format!("encoding the node public key: {error}")))?;
            let note = format!(
                "created the lab's node key (ed25519); physical nodes must accept its public half in root's authorized_keys: {public}"
            );
            Ok((node_key_secret(&args.node_key_secret, namespace, &private), note))
        }
        Creation::RegistryToken => {
            let name = args.registry_token_secret.as_deref().unwrap_or_default();
            let (key, cert) = token_key_and_certificate()?;
            let note = format!(
                "created the registry token key (ECDSA P-256), its certificate ({TOKEN_CERT_NAME}, the registry's rootcertbundle) and a new tenant secret"
            );
            Ok((
                registry_token_secret(name, namespace, &key, &cert, &random_text(48)),
                note,
            ))
        }
        Creation::RegistryCredentials { password } => {
            let name = args.registry_credentials_secret.as_deref().unwrap_or_default();
            let (host, _) = split_registry(&args.lab_registry)?;
            let note = format!(
                "created the lab registry credential (user {REGISTRY_USERNAME}, random password) for {host}"
            );
            Ok((
                registry_credentials_secret(name, namespace, &host, REGISTRY_USERNAME, password),
                note,
            ))
        }
        Creation::Htpasswd { username, password } => {
            let name = args.registry_htpasswd_secret.as_deref().unwrap_or_default();
            let hash = bcrypt::hash(password, bcrypt::DEFAULT_COST)
                .map_err(|error| Error::Config(format!("hashing the registry password: {error}")))?;
            let note = format!("created the embedded registry's htpasswd for user {username}");
            Ok((
                htpasswd_secret(name, namespace, &format!("{username}:{hash}\n"), password),
                note,
            ))
        }
    }
}

async fn announce(recorder: &EventPublisher, secret: &Secret, note: String) {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
    tracing::info!(secret = %format!("{namespace}/{name}"), "{note}");
    let event = Event {
        type_: EventType::Normal,
        reason: REASON_CREATED.into(),
        note: Some(note),
        action: "Create".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &secret.object_ref(&())).await {
        tracing::warn!(%error, "could not publish the Event about Secret {namespace}/{name}");
    }
}

/// Creates the missing Secrets the flags name (see the module documentation); returns the names of
/// those it created. Run before [`super::config::Config::load`] reads them.
pub async fn ensure(client: Client, args: &Args, identity: &str) -> Result<Vec<String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let recorder = EventPublisher::new(client, super::shared::context::MANAGED_BY, identity);
    let names = [
        Some(args.node_key_secret.as_str()),
        args.registry_token_secret.as_deref(),
        args.registry_credentials_secret.as_deref(),
        args.registry_htpasswd_secret.as_deref(),
    ];
    let mut created = Vec::new();
    for _ in 0..MAX_STEPS {
        let node_key = observe(&api, names[0]).await?;
        let token = observe(&api, names[1]).await?;
        let credentials = observe(&api, names[2]).await?;
        let htpasswd = observe(&api, names[3]).await?;
        let observed = Observed {
            node_key: slot(names[0], node_key.as_ref()),
            token: slot(names[1], token.as_ref()),
            credentials: slot(names[2], credentials.as_ref()),
            htpasswd: slot(names[3], htpasswd.as_ref()),
        };
        let next = plan(observed, args.create_missing_secrets, &random_password())
            .map_err(|refusal| Error::Config(format!("in namespace {}: {refusal}", args.namespace)))?;
        let Some(creation) = next else {
            return Ok(created);
        };
        let (secret, note) = materialize(args, &creation)?;
        let name = secret.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), &secret).await {
            Ok(stored) => {
                announce(&recorder, &stored, note).await;
                created.push(name);
            }
            // Another replica made it first: observe again and take theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                return Err(Error::Config(format!(
                    "not allowed to create Secret {}/{name} ({}): grant the operator's ServiceAccount `create` on secrets in {}, or create it yourself",
                    args.namespace, status.message, args.namespace
                )));
            }
            Err(source) => {
                return Err(Error::kube(
                    format!("creating Secret {}/{name}", args.namespace),
                    source,
                ));
            }
        }
    }
    Err(Error::Config(format!(
        "the Secrets of namespace {} kept changing while the operator created the missing ones: restart it",
        args.namespace
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(entries: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    /// Without token auth (the embedded registry checks an htpasswd, or an external one its own).
    fn observed<'a>(node_key: Slot<'a>, credentials: Slot<'a>, htpasswd: Slot<'a>) -> Observed<'a> {
        Observed {
            node_key,
            token: Slot::NotConfigured,
            credentials,
            htpasswd,
        }
    }

    /// With token auth (the chart's default): no htpasswd named.
    fn with_token<'a>(node_key: Slot<'a>, token: Slot<'a>, credentials: Slot<'a>) -> Observed<'a> {
        Observed {
            node_key,
            token,
            credentials,
            htpasswd: Slot::NotConfigured,
        }
    }

    #[test]
    fn with_token_auth_the_node_key_then_the_token_key_then_the_lab_credential_are_created() {
        let none = with_token(Slot::Missing, Slot::Missing, Slot::Missing);
        assert_eq!(plan(none, true, "pw"), Ok(Some(Creation::NodeKey)));
        let key = with(&[("ssh-privatekey", "k")]);
        let no_token = with_token(Slot::Present(&key), Slot::Missing, Slot::Missing);
        assert_eq!(plan(no_token, true, "pw"), Ok(Some(Creation::RegistryToken)));
        // Only walt's token issuer checks the lab credential: it may be invented, for any registry
        // that trusts the issuer.
        let token = with(&[("tls.key", "k"), ("tls.crt", "c"), ("tenant-secret", "t")]);
        let no_credentials = with_token(Slot::Present(&key), Slot::Present(&token), Slot::Missing);
        assert_eq!(
            plan(no_credentials, true, "pw"),
            Ok(Some(Creation::RegistryCredentials {
                password: "pw".into()
            }))
        );
        let all = with_token(Slot::Present(&key), Slot::Present(&token), Slot::Present(&key));
        assert_eq!(plan(all, true, "pw"), Ok(None));
        // An admin's token Secret is kept whatever it holds; nothing is made with creation off.
        let empty = Secret::default();
        let admins = with_token(Slot::Present(&key), Slot::Present(&empty), Slot::Present(&key));
        assert_eq!(plan(admins, true, "pw"), Ok(None));
        let off = with_token(Slot::Missing, Slot::Missing, Slot::Missing);
        assert_eq!(plan(off, false, "pw"), Ok(None));
    }

    /// The DER inside a PEM text.
    fn pem_contents(text: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = text.lines().filter(|line| !line.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("PEM base64")
    }

    #[test]
    fn a_created_token_key_is_what_the_issuer_signs_with_and_its_certificate_carries() {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let (key_pem, cert_pem) = token_key_and_certificate().expect("a token key");
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{key_pem}");
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----"), "{cert_pem}");
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pem_contents(&key_pem),
            &ring::rand::SystemRandom::new(),
        )
        .expect("a P-256 PKCS#8 key");
        // The certificate (the registry's rootcertbundle) holds the key's public point and its name.
        let cert = pem_contents(&cert_pem);
        let public = pair.public_key().as_ref();
        assert_eq!(public.len(), 65);
        assert!(
            cert.windows(public.len()).any(|w| w == public),
            "public key not in the certificate"
        );
        assert!(
            cert.windows(TOKEN_CERT_NAME.len())
                .any(|w| w == TOKEN_CERT_NAME.as_bytes())
        );
        // The operator's token issuer starts from it, as from the chart's key.
        let issuer = crate::oci::token_issuer::TokenIssuer::new(crate::oci::token_issuer::IssuerConfig {
            key_pem: key_pem.clone(),
            tenant_secret: random_text(48).into_bytes(),
            issuer: "walt-operator".into(),
            service: "walt-registry".into(),
            lab_credential: None,
            prefix: "walt".into(),
            catalog_namespace: "walt-catalog".into(),
            lifetime: std::time::Duration::from_mins(5),
        });
        assert!(issuer.is_ok(), "the issuer refused the created key");
        // Two creations never share a key.
        assert_ne!(token_key_and_certificate().expect("another").0, key_pem);
        let secret = registry_token_secret("t", "ns", &key_pem, &cert_pem, &random_text(48));
        assert_eq!(secret_key(&secret, "tls.key"), Some(key_pem.into_bytes()));
        assert_eq!(secret_key(&secret, "tenant-secret").map(|t| t.len()), Some(48));
    }

    #[test]
    fn nothing_is_created_when_everything_exists_or_creation_is_off() {
        let secret = with(&[("username", "u"), ("password", "p")]);
        let all = observed(
            Slot::Present(&secret),
            Slot::Present(&secret),
            Slot::Present(&secret),
        );
        assert_eq!(plan(all, true, "pw"), Ok(None));
        let none = observed(Slot::Missing, Slot::Missing, Slot::Missing);
        assert_eq!(plan(none, false, "pw"), Ok(None));
    }

    #[test]
    fn missing_secrets_are_created_one_at_a_time_node_key_then_credentials_then_htpasswd() {
        let none = observed(Slot::Missing, Slot::Missing, Slot::Missing);
        assert_eq!(plan(none, true, "pw"), Ok(Some(Creation::NodeKey)));
        let key = with(&[("ssh-privatekey", "k")]);
        let no_registry = observed(Slot::Present(&key), Slot::Missing, Slot::Missing);
        assert_eq!(
            plan(no_registry, true, "pw"),
            Ok(Some(Creation::RegistryCredentials {
                password: "pw".into()
            }))
        );
        // The htpasswd is made from the stored credentials, not from the fresh password.
        let stored = with(&[("username", "walt"), ("password", "stored")]);
        let no_htpasswd = observed(Slot::Present(&key), Slot::Present(&stored), Slot::Missing);
        assert_eq!(
            plan(no_htpasswd, true, "pw"),
            Ok(Some(Creation::Htpasswd {
                username: "walt".into(),
                password: "stored".into()
            }))
        );
    }

    #[test]
    fn an_existing_secret_is_never_overwritten() {
        // Whatever a present Secret holds (even nothing usable), no creation targets it.
        let empty = Secret::default();
        for present in [Slot::Present(&empty)] {
            for other in [Slot::NotConfigured, Slot::Present(&empty)] {
                let next = plan(observed(present, other, Slot::NotConfigured), true, "pw");
                assert_eq!(next, Ok(None), "{present:?} {other:?}");
            }
        }
        let key = with(&[("ssh-privatekey", "k")]);
        let creds = with(&[("username", "u"), ("password", "p")]);
        let next = plan(
            observed(Slot::Present(&key), Slot::Present(&creds), Slot::Present(&empty)),
            true,
            "pw",
        );
        assert_eq!(next, Ok(None));
    }

    #[test]
    fn external_registry_credentials_are_never_invented() {
        let key = with(&[("ssh-privatekey", "k")]);
        let external = observed(Slot::Present(&key), Slot::Missing, Slot::NotConfigured);
        assert_eq!(plan(external, true, "pw"), Ok(None));
        let anonymous = observed(Slot::Missing, Slot::NotConfigured, Slot::NotConfigured);
        assert_eq!(plan(anonymous, true, "pw"), Ok(Some(Creation::NodeKey)));
    }

    #[test]
    fn inconsistent_registry_secrets_are_refused_with_what_to_do() {
        let key = with(&[("ssh-privatekey", "k")]);
        let htpasswd = with(&[("htpasswd", "walt:$2y$...")]);
        let orphan = observed(Slot::Present(&key), Slot::Missing, Slot::Present(&htpasswd));
        let refusal = plan(orphan, true, "pw").unwrap_err();
        assert_eq!(refusal, Refusal::HtpasswdWithoutCredentials);
        assert!(refusal.to_string().contains("delete the htpasswd Secret"));
        let docker_only = with(&[(".dockerconfigjson", "{}")]);
        let unreadable = observed(Slot::Present(&key), Slot::Present(&docker_only), Slot::Missing);
        assert_eq!(plan(unreadable, true, "pw"), Err(Refusal::CredentialsUnreadable));
    }

    #[test]
    fn created_secrets_have_the_charts_shape() {
        let secret = registry_credentials_secret("c", "ns", "reg:5000", "walt", "s3cret");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let document = secret_key(&secret, ".dockerconfigjson").expect("dockerconfigjson");
        let found = super::super::config::credentials_from_docker_config(&document, "reg:5000")
            .expect("parses")
            .expect("has the host");
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("walt", "s3cret")
        );
        assert_eq!(secret_key(&secret, "password"), Some(b"s3cret".to_vec()));
        let annotations = secret.metadata.annotations.expect("annotations");
        assert_eq!(annotations[CREATED_BY_ANNOTATION], "walt-operator");

        let key = node_key_secret("k", "ns", "PRIVATE");
        assert_eq!(key.type_.as_deref(), Some("kubernetes.io/ssh-auth"));
        assert_eq!(secret_key(&key, "ssh-privatekey"), Some(b"PRIVATE".to_vec()));

        let htpasswd = htpasswd_secret("h", "ns", "walt:$2b$hash\n", "s3cret");
        assert_eq!(
            secret_key(&htpasswd, "password-sha256"),
            Some(hex::encode(Sha256::digest(b"s3cret")).into_bytes())
        );
    }

    #[test]
    fn random_passwords_are_long_and_differ() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
