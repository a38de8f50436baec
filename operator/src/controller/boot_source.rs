//! `walt-operator boot-server --from-cluster`: the boot service fed from the cluster. It watches
//! Devices, Nodes and Images; each Device of its lab network that walt network-boots (`firmware`,
//! `mac`) and that a Node is bound to serves that Node's image, by digest ([`wanted`], pure); a
//! change swaps the bindings while serving (a node running on the image it booted keeps it until it
//! mounts again: [`crate::boot::state::BootState::set_bindings`]). Each device is served its own
//! SSH host key, from the Secret the operator made for it ([`super::device::host_key`]), watched in
//! `--host-key-namespace`. A MAC several Devices claim, or an address several Devices of the network
//! claim, is served nothing (`MacConflict`, `AddressConflict` on them); a MAC no Device claims that
//! asks for a boot is recorded as an unregistered Device for the lab admin ([`super::boot_claims`]
//! decides both).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::mpsc;
use walt_crds::{ConditionStatus, Device, HOST_KEY_LABEL, Image, ImageName, Node, host_key_secret_name};

use crate::boot::cli::{self, Args, BootError, DeviceArg, HostKeySource, ImageCache, Source};
use crate::boot::dhcp::Sighting;
use crate::boot::persist::PersistOwner;
use crate::boot::state::{BootState, Mac};
use crate::controller::boot_claims::{
    ClaimKind, Conflict, Record, address_conflicts, conflict_conditions, conflicts, mac_of, record, refusals,
};
use crate::controller::boot_defaults::{DefaultImages, Unregistered, default_boot};
use crate::controller::device::host_key::served_key;
use crate::controller::shared::events::EventPublisher;
use crate::controller::shared::registry::pinned_reference_of;

/// The lab network of a Device (`default` when it names none).
pub fn network_of(device: &Device) -> &str {
    device.spec.boot_network.as_deref().unwrap_or("default")
}

/// Event: an unknown device asked for a boot and was recorded as an unregistered Device.
pub const RECORDED: &str = "Recorded";
/// Event: a Device's MAC is claimed by it alone again (the Warning before is `MacConflict`).
pub const MAC_CONFLICT_RESOLVED: &str = "MacConflictResolved";
/// Event: a Device's address is claimed by it alone again (the Warning before is `AddressConflict`).
pub const ADDRESS_CONFLICT_RESOLVED: &str = "AddressConflictResolved";

/// A Device the boot service serves nothing, and why (logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The Device's name.
    pub device: String,
    /// Why.
    pub why: String,
}

/// What the boot service serves on its network, decided by [`wanted`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wanted {
    /// The devices served.
    pub serve: Vec<DeviceArg>,
    /// The Devices of the network served nothing, and why.
    pub skipped: Vec<Skipped>,
    /// The MACs several registered Devices claim (the whole lab's), and the addresses several
    /// network-booted Devices of the network claim: served nothing.
    pub conflicts: Vec<Conflict>,
}

/// What the boot service should serve on `network` (pure): for each network-booted Device there,
/// bound to a Node whose Image is resolved, the Node's image by digest under the Node's name, with
/// the host key walt made for the Device (from `secrets`, the host key Secrets); the Devices it
/// cannot serve, with the reason. A MAC two registered Devices claim, or an address two Devices of
/// the network claim, is served to neither (taking one of them would boot the image of a Node that
/// may not be on that device, or lease one address to two devices).
pub fn wanted(
    devices: &[Device],
    nodes: &[Node],
    images: &[Image],
    secrets: &[Secret],
    network: &str,
    catalog_namespace: &str,
    unregistered: &Unregistered,
) -> Wanted {
    let mut conflicts = conflicts(devices);
    conflicts.extend(address_conflicts(devices, network, network_of));
    let mut serve = Vec::new();
    let mut skipped = Vec::new();
    for device in devices
        .iter()
        .filter(|d| d.spec.firmware.is_some() && network_of(d) == network)
    {
        let name = device.name_any();
        let conflict = conflicts
            .iter()
            .find(|c| device.is_registered() && c.devices.contains(&name));
        // A recorded device the lab admin has since registered under another name: that one serves it.
        let registered_as = mac_of(device).and_then(|mac| {
            devices
                .iter()
                .find(|d| d.is_registered() && mac_of(d) == Some(mac))
                .map(ResourceExt::name_any)
        });
        let one = match conflict {
            Some(conflict) => Err(conflict.reason()),
            None if !device.is_registered() => match registered_as {
                Some(other) => Err(format!(
                    "registered as the Device {other}: served under that name"
                )),
                None => {
                    wanted_unregistered(device, devices, images, network, catalog_namespace, unregistered)
                }
            },
            None => wanted_one(device, nodes, images, catalog_namespace).map(|mut arg| {
                let secret_name = host_key_secret_name(&name);
                arg.host_key = secrets
                    .iter()
                    .find(|s| s.name_any() == secret_name)
                    .and_then(|s| served_key(device, s))
                    .map(HostKeySource::Key);
                arg
            }),
        };
        match one {
            Ok(arg) => serve.push(arg),
            Err(why) => skipped.push(Skipped {
                device: device.name_any(),
                why,
            }),
        }
    }
    Wanted {
        serve,
        skipped,
        conflicts,
    }
}

