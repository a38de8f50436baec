//! `Device`: a physical device of the lab (cluster-scoped), registered by a lab admin and lent to
//! one namespace at a time; a tenant's Node claims it by name (`Node.spec.device`), like a
//! PersistentVolumeClaim binds a PersistentVolume.
//!
//! Tenants never type a network address: only a Device says where a physical node is, and only lab
//! admins write Devices (RBAC). The operator reaches a device only for the one Node bound to it, in
//! the namespace it is lent to (`Device.status.boundTo`).
//!
//! A device the lab does not know yet that asks walt's boot service for a network boot is recorded
//! as a Device without `spec.address` (labelled [`DISCOVERED_LABEL`], `status.discovered`): the lab
//! admin sees it, registers it (gives it an address) and lends it; until then it boots nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::node::DEFAULT_SSH_PORT;

/// A device of the lab: where it is, what it is, how its identity is checked, and whom it is lent
/// to.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "Device",
    plural = "devices",
    status = "DeviceStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wdev",
    category = "walt",
    doc = "A physical device of the lab (cluster-scoped, written by lab admins only): its address, model \
           and host key. spec.lentTo lends it to one namespace; a Node of that namespace naming it in \
           spec.device is bound to it (status.boundTo), one Node at a time. A device that asked the boot \
           service for a boot while unknown is recorded without spec.address (unregistered, \
           status.discovered): set spec.address to register it.",
    printcolumn = r#"{"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Node model"}"#,
    printcolumn = r#"{"name": "Address", "type": "string", "jsonPath": ".spec.address", "description": "Where the operator reaches the device (empty: unregistered)"}"#,
    printcolumn = r#"{"name": "MAC", "type": "string", "jsonPath": ".spec.mac", "description": "MAC address of the boot interface", "priority": 1}"#,
    printcolumn = r#"{"name": "Lent To", "type": "string", "jsonPath": ".spec.lentTo.namespace", "description": "The namespace the device is lent to"}"#,
    printcolumn = r#"{"name": "Bound To", "type": "string", "jsonPath": ".status.boundTo.node", "description": "The Node bound to the device"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.firmware) || has(self.mac)",
        "message": "spec.firmware needs spec.mac: the boot service knows a device by the MAC address of its boot interface"
    },
    {
        "rule": "!has(self.lentTo) || has(self.address)",
        "message": "an unregistered device (no spec.address) cannot be lent: register it first by setting spec.address (`kubectl walt device register`)"
    }
]))]
pub struct DeviceSpec {
    /// Host name or IP address the operator reaches the device at (no port: see `sshPort`); the
    /// boot service gives it at DHCP time when it is an IPv4 address. Unset: the device is not
    /// registered yet (recorded by the boot service when it asked for a boot): it cannot be lent
    /// and boots nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::host")]
    pub address: Option<String>,
    /// SSH port of the device.
    #[serde(default = "default_ssh_port")]
    #[schemars(schema_with = "crate::schema::tcp_port")]
    pub ssh_port: i32,
    /// Node model (WalT's name for the kind of device: `rpi-3-b`, `rpi-4-b`, `pc-x86-64`, …); a Node
    /// bound to the device gets this model.
    #[schemars(length(min = 1, max = 63))]
    pub model: String,
    /// Pinned SSH host key of the device (one OpenSSH public key line), enforced on every connection.
    /// Unset: the first key seen by the Node bound to it is recorded in that Node's `status.hostKey`
    /// and enforced from then on (pin it: a device changes hands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::public_key")]
    pub host_key: Option<String>,
    /// MAC address of the device's boot interface: the boot service (`walt-operator boot-server`)
    /// knows the device by it at DHCP time and serves its image under
    /// `/var/lib/walt/nodes/<mac>/fs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::mac")]
    pub mac: Option<String>,
    /// The firmware that network-boots the device (see [`Firmware`]). Unset: walt does not
    /// network-boot the device. Needs `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// The lab network the device boots on (the name of a boot service's network, one active boot
    /// service per network). Unset: the lab's default boot network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub boot_network: Option<String>,
    /// The namespace the device is lent to (one at a time). Unset: the device is the lab's and no
    /// Node can use it. Changing it takes the device back: the operator stops reaching it for the
    /// Node of the former namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lent_to: Option<DeviceLoan>,
}

/// The firmware that network-boots the device: `ipxe` (PCs and amd64 VM nodes: DHCP, then
/// `http://SERVER/boot/start.ipxe` and the kernel over HTTP), `rpi` (the Raspberry Pi boot ROM:
/// DHCP option 43 "Raspberry Pi Boot", then TFTP) or `u-boot` (boards and arm64 VM nodes:
/// `start.uboot` over TFTP). Unset: walt does not network-boot the device. Needs `mac`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Firmware {
    /// iPXE (PCs, VM nodes): DHCP, then `start.ipxe` and the kernel over HTTP.
    #[serde(rename = "ipxe")]
    Ipxe,
    /// The Raspberry Pi boot ROM: DHCP with option 43 "Raspberry Pi Boot", then TFTP.
    #[serde(rename = "rpi")]
    Rpi,
    /// U-Boot: DHCP, then `start.uboot` over TFTP.
    #[serde(rename = "u-boot")]
    UBoot,
}

impl Firmware {
    /// The CPU of the VM a VM slot Device with this firmware is: `ipxe` a PC (amd64), `u-boot` an
    /// arm64 board (qemu's `virt` with U-Boot); `rpi` none (no VM has the Raspberry Pi ROM).
    pub fn vm_architecture(self) -> Option<crate::node::Architecture> {
        match self {
            Self::Ipxe => Some(crate::node::Architecture::Amd64),
            Self::UBoot => Some(crate::node::Architecture::Arm64),
            Self::Rpi => None,
        }
    }
}

