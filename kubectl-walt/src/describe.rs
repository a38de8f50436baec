//! Tables and `show` pages for nodes, images and devices (pure: objects in, text out).

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Event;
use walt_crds::{Condition, Device, Image, ImageShellMode, Node, NodePhase};

use crate::cli::OutputFormat;
use crate::format::{Table, age_since, bytes, short_digest};
use crate::resolve::{display_image, name_of};

/// The phase of a node as text.
pub fn node_phase(node: &Node) -> String {
    node.status
        .as_ref()
        .map_or_else(|| "Pending".into(), |s| format!("{:?}", s.phase))
}

/// What a node still waits for, as `node wait` says it: its phase, or the request the operator has
/// not acted on yet.
pub fn node_waiting_for(node: &Node) -> String {
    if walt_crds::node::reboot_pending(node) {
        "reboot requested".into()
    } else if node_phase(node) == "Ready" {
        "Ready, the operator has not seen the latest change yet".into()
    } else {
        node_phase(node)
    }
}

/// Whether the node is booted and reachable, and the operator has acted on everything asked of it:
/// a `Ready` written before a `node boot` (a new generation) or before a `node reboot` (a request
/// not handled yet) is not the node's answer to it.
pub fn node_ready(node: &Node) -> bool {
    node.status.as_ref().is_some_and(|s| {
        s.phase == NodePhase::Ready
            && s.observed_generation
                .is_none_or(|seen| seen >= node.metadata.generation.unwrap_or(0))
    }) && !walt_crds::node::reboot_pending(node)
}

/// The node's image as the user reads it (`default` when the model's default).
pub fn node_image(node: &Node) -> String {
    node.spec.image.clone().unwrap_or_else(|| "default".into())
}

fn booted(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.booted_image.as_ref())
        .map_or_else(
            || "-".into(),
            |b| {
                let name = b.name.clone().unwrap_or_else(|| "?".into());
                match &b.digest {
                    Some(d) => format!("{name}@{}", short_digest(d)),
                    None => name,
                }
            },
        )
}

/// What walt's boot service served the node (its latest network boot) and what was verified.
fn served(node: &Node) -> String {
    let status = node.status.as_ref();
    let boot = status.and_then(|s| s.boot.as_ref());
    let Some(served) = boot.and_then(|b| b.served.as_deref()) else {
        return "-".into();
    };
    let verified = status
        .and_then(|s| walt_crds::find_condition(&s.conditions, walt_crds::condition_types::IMAGE_VERIFIED))
        .map_or_else(
            || "not verified".to_string(),
            |c| {
                if c.status == "True" {
                    "verified".to_string()
                } else {
                    format!("not verified: {}", c.reason)
                }
            },
        );
    format!("{} ({verified})", short_digest(served))
}

/// What runs a virtual node (pure): its architecture, `vm …` for a VM node.
fn virtual_kind(node: &Node) -> String {
    node.spec.virtual_node.as_ref().map_or_else(
        || "-".into(),
        |v| match v.kind {
            walt_crds::VirtualKind::Container => v.architecture.as_str().into(),
            walt_crds::VirtualKind::Vm => format!("vm {}", v.architecture.as_str()),
        },
    )
}

fn virtual_text(node: &Node) -> String {
    node.spec.virtual_node.as_ref().map_or_else(
        || "-".into(),
        |v| format!("{}, {} memory, {} cpu", virtual_kind(node), v.memory.0, v.cpu.0),
    )
}

/// Where a virtual node's pod runs and whether natively (pure): its cluster node, and whether the
/// node's CPU is that cluster node's or emulated (qemu-user).
fn runs_on(status: &walt_crds::NodeStatus) -> String {
    let Some(cluster_node) = &status.cluster_node else {
        return "-".into();
    };
    match status.emulated {
        Some(true) => format!("cluster node {cluster_node}, emulated (qemu-user: another CPU)"),
        Some(false) => format!("cluster node {cluster_node}, native (no emulation)"),
        None => format!("cluster node {cluster_node}"),
    }
}

/// `node ls` as a table.
pub fn node_table(nodes: &[Node], format: OutputFormat) -> String {
    let wide = format == OutputFormat::Wide;
    let mut headers = vec!["NAME", "MODEL", "IMAGE", "PHASE", "AGE"];
    if wide {
        headers.extend(["ADDRESS", "BOOTED", "SERVED", "BOOT-MODE", "VIRTUAL"]);
    }
    let mut table = Table::new(headers);
    for node in nodes {
        let mut row = vec![
            name_of(node),
            node.spec.model.clone(),
            node_image(node),
            node_phase(node),
            age_since(node.metadata.creation_timestamp.as_ref()),
        ];
        if wide {
            row.push(
                node.status
                    .as_ref()
                    .and_then(|s| s.address.clone())
                    .unwrap_or_else(|| "-".into()),
            );
            row.push(booted(node));
            row.push(served(node));
            row.push(format!("{:?}", node.spec.boot_mode).to_lowercase());
            row.push(virtual_kind(node));
        }
        table.row(row);
    }
    table.render()
}