/// What a Device nobody registered boots: the lab's default image of its model at the address its
/// network lent it ([`default_boot`] decides), under the Device's own name.
fn wanted_unregistered(
    device: &Device,
    devices: &[Device],
    images: &[Image],
    network: &str,
    catalog_namespace: &str,
    unregistered: &Unregistered,
) -> Result<DeviceArg, String> {
    let mac = device_mac(device)?;
    let (image_name, ip) = default_boot(device, devices, network, unregistered)?;
    let image = catalog_image(images, &[catalog_namespace], image_name).ok_or_else(|| {
        format!("the lab's default image {image_name} is not in the catalog ({catalog_namespace})")
    })??;
    Ok(DeviceArg {
        mac,
        ip,
        name: device.name_any(),
        model: device.spec.model.clone(),
        source: Source::Image(image),
        host_key: None,
        // Lent to no tenant: no `/persist` (whose would it be?).
        persist: None,
    })
}

/// The MAC a network-booted Device claims.
fn device_mac(device: &Device) -> Result<Mac, String> {
    device
        .spec
        .mac
        .as_deref()
        .ok_or("no spec.mac")?
        .parse()
        .map_err(|e: crate::boot::state::BadMac| e.to_string())
}

/// The pinned reference of the Image `image_name` in the first of `namespaces` that has it (pure):
/// `None` when none has it, an error when it is not resolved yet.
fn catalog_image(images: &[Image], namespaces: &[&str], image_name: &str) -> Option<Result<String, String>> {
    let object = ImageName::parse(image_name).ok()?.object_name();
    let image = namespaces.iter().find_map(|namespace| {
        images
            .iter()
            .find(|i| i.namespace().as_deref() == Some(*namespace) && i.name_any() == object)
    })?;
    Some(
        pinned_reference_of(image)
            .ok_or_else(|| format!("the Image {image_name} is not resolved yet (no digest)")),
    )
}

fn wanted_one(
    device: &Device,
    nodes: &[Node],
    images: &[Image],
    catalog_namespace: &str,
) -> Result<DeviceArg, String> {
    let mac = device_mac(device)?;
    let address = device
        .spec
        .address
        .as_deref()
        .ok_or("not registered (no spec.address): boots nothing until a lab admin registers it")?;
    let ip: Ipv4Addr = address.parse().map_err(|_| {
        format!("spec.address {address:?} is not an IPv4 address (the boot service tells the device's requests by it)")
    })?;
    let binding = device.bound_to().ok_or("bound to no Node")?;
    let node = nodes
        .iter()
        .find(|n| {
            n.namespace().as_deref() == Some(binding.namespace.as_str())
                && n.name_any() == binding.node
                && n.uid().as_deref() == Some(binding.uid.as_str())
        })
        .ok_or_else(|| format!("its Node {}/{} is gone", binding.namespace, binding.node))?;
    let image_name = node
        .spec
        .image
        .as_deref()
        .ok_or_else(|| format!("Node {}/{} has no spec.image", binding.namespace, binding.node))?;
    ImageName::parse(image_name).map_err(|e| e.to_string())?;
    let pinned =
        catalog_image(images, &[&binding.namespace, catalog_namespace], image_name).ok_or_else(|| {
            format!(
                "the Image {image_name} of Node {}/{} does not exist",
                binding.namespace, binding.node
            )
        })??;
    Ok(DeviceArg {
        mac,
        ip,
        name: node.name_any(),
        model: device.spec.model.clone(),
        source: Source::Image(pinned),
        host_key: None,
        // The device's `/persist` while lent to this tenant: another tenant gets its own.
        persist: Some(PersistOwner::new(&device.name_any(), &binding.namespace).map_err(|e| e.to_string())?),
    })
}

