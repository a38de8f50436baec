//! Who a MAC address and an address belong to, for the boot service fed from the cluster (pure
//! decisions, I/O in [`super::boot_source`]):
//! - [`conflicts`]: registered Devices claiming the same MAC (a lab admin's typo), and
//!   [`address_conflicts`]: network-booted Devices of one boot network claiming the same address
//!   (DHCP would lease it to two devices). The boot service serves such devices nothing, rather
//!   than one of them at random, and says which Devices share what ([`conflict_conditions`]: the
//!   `MacConflict` or `AddressConflict` condition on each, cleared once the conflict is gone). The
//!   API server refuses most such typos first (the admission policies `walt-device-mac-unique` and
//!   `walt-device-address-unique` get every Device as their parameters), but not two writes at
//!   once, a pair made before the policy, or a cluster without it: the conditions cover those.
//! - [`record`]: a MAC no Device claims, asking for a boot, is recorded for the lab admin as an
//!   unregistered Device (WalT registers new devices the same way), within a cap, and boots nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use walt_crds::{
    ADDRESS_CONFLICT_CONDITION, ConditionStatus, DISCOVERED_LABEL, Device, DeviceDiscovery, DeviceSpec,
    DeviceStatus, Firmware, MAC_CONFLICT_CONDITION, new_condition,
};

use super::boot_defaults::{Unregistered, lend, lent_address};
use crate::boot::dhcp::{self, Sighting};
use crate::boot::state::Mac;

/// Reason of `MacConflict=True`.
pub const SHARED_MAC: &str = "SharedMac";
/// Reason of `MacConflict=False` (the conflict is gone).
pub const UNIQUE_MAC: &str = "UniqueMac";
/// Reason of `AddressConflict=True`.
pub const SHARED_ADDRESS: &str = "SharedAddress";
/// Reason of `AddressConflict=False` (the conflict is gone).
pub const UNIQUE_ADDRESS: &str = "UniqueAddress";
/// The model of a recorded device whose request does not name one (WalT's name for it).
pub const UNKNOWN_MODEL: &str = "unknown";
/// A recorded device's `status.discovered.lastSeen` is written at most this often.
pub const TOUCH_EVERY: SignedDuration = SignedDuration::from_mins(1);

/// What several Devices claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A MAC address (lab-wide: one MAC is one network interface).
    Mac(Mac),
    /// An address on a boot network (what authoritative DHCP leases to the device).
    Address {
        /// The address.
        ip: Ipv4Addr,
        /// The boot network.
        network: String,
    },
}

/// The kinds of claims, each with its condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimKind {
    /// MAC addresses: `MacConflict`.
    Mac,
    /// Addresses: `AddressConflict`.
    Address,
}

impl ClaimKind {
    /// The condition type (also the Warning Event's reason).
    pub fn condition(self) -> &'static str {
        match self {
            ClaimKind::Mac => MAC_CONFLICT_CONDITION,
            ClaimKind::Address => ADDRESS_CONFLICT_CONDITION,
        }
    }

    fn shared(self) -> &'static str {
        match self {
            ClaimKind::Mac => SHARED_MAC,
            ClaimKind::Address => SHARED_ADDRESS,
        }
    }

    fn unique(self) -> (&'static str, &'static str) {
        match self {
            ClaimKind::Mac => (
                UNIQUE_MAC,
                "no other Device claims its MAC address: the boot service serves it again",
            ),
            ClaimKind::Address => (
                UNIQUE_ADDRESS,
                "no other Device of its boot network claims its address: the boot service serves it again",
            ),
        }
    }
}

impl Claim {
    /// Its kind.
    pub fn kind(&self) -> ClaimKind {
        match self {
            Claim::Mac(_) => ClaimKind::Mac,
            Claim::Address { .. } => ClaimKind::Address,
        }
    }
}

/// Devices that claim one MAC address, or one address on a boot network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// What they claim.
    pub claim: Claim,
    /// The Devices claiming it, by name, sorted.
    pub devices: Vec<String>,
}