/// `node show` as a page.
pub fn node_page(node: &Node, events: &[Event]) -> String {
    let mut out = String::new();
    let status = node.status.clone().unwrap_or_default();
    let line = |out: &mut String, key: &str, value: String| {
        let _ = writeln!(out, "{:<13}{value}", format!("{key}:"));
    };
    line(&mut out, "Name", name_of(node));
    line(
        &mut out,
        "Namespace",
        node.metadata.namespace.clone().unwrap_or_default(),
    );
    line(&mut out, "Model", node.spec.model.clone());
    line(&mut out, "Image", node_image(node));
    line(&mut out, "Booted", booted(node));
    line(&mut out, "Served", served(node));
    line(&mut out, "Phase", node_phase(node));
    line(
        &mut out,
        "Address",
        status.address.clone().unwrap_or_else(|| "-".into()),
    );
    line(
        &mut out,
        "Device",
        node.spec.device.clone().unwrap_or_else(|| "-".into()),
    );
    line(
        &mut out,
        "Boot mode",
        format!("{:?}", node.spec.boot_mode).to_lowercase(),
    );
    line(&mut out, "Virtual", virtual_text(node));
    if node.spec.virtual_node.is_some() {
        line(&mut out, "Runs on", runs_on(&status));
    }
    line(
        &mut out,
        "Host key",
        status
            .host_key
            .as_deref()
            .map_or_else(|| "-".into(), abbreviate_key),
    );
    line(
        &mut out,
        "Last seen",
        status
            .last_seen
            .as_ref()
            .map_or_else(|| "never".into(), |t| format!("{} ago", age_since(Some(t)))),
    );
    line(
        &mut out,
        "Age",
        age_since(node.metadata.creation_timestamp.as_ref()),
    );
    conditions_section(&mut out, &status.conditions);
    events_section(&mut out, events);
    out
}

/// The SHA-256 fingerprint of an OpenSSH public key line, as OpenSSH prints it (`SHA256:…`); the
/// line shortened when it does not parse.
pub fn key_fingerprint(line: &str) -> String {
    russh::keys::PublicKey::from_openssh(line.trim()).map_or_else(
        |_| abbreviate_key(line),
        |key| key.fingerprint(russh::keys::HashAlg::Sha256).to_string(),
    )
}

/// The host key the operator enforces on a device, as `device show` says it (pure): its
/// fingerprint and where it comes from.
pub fn device_host_key(device: &Device) -> String {
    let made = device.status.as_ref().and_then(|s| s.host_key.as_deref());
    match (device.spec.host_key.as_deref(), made) {
        (Some(pinned), _) => format!("{} (pinned by the lab: spec.hostKey)", key_fingerprint(pinned)),
        (None, Some(made)) => format!(
            "{} (made by walt, served at every network boot: Secret {} in the operator's namespace)",
            key_fingerprint(made),
            walt_crds::host_key_secret_name(&name_of(device))
        ),
        (None, None) if device.spec.firmware.is_some() => {
            "- (not made yet: the operator makes one for a network-booted device)".into()
        }
        (None, None) => "- (none pinned: the first key seen is recorded on the Node)".into(),
    }
}

/// `device show` as a page.
pub fn device_page(device: &Device, events: &[Event]) -> String {
    let mut out = String::new();
    let status = device.status.clone().unwrap_or_default();
    let line = |out: &mut String, key: &str, value: String| {
        let _ = writeln!(out, "{:<14}{value}", format!("{key}:"));
    };
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    line(&mut out, "Name", name_of(device));
    line(&mut out, "Model", device.spec.model.clone());
    line(
        &mut out,
        "Address",
        device.spec.address.as_ref().map_or_else(
            || "(unregistered)".into(),
            |address| format!("{address}:{}", device.spec.ssh_port),
        ),
    );
    line(&mut out, "MAC", or_dash(device.spec.mac.clone()));
    line(
        &mut out,
        "Firmware",
        or_dash(device.spec.firmware.and_then(|f| {
            serde_json::to_value(f)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
        })),
    );
    line(
        &mut out,
        "Boot network",
        device
            .spec
            .boot_network
            .clone()
            .unwrap_or_else(|| "default".into()),
    );
    line(&mut out, "Lent to", or_dash(device.lent_to().map(str::to_owned)));
    line(
        &mut out,
        "Bound to",
        or_dash(
            status
                .bound_to
                .as_ref()
                .map(|b| format!("{}/{}", b.namespace, b.node)),
        ),
    );
    line(&mut out, "Host key", device_host_key(device));
    line(
        &mut out,
        "Age",
        age_since(device.metadata.creation_timestamp.as_ref()),
    );
    conditions_section(&mut out, &status.conditions);
    events_section(&mut out, events);
    out
}