/// The device's host key files under `--host-key-dir`, when both are there.
fn host_key_of(dir: Option<&Path>, device: &str) -> Option<std::path::PathBuf> {
    let path = dir?.join(device);
    (path.is_file() && path.with_extension("pub").is_file()).then_some(path)
}

/// Builds the bindings of `wanted` (a device whose image cannot be pulled is logged and left out); a
/// device walt made no key for is served its `--host-key-dir` files, when there.
async fn bindings(
    wanted: &[(String, DeviceArg)],
    args: &Args,
    cache: &mut ImageCache,
) -> Vec<crate::boot::state::Binding> {
    let mut out = Vec::new();
    for (device, arg) in wanted {
        let mut arg = arg.clone();
        if arg.host_key.is_none() {
            arg.host_key = host_key_of(args.host_key_dir.as_deref(), device).map(HostKeySource::File);
        }
        match cli::bind(&arg, args, cache).await {
            Ok(binding) => out.push(binding),
            Err(error) => tracing::warn!(device, %error, "not served"),
        }
    }
    out
}

/// Watches the cluster and keeps `state`'s bindings what [`wanted`] says, the refused MACs and their
/// Devices' `MacConflict` conditions with them; records the unknown devices `sightings` brings.
async fn feed(
    client: kube::Client,
    args: &Args,
    state: Arc<BootState>,
    sightings: mpsc::Receiver<Sighting>,
) -> Result<(), BootError> {
    let config = watcher::Config::default();
    let (devices, device_writer) = reflector::store::<Device>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (images, image_writer) = reflector::store::<Image>();
    let device_events = reflector(
        device_writer,
        watcher(Api::<Device>::all(client.clone()), config.clone()),
    )
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let node_events = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), config.clone()),
    )
    .touched_objects()
    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let image_events = reflector(image_writer, watcher(Api::<Image>::all(client.clone()), config))
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let (secrets, secret_writer) = reflector::store::<Secret>();
    let mut streams = vec![device_events.boxed(), node_events.boxed(), image_events.boxed()];
    if let Some(namespace) = &args.host_key_namespace {
        // The host key Secrets only (label selector): RBAC cannot narrow a list to a label.
        let secret_config = watcher::Config::default().labels(&format!("{HOST_KEY_LABEL}=true"));
        let secret_events = reflector(
            secret_writer,
            watcher(
                Api::<Secret>::namespaced(client.clone(), namespace),
                secret_config,
            ),
        )
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
        streams.push(secret_events.boxed());
    }
    let mut events = futures::stream::select_all(streams);
    let device_api = Api::<Device>::all(client.clone());
    let publisher = EventPublisher::new(client, "walt-boot-server", &args.network);
    let unregistered = Unregistered {
        images: DefaultImages::new(&args.default_images),
        pool: args.unregistered_addresses,
    };
    let recorder = record_unknown(
        device_api.clone(),
        &publisher,
        devices.clone(),
        sightings,
        args,
        &unregistered,
    );
    let watch = async {
        let mut cache = ImageCache::default();
        let mut served: BTreeMap<String, DeviceArg> = BTreeMap::new();
        let mut first = true;
        while let Some(event) = events.next().await {
            if let Err(error) = event {
                tracing::warn!(%error, "watching the cluster");
            }
            // Let a burst of changes settle, then look once.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while let Some(Some(_)) = events.next().now_or_never() {}
            let lab = all(&devices);
            let Wanted {
                serve,
                skipped,
                conflicts,
            } = wanted(
                &lab,
                &all(&nodes),
                &all(&images),
                &all(&secrets),
                &args.network,
                &args.catalog_namespace,
                &unregistered,
            );
            state.set_refusals(refusals(&lab, &conflicts));
            write_conflict_conditions(&device_api, &publisher, &lab, &conflicts, ClaimKind::Mac).await;
            // Addresses are the network's: this service speaks only for its network's Devices.
            let ours: Vec<Device> = lab
                .iter()
                .filter(|d| network_of(d) == args.network)
                .cloned()
                .collect();
            write_conflict_conditions(&device_api, &publisher, &ours, &conflicts, ClaimKind::Address).await;
            let want: BTreeMap<String, DeviceArg> =
                serve.into_iter().map(|arg| (arg.mac.to_string(), arg)).collect();
            if want == served && !first {
                continue;
            }
            for skip in &skipped {
                tracing::info!(device = skip.device, why = skip.why, "not served");
            }
            let names: Vec<(String, DeviceArg)> = want
                .values()
                .map(|arg| (device_name(&lab, arg.mac), arg.clone()))
                .collect();
            let new = bindings(&names, args, &mut cache).await;
            tracing::info!(devices = new.len(), "bindings updated from the cluster");
            state.set_bindings(new);
            served = want;
            first = false;
        }
    };
    tokio::join!(watch, recorder);
    Ok(())
}