fn default_ssh_port() -> i32 {
    DEFAULT_SSH_PORT
}

/// Whom a device is lent to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLoan {
    /// The namespace (tenant) whose Nodes may claim the device.
    #[schemars(schema_with = "crate::schema::namespace_name")]
    pub namespace: String,
}

/// The label of the Devices the boot service recorded (value `true`): `kubectl get devices -l
/// walt.dev/discovered` lists them.
pub const DISCOVERED_LABEL: &str = "walt.dev/discovered";

/// The condition a boot service sets on the Devices that claim the same MAC address: `True` while
/// another Device claims it (the boot service serves that MAC nothing), `False` once it is the
/// only one.
pub const MAC_CONFLICT_CONDITION: &str = "MacConflict";

/// The label of the Secrets holding the SSH host keys walt made for network-booted Devices (value
/// `true`), in the operator's namespace; each is owned by its Device (owner reference: name and uid).
pub const HOST_KEY_LABEL: &str = "walt.dev/device-host-key";

/// Longest name of a Kubernetes object such as a Secret (a DNS subdomain).
const MAX_OBJECT_NAME_LEN: usize = 253;

/// The name of the Secret holding the SSH host key walt made for the Device `device` (pure):
/// `walt-hostkey-<device>`, shortened with a hash when longer than an object name may be.
pub fn host_key_secret_name(device: &str) -> String {
    crate::runtime::prefixed_within("walt-hostkey-", device, MAX_OBJECT_NAME_LEN)
}

/// The condition a boot service sets on the network-booted Devices of its lab network that claim
/// the same address: `True` while another Device there claims it (the boot service serves neither),
/// `False` once it is the only one.
pub const ADDRESS_CONFLICT_CONDITION: &str = "AddressConflict";

/// The observed state of a Device: the Node bound to it, and what the boot service saw of it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The Node bound to the device (written by the operator, in the namespace it is lent to). A
    /// binding whose Node is gone, or whose namespace is no longer the one lent to, is stale: the
    /// operator clears it, and a Node of the lent namespace may take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<DeviceBinding>,
    /// What the boot service saw when this device asked for a boot while unknown (Devices it
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovered: Option<DeviceDiscovery>,
    /// The SSH host key walt made for this network-booted device (one OpenSSH public key line,
    /// written by the operator): its private half is in the Secret `walt-hostkey-<device>` of the
    /// operator's namespace, and the boot service serves both in the device's top layer
    /// (`/etc/ssh/ssh_host_ed25519_key`), so the device answers with it and the operator enforces it
    /// on every connection. Unset when `spec.hostKey` pins another key (the device keeps its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::public_key")]
    pub host_key: Option<String>,
    /// Standard conditions: `MacConflict` (written by the boot service: another Device claims the
    /// same MAC address, so neither is served), `AddressConflict` (another network-booted Device of
    /// the same boot network claims the same address, so neither is served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// What the boot service saw of an unknown device's DHCP requests.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDiscovery {
    /// The firmware its request showed: `ipxe` (iPXE: option 175 or user class), `rpi` (the
    /// Raspberry Pi boot ROM's vendor class), `u-boot`, `pxe` (another PXE ROM) or `other` (an
    /// operating system's DHCP client).
    #[schemars(length(max = 16))]
    pub firmware: String,
    /// Its DHCP vendor class (option 60), as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub vendor_class: Option<String>,
    /// Its DHCP user class (option 77), as sent (iPXE: `walt.node.<model>` names its model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub user_class: Option<String>,
    /// The lab network (boot service) it asked on.
    #[schemars(length(max = 63))]
    pub network: String,
    /// Its first request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Time>,
    /// Its latest request (updated at most once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// The address the boot service lent it while it is unregistered (from its network's
    /// `unregisteredAddresses`), to boot the lab's default image of its model; none when the
    /// network lends none (it then boots nothing until a lab admin registers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub address: Option<String>,
}

/// The Node bound to a device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceBinding {
    /// The Node's namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The Node's name.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The Node's uid (a Node deleted and created again under the same name is another claim).
    #[schemars(length(max = 64))]
    pub uid: String,
}

impl Device {
    /// The namespace the device is lent to, if any.
    pub fn lent_to(&self) -> Option<&str> {
        self.spec.lent_to.as_ref().map(|loan| loan.namespace.as_str())
    }

    /// Whether the device is registered (has `spec.address`): one the boot service recorded is not
    /// until a lab admin gives it an address.
    pub fn is_registered(&self) -> bool {
        self.spec.address.is_some()
    }

    /// The device's condition of type `type_`, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == type_))
    }

    /// The device's `MacConflict` condition, if any.
    pub fn mac_conflict(&self) -> Option<&Condition> {
        self.condition(MAC_CONFLICT_CONDITION)
    }

    /// The device's `AddressConflict` condition, if any.
    pub fn address_conflict(&self) -> Option<&Condition> {
        self.condition(ADDRESS_CONFLICT_CONDITION)
    }

    /// The host key the operator enforces on the device (pure): the one a lab admin pinned
    /// (`spec.hostKey`), else the one walt made for it and serves it at boot (`status.hostKey`).
    pub fn enforced_host_key(&self) -> Option<&str> {
        self.spec
            .host_key
            .as_deref()
            .or_else(|| self.status.as_ref().and_then(|s| s.host_key.as_deref()))
    }

    /// The Node bound to the device, if any (stale or not).
    pub fn bound_to(&self) -> Option<&DeviceBinding> {
        self.status.as_ref().and_then(|status| status.bound_to.as_ref())
    }
}
