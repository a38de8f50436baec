//! Per-Device SSH host keys: each network-booted Device (`spec.firmware`) whose host key no lab admin
//! pinned (`spec.hostKey`) gets an ed25519 key of its own, made by the operator in a Secret of its
//! namespace ([`walt_crds::host_key_secret_name`], labelled [`walt_crds::HOST_KEY_LABEL`], owned by
//! the Device so it goes with it), created when missing and never overwritten. Its public key is
//! recorded in the Device's `status.hostKey` (what `kubectl walt device show` shows and the
//! operator's SSH client enforces: [`walt_crds::Device::enforced_host_key`]); the boot service
//! watches these Secrets and serves the key in the device's top layer, so the device answers with
//! it from its first boot and nobody trusts a key on first use.
//!
//! The decisions are pure ([`secret_step`], [`recorded_key`], [`ownership`], [`host_key_of`]); the
//! I/O is [`ensure`].

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use walt_crds::{Device, HOST_KEY_LABEL, host_key_secret_name};

use crate::boot::node_layer::HostKey;
use crate::controller::shared::context::{Context, MANAGED_BY, MANAGED_BY_LABEL};
use crate::controller::shared::error::{Error, Result};

use super::reasons;

/// The Secret's key holding the private key (OpenSSH), as in `kubernetes.io/ssh-auth` Secrets.
pub const PRIVATE_KEY: &str = "ssh-privatekey";
/// The Secret's key holding the public key line (for people; walt derives it from the private key).
pub const PUBLIC_KEY: &str = "ssh-publickey";
/// The Secret's type.
pub const SECRET_TYPE: &str = "kubernetes.io/ssh-auth";

/// Whose a Secret under a Device's host key name is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// This very Device's (an owner reference with its uid).
    Ours,
    /// A former Device of the same name's (deleted, its Secret not collected yet): replaced.
    Stale {
        /// The Secret's uid (the delete is conditional on it).
        uid: Option<String>,
    },
    /// Not a Device's: never touched, never served.
    Foreign,
}

/// Whose `secret` is, for `device` (pure).
pub fn ownership(secret: &Secret, device: &Device) -> Ownership {
    let name = device.name_any();
    let device_refs: Vec<&OwnerReference> = secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == "Device" && o.api_version.starts_with("walt.dev/") && o.name == name)
        .collect();
    if device_refs
        .iter()
        .any(|o| device.uid().as_deref() == Some(o.uid.as_str()))
    {
        Ownership::Ours
    } else if device_refs.is_empty() {
        Ownership::Foreign
    } else {
        Ownership::Stale { uid: secret.uid() }
    }
}

/// Whether walt makes and serves a host key for `device` (pure): it is registered (a device the boot
/// service recorded boots nothing: a flood of made-up MACs makes no Secrets) and network-boots
/// (`firmware`), no admin pinned a key of its own, and it is not being deleted.
pub fn wants_key(device: &Device) -> bool {
    device.is_registered()
        && device.spec.firmware.is_some()
        && device.spec.host_key.is_none()
        && device.metadata.deletion_timestamp.is_none()
}

/// Whether the Device's host key Secret is to be read at all (pure): walt keys it, or its status
/// still records a key (to clear when no longer served). Most Devices cost no request.
pub fn needs_look(device: &Device) -> bool {
    wants_key(device) || device.status.as_ref().is_some_and(|s| s.host_key.is_some())
}

/// What to do with a Device's host key Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretStep {
    /// Nothing (present and ours, or not wanted).
    Keep,
    /// Create it (a new key).
    Create,
    /// Delete a former Device's Secret (by uid), then create ours.
    Replace {
        /// The stale Secret's uid.
        uid: Option<String>,
    },
    /// Another Secret holds the name: leave it, make and serve no key, say so.
    Blocked,
}