/// Writes the `MacConflict` or `AddressConflict` conditions that change ([`conflict_conditions`]),
/// each with an Event on the Device (Warning `MacConflict`, then Normal `MacConflictResolved`;
/// `AddressConflict`, `AddressConflictResolved`) and a log line. A failed write is logged and tried
/// again at the next change.
async fn write_conflict_conditions(
    api: &Api<Device>,
    events: &EventPublisher,
    devices: &[Device],
    conflicts: &[Conflict],
    kind: ClaimKind,
) {
    for (name, condition) in conflict_conditions(devices, conflicts, kind, Timestamp::now()) {
        let Some(device) = devices.iter().find(|d| d.name_any() == name) else {
            continue;
        };
        let shared = condition.status == ConditionStatus::True.as_str();
        let what = match kind {
            ClaimKind::Mac => "MAC address",
            ClaimKind::Address => "address",
        };
        if shared {
            tracing::warn!(
                device = name,
                why = condition.message,
                "{what} shared: not served"
            );
        } else {
            tracing::info!(device = name, "{what} no longer shared: served again");
        }
        let (type_, reason) = match (shared, kind) {
            (true, kind) => (EventType::Warning, kind.condition()),
            (false, ClaimKind::Mac) => (EventType::Normal, MAC_CONFLICT_RESOLVED),
            (false, ClaimKind::Address) => (EventType::Normal, ADDRESS_CONFLICT_RESOLVED),
        };
        publish(events, device, type_, reason, condition.message.clone()).await;
        let mut list = device
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        walt_crds::set_condition(&mut list, condition);
        let patch = serde_json::json!({"status": {"conditions": list}});
        if let Err(error) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(device = name, %error, condition = kind.condition(), "writing the condition");
        }
    }
}

/// Publishes an Event on a Device (a failure is logged: Events are a courtesy, the condition and
/// the records are the state).
async fn publish(events: &EventPublisher, device: &Device, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Boot".into(),
        secondary: None,
    };
    if let Err(error) = events.publish(&event, &device.object_ref(&())).await {
        tracing::warn!(%error, reason, "could not publish an Event");
    }
}