impl Conflict {
    /// Why the Devices are served nothing (journal, logs, conditions).
    pub fn reason(&self) -> String {
        let devices = self.devices.join(", ");
        match &self.claim {
            Claim::Mac(mac) => format!(
                "the MAC address {mac} is claimed by the Devices {devices}: the boot service serves it nothing until \
                 one Device alone claims it (fix spec.mac)"
            ),
            Claim::Address { ip, network } => format!(
                "the address {ip} is claimed by the Devices {devices} on the boot network {network}: the boot service \
                 serves neither until one Device alone claims it (fix spec.address)"
            ),
        }
    }
}

/// The MAC a Device claims, if it names one that parses.
pub fn mac_of(device: &Device) -> Option<Mac> {
    device.spec.mac.as_deref().and_then(|mac| mac.parse().ok())
}

/// The Conflicts of the claims gathered (those more than one Device makes), devices sorted.
fn shared<K: Ord>(claims: BTreeMap<K, Vec<String>>, claim: impl Fn(K) -> Claim) -> Vec<Conflict> {
    claims
        .into_iter()
        .filter(|(_, devices)| devices.len() > 1)
        .map(|(key, mut devices)| {
            devices.sort();
            Conflict {
                claim: claim(key),
                devices,
            }
        })
        .collect()
}

/// The MACs claimed by more than one registered Device (pure). A Device the boot service recorded
/// (unregistered) yields to a registered one with its MAC: that is the lab admin registering it.
pub fn conflicts(devices: &[Device]) -> Vec<Conflict> {
    let mut claims: BTreeMap<Mac, Vec<String>> = BTreeMap::new();
    for device in devices.iter().filter(|d| d.is_registered()) {
        if let Some(mac) = mac_of(device) {
            claims.entry(mac).or_default().push(device.name_any());
        }
    }
    shared(claims, Claim::Mac)
}

/// The IPv4 addresses claimed by more than one network-booted Device (`firmware`) of the boot
/// network `network` (pure; `of_network` tells a Device's network). Devices walt does not network-boot
/// may share an address (devices behind one jump host, told apart by their SSH port).
pub fn address_conflicts(
    devices: &[Device],
    network: &str,
    of_network: impl Fn(&Device) -> &str,
) -> Vec<Conflict> {
    let mut claims: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for device in devices
        .iter()
        .filter(|d| d.spec.firmware.is_some() && of_network(d) == network)
    {
        if let Some(ip) = device.spec.address.as_deref().and_then(|a| a.parse().ok()) {
            claims.entry(ip).or_default().push(device.name_any());
        }
    }
    shared(claims, |ip| Claim::Address {
        ip,
        network: network.to_owned(),
    })
}

/// The MACs the boot service answers nothing, and why (pure): each shared MAC, and the MAC of each
/// Device sharing an address (a MAC conflict's words first).
pub fn refusals(devices: &[Device], conflicts: &[Conflict]) -> HashMap<Mac, String> {
    let mut out = HashMap::new();
    for conflict in conflicts {
        let macs: Vec<Mac> = match &conflict.claim {
            Claim::Mac(mac) => vec![*mac],
            Claim::Address { .. } => devices
                .iter()
                .filter(|d| conflict.devices.contains(&d.name_any()))
                .filter_map(mac_of)
                .collect(),
        };
        for mac in macs {
            let reason = conflict.reason();
            out.entry(mac)
                .and_modify(|why: &mut String| {
                    if conflict.claim.kind() == ClaimKind::Mac {
                        why.clone_from(&reason);
                    }
                })
                .or_insert(reason);
        }
    }
    out
}