/// The step for `device` given the Secret under its host key name (pure). A Secret that exists is
/// never changed: only a former Device's is replaced.
pub fn secret_step(device: &Device, secret: Option<&Secret>) -> SecretStep {
    if !wants_key(device) {
        return SecretStep::Keep;
    }
    match secret.map(|s| ownership(s, device)) {
        None => SecretStep::Create,
        Some(Ownership::Ours) => SecretStep::Keep,
        Some(Ownership::Stale { uid }) => SecretStep::Replace { uid },
        Some(Ownership::Foreign) => SecretStep::Blocked,
    }
}

/// A host key Secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the host key Secret {secret}: {reason}")]
pub struct BadSecret {
    /// The Secret's name.
    pub secret: String,
    /// What is wrong.
    pub reason: String,
}

/// The host key a Secret holds (pure): its private key, and the public key derived from it (so the
/// key served and the key enforced cannot differ).
pub fn host_key_of(secret: &Secret) -> std::result::Result<HostKey, BadSecret> {
    let bad = |reason: String| BadSecret {
        secret: secret.name_any(),
        reason,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(PRIVATE_KEY))
        .ok_or_else(|| bad(format!("no {PRIVATE_KEY}")))?;
    let key = crate::ssh::client::decode_key(&bytes.0).map_err(|e| bad(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| bad(format!("encoding its public key: {e}")))?;
    let private = String::from_utf8(bytes.0.clone()).map_err(|_| bad("not text".into()))?;
    Ok(HostKey { private, public })
}

/// Whether two OpenSSH public key lines hold the same key (type and key; comments aside).
fn same_key(a: &str, b: &str) -> bool {
    a.split_whitespace().take(2).eq(b.split_whitespace().take(2))
}

/// The key walt serves `device` from `secret`, if any (pure): the Secret must be the Device's own, the
/// Device network-booted, and a key the admin pinned (`spec.hostKey`) must be that very key (else the
/// device keeps its own and walt serves none). The boot service and `status.hostKey` both follow it.
pub fn served_key(device: &Device, secret: &Secret) -> Option<HostKey> {
    if device.spec.firmware.is_none() || ownership(secret, device) != Ownership::Ours {
        return None;
    }
    let key = host_key_of(secret).ok()?;
    match &device.spec.host_key {
        Some(pinned) if !same_key(pinned, &key.public) => None,
        _ => Some(key),
    }
}

/// What the Device's `status.hostKey` should say (pure): the public key walt serves it.
pub fn recorded_key(device: &Device, secret: Option<&Secret>) -> Option<String> {
    secret
        .and_then(|secret| served_key(device, secret))
        .map(|key| key.public.trim().to_owned())
}

/// A new host key Secret for `device` in `namespace`: a fresh ed25519 key (comment: the device's
/// name), owned by the Device.
pub fn new_secret(device: &Device, namespace: &str) -> Result<Secret> {
    let name = device.name_any();
    let mut key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
        .map_err(|error| Error::Config(format!("generating a host key for the Device {name}: {error}")))?;
    key.set_comment(name.as_str());
    let private = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|error| Error::Config(format!("encoding the host key of the Device {name}: {error}")))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|error| Error::Config(format!("encoding the host key of the Device {name}: {error}")))?;
    let owner = OwnerReference {
        api_version: Device::api_version(&()).into_owned(),
        kind: Device::kind(&()).into_owned(),
        name: name.clone(),
        uid: device.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(host_key_secret_name(&name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (HOST_KEY_LABEL.to_owned(), "true".to_owned()),
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([("walt.dev/device".to_owned(), name)])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([
            (PRIVATE_KEY.to_owned(), ByteString(private.as_bytes().to_vec())),
            (
                PUBLIC_KEY.to_owned(),
                ByteString(format!("{public}\n").into_bytes()),
            ),
        ])),
        ..Secret::default()
    })
}

