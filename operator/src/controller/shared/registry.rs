//! The lab registry as every kind sees it: the one client, where an Image lives in it, pinned
//! references, and the credentials Secret pods of a namespace mount.

use k8s_openapi::api::core::v1::{Secret, SecretVolumeSource, Volume, VolumeMount};
use kube::api::ObjectMeta;
use kube::{Api, ResourceExt};
use walt_crds::{Image, ImageName};

use super::context::{Context, MANAGED_BY, MANAGED_BY_LABEL};
use super::error::{Error, Result};
use crate::oci::token_issuer::TENANT_USER_PREFIX;
use crate::oci::{ClientOptions, Credentials, RegistryClient};

/// Annotation that asks for an immediate re-resolve (its value changes
/// each time; the operator sets it after moving the image's tag).
pub const RESOLVE_ANNOTATION: &str = "walt.dev/resolve-requested";

/// The lab reference of an Image: `spec.reference`, else the default
/// `<lab registry>/<namespace>/<name>:<tag>` (pure).
pub fn lab_reference(image: &Image, lab_registry: &str) -> Result<String> {
    if let Some(reference) = image.spec.reference.as_deref().filter(|r| !r.trim().is_empty()) {
        return Ok(reference.trim().to_owned());
    }
    let name = ImageName::from_object_name(&image.name_any()).map_err(|error| {
        Error::Invalid(format!(
            "{error}; the Image object name must be an image name (`name`, or `name.tag` for `name:tag`), or set spec.reference"
        ))
    })?;
    Ok(name.default_reference(lab_registry, &image.namespace().unwrap_or_default()))
}

/// `repository@digest` of a resolved Image, from its status (pure).
pub fn pinned_reference_of(image: &Image) -> Option<String> {
    let status = image.status.as_ref()?;
    let digest = status.digest.as_deref()?;
    let reference = status.reference.as_deref()?;
    Some(pinned_reference(reference, digest))
}

/// Name of the per-tenant Secret with that tenant's registry credential, in its runtime namespace,
/// which its shell and virtual node pods mount (never the lab's: see [`ensure_registry_secret`]).
pub const REGISTRY_SECRET: &str = "walt-registry-credentials";