/// Records the unknown devices `sightings` brings as unregistered Devices ([`record`] decides),
/// each with a Normal Event `Recorded`, until the channel closes.
async fn record_unknown(
    api: Api<Device>,
    events: &EventPublisher,
    devices: reflector::Store<Device>,
    mut sightings: mpsc::Receiver<Sighting>,
    args: &Args,
    unregistered: &Unregistered,
) {
    let (network, cap) = (args.network.as_str(), args.max_unknown_devices);
    // Devices written here as the watch has not shown them yet: counted against the cap, not
    // created twice, their lent addresses not lent again.
    let mut written: Vec<Device> = Vec::new();
    let mut full = Throttle::new(Duration::from_mins(1));
    // Not before the Devices are known: a device that asks while the watch is still listing them is
    // registered, not unknown (seen: a registered device recorded as unknown at start).
    if devices.wait_until_ready().await.is_err() {
        return;
    }
    while let Some(sighting) = sightings.recv().await {
        let mut lab = all(&devices);
        written.retain(|w| {
            !lab.iter()
                .any(|d| d.name_any() == w.name_any() && discovery(d) == discovery(w))
        });
        lab.retain(|d| !written.iter().any(|w| w.name_any() == d.name_any()));
        lab.extend(written.iter().cloned());
        match record(&sighting, &lab, network, cap, unregistered, Timestamp::now()) {
            Record::Known => {}
            Record::Full { cap } => {
                if let Some(dropped) = full.hit(std::time::Instant::now()) {
                    tracing::warn!(
                        mac = %sighting.mac,
                        cap,
                        not_recorded = dropped,
                        "unknown devices not recorded: {cap} unregistered Devices exist \
                         (--max-unknown-devices); register or delete them"
                    );
                }
            }
            Record::Create(device) => match create_recorded(&api, &device).await {
                Ok(made) => {
                    let boots = what_it_boots(&device, &lab, network, unregistered);
                    tracing::info!(
                        device = device.name_any(),
                        mac = %sighting.mac,
                        firmware = ?sighting.firmware,
                        boots,
                        "unknown device recorded (unregistered)"
                    );
                    if let Some(made) = made {
                        let note = format!(
                            "a device with the MAC address {} asked for a network boot on the lab network {network}: \
                             recorded unregistered ({boots}); register it with `kubectl walt device register {}`",
                            sighting.mac,
                            made.name_any()
                        );
                        publish(events, &made, EventType::Normal, RECORDED, note).await;
                    }
                    written.push(*device);
                }
                Err(error) => tracing::warn!(mac = %sighting.mac, %error, "recording an unknown device"),
            },
            Record::Touch { device, discovered } => {
                let patch = serde_json::json!({"status": {"discovered": discovered}});
                match api
                    .patch_status(&device, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(patched) => written.push(patched),
                    Err(error) => tracing::warn!(device, %error, "updating a recorded device's discovery"),
                }
            }
        }
    }
}

/// A Device's `status.discovered`, if any.
fn discovery(device: &Device) -> Option<&walt_crds::DeviceDiscovery> {
    device.status.as_ref()?.discovered.as_ref()
}

/// What a recorded device boots, in words (pure; the Event and the log say it).
fn what_it_boots(device: &Device, lab: &[Device], network: &str, unregistered: &Unregistered) -> String {
    match default_boot(device, lab, network, unregistered) {
        Ok((image, address)) => format!("it boots the lab's default image {image} at {address}"),
        Err(_) => "it boots nothing".to_owned(),
    }
}

/// Creates a recorded Device, then its `status.discovered` (a create ignores the status); the
/// Device made, or `None` when another boot service created it first (no error).
async fn create_recorded(api: &Api<Device>, device: &Device) -> Result<Option<Device>, kube::Error> {
    let name = device.name_any();
    match api.create(&PostParams::default(), device).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => return Ok(None),
        Err(error) => return Err(error),
    }
    let discovered = device.status.as_ref().and_then(|s| s.discovered.as_ref());
    let patch = serde_json::json!({"status": {"discovered": discovered}});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(Some)
}

/// Lets a repeated warning out at most once per period, with the count of the ones held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    /// Once per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// One more occurrence at `now`: `Some(n)` when it is to be told (`n` occurrences since the
    /// last one told, this one included), else `None` (held back).
    pub fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        self.held += 1;
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// Everything a reflector holds.
fn all<K>(store: &reflector::Store<K>) -> Vec<K>
where
    K: reflector::Lookup + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// The name of the Device with this MAC.
fn device_name(devices: &[Device], mac: Mac) -> String {
    devices
        .iter()
        .find(|d| d.spec.mac.as_deref().and_then(|m| m.parse::<Mac>().ok()) == Some(mac))
        .map(ResourceExt::name_any)
        .unwrap_or_default()
}