/// `image ls` as a table. `usage` gives the number of nodes booting each image.
pub fn image_table(images: &[Image], usage: &dyn Fn(&Image) -> usize, format: OutputFormat) -> String {
    let wide = format == OutputFormat::Wide;
    let mut headers = vec![
        "NAME", "READY", "ARCH", "MODELS", "SHELL", "LAYERS", "SIZE", "IN-USE", "AGE",
    ];
    if wide {
        headers.extend(["DIGEST", "REFERENCE", "SOURCE"]);
    }
    let mut table = Table::new(headers);
    for image in images {
        let status = image.status.clone().unwrap_or_default();
        let mut row = vec![
            display_image(&name_of(image)),
            image_ready(image),
            status
                .platform
                .as_ref()
                .map_or_else(|| "-".into(), |p| p.architecture.clone()),
            if status.node_models.is_empty() {
                "-".into()
            } else {
                status.node_models.join(",")
            },
            shell_mode(status.shell_mode),
            status.layers.map_or_else(|| "-".into(), |l| l.to_string()),
            status.size.map_or_else(|| "-".into(), bytes),
            match usage(image) {
                0 => "no".into(),
                n => format!("{n} node{}", if n == 1 { "" } else { "s" }),
            },
            age_since(image.metadata.creation_timestamp.as_ref()),
        ];
        if wide {
            row.push(status.digest.as_deref().map_or_else(|| "-".into(), short_digest));
            row.push(status.reference.clone().unwrap_or_else(|| "-".into()));
            row.push(image.spec.source.clone().unwrap_or_else(|| "-".into()));
        }
        table.row(row);
    }
    table.render()
}

/// `True`, `False` (with the reason) or `Unknown` from the Ready condition.
pub fn image_ready(image: &Image) -> String {
    let conditions = image
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    match walt_crds::find_condition(conditions, walt_crds::condition_types::READY) {
        Some(c) if c.status == "True" => "True".into(),
        Some(c) if c.status == "False" => format!("False ({})", c.reason),
        _ => "Unknown".into(),
    }
}

fn shell_mode(mode: Option<ImageShellMode>) -> String {
    match mode {
        Some(ImageShellMode::Init) => "init".into(),
        Some(ImageShellMode::Basic) => "basic".into(),
        None => "-".into(),
    }
}

/// `image show` as a page.
pub fn image_page(image: &Image, booted_by: &[String], events: &[Event]) -> String {
    let mut out = String::new();
    let status = image.status.clone().unwrap_or_default();
    let line = |out: &mut String, key: &str, value: String| {
        let _ = writeln!(out, "{:<13}{value}", format!("{key}:"));
    };
    line(&mut out, "Name", display_image(&name_of(image)));
    line(
        &mut out,
        "Namespace",
        image.metadata.namespace.clone().unwrap_or_default(),
    );
    line(&mut out, "Ready", image_ready(image));
    line(
        &mut out,
        "Reference",
        status.reference.clone().unwrap_or_else(|| "-".into()),
    );
    line(
        &mut out,
        "Digest",
        status.digest.clone().unwrap_or_else(|| "-".into()),
    );
    if let Some(source) = &image.spec.source {
        line(&mut out, "Source", source.clone());
    }
    line(
        &mut out,
        "Platform",
        status.platform.as_ref().map_or_else(
            || "-".into(),
            |p| match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
        ),
    );
    line(
        &mut out,
        "Node models",
        if status.node_models.is_empty() {
            "-".into()
        } else {
            status.node_models.join(", ")
        },
    );
    line(&mut out, "Shell mode", shell_mode(status.shell_mode));
    line(
        &mut out,
        "Layers",
        status.layers.map_or_else(|| "-".into(), |l| l.to_string()),
    );
    line(&mut out, "Size", status.size.map_or_else(|| "-".into(), bytes));
    line(
        &mut out,
        "Booted by",
        if booted_by.is_empty() {
            "no node".into()
        } else {
            booted_by.join(", ")
        },
    );
    line(
        &mut out,
        "Age",
        age_since(image.metadata.creation_timestamp.as_ref()),
    );
    conditions_section(&mut out, &status.conditions);
    events_section(&mut out, events);
    out
}

