//! `walt-operator boot-server --from-cluster`: the boot service fed from the cluster. It watches
//! Devices, Nodes and Images; each Device of its lab network that walt network-boots (`firmware`,
//! `mac`) and that a Node is bound to serves that Node's image, by digest ([`wanted`], pure); a
//! change swaps the bindings while serving (a node running on the image it booted keeps it until it
//! mounts again: [`crate::boot::state::BootState::set_bindings`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use walt_crds::{Device, Image, ImageName, Node};

use crate::boot::cli::{self, Args, BootError, DeviceArg, ImageCache, Source};
use crate::boot::state::{BootState, Mac};
use crate::controller::shared::registry::pinned_reference_of;

/// The lab network of a Device (`default` when it names none).
pub fn network_of(device: &Device) -> &str {
    device.spec.boot_network.as_deref().unwrap_or("default")
}

/// A Device the boot service serves nothing, and why (logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The Device's name.
    pub device: String,
    /// Why.
    pub why: String,
}

/// What the boot service should serve on `network` (pure): for each network-booted Device there,
/// bound to a Node whose Image is resolved, the Node's image by digest under the Node's name; the
/// Devices it cannot serve, with the reason.
pub fn wanted(
    devices: &[Device],
    nodes: &[Node],
    images: &[Image],
    network: &str,
    catalog_namespace: &str,
) -> (Vec<DeviceArg>, Vec<Skipped>) {
    let mut serve = Vec::new();
    let mut skipped = Vec::new();
    for device in devices
        .iter()
        .filter(|d| d.spec.firmware.is_some() && network_of(d) == network)
    {
        match wanted_one(device, nodes, images, catalog_namespace) {
            Ok(arg) => serve.push(arg),
            Err(why) => skipped.push(Skipped {
                device: device.name_any(),
                why,
            }),
        }
    }
    (serve, skipped)
}

fn wanted_one(
    device: &Device,
    nodes: &[Node],
    images: &[Image],
    catalog_namespace: &str,
) -> Result<DeviceArg, String> {
    let mac: Mac = device
        .spec
        .mac
        .as_deref()
        .ok_or("no spec.mac")?
        .parse()
        .map_err(|e: crate::boot::state::BadMac| e.to_string())?;
    let ip: Ipv4Addr = device.spec.address.parse().map_err(|_| {
        format!(
            "spec.address {:?} is not an IPv4 address (the boot service tells the device's requests by it)",
            device.spec.address
        )
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
    let object = ImageName::parse(image_name)
        .map_err(|e| e.to_string())?
        .object_name();
    let find = |namespace: &str| {
        images
            .iter()
            .find(|i| i.namespace().as_deref() == Some(namespace) && i.name_any() == object)
    };
    let image = find(&binding.namespace)
        .or_else(|| find(catalog_namespace))
        .ok_or_else(|| {
            format!(
                "the Image {image_name} of Node {}/{} does not exist",
                binding.namespace, binding.node
            )
        })?;
    let pinned = pinned_reference_of(image)
        .ok_or_else(|| format!("the Image {image_name} is not resolved yet (no digest)"))?;
    Ok(DeviceArg {
        mac,
        ip,
        name: node.name_any(),
        model: device.spec.model.clone(),
        source: Source::Image(pinned),
        host_key: None,
    })
}

/// The device's host key files under `--host-key-dir`, when both are there.
fn host_key_of(dir: Option<&Path>, device: &str) -> Option<std::path::PathBuf> {
    let path = dir?.join(device);
    (path.is_file() && path.with_extension("pub").is_file()).then_some(path)
}

/// Builds the bindings of `wanted` (a device whose image cannot be pulled is logged and left out).
async fn bindings(
    wanted: &[(String, DeviceArg)],
    args: &Args,
    cache: &mut ImageCache,
) -> Vec<crate::boot::state::Binding> {
    let mut out = Vec::new();
    for (device, arg) in wanted {
        let mut arg = arg.clone();
        arg.host_key = host_key_of(args.host_key_dir.as_deref(), device);
        match cli::bind(&arg, args, cache).await {
            Ok(binding) => out.push(binding),
            Err(error) => tracing::warn!(device, %error, "not served"),
        }
    }
    out
}

/// Watches the cluster and keeps `state`'s bindings what [`wanted`] says.
async fn feed(client: kube::Client, args: &Args, state: Arc<BootState>) -> Result<(), BootError> {
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
    let image_events = reflector(image_writer, watcher(Api::<Image>::all(client), config))
        .touched_objects()
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let mut events =
        futures::stream::select_all([device_events.boxed(), node_events.boxed(), image_events.boxed()]);
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
        let (want, skipped) = wanted(
            &all(&devices),
            &all(&nodes),
            &all(&images),
            &args.network,
            &args.catalog_namespace,
        );
        let want: BTreeMap<String, DeviceArg> =
            want.into_iter().map(|arg| (arg.mac.to_string(), arg)).collect();
        if want == served && !first {
            continue;
        }
        for skip in &skipped {
            tracing::info!(device = skip.device, why = skip.why, "not served");
        }
        let names: Vec<(String, DeviceArg)> = want
            .values()
            .map(|arg| (device_name(&all(&devices), arg.mac), arg.clone()))
            .collect();
        let new = bindings(&names, args, &mut cache).await;
        tracing::info!(devices = new.len(), "bindings updated from the cluster");
        state.set_bindings(new);
        served = want;
        first = false;
    }
    Ok(())
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
        println!(
            "walt boot server ready: devices of the lab network {} from the cluster, on {}",
            args.network, args.listen
        );
        tokio::select! {
            fed = feed(client, args, state) => fed?,
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

    fn device(name: &str, network: Option<&str>, bound: Option<(&str, &str, &str)>) -> Device {
        let mut d = Device::new(
            name,
            DeviceSpec {
                address: "10.0.0.11".into(),
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
        let (serve, skipped) = wanted(
            &[device("pc1", None, Some(("lab", "n1", "u1")))],
            &[node("lab", "n1", "u1", Some("debian"))],
            &[image("lab", "debian", Some("sha256:aa"))],
            "default",
            "walt-catalog",
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
    }

    #[test]
    fn the_catalog_serves_images_a_namespace_does_not_have() {
        let (serve, _) = wanted(
            &[device("pc1", None, Some(("lab", "n1", "u1")))],
            &[node("lab", "n1", "u1", Some("debian"))],
            &[image("walt-catalog", "debian", Some("sha256:cc"))],
            "default",
            "walt-catalog",
        );
        assert_eq!(
            serve[0].source,
            Source::Image("registry:5000/walt-catalog/debian@sha256:cc".into())
        );
    }

    #[test]
    fn devices_that_cannot_be_served_say_why() {
        let why = |devices: &[Device], nodes: &[Node], images: &[Image]| {
            let (serve, skipped) = wanted(devices, nodes, images, "default", "walt-catalog");
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
        bad.spec.address = "pc1.lab".into();
        assert!(
            why(&[bad], std::slice::from_ref(&n), std::slice::from_ref(&i)).contains("not an IPv4 address")
        );
        let (serve, skipped) = wanted(
            &[device("pc1", Some("lab2"), Some(("lab", "n1", "u1")))],
            &[n],
            &[i],
            "default",
            "walt-catalog",
        );
        assert!(
            serve.is_empty() && skipped.is_empty(),
            "another network's device is not ours"
        );
    }
}