/// Runs the boot service fed from the cluster until SIGTERM or SIGINT.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    cli::init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().map_err(BootError::Runtime)?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("connecting to the cluster (kubeconfig or in-cluster config): {e}"))?;
        let state = cli::start(args, Vec::new()).await?;
        // Bounded: a flood of requests from made-up MACs is dropped at the DHCP socket.
        let (sink, sightings) = mpsc::channel(64);
        state.record_sightings(sink);
        println!(
            "walt boot server ready: devices of the lab network {} from the cluster, on {}",
            args.network, args.listen
        );
        tokio::select! {
            fed = feed(client, args, state, sightings) => fed?,
            done = cli::terminated() => done?,
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceBinding, DeviceSpec, DeviceStatus, Firmware, ImageSpec, ImageStatus, NodeSpec};

    /// [`wanted`] on the `default` network with the `walt-catalog` catalog, no host key Secrets and
    /// no default images for unregistered devices.
    fn wanted_plain(devices: &[Device], nodes: &[Node], images: &[Image]) -> Wanted {
        wanted(
            devices,
            nodes,
            images,
            &[],
            "default",
            "walt-catalog",
            &Unregistered::default(),
        )
    }

    fn device(name: &str, network: Option<&str>, bound: Option<(&str, &str, &str)>) -> Device {
        let mut d = Device::new(
            name,
            DeviceSpec {
                address: Some("10.0.0.11".into()),
                model: "pc-x86-64".into(),
                mac: Some("52:54:00:00:00:01".into()),
                firmware: Some(Firmware::Ipxe),
                boot_network: network.map(str::to_string),
                ..DeviceSpec::default()
            },
        );
        d.status = Some(DeviceStatus {
            bound_to: bound.map(|(namespace, node, uid)| DeviceBinding {
                namespace: namespace.into(),
                node: node.into(),
                uid: uid.into(),
            }),
            ..DeviceStatus::default()
        });
        d
    }

    fn node(namespace: &str, name: &str, uid: &str, image: Option<&str>) -> Node {
        let mut n = Node::new(
            name,
            NodeSpec {
                model: "pc-x86-64".into(),
                device: Some("pc1".into()),
                image: image.map(str::to_string),
                ..NodeSpec::default()
            },
        );
        n.metadata.namespace = Some(namespace.into());
        n.metadata.uid = Some(uid.into());
        n
    }

    fn image(namespace: &str, name: &str, digest: Option<&str>) -> Image {
        let mut i = Image::new(name, ImageSpec::default());
        i.metadata.namespace = Some(namespace.into());
        i.status = Some(ImageStatus {
            digest: digest.map(str::to_string),
            reference: Some(format!("registry:5000/{namespace}/{name}:latest")),
            ..ImageStatus::default()
        });
        i
    }

    #[test]
    fn a_bound_device_serves_its_nodes_image_by_digest() {
        let Wanted { serve, skipped, .. } = wanted_plain(
            &[device("pc1", None, Some(("lab", "n1", "u1")))],
            &[node("lab", "n1", "u1", Some("debian"))],
            &[image("lab", "debian", Some("sha256:aa"))],
        );
        assert_eq!(skipped, vec![]);
        assert_eq!(serve.len(), 1);
        assert_eq!(serve[0].name, "n1", "the host name is the Node's name");
        assert_eq!(serve[0].ip, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(
            serve[0].source,
            Source::Image("registry:5000/lab/debian@sha256:aa".into()),
            "pulled by digest"
        );
        assert_eq!(
            serve[0].persist,
            Some(PersistOwner::new("pc1", "lab").expect("owner")),
            "its /persist is the Device's, for the Node's namespace"
        );
        // Lent to another tenant: that tenant's /persist, not the former one's.
        let Wanted { serve, .. } = wanted_plain(
            &[device("pc1", None, Some(("other", "n2", "u2")))],
            &[node("other", "n2", "u2", Some("debian"))],
            &[image("other", "debian", Some("sha256:aa"))],
        );
        assert_eq!(
            serve[0].persist,
            Some(PersistOwner::new("pc1", "other").expect("owner"))
        );
    }

    #[test]
    fn an_unregistered_device_boots_the_default_image_of_its_model_at_its_lent_address() {
        let mut recorded = device("unknown-525400000001", None, None);
        recorded.spec.address = None;
        recorded.status = Some(DeviceStatus {
            discovered: Some(walt_crds::DeviceDiscovery {
                address: Some("10.0.0.200".into()),
                ..walt_crds::DeviceDiscovery::default()
            }),
            ..DeviceStatus::default()
        });
        let unregistered = Unregistered {
            images: DefaultImages::new(&[("pc-x86-64".into(), "pc-default".into())]),
            pool: Some("10.0.0.200-10.0.0.209".parse().expect("pool")),
        };
        let catalog = [image("walt-catalog", "pc-default", Some("sha256:dd"))];
        let Wanted { serve, skipped, .. } = wanted(
            std::slice::from_ref(&recorded),
            &[],
            &catalog,
            &[],
            "default",
            "walt-catalog",
            &unregistered,
        );
        assert_eq!(skipped, vec![]);
        assert_eq!(serve.len(), 1);
        assert_eq!(
            serve[0].name, "unknown-525400000001",
            "the host name is the Device's"
        );
        assert_eq!(serve[0].ip, Ipv4Addr::new(10, 0, 0, 200));
        assert_eq!(
            serve[0].source,
            Source::Image("registry:5000/walt-catalog/pc-default@sha256:dd".into())
        );
        assert_eq!(serve[0].persist, None, "lent to nobody: no /persist");

        // Without the lab's settings it boots nothing, and the reason names them.
        let Wanted { serve, skipped, .. } = wanted_plain(std::slice::from_ref(&recorded), &[], &catalog);
        assert!(serve.is_empty());
        assert!(skipped[0].why.contains("--unregistered-addresses"), "{skipped:?}");

        // A default image missing from the catalog is named.
        let Wanted { skipped, .. } = wanted(
            std::slice::from_ref(&recorded),
            &[],
            &[],
            &[],
            "default",
            "walt-catalog",
            &unregistered,
        );
        assert!(
            skipped[0]
                .why
                .contains("default image pc-default is not in the catalog"),
            "{skipped:?}"
        );

        // Registered since under another name (the same MAC): that Device serves it, not the record.
        let admin = device("pc1", None, Some(("lab", "n1", "u1")));
        let Wanted { serve, skipped, .. } = wanted(
            &[recorded, admin],
            &[node("lab", "n1", "u1", Some("debian"))],
            &[image("lab", "debian", Some("sha256:aa")), catalog[0].clone()],
            &[],
            "default",
            "walt-catalog",
            &unregistered,
        );
        assert_eq!(serve.len(), 1);
        assert_eq!(serve[0].name, "n1");
        assert!(
            skipped[0].why.contains("registered as the Device pc1"),
            "{skipped:?}"
        );
    }

    #[test]
    fn the_catalog_serves_images_a_namespace_does_not_have() {
        let Wanted { serve, .. } = wanted_plain(
            &[device("pc1", None, Some(("lab", "n1", "u1")))],
            &[node("lab", "n1", "u1", Some("debian"))],
            &[image("walt-catalog", "debian", Some("sha256:cc"))],
        );
        assert_eq!(
            serve[0].source,
            Source::Image("registry:5000/walt-catalog/debian@sha256:cc".into())
        );
    }

    #[test]
    fn devices_that_cannot_be_served_say_why() {
        let why = |devices: &[Device], nodes: &[Node], images: &[Image]| {
            let Wanted { serve, skipped, .. } = wanted_plain(devices, nodes, images);
            assert!(serve.is_empty());
            skipped.into_iter().map(|s| s.why).collect::<Vec<_>>().join("; ")
        };
        let n = node("lab", "n1", "u1", Some("debian"));
        let i = image("lab", "debian", Some("sha256:aa"));
        assert!(
            why(
                &[device("pc1", None, None)],
                std::slice::from_ref(&n),
                std::slice::from_ref(&i)
            )
            .contains("bound to no Node")
        );
        assert!(
            why(
                &[device("pc1", None, Some(("lab", "n1", "other-uid")))],
                std::slice::from_ref(&n),
                std::slice::from_ref(&i)
            )
            .contains("is gone")
        );
        assert!(
            why(
                &[device("pc1", None, Some(("lab", "n1", "u1")))],
                std::slice::from_ref(&n),
                &[image("lab", "debian", None)]
            )
            .contains("not resolved yet")
        );
        let mut bad = device("pc1", None, Some(("lab", "n1", "u1")));
        bad.spec.address = Some("pc1.lab".into());
        assert!(
            why(&[bad], std::slice::from_ref(&n), std::slice::from_ref(&i)).contains("not an IPv4 address")
        );
        let mut unregistered = device("pc1", None, Some(("lab", "n1", "u1")));
        unregistered.spec.address = None;
        assert!(
            why(
                &[unregistered],
                std::slice::from_ref(&n),
                std::slice::from_ref(&i)
            )
            .contains("not registered")
        );
        let Wanted { serve, skipped, .. } = wanted_plain(
            &[device("pc1", Some("lab2"), Some(("lab", "n1", "u1")))],
            &[n],
            &[i],
        );
        assert!(
            serve.is_empty() && skipped.is_empty(),
            "another network's device is not ours"
        );
    }

    /// `pc1` bound to `n1`, and `pc2` (as `change` makes it from a copy of `pc1`) bound to `n2`, both
    /// Nodes booting a resolved Image.
    fn two_devices(change: impl FnOnce(&mut Device)) -> ([Device; 2], [Node; 2], [Image; 1]) {
        let mut second = device("pc2", None, Some(("lab", "n2", "u2")));
        change(&mut second);
        (
            [device("pc1", None, Some(("lab", "n1", "u1"))), second],
            [
                node("lab", "n1", "u1", Some("debian")),
                node("lab", "n2", "u2", Some("debian")),
            ],
            [image("lab", "debian", Some("sha256:aa"))],
        )
    }

    #[test]
    fn a_mac_two_devices_claim_is_served_to_neither_until_one_is_gone() {
        let (both, nodes, images) = two_devices(|typo| typo.spec.address = Some("10.0.0.12".into()));
        let Wanted {
            serve,
            skipped,
            conflicts,
        } = wanted_plain(&both, &nodes, &images);
        assert!(serve.is_empty(), "neither is served: {serve:?}");
        assert_eq!(skipped.len(), 2);
        for skip in &skipped {
            assert!(
                skip.why.contains("claimed by the Devices pc1, pc2"),
                "{}",
                skip.why
            );
        }
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            conflicts[0].claim,
            crate::controller::boot_claims::Claim::Mac("52:54:00:00:00:01".parse().expect("mac"))
        );
        let Wanted { serve, conflicts, .. } = wanted_plain(&both[..1], &nodes, &images);
        assert_eq!(serve.len(), 1, "served again once the conflict is gone");
        assert!(conflicts.is_empty());
    }

    #[test]
    fn an_address_two_devices_of_the_network_claim_is_served_to_neither() {
        let (both, nodes, images) = two_devices(|other| other.spec.mac = Some("52:54:00:00:00:02".into()));
        let mut other = both[1].clone();
        let Wanted {
            serve,
            skipped,
            conflicts,
        } = wanted_plain(&both, &nodes, &images);
        assert!(serve.is_empty(), "neither is served: {serve:?}");
        assert!(
            skipped.iter().all(|s| s
                .why
                .contains("the address 10.0.0.11 is claimed by the Devices pc1, pc2")),
            "{skipped:?}"
        );
        assert_eq!(conflicts.len(), 1);
        other.spec.boot_network = Some("lab2".into());
        let Wanted { serve, conflicts, .. } = wanted_plain(&[both[0].clone(), other], &nodes, &images);
        assert_eq!(serve.len(), 1, "one address on two networks is no conflict");
        assert!(conflicts.is_empty());
    }

    #[test]
    fn a_device_is_served_the_host_key_walt_made_for_it() {
        let mut pc = device("pc1", None, Some(("lab", "n1", "u1")));
        pc.metadata.uid = Some("device-uid".into());
        let secret = crate::controller::device::host_key::new_secret(&pc, "walt-system").expect("key");
        let key = crate::controller::device::host_key::host_key_of(&secret).expect("readable");
        let nodes = [node("lab", "n1", "u1", Some("debian"))];
        let images = [image("lab", "debian", Some("sha256:aa"))];
        let served = |device: &Device, secrets: &[Secret]| {
            wanted(
                std::slice::from_ref(device),
                &nodes,
                &images,
                secrets,
                "default",
                "walt-catalog",
                &Unregistered::default(),
            )
            .serve
            .remove(0)
            .host_key
        };
        assert_eq!(
            served(&pc, std::slice::from_ref(&secret)),
            Some(HostKeySource::Key(key)),
            "its own key"
        );
        assert_eq!(served(&pc, &[]), None, "no Secret yet: none (the image's own)");
        let mut recreated = pc.clone();
        recreated.metadata.uid = Some("another-uid".into());
        assert_eq!(
            served(&recreated, std::slice::from_ref(&secret)),
            None,
            "a former Device's key is not served"
        );
    }

    #[test]
    fn a_repeated_warning_is_told_once_a_minute_with_the_count_held_back() {
        let start = std::time::Instant::now();
        let mut throttle = Throttle::new(Duration::from_mins(1));
        assert_eq!(throttle.hit(start), Some(1));
        assert_eq!(throttle.hit(start + Duration::from_secs(10)), None);
        assert_eq!(throttle.hit(start + Duration::from_secs(20)), None);
        assert_eq!(throttle.hit(start + Duration::from_secs(61)), Some(3));
    }
}