/// The conditions of `kind` (`MacConflict` or `AddressConflict`) to write (pure): `True` on each
/// Device of a conflict of that kind, `False` on a Device whose condition says `True` but that no
/// longer shares what it claims; only those that change.
pub fn conflict_conditions(
    devices: &[Device],
    conflicts: &[Conflict],
    kind: ClaimKind,
    now: Timestamp,
) -> Vec<(String, Condition)> {
    let mut writes = Vec::new();
    for device in devices {
        let name = device.name_any();
        let conflict = conflicts
            .iter()
            .find(|c| c.claim.kind() == kind && c.devices.contains(&name));
        let current = device.condition(kind.condition());
        let wanted = match (conflict, current) {
            (Some(conflict), _) => new_condition(
                kind.condition(),
                ConditionStatus::True,
                kind.shared(),
                conflict.reason(),
                device.metadata.generation,
                Time(now),
            ),
            (None, Some(current)) if current.status == ConditionStatus::True.as_str() => {
                let (reason, message) = kind.unique();
                new_condition(
                    kind.condition(),
                    ConditionStatus::False,
                    reason,
                    message,
                    device.metadata.generation,
                    Time(now),
                )
            }
            (None, _) => continue,
        };
        let same = current.is_some_and(|c| {
            c.status == wanted.status && c.reason == wanted.reason && c.message == wanted.message
        });
        if !same {
            writes.push((name, wanted));
        }
    }
    writes
}

/// What to do with a DHCP request from a MAC the boot service does not serve.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Create this unregistered Device (its `status.discovered` written once it exists).
    Create(Box<Device>),
    /// Refresh the recorded Device's `status.discovered` (its latest request).
    Touch {
        /// The Device.
        device: String,
        /// Its new `status.discovered`.
        discovered: DeviceDiscovery,
    },
    /// A Device claims the MAC (registered, or recorded and seen within [`TOUCH_EVERY`]): nothing.
    Known,
    /// `cap` unregistered Devices exist already: not recorded (a flood of made-up MACs cannot
    /// create objects without bound).
    Full {
        /// The cap.
        cap: usize,
    },
}

/// The name of the Device recorded for a MAC: `unknown-` and its twelve hex digits (one Device per
/// MAC, whatever the number of requests).
pub fn recorded_name(mac: Mac) -> String {
    format!("unknown-{}", mac.to_string().replace(':', ""))
}

/// Whether a Device is one the boot service recorded and the lab admin has not registered yet.
pub fn is_recorded(device: &Device) -> bool {
    !device.is_registered() && device.labels().get(DISCOVERED_LABEL).is_some_and(|v| v == "true")
}

/// The firmware a request shows, as `status.discovered.firmware` and `spec.firmware` say it.
fn firmware_names(firmware: &dhcp::Firmware) -> (&'static str, Option<Firmware>) {
    match firmware {
        dhcp::Firmware::Ipxe(_) => ("ipxe", Some(Firmware::Ipxe)),
        dhcp::Firmware::Rpi => ("rpi", Some(Firmware::Rpi)),
        dhcp::Firmware::Uboot => ("u-boot", Some(Firmware::UBoot)),
        dhcp::Firmware::Pxe => ("pxe", None),
        dhcp::Firmware::Other => ("other", None),
    }
}