/// Makes the Device's host key Secret when it is missing ([`secret_step`]) and keeps its
/// `status.hostKey` what [`recorded_key`] says; Events `HostKeyCreated` (with the fingerprint) and
/// `HostKeySecretNotOurs`.
pub async fn ensure(context: &Context, device: &Device) -> Result<()> {
    if !needs_look(device) {
        return Ok(());
    }
    let name = device.name_any();
    let namespace = &context.config.args.namespace;
    let secret_name = host_key_secret_name(&name);
    let api = Api::<Secret>::namespaced(context.client.clone(), namespace);
    let read =
        |action: &str| format!("{action} the host key Secret {namespace}/{secret_name} of the Device {name}");
    let mut secret = api
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::kube(read("reading"), source))?;
    match secret_step(device, secret.as_ref()) {
        SecretStep::Keep => {}
        SecretStep::Blocked => {
            let note = format!(
                "the Secret {namespace}/{secret_name} is not the Device's own (no owner reference to it): walt makes \
                 and serves no host key for {name} while it is there; delete or rename it"
            );
            tracing::warn!(device = %name, "{note}");
            context
                .event(
                    device,
                    EventType::Warning,
                    reasons::HOST_KEY_SECRET_NOT_OURS,
                    "HostKey",
                    note,
                )
                .await;
        }
        step @ (SecretStep::Create | SecretStep::Replace { .. }) => {
            if let SecretStep::Replace { uid } = step {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid,
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&secret_name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(source) => return Err(Error::kube(read("deleting the former Device's"), source)),
                }
            }
            let new = new_secret(device, namespace)?;
            secret = Some(match api.create(&PostParams::default(), &new).await {
                Ok(made) => {
                    let public = recorded_key(device, Some(&made)).unwrap_or_default();
                    let fingerprint = crate::ssh::client::parse_public_key(&public)
                        .map(|key| crate::ssh::client::fingerprint(&key))
                        .unwrap_or_default();
                    let note = format!(
                        "made the SSH host key {fingerprint} of the Device {name} (Secret {namespace}/{secret_name}): \
                         the boot service serves it to the device, the operator accepts no other"
                    );
                    tracing::info!(device = %name, %fingerprint, "host key made");
                    context
                        .event(
                            device,
                            EventType::Normal,
                            reasons::HOST_KEY_CREATED,
                            "HostKey",
                            note,
                        )
                        .await;
                    made
                }
                // Another replica made it first: take it as it is.
                Err(kube::Error::Api(status)) if status.code == 409 => api
                    .get(&secret_name)
                    .await
                    .map_err(|source| Error::kube(read("reading"), source))?,
                Err(source) => return Err(Error::kube(read("creating"), source)),
            });
        }
    }
    let wanted = recorded_key(device, secret.as_ref());
    let current = device.status.as_ref().and_then(|s| s.host_key.clone());
    if wanted != current {
        let patch = serde_json::json!({"status": {"hostKey": wanted}});
        Api::<Device>::all(context.client.clone())
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::kube(format!("recording the host key of the Device {name}"), source))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceSpec, DeviceStatus, Firmware};

    fn device(firmware: Option<Firmware>, pinned: Option<&str>) -> Device {
        let mut device = Device::new(
            "pc1",
            DeviceSpec {
                address: Some("10.0.0.11".into()),
                model: "pc-x86-64".into(),
                mac: Some("52:54:00:00:00:01".into()),
                firmware,
                host_key: pinned.map(str::to_owned),
                ..DeviceSpec::default()
            },
        );
        device.metadata.uid = Some("uid-1".into());
        device
    }

    fn made(device: &Device) -> Secret {
        new_secret(device, "walt-system").expect("a new key")
    }

    #[test]
    fn a_network_booted_device_gets_a_key_it_owns_and_a_pinned_or_plain_one_none() {
        let pc = device(Some(Firmware::Ipxe), None);
        assert_eq!(secret_step(&pc, None), SecretStep::Create);
        let secret = made(&pc);
        assert_eq!(secret.metadata.name.as_deref(), Some("walt-hostkey-pc1"));
        assert_eq!(
            secret.labels().get(HOST_KEY_LABEL).map(String::as_str),
            Some("true")
        );
        let owner = &secret.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Device", "pc1", "uid-1")
        );
        assert_eq!(ownership(&secret, &pc), Ownership::Ours);
        assert_eq!(
            secret_step(&pc, Some(&secret)),
            SecretStep::Keep,
            "never overwritten"
        );
        let key = host_key_of(&secret).expect("readable");
        assert!(key.public.starts_with("ssh-ed25519 "), "{}", key.public);
        assert_eq!(
            recorded_key(&pc, Some(&secret)).as_deref(),
            Some(key.public.trim())
        );
        assert_eq!(
            secret_step(&device(None, None), None),
            SecretStep::Keep,
            "not network-booted: no key"
        );
        assert_eq!(
            secret_step(&device(Some(Firmware::Rpi), Some("ssh-ed25519 AAAA")), None),
            SecretStep::Keep,
            "the admin pinned the device's own key"
        );
        let mut recorded = device(Some(Firmware::Rpi), None);
        recorded.spec.address = None;
        assert_eq!(
            secret_step(&recorded, None),
            SecretStep::Keep,
            "a device the boot service recorded gets none until registered"
        );
        assert!(
            !needs_look(&recorded) && !needs_look(&device(None, None)),
            "no request for those"
        );
        let mut was_keyed = device(None, None);
        was_keyed.status = Some(DeviceStatus {
            host_key: Some("ssh-ed25519 AAAA".into()),
            ..DeviceStatus::default()
        });
        assert!(needs_look(&was_keyed), "its recorded key is to be cleared");
    }

    #[test]
    fn a_former_devices_secret_is_replaced_and_a_foreign_one_left_alone() {
        let pc = device(Some(Firmware::Ipxe), None);
        let mut former = made(&pc);
        former.metadata.uid = Some("secret-uid".into());
        former.metadata.owner_references.get_or_insert_with(Vec::new)[0].uid = "uid-0".into();
        assert_eq!(
            secret_step(&pc, Some(&former)),
            SecretStep::Replace {
                uid: Some("secret-uid".into())
            }
        );
        assert_eq!(recorded_key(&pc, Some(&former)), None, "its key is not served");
        let mut foreign = made(&pc);
        foreign.metadata.owner_references = None;
        assert_eq!(secret_step(&pc, Some(&foreign)), SecretStep::Blocked);
        assert_eq!(recorded_key(&pc, Some(&foreign)), None);
    }

    #[test]
    fn a_pinned_key_is_served_only_when_it_is_the_secrets_and_status_follows() {
        let pc = device(Some(Firmware::Ipxe), None);
        let secret = made(&pc);
        let public = host_key_of(&secret).expect("key").public;
        let mut same = pc.clone();
        same.spec.host_key = Some(format!(
            "{} another-comment",
            public.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
        ));
        assert!(served_key(&same, &secret).is_some(), "pinned to the very key");
        let mut other = pc.clone();
        other.spec.host_key =
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDVyM7T7Fy8w7L0iYGJm8Hfy7QnSS5n2A4rsdKXxBFH7".into());
        assert_eq!(
            served_key(&other, &secret),
            None,
            "the device keeps the key the admin pinned"
        );
        let mut unbooted = pc.clone();
        unbooted.spec.firmware = None;
        assert_eq!(recorded_key(&unbooted, Some(&secret)), None);
        let mut recorded = pc.clone();
        recorded.status = Some(DeviceStatus {
            host_key: recorded_key(&pc, Some(&secret)),
            ..DeviceStatus::default()
        });
        assert_eq!(
            recorded.enforced_host_key(),
            Some(public.trim()),
            "what the operator enforces"
        );
        assert_eq!(
            other.enforced_host_key(),
            other.spec.host_key.as_deref(),
            "the pinned key wins"
        );
    }

    #[test]
    fn a_secret_without_a_readable_key_says_so() {
        let mut secret = made(&device(Some(Firmware::Ipxe), None));
        secret.data = Some(BTreeMap::from([(
            PRIVATE_KEY.to_owned(),
            ByteString(b"garbage".to_vec()),
        )]));
        let error = host_key_of(&secret).expect_err("garbage");
        assert!(error.to_string().contains("walt-hostkey-pc1"), "{error}");
        secret.data = None;
        assert!(
            host_key_of(&secret)
                .expect_err("empty")
                .to_string()
                .contains(PRIVATE_KEY)
        );
    }
}