fn conditions_section(out: &mut String, conditions: &[Condition]) {
    out.push_str("Conditions:\n");
    if conditions.is_empty() {
        out.push_str("  <none>\n");
        return;
    }
    let mut table = Table::new(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
    for c in conditions {
        table.row([
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            age_since(Some(&c.last_transition_time)),
            c.message.clone(),
        ]);
    }
    for l in table.render().lines() {
        let _ = writeln!(out, "  {l}");
    }
}

fn events_section(out: &mut String, events: &[Event]) {
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
        return;
    }
    let mut table = Table::new(["TYPE", "REASON", "AGE", "MESSAGE"]);
    for e in events.iter().rev().take(10).rev() {
        let age = crate::cluster::event_time(e)
            .map_or_else(|| "-".into(), |t| crate::format::age(crate::format::since(t)));
        table.row([
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            age,
            e.message.clone().unwrap_or_default(),
        ]);
    }
    for l in table.render().lines() {
        let _ = writeln!(out, "  {l}");
    }
}

/// `ssh-ed25519 AAAAC3Nz…Qk9 comment` → type and the ends of the key.
fn abbreviate_key(key: &str) -> String {
    let mut parts = key.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(kind), Some(blob)) if blob.len() > 24 => {
            format!("{kind} {}…{}", &blob[..12], &blob[blob.len() - 8..])
        }
        _ => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ImageDigestRef, ImageSpec, ImageStatus, NodeSpec, NodeStatus, Platform, VirtualNode};

    #[test]
    fn device_show_names_the_enforced_host_key_by_fingerprint_and_origin() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ pc1";
        let mut device = Device::new(
            "pc1",
            walt_crds::DeviceSpec {
                address: Some("10.0.0.11".into()),
                ssh_port: 22,
                model: "pc-x86-64".into(),
                mac: Some("52:54:00:00:00:01".into()),
                firmware: Some(walt_crds::Firmware::Ipxe),
                ..walt_crds::DeviceSpec::default()
            },
        );
        assert!(device_host_key(&device).contains("not made yet"));
        device.status = Some(walt_crds::DeviceStatus {
            host_key: Some(key.into()),
            ..walt_crds::DeviceStatus::default()
        });
        let page = device_page(&device, &[]);
        let fingerprint = key_fingerprint(key);
        assert!(
            fingerprint.starts_with("SHA256:") && fingerprint.len() > 40,
            "{fingerprint}"
        );
        assert!(
            page.contains(&format!("Host key:     {fingerprint} (made by walt"))
                && page.contains("walt-hostkey-pc1"),
            "{page}"
        );
        assert!(
            page.contains("Firmware:     ipxe") && page.contains("Boot network: default"),
            "{page}"
        );
        device.spec.host_key = Some(key.into());
        assert!(device_host_key(&device).ends_with("(pinned by the lab: spec.hostKey)"));
    }

    #[test]
    fn a_node_is_ready_once_the_operator_acted_on_what_was_asked() {
        let mut n = node();
        n.metadata.generation = Some(2);
        n.status = Some(NodeStatus {
            phase: NodePhase::Ready,
            observed_generation: Some(2),
            ..NodeStatus::default()
        });
        assert!(node_ready(&n));
        // `node boot` moved spec.image: generation 3, not observed yet.
        n.metadata.generation = Some(3);
        assert!(!node_ready(&n));
        n.status.as_mut().expect("status").observed_generation = Some(3);
        assert!(node_ready(&n));
        // `node reboot`: asked, not handled yet; then handled.
        let annotations = n.metadata.annotations.get_or_insert_default();
        annotations.insert(
            walt_crds::node::REBOOT_REQUESTED_ANNOTATION.into(),
            "2026-11-22T10:00:00Z".into(),
        );
        assert!(!node_ready(&n));
        assert_eq!(node_waiting_for(&n), "reboot requested");
        n.metadata.annotations.get_or_insert_default().insert(
            walt_crds::node::REBOOT_HANDLED_ANNOTATION.into(),
            "2026-11-22T10:00:00Z".into(),
        );
        assert!(node_ready(&n));
    }

    fn node() -> Node {
        let mut n = Node::new(
            "vnode1",
            NodeSpec {
                model: "pc-x86-64".into(),
                image: Some("pc-base".into()),
                virtual_node: Some(VirtualNode::default()),
                ..NodeSpec::default()
            },
        );
        n.metadata.namespace = Some("lab".into());
        n.status = Some(NodeStatus {
            phase: NodePhase::Ready,
            address: Some("10.1.2.3:22".into()),
            booted_image: Some(ImageDigestRef {
                name: Some("pc-base".into()),
                digest: Some("sha256:0123456789abcdef0123456789".into()),
            }),
            ..NodeStatus::default()
        });
        n
    }

    #[test]
    fn node_table_and_wide() {
        let table = node_table(&[node()], OutputFormat::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "NAME     MODEL       IMAGE     PHASE   AGE");
        assert!(lines[1].starts_with("vnode1   pc-x86-64   pc-base   Ready   "));
        let wide = node_table(&[node()], OutputFormat::Wide);
        assert!(wide.contains("10.1.2.3:22   pc-base@sha256:0123456789ab   -        volatile    amd64"));
        let mut vm = node();
        if let Some(v) = vm.spec.virtual_node.as_mut() {
            v.kind = walt_crds::VirtualKind::Vm;
        }
        assert!(node_table(&[vm.clone()], OutputFormat::Wide).contains("volatile    vm amd64"));
        assert!(node_page(&vm, &[]).contains("Virtual:     vm amd64, 512Mi memory, 1 cpu\n"));
    }

    #[test]
    fn a_network_booted_node_shows_what_was_served_and_whether_it_is_verified() {
        let mut n = node();
        let status = n.status.get_or_insert_with(NodeStatus::default);
        status.boot = Some(walt_crds::NodeBoot {
            served: Some("sha256:0123456789abcdef0123456789".into()),
            ..walt_crds::NodeBoot::default()
        });
        status.conditions.push(walt_crds::new_condition(
            walt_crds::condition_types::IMAGE_VERIFIED,
            walt_crds::ConditionStatus::False,
            "DigestMismatch",
            "served a, reports b",
            None,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ));
        let page = node_page(&n, &[]);
        assert!(
            page.contains("Served:      sha256:0123456789ab (not verified: DigestMismatch)\n"),
            "{page}"
        );
        if let Some(condition) = n.status.as_mut().and_then(|s| s.conditions.first_mut()) {
            condition.status = "True".into();
        }
        let wide = node_table(&[n], OutputFormat::Wide);
        assert!(wide.contains("sha256:0123456789ab (verified)"), "{wide}");
    }

    #[test]
    fn node_page_has_everything() {
        let page = node_page(&node(), &[]);
        assert!(page.contains("Name:        vnode1\n"));
        assert!(page.contains("Booted:      pc-base@sha256:0123456789ab\n"));
        assert!(page.contains("Served:      -\n"));
        assert!(page.contains("Virtual:     amd64, 512Mi memory, 1 cpu\n"));
        assert!(page.contains("Runs on:     -\n"), "not scheduled yet:\n{page}");
        assert!(page.contains("Conditions:\n  <none>\nEvents:\n  <none>\n"));
        let mut placed = node();
        let status = placed.status.get_or_insert_with(Default::default);
        status.cluster_node = Some("pi-1".into());
        status.emulated = Some(false);
        assert!(
            node_page(&placed, &[]).contains("Runs on:     cluster node pi-1, native (no emulation)\n"),
            "{}",
            node_page(&placed, &[])
        );
        if let Some(status) = placed.status.as_mut() {
            status.emulated = Some(true);
        }
        assert!(
            node_page(&placed, &[])
                .contains("Runs on:     cluster node pi-1, emulated (qemu-user: another CPU)\n")
        );
    }

    #[test]
    fn image_table_shows_usage() {
        let mut image = Image::new("rpi.v2", ImageSpec::default());
        image.status = Some(ImageStatus {
            platform: Some(Platform {
                architecture: "arm64".into(),
                ..Platform::default()
            }),
            node_models: vec!["rpi-3-b".into(), "rpi-4-b".into()],
            shell_mode: Some(ImageShellMode::Init),
            layers: Some(3),
            size: Some(30 * 1024 * 1024),
            ..ImageStatus::default()
        });
        let table = image_table(&[image], &|_| 2, OutputFormat::Table);
        let row = table.lines().nth(1).expect("row");
        assert!(
            row.starts_with(
                "rpi:v2   Unknown   arm64   rpi-3-b,rpi-4-b   init    3        30.0MiB   2 nodes"
            ),
            "{row}"
        );
    }
}