/// Decides what a request from an unserved MAC records (pure): `devices` are the lab's Devices (and
/// those this service created that its watch has not shown yet), `network` the boot service's,
/// `cap` the most unregistered Devices the lab keeps (0: record nothing).
pub fn record(
    sighting: &Sighting,
    devices: &[Device],
    network: &str,
    cap: usize,
    unregistered: &Unregistered,
    now: Timestamp,
) -> Record {
    let (firmware_name, firmware) = firmware_names(&sighting.firmware);
    let discovered = |first_seen: Option<Time>, address: Option<String>| DeviceDiscovery {
        firmware: firmware_name.to_owned(),
        vendor_class: sighting.vendor_class.clone(),
        user_class: sighting.user_class.clone(),
        network: network.to_owned(),
        first_seen: first_seen.or(Some(Time(now))),
        last_seen: Some(Time(now)),
        address,
    };
    // The address lent to a recorded device whose model has a default image (it boots that): kept
    // while it is still in the pool, else the lowest free one.
    let lent = |device: Option<&Device>, model: &str| {
        let pool = unregistered.pool.as_ref()?;
        unregistered.images.of(model)?;
        device
            .and_then(lent_address)
            .filter(|address| pool.contains(*address))
            .or_else(|| lend(pool, devices, network))
            .map(|address| address.to_string())
    };
    if let Some(device) = devices.iter().find(|d| mac_of(d) == Some(sighting.mac)) {
        let last = device.status.as_ref().and_then(|s| s.discovered.as_ref());
        let stale = last
            .and_then(|d| d.last_seen.as_ref())
            .is_none_or(|seen| now.duration_since(seen.0) >= TOUCH_EVERY);
        let address = lent(Some(device), &device.spec.model);
        let lends_anew = address.is_some() && address != last.and_then(|d| d.address.clone());
        if !is_recorded(device) || !(stale || lends_anew) {
            return Record::Known;
        }
        return Record::Touch {
            device: device.name_any(),
            discovered: discovered(last.and_then(|d| d.first_seen.clone()), address),
        };
    }
    let recorded = devices.iter().filter(|d| is_recorded(d)).count();
    if recorded >= cap {
        return Record::Full { cap };
    }
    let model = match &sighting.firmware {
        dhcp::Firmware::Ipxe(Some(model)) if valid_model(model) => model.clone(),
        _ => UNKNOWN_MODEL.to_owned(),
    };
    let address = lent(None, &model);
    let mut device = Device::new(
        &recorded_name(sighting.mac),
        DeviceSpec {
            address: None,
            ssh_port: walt_crds::DEFAULT_SSH_PORT,
            model,
            mac: Some(sighting.mac.to_string()),
            firmware,
            boot_network: (network != "default").then(|| network.to_owned()),
            ..DeviceSpec::default()
        },
    );
    device
        .labels_mut()
        .insert(DISCOVERED_LABEL.to_owned(), "true".to_owned());
    device.status = Some(DeviceStatus {
        discovered: Some(discovered(None, address)),
        ..DeviceStatus::default()
    });
    Record::Create(Box::new(device))
}