/// The registry credentials volume (the namespace's copy of the lab Secret,
/// projected as `config.json` so OCI clients find it through `DOCKER_CONFIG`).
pub fn registry_credentials_volume() -> Volume {
    Volume {
        name: "registry".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(REGISTRY_SECRET.into()),
            items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                key: ".dockerconfigjson".into(),
                path: "config.json".into(),
                ..Default::default()
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// Where [`registry_credentials_volume`] is mounted.
pub fn registry_credentials_mount() -> VolumeMount {
    VolumeMount {
        name: "registry".into(),
        mount_path: "/etc/walt/registry".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// Repository part of a reference (`host/path:tag` or `…@sha256:…` → `host/path`).
pub fn repository_of(reference: &str) -> &str {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

/// `repository@digest` of a reference and a digest.
pub fn pinned_reference(reference: &str, digest: &str) -> String {
    format!("{}@{digest}", repository_of(reference))
}

/// Annotation an operator puts on an Image when its new digest must not
/// reboot the nodes that boot it (a NodeSave with `rebootNodes: false`).
pub const NO_REBOOT_ANNOTATION: &str = "walt.dev/no-reboot-digest";

/// Writes the registry credential of tenant namespace `tenant` as [`REGISTRY_SECRET`] into the
/// namespace `into` where its pods run and mount it: its runtime namespace (`walt-run-<tenant>`, for
/// shells, builds and virtual nodes; the tenant cannot read Secrets there). User `tenant/<tenant>` and the password the token issuer derives for
/// it, which gets tokens for `<prefix>/<tenant>/…` (pull, push) and the catalog (pull) only. Without a
/// token issuer nothing is written (the lab credential never leaves the operator's namespace) and pods
/// use the registry anonymously. Returns whether there is a credential to mount.
pub async fn ensure_registry_secret(context: &Context, tenant: &str, into: &str) -> Result<bool> {
    let Some(issuer) = &context.config.token_issuer else {
        return Ok(false);
    };
    let user = format!("{TENANT_USER_PREFIX}{tenant}");
    let password = issuer.tenant_password(tenant);
    let mut secret = tenant_registry_secret(&context.config.registry_host, into, &user, &password);
    if let Some(labels) = secret.metadata.labels.as_mut() {
        labels.insert(walt_crds::runtime::TENANT_LABEL.to_owned(), tenant.to_owned());
    }
    context
        .apply(&Api::<Secret>::namespaced(context.client.clone(), into), &secret)
        .await?;
    Ok(true)
}

/// The [`REGISTRY_SECRET`] of `namespace` (pure): a `kubernetes.io/dockerconfigjson` for `host`.
pub fn tenant_registry_secret(host: &str, namespace: &str, user: &str, password: &str) -> Secret {
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{user}:{password}"),
    );
    let document = serde_json::json!({"auths": {host: {"auth": auth}}});
    Secret {
        metadata: ObjectMeta {
            name: Some(REGISTRY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        string_data: Some([(".dockerconfigjson".to_owned(), document.to_string())].into()),
        ..Secret::default()
    }
}

/// The registry client for the lab registry: its credentials, plain HTTP
/// when `--registry-plain-http`. One client for the whole process (a client
/// per reconcile cost its own connection pool and TLS roots: hundreds of
/// MiB with thousands of Images).
pub fn registry_client(context: &Context) -> Result<RegistryClient> {
    if let Some(client) = context.lab_registry.get() {
        return Ok(client.clone());
    }
    let client = registry_client_with(context, Credentials::default())?;
    Ok(context.lab_registry.get_or_init(|| client).clone())
}

/// The registry client for the lab registry (its credentials, plain HTTP
/// when `--registry-plain-http`) and for clone sources (`source_credentials`
/// from the Image's pull secret, plain HTTP for `--plain-http-sources`).
pub fn registry_client_with(context: &Context, source_credentials: Credentials) -> Result<RegistryClient> {
    let host = &context.config.registry_host;
    let credentials = match &context.config.registry_credentials {
        Some(credentials) => {
            Credentials::default().with_basic(host, &credentials.username, &credentials.password)
        }
        None => Credentials::default(),
    }
    .merged(source_credentials);
    let mut insecure_registries = context.config.args.plain_http_sources.clone();
    if context.config.args.registry_plain_http {
        insecure_registries.push(host.clone());
    }
    RegistryClient::new(ClientOptions {
        credentials,
        insecure_registries,
        timeout: Some(context.config.args.registry_timeout),
    })
    .map_err(|error| Error::Registry(format!("creating the client of the lab registry {host}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::ImageSpec;

    fn image(name: &str, reference: Option<&str>) -> Image {
        let mut image = Image::new(
            name,
            ImageSpec {
                reference: reference.map(str::to_owned),
                ..ImageSpec::default()
            },
        );
        image.metadata.namespace = Some("alice".into());
        image.metadata.generation = Some(3);
        image
    }

    #[test]
    fn default_and_explicit_references() {
        assert_eq!(
            lab_reference(&image("debian", None), "127.0.0.1:5000").expect("valid"),
            "127.0.0.1:5000/alice/debian:latest"
        );
        assert_eq!(
            lab_reference(&image("debian.v2", None), "reg.lab/walt").expect("valid"),
            "reg.lab/walt/alice/debian:v2"
        );
        assert_eq!(
            lab_reference(&image("x", Some("other.lab/y:1")), "reg").expect("valid"),
            "other.lab/y:1"
        );
        let error = lab_reference(&image("default", None), "reg").unwrap_err();
        assert!(matches!(error, Error::Invalid(_)));
    }

    #[test]
    fn a_namespace_secret_holds_its_own_credential_for_the_lab_host() {
        let secret = tenant_registry_secret("reg.lab:5000", "alice", "tenant/alice", "p4ss");
        assert_eq!(secret.metadata.namespace.as_deref(), Some("alice"));
        let document = secret
            .string_data
            .as_ref()
            .and_then(|data| data.get(".dockerconfigjson"))
            .expect("a docker config");
        let document: serde_json::Value = serde_json::from_str(document).expect("json");
        let auth = document["auths"]["reg.lab:5000"]["auth"]
            .as_str()
            .expect("an auth for the lab host");
        let decoded =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, auth).expect("base64");
        assert_eq!(decoded, b"tenant/alice:p4ss");
        assert_eq!(document["auths"].as_object().map(serde_json::Map::len), Some(1));
    }

    #[test]
    fn references() {
        assert_eq!(repository_of("reg.lab:5000/a/b:latest"), "reg.lab:5000/a/b");
        assert_eq!(repository_of("reg.lab:5000/a/b"), "reg.lab:5000/a/b");
        assert_eq!(repository_of("reg.lab/a/b@sha256:1"), "reg.lab/a/b");
        assert_eq!(
            pinned_reference("reg.lab:5000/a/b:v2", "sha256:9"),
            "reg.lab:5000/a/b@sha256:9"
        );
    }
}