/// Whether a model named by a request fits `spec.model` (1 to 63 characters of a host name label):
/// the request is the device's word, anything else is recorded as [`UNKNOWN_MODEL`].
fn valid_model(model: &str) -> bool {
    (1..=63).contains(&model.len())
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::super::boot_defaults::DefaultImages;
    use super::*;
    use walt_crds::DeviceLoan;

    fn mac(last: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0xaa, 0, last])
    }

    fn registered(name: &str, mac: Mac) -> Device {
        Device::new(
            name,
            DeviceSpec {
                address: Some("10.0.0.11".into()),
                model: "pc-x86-64".into(),
                mac: Some(mac.to_string()),
                firmware: Some(Firmware::Ipxe),
                lent_to: Some(DeviceLoan {
                    namespace: "lab".into(),
                }),
                ..DeviceSpec::default()
            },
        )
    }

    fn sighting(mac: Mac, firmware: dhcp::Firmware) -> Sighting {
        Sighting {
            mac,
            firmware,
            vendor_class: Some("PXEClient:Arch:00000:UNDI:002001".into()),
            user_class: None,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("time")
    }

    #[test]
    fn two_registered_devices_with_one_mac_conflict_and_a_recorded_one_yields() {
        let recorded = match record(
            &sighting(mac(1), dhcp::Firmware::Rpi),
            &[],
            "default",
            10,
            &Unregistered::default(),
            at(0),
        ) {
            Record::Create(device) => *device,
            other => panic!("{other:?}"),
        };
        let devices = [
            registered("pc-b", mac(1)),
            registered("pc-a", mac(1)),
            registered("pc-c", mac(2)),
            recorded.clone(),
        ];
        let found = conflicts(&devices);
        assert_eq!(
            found,
            vec![Conflict {
                claim: Claim::Mac(mac(1)),
                devices: vec!["pc-a".into(), "pc-b".into()]
            }]
        );
        assert!(
            found[0]
                .reason()
                .contains("52:54:00:aa:00:01 is claimed by the Devices pc-a, pc-b"),
            "{}",
            found[0].reason()
        );
        assert_eq!(
            conflicts(&[registered("pc-a", mac(1)), recorded]),
            vec![],
            "registering a recorded device is no conflict"
        );
    }

    #[test]
    fn conflict_conditions_are_set_on_both_then_cleared_and_not_rewritten() {
        let mut devices = vec![registered("pc-a", mac(1)), registered("pc-b", mac(1))];
        let writes = conflict_conditions(&devices, &conflicts(&devices), ClaimKind::Mac, at(0));
        assert_eq!(writes.len(), 2);
        for (name, condition) in &writes {
            assert_eq!(condition.status, "True", "{name}");
            assert_eq!(condition.reason, SHARED_MAC);
            assert!(condition.message.contains("pc-a, pc-b"), "{}", condition.message);
        }
        for (device, (_, condition)) in devices.iter_mut().zip(writes) {
            device.status.get_or_insert_with(Default::default).conditions = vec![condition];
        }
        assert_eq!(
            conflict_conditions(&devices, &conflicts(&devices), ClaimKind::Mac, at(5)),
            vec![],
            "written once"
        );
        devices.pop();
        let cleared = conflict_conditions(&devices, &conflicts(&devices), ClaimKind::Mac, at(10));
        assert_eq!(cleared.len(), 1);
        assert_eq!(
            (cleared[0].0.as_str(), cleared[0].1.status.as_str()),
            ("pc-a", "False")
        );
        assert_eq!(cleared[0].1.reason, UNIQUE_MAC);
        assert_eq!(
            conflict_conditions(&[registered("pc-c", mac(3))], &[], ClaimKind::Mac, at(0)),
            vec![],
            "no condition on a Device that never conflicted"
        );
    }

    fn at_address(name: &str, last: u8, address: &str, network: Option<&str>) -> Device {
        let mut device = registered(name, mac(last));
        device.spec.address = Some(address.into());
        device.spec.boot_network = network.map(str::to_owned);
        device
    }

    fn network(device: &Device) -> &str {
        device.spec.boot_network.as_deref().unwrap_or("default")
    }

    #[test]
    fn two_network_booted_devices_with_one_address_on_one_network_conflict() {
        let mut plain = at_address("ssh-only", 9, "10.0.0.5", None);
        plain.spec.firmware = None;
        let devices = [
            at_address("pc-b", 1, "10.0.0.5", None),
            at_address("pc-a", 2, "10.0.0.5", Some("default")),
            at_address("pc-c", 3, "10.0.0.6", None),
            at_address("lab2-a", 4, "10.0.0.5", Some("lab2")),
            plain,
        ];
        let found = address_conflicts(&devices, "default", network);
        assert_eq!(
            found,
            vec![Conflict {
                claim: Claim::Address {
                    ip: Ipv4Addr::new(10, 0, 0, 5),
                    network: "default".into()
                },
                devices: vec!["pc-a".into(), "pc-b".into()]
            }],
            "another network's device, and one walt does not network-boot, are no conflict"
        );
        assert!(
            found[0].reason().contains(
                "the address 10.0.0.5 is claimed by the Devices pc-a, pc-b on the boot network default"
            ),
            "{}",
            found[0].reason()
        );
        assert_eq!(address_conflicts(&devices, "lab2", network), vec![]);
        let refused = refusals(&devices, &found);
        assert_eq!(refused.len(), 2, "both MACs answered nothing: {refused:?}");
        assert!(refused[&mac(1)].contains("pc-a, pc-b"));
        assert!(!refused.contains_key(&mac(3)));
        let mut both = found.clone();
        both.extend(conflicts(&[registered("x", mac(1)), registered("y", mac(1))]));
        assert!(
            refusals(&devices, &both)[&mac(1)].contains("the MAC address"),
            "a shared MAC is said first"
        );
    }

    #[test]
    fn address_conditions_are_set_on_both_then_cleared_and_mac_conditions_left_alone() {
        let mut devices = vec![
            at_address("pc-a", 1, "10.0.0.5", None),
            at_address("pc-b", 2, "10.0.0.5", None),
        ];
        let found = address_conflicts(&devices, "default", network);
        assert_eq!(
            conflict_conditions(&devices, &found, ClaimKind::Mac, at(0)),
            vec![],
            "no MAC condition for a shared address"
        );
        let writes = conflict_conditions(&devices, &found, ClaimKind::Address, at(0));
        assert_eq!(writes.len(), 2);
        for (name, condition) in &writes {
            assert_eq!(
                (
                    condition.type_.as_str(),
                    condition.status.as_str(),
                    condition.reason.as_str()
                ),
                (ADDRESS_CONFLICT_CONDITION, "True", SHARED_ADDRESS),
                "{name}"
            );
        }
        for (device, (_, condition)) in devices.iter_mut().zip(writes) {
            device.status.get_or_insert_with(Default::default).conditions = vec![condition];
        }
        devices[1].spec.address = Some("10.0.0.7".into());
        let found = address_conflicts(&devices, "default", network);
        let cleared = conflict_conditions(&devices, &found, ClaimKind::Address, at(10));
        assert_eq!(cleared.len(), 2, "both cleared once one address changed");
        assert!(
            cleared
                .iter()
                .all(|(_, c)| c.status == "False" && c.reason == UNIQUE_ADDRESS)
        );
    }

    #[test]
    fn an_unknown_mac_is_recorded_as_an_unregistered_device_that_boots_nothing() {
        let Record::Create(device) = record(
            &sighting(mac(7), dhcp::Firmware::Rpi),
            &[registered("pc-a", mac(1))],
            "lab2",
            10,
            &Unregistered::default(),
            at(0),
        ) else {
            panic!("created");
        };
        assert_eq!(device.name_any(), "unknown-525400aa0007");
        assert!(is_recorded(&device) && !device.is_registered());
        assert_eq!(device.spec.mac.as_deref(), Some("52:54:00:aa:00:07"));
        assert_eq!(device.spec.firmware, Some(Firmware::Rpi));
        assert_eq!(device.spec.boot_network.as_deref(), Some("lab2"));
        assert_eq!(device.spec.model, UNKNOWN_MODEL);
        assert_eq!(device.lent_to(), None, "lent to nobody: nothing boots it");
        let discovered = device
            .status
            .as_ref()
            .and_then(|s| s.discovered.clone())
            .expect("discovered");
        assert_eq!(discovered.firmware, "rpi");
        assert_eq!(discovered.network, "lab2");
        assert_eq!(discovered.first_seen, Some(Time(at(0))));
        let Record::Create(ipxe) = record(
            &Sighting {
                mac: mac(8),
                firmware: dhcp::Firmware::Ipxe(Some("pc-x86-64".into())),
                vendor_class: None,
                user_class: Some("walt.node.pc-x86-64".into()),
            },
            &[],
            "default",
            10,
            &Unregistered::default(),
            at(0),
        ) else {
            panic!("created");
        };
        assert_eq!(
            ipxe.spec.model, "pc-x86-64",
            "the iPXE user class names the model"
        );
        assert_eq!(ipxe.spec.boot_network, None, "the default network");
        let Record::Create(os) = record(
            &sighting(mac(9), dhcp::Firmware::Other),
            &[],
            "default",
            10,
            &Unregistered::default(),
            at(0),
        ) else {
            panic!("created");
        };
        assert_eq!(os.spec.firmware, None, "not a firmware walt boots");
    }

    #[test]
    fn a_recorded_device_is_touched_at_most_once_a_minute_and_a_registered_one_never() {
        let Record::Create(device) = record(
            &sighting(mac(7), dhcp::Firmware::Rpi),
            &[],
            "default",
            10,
            &Unregistered::default(),
            at(0),
        ) else {
            panic!("created");
        };
        let devices = [*device];
        let again = sighting(mac(7), dhcp::Firmware::Rpi);
        assert_eq!(
            record(&again, &devices, "default", 10, &Unregistered::default(), at(30)),
            Record::Known
        );
        let Record::Touch { device, discovered } =
            record(&again, &devices, "default", 10, &Unregistered::default(), at(60))
        else {
            panic!("touched");
        };
        assert_eq!(device, "unknown-525400aa0007");
        assert_eq!(discovered.first_seen, Some(Time(at(0))), "first seen kept");
        assert_eq!(discovered.last_seen, Some(Time(at(60))));
        assert_eq!(
            record(
                &sighting(mac(1), dhcp::Firmware::Rpi),
                &[registered("pc-a", mac(1))],
                "default",
                10,
                &Unregistered::default(),
                at(0)
            ),
            Record::Known,
            "a registered device (not served: unbound, or its MAC shared) is not recorded"
        );
    }

    #[test]
    fn recording_stops_at_the_cap_and_resumes_when_the_admin_registers_one() {
        let mut devices = Vec::new();
        for last in 0..3 {
            match record(
                &sighting(mac(last), dhcp::Firmware::Rpi),
                &devices,
                "default",
                3,
                &Unregistered::default(),
                at(0),
            ) {
                Record::Create(device) => devices.push(*device),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            record(
                &sighting(mac(50), dhcp::Firmware::Rpi),
                &devices,
                "default",
                3,
                &Unregistered::default(),
                at(0)
            ),
            Record::Full { cap: 3 }
        );
        assert_eq!(
            record(
                &sighting(mac(51), dhcp::Firmware::Rpi),
                &[],
                "default",
                0,
                &Unregistered::default(),
                at(0)
            ),
            Record::Full { cap: 0 },
            "cap 0: nothing recorded"
        );
        devices[0].spec.address = Some("10.0.0.30".into());
        assert!(matches!(
            record(
                &sighting(mac(50), dhcp::Firmware::Rpi),
                &devices,
                "default",
                3,
                &Unregistered::default(),
                at(0)
            ),
            Record::Create(_)
        ));
    }

    #[test]
    fn a_recorded_device_is_lent_the_lowest_free_address_and_keeps_it() {
        let lending = Unregistered {
            images: DefaultImages::new(&[("pc-x86-64".into(), "pc-default".into())]),
            pool: Some("10.0.0.200-10.0.0.201".parse().expect("pool")),
        };
        let lent = |record: Record| match record {
            Record::Create(device) => device.status.and_then(|s| s.discovered).and_then(|d| d.address),
            Record::Touch { discovered, .. } => discovered.address,
            other => panic!("{other:?}"),
        };
        let ask = |last: u8| sighting(mac(last), dhcp::Firmware::Ipxe(Some("pc-x86-64".into())));
        let first = record(&ask(60), &[], "default", 10, &lending, at(0));
        let Record::Create(first_device) = first.clone() else {
            panic!("created")
        };
        assert_eq!(lent(first), Some("10.0.0.200".into()));
        let devices = [*first_device.clone()];
        assert_eq!(
            lent(record(&ask(61), &devices, "default", 10, &lending, at(0))),
            Some("10.0.0.201".into()),
            "the next one"
        );
        // Seen again: it keeps its address (nothing to write within a minute).
        assert_eq!(
            record(&ask(60), &devices, "default", 10, &lending, at(30)),
            Record::Known
        );
        // Recorded before the network lent addresses: lent one at its next request, at once.
        let Record::Create(older) = record(&ask(62), &[], "default", 10, &Unregistered::default(), at(0))
        else {
            panic!("created")
        };
        assert_eq!(
            lent(record(&ask(62), &[*older], "default", 10, &lending, at(10))),
            Some("10.0.0.200".into())
        );
        // A model without a default image boots nothing: no address is spent on it.
        let rpi = record(
            &sighting(mac(64), dhcp::Firmware::Rpi),
            &[],
            "default",
            10,
            &lending,
            at(0),
        );
        assert_eq!(lent(rpi), None);
        // All lent: recorded without one.
        let third = record(
            &ask(63),
            &[*first_device, registered_at("pc", mac(9), "10.0.0.201")],
            "default",
            10,
            &lending,
            at(0),
        );
        assert_eq!(lent(third), None);
    }

    fn registered_at(name: &str, mac: Mac, address: &str) -> Device {
        let mut device = registered(name, mac);
        device.spec.address = Some(address.into());
        device
    }
}
