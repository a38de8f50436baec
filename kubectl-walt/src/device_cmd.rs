//! `device ls`, `node acquire DEVICE [--as NODE]`, `node release NODE` (WalT's `node acquire` and
//! `node release`): the lab's devices lent to the namespace, and the Nodes that hold them; for lab
//! admins, `device ls --unregistered` and `device register` (the devices the boot service recorded
//! when they asked for a boot while unknown).
//!
//! Devices are cluster-scoped and written by lab admins only; a tenant reads them
//! (`walt-device-viewer`) and claims one by creating a Node naming it (`spec.device`). The decisions
//! here are pure ([`lent_rows`], [`acquire_plan`], [`release_check`]); the API calls are at the edges.

use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use walt_crds::{DISCOVERED_LABEL, Device, DeviceLoan, Node, NodeSpec};

use crate::cli::OutputFormat;
use crate::cluster::Ctx;
use crate::error::{Error, Op, Result};
use crate::format::{Table, age_since, serialize_objects};
use crate::resolve::{list_nodes, name_of};

/// What a device lent to the namespace is doing for it (pure): the Node of the namespace that holds
/// it, else `available`.
pub fn holder(device: &Device, nodes: &[Node]) -> Option<String> {
    let name = device.name_any();
    let claimed: Vec<String> = nodes
        .iter()
        .filter(|node| node.spec.device.as_deref() == Some(name.as_str()))
        .map(name_of)
        .collect();
    let bound = device
        .bound_to()
        .map(|binding| binding.node.clone())
        .filter(|node| claimed.contains(node));
    bound.or_else(|| claimed.into_iter().next())
}

/// The devices lent to `namespace`, as `device ls` shows them (pure).
pub fn lent_rows(devices: &[Device], namespace: &str, nodes: &[Node], all: bool) -> String {
    let mut headers = vec!["NAME", "MODEL", "ADDRESS", "NODE"];
    if all {
        headers.push("LENT TO");
    }
    headers.push("AGE");
    let mut table = Table::new(headers);
    for device in devices {
        let lent_here = device.lent_to() == Some(namespace);
        if !all && !lent_here {
            continue;
        }
        let node = if lent_here {
            holder(device, nodes).unwrap_or_else(|| "(available)".into())
        } else {
            "-".into()
        };
        let shared = |condition: Option<&walt_crds::Condition>| condition.is_some_and(|c| c.status == "True");
        let address = match &device.spec.address {
            None => "(unregistered)".to_owned(),
            Some(_) if shared(device.mac_conflict()) => "(MAC shared: not booted)".to_owned(),
            Some(_) if shared(device.address_conflict()) => "(address shared: not booted)".to_owned(),
            Some(address) => format!("{address}:{}", device.spec.ssh_port),
        };
        let mut row = vec![device.name_any(), device.spec.model.clone(), address, node];
        if all {
            row.push(device.lent_to().unwrap_or("-").to_owned());
        }
        row.push(age_since(device.metadata.creation_timestamp.as_ref()));
        table.row(row);
    }
    table.render()
}

/// The devices the boot service recorded and no lab admin registered yet, as `device ls
/// --unregistered` shows them (pure): what their requests said, where and when.
pub fn unregistered_rows(devices: &[Device]) -> String {
    let mut table = Table::new(vec![
        "NAME",
        "MAC",
        "FIRMWARE",
        "MODEL",
        "NETWORK",
        "LENT ADDRESS",
        "FIRST SEEN",
        "LAST SEEN",
    ]);
    for device in devices.iter().filter(|d| !d.is_registered()) {
        let seen = device.status.as_ref().and_then(|s| s.discovered.as_ref());
        let ago = |time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            time.map_or_else(|| "-".to_owned(), |t| format!("{} ago", age_since(Some(t))))
        };
        table.row(vec![
            device.name_any(),
            device.spec.mac.clone().unwrap_or_else(|| "-".into()),
            seen.map_or_else(|| "-".into(), |s| s.firmware.clone()),
            device.spec.model.clone(),
            seen.map_or_else(|| "-".into(), |s| s.network.clone()),
            // Where it boots the lab's default image of its model, when its network lends addresses.
            seen.and_then(|s| s.address.clone()).unwrap_or_else(|| "-".into()),
            ago(seen.and_then(|s| s.first_seen.as_ref())),
            ago(seen.and_then(|s| s.last_seen.as_ref())),
        ]);
    }
    table.render()
}

/// What `device register` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// The device's new name (`--as`; default: its recorded name).
    pub name: Option<String>,
    /// Where the operator reaches it (`--address`).
    pub address: String,
    /// Its model (`--model`; default: the recorded one, which must then be known).
    pub model: Option<String>,
    /// The namespace to lend it to (`--lend`).
    pub lend: Option<String>,
}

/// What `device register` writes (pure): the registered Device (the recorded one's MAC, firmware
/// and boot network, the admin's address, model and loan), and the recorded Device to delete when
/// it gets another name (else the recorded one is replaced in place). Refused with what to do when
/// the device is registered already or its model is still unknown.
pub fn register_plan(recorded: &Device, registration: &Registration) -> Result<(Device, Option<String>)> {
    let name = recorded.name_any();
    if recorded.is_registered() {
        return Err(Error::Invalid(format!(
            "the device {name} is registered already (spec.address is set): edit it with `kubectl edit devices.walt.dev {name}`"
        )));
    }
    let model = registration
        .model
        .clone()
        .unwrap_or_else(|| recorded.spec.model.clone());
    if model == "unknown" {
        return Err(Error::Invalid(format!(
            "the model of {name} is unknown (its boot request did not name it): give it with --model, e.g. --model rpi-3-b"
        )));
    }
    let new_name = registration.name.clone().unwrap_or_else(|| name.clone());
    let mut spec = recorded.spec.clone();
    spec.address = Some(registration.address.clone());
    spec.model = model;
    spec.lent_to = registration
        .lend
        .clone()
        .map(|namespace| DeviceLoan { namespace });
    let mut device = Device::new(&new_name, spec);
    let mut labels = recorded.labels().clone();
    labels.remove(DISCOVERED_LABEL);
    if !labels.is_empty() {
        device.metadata.labels = Some(labels);
    }
    if new_name == name {
        // Replaced in place: the write names the version read (a concurrent change is refused).
        device.metadata.resource_version = recorded.resource_version();
        return Ok((device, None));
    }
    Ok((device, Some(name)))
}

/// The Node `node acquire` creates (pure): named `as_name` (default: the device's name), of the
/// device's model, naming the device (run as a VM node, `spec.virtual.kind: vm`, when `vm` is
/// given, of the CPU the device's firmware boots: arm64 for `u-boot`); refused with what to do when the device is not lent to `namespace` or a Node of the
/// namespace already holds it.
pub fn acquire_plan(
    device: &Device,
    namespace: &str,
    nodes: &[Node],
    as_name: Option<&str>,
    image: Option<&str>,
    vm: Option<walt_crds::VirtualNode>,
) -> Result<Node> {
    let name = device.name_any();
    if device.lent_to() != Some(namespace) {
        return Err(Error::Invalid(format!(
            "the device {name} is not lent to the namespace {namespace}: `kubectl walt device ls` lists those that are; \
             ask a lab admin to lend it (they set spec.lentTo on the Device)"
        )));
    }
    if let Some(holder) = holder(device, nodes) {
        return Err(Error::Invalid(format!(
            "the device {name} is held by the node {holder}: release it first (`kubectl walt node release {holder}`)"
        )));
    }
    let node_name = as_name.map_or_else(|| name.clone(), str::to_owned);
    let vm = vm.map(|mut vm| {
        if let Some(architecture) = device
            .spec
            .firmware
            .and_then(walt_crds::Firmware::vm_architecture)
        {
            vm.architecture = architecture;
        }
        vm
    });
    let mut node = Node::new(
        &node_name,
        NodeSpec {
            model: device.spec.model.clone(),
            device: Some(name),
            image: image.map(str::to_owned),
            virtual_node: vm,
            ..NodeSpec::default()
        },
    );
    node.metadata.namespace = Some(namespace.to_owned());
    Ok(node)
}

/// The device a Node holds, if `node release` may release it (pure): only physical Nodes hold a
/// device; a virtual node is removed with `node remove`.
pub fn release_check(node: &Node) -> Result<String> {
    node.spec.device.clone().ok_or_else(|| {
        Error::Invalid(format!(
            "{} is a virtual node: it holds no device; remove it with `kubectl walt node remove {}`",
            name_of(node),
            name_of(node)
        ))
    })
}

fn devices(ctx: &Ctx) -> Api<Device> {
    Api::all(ctx.client.clone())
}

async fn get_device(ctx: &Ctx, name: &str) -> Result<Device> {
    devices(ctx)
        .get_opt(name)
        .await
        .map_err(|e| Error::api(Op::named("get", "device", "devices.walt.dev", name, ""), e))?
        .ok_or_else(|| Error::NotFound {
            kind: "device",
            name: name.to_owned(),
            namespace: "(the lab)".into(),
            hint: "`kubectl walt device ls` lists the devices lent to your namespace".into(),
        })
}

/// `device ls [--all | --unregistered]`
pub async fn ls(ctx: &Ctx, all: bool, unregistered: bool, format: OutputFormat) -> Result<()> {
    let list = devices(ctx)
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api(Op::named("list", "device", "devices.walt.dev", "", ""), e))?
        .items;
    if unregistered {
        let shown: Vec<Device> = list.into_iter().filter(|d| !d.is_registered()).collect();
        match format {
            OutputFormat::Table | OutputFormat::Wide if shown.is_empty() => eprintln!(
                "No unregistered device: the boot service records a device here when it asks for a network boot \
                 while no Device has its MAC address."
            ),
            OutputFormat::Table | OutputFormat::Wide => print!("{}", unregistered_rows(&shown)),
            _ => print!("{}", serialize_objects(&shown, format, false)?),
        }
        return Ok(());
    }
    let nodes = list_nodes(ctx).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            if !all
                && list
                    .iter()
                    .all(|device| device.lent_to() != Some(ctx.namespace.as_str()))
            {
                eprintln!(
                    "No device is lent to the namespace {}. A lab admin lends devices (spec.lentTo of a Device); \
                     `kubectl walt device ls --all` shows the lab's.",
                    ctx.namespace
                );
            } else {
                print!("{}", lent_rows(&list, &ctx.namespace, &nodes, all));
            }
        }
        _ => {
            let shown: Vec<Device> = list
                .into_iter()
                .filter(|device| all || device.lent_to() == Some(ctx.namespace.as_str()))
                .collect();
            print!("{}", serialize_objects(&shown, format, false)?);
        }
    }
    Ok(())
}

/// `device show DEVICE`: what the lab says of it, the host key the operator enforces (fingerprint),
/// its conditions and Events.
pub async fn show(ctx: &Ctx, name: &str, format: OutputFormat) -> Result<()> {
    let device = get_device(ctx, name).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            let uid = device.metadata.uid.clone().unwrap_or_default();
            // A cluster-scoped object's Events are in the namespace `default`.
            let events = ctx.events_in("default", &uid).await;
            print!("{}", crate::describe::device_page(&device, &events));
        }
        _ => print!("{}", serialize_objects(&[device], format, true)?),
    }
    Ok(())
}

/// `device register DEVICE --address ADDRESS [--as NAME] [--model MODEL] [--lend NAMESPACE]`
pub async fn register(ctx: &Ctx, name: &str, registration: &Registration) -> Result<()> {
    let recorded = get_device(ctx, name).await?;
    let (device, delete) = register_plan(&recorded, registration)?;
    let new_name = device.name_any();
    let api = devices(ctx);
    if delete.is_none() {
        api.replace(&new_name, &PostParams::default(), &device)
            .await
            .map_err(|e| {
                Error::api(
                    Op::named("replace", "device", "devices.walt.dev", &new_name, ""),
                    e,
                )
            })?;
    } else {
        api.create(&PostParams::default(), &device).await.map_err(|e| {
            Error::api(
                Op::named("create", "device", "devices.walt.dev", &new_name, ""),
                e,
            )
        })?;
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|e| Error::api(Op::named("delete", "device", "devices.walt.dev", name, ""), e))?;
    }
    println!(
        "Device {new_name} registered ({}, {}{}).{}",
        registration.address,
        device.spec.model,
        device
            .lent_to()
            .map(|ns| format!(", lent to {ns}"))
            .unwrap_or_default(),
        if device.lent_to().is_some() {
            format!(
                " A Node of that namespace boots it once it acquires it (`kubectl walt node acquire {new_name}`)."
            )
        } else {
            format!(
                " Lend it to a namespace: `kubectl patch devices.walt.dev {new_name} --type=merge -p '{{\"spec\":{{\"lentTo\":{{\"namespace\":\"NS\"}}}}}}'`."
            )
        }
    );
    Ok(())
}

/// `node acquire DEVICE [--as NODE] [--image IMAGE] [--vm [--memory Q] [--cpu Q]]`
pub async fn acquire(
    ctx: &Ctx,
    device: &str,
    as_name: Option<&str>,
    image: Option<&str>,
    vm: Option<walt_crds::VirtualNode>,
) -> Result<()> {
    let device = get_device(ctx, device).await?;
    let nodes = list_nodes(ctx).await?;
    let is_vm = vm.is_some();
    let node = acquire_plan(&device, &ctx.namespace, &nodes, as_name, image, vm)?;
    let name = name_of(&node);
    ctx.nodes()
        .create(&PostParams::default(), &node)
        .await
        .map_err(|e| {
            Error::api(
                Op::named("create", "node", "nodes.walt.dev", &name, &ctx.namespace),
                e,
            )
        })?;
    println!(
        "Node {name} created on the device {} ({}{}). Follow with `kubectl walt node wait {name}`{}; \
         `kubectl walt node release {name}` gives the device back.",
        device.name_any(),
        device.spec.model,
        if is_vm { ", run as a VM" } else { "" },
        if is_vm {
            format!(" and its boot with `kubectl walt node console {name}`")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `node release NODE`
pub async fn release(ctx: &Ctx, name: &str) -> Result<()> {
    let node = ctx.get_node(name).await?;
    let device = release_check(&node)?;
    ctx.nodes()
        .delete(name, &DeleteParams::default())
        .await
        .map_err(|e| {
            Error::api(
                Op::named("delete", "node", "nodes.walt.dev", name, &ctx.namespace),
                e,
            )
        })?;
    println!("{name}: released the device {device} (another node of the namespace may acquire it now).");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceBinding, DeviceLoan, DeviceSpec, DeviceStatus};

    fn device(lent_to: Option<&str>, bound: Option<&str>) -> Device {
        let mut device = Device::new(
            "pi1",
            DeviceSpec {
                address: Some("192.0.2.11".into()),
                ssh_port: 22,
                model: "rpi-4-b".into(),
                lent_to: lent_to.map(|namespace| DeviceLoan {
                    namespace: namespace.into(),
                }),
                ..DeviceSpec::default()
            },
        );
        device.status = Some(DeviceStatus {
            bound_to: bound.map(|node| DeviceBinding {
                namespace: "alice".into(),
                node: node.into(),
                uid: "u".into(),
            }),
            ..DeviceStatus::default()
        });
        device
    }

    fn node(name: &str, device: &str) -> Node {
        Node::new(
            name,
            NodeSpec {
                device: Some(device.into()),
                ..NodeSpec::default()
            },
        )
    }

    #[test]
    fn acquire_makes_a_node_of_the_device_model_naming_it() {
        let node = acquire_plan(
            &device(Some("alice"), None),
            "alice",
            &[],
            Some("mine"),
            Some("rpi-debian"),
            None,
        )
        .expect("acquire");
        assert_eq!(name_of(&node), "mine");
        assert_eq!(node.spec.device.as_deref(), Some("pi1"));
        assert_eq!(node.spec.model, "rpi-4-b");
        assert_eq!(node.spec.image.as_deref(), Some("rpi-debian"));
        let default_name =
            acquire_plan(&device(Some("alice"), None), "alice", &[], None, None, None).expect("acquire");
        assert_eq!(name_of(&default_name), "pi1");
        assert!(default_name.spec.virtual_node.is_none());
        let vm = walt_crds::VirtualNode {
            kind: walt_crds::VirtualKind::Vm,
            ..walt_crds::VirtualNode::default()
        };
        let vm_node = acquire_plan(
            &device(Some("alice"), None),
            "alice",
            &[],
            None,
            None,
            Some(vm.clone()),
        )
        .expect("acquire as a VM");
        assert!(walt_crds::is_vm(&vm_node));
        assert_eq!(vm_node.spec.device.as_deref(), Some("pi1"));
        let mut arm_slot = device(Some("alice"), None);
        arm_slot.spec.firmware = Some(walt_crds::Firmware::UBoot);
        let arm = acquire_plan(&arm_slot, "alice", &[], None, None, Some(vm.clone())).expect("acquire");
        assert_eq!(
            arm.spec.virtual_node.map(|v| v.architecture),
            Some(walt_crds::Architecture::Arm64),
            "a U-Boot VM slot is an arm64 VM"
        );
        arm_slot.spec.firmware = Some(walt_crds::Firmware::Ipxe);
        let pc = acquire_plan(&arm_slot, "alice", &[], None, None, Some(vm)).expect("acquire");
        assert_eq!(
            pc.spec.virtual_node.map(|v| v.architecture),
            Some(walt_crds::Architecture::Amd64)
        );
    }

    #[test]
    fn acquire_refuses_devices_not_lent_here_or_held() {
        for not_lent in [device(Some("bob"), None), device(None, None)] {
            let refused = acquire_plan(&not_lent, "alice", &[], None, None, None).expect_err("not lent");
            assert!(
                refused.to_string().contains("not lent to the namespace alice"),
                "{refused}"
            );
        }
        let held = acquire_plan(
            &device(Some("alice"), Some("n1")),
            "alice",
            &[node("n1", "pi1")],
            None,
            None,
            None,
        )
        .expect_err("held");
        assert!(
            held.to_string().contains("kubectl walt node release n1"),
            "{held}"
        );
        // A stale binding (its Node is gone) does not hold the device.
        assert!(
            acquire_plan(
                &device(Some("alice"), Some("gone")),
                "alice",
                &[],
                None,
                None,
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn only_physical_nodes_are_released() {
        assert_eq!(release_check(&node("n1", "pi1")).expect("physical"), "pi1");
        let virtual_node = Node::new(
            "v1",
            NodeSpec {
                virtual_node: Some(walt_crds::VirtualNode::default()),
                ..NodeSpec::default()
            },
        );
        assert!(
            release_check(&virtual_node)
                .expect_err("virtual")
                .to_string()
                .contains("node remove v1")
        );
    }

    #[test]
    fn ls_shows_the_devices_lent_here_and_who_holds_them() {
        let devices = [device(Some("alice"), Some("n1")), {
            let mut other = device(Some("bob"), None);
            other.metadata.name = Some("pi2".into());
            other
        }];
        let table = lent_rows(&devices, "alice", &[node("n1", "pi1")], false);
        assert!(
            table.contains("pi1") && table.contains("192.0.2.11:22") && table.contains("n1"),
            "{table}"
        );
        assert!(!table.contains("pi2"), "{table}");
        let all = lent_rows(&devices, "alice", &[], true);
        assert!(
            all.contains("pi2") && all.contains("bob") && all.contains("(available)"),
            "{all}"
        );
    }

    fn recorded(model: &str) -> Device {
        let mut device = Device::new(
            "unknown-525400aa0007",
            DeviceSpec {
                model: model.into(),
                mac: Some("52:54:00:aa:00:07".into()),
                firmware: Some(walt_crds::Firmware::Rpi),
                boot_network: Some("lab2".into()),
                ..DeviceSpec::default()
            },
        );
        device.labels_mut().insert(DISCOVERED_LABEL.into(), "true".into());
        device.metadata.resource_version = Some("42".into());
        device.status = Some(DeviceStatus {
            discovered: Some(walt_crds::DeviceDiscovery {
                firmware: "rpi".into(),
                network: "lab2".into(),
                address: Some("10.0.2.200".into()),
                ..walt_crds::DeviceDiscovery::default()
            }),
            ..DeviceStatus::default()
        });
        device
    }

    #[test]
    fn unregistered_devices_are_listed_apart_and_shown_unregistered_to_all() {
        let devices = [device(Some("alice"), None), recorded("unknown")];
        let table = unregistered_rows(&devices);
        assert!(
            table.contains("unknown-525400aa0007")
                && table.contains("52:54:00:aa:00:07")
                && table.contains("rpi")
                && table.contains("lab2")
                && table.contains("10.0.2.200"),
            "{table}"
        );
        assert!(
            !table.contains("pi1"),
            "registered devices are not listed: {table}"
        );
        let all = lent_rows(&devices, "alice", &[], true);
        assert!(all.contains("(unregistered)"), "{all}");
    }

    #[test]
    fn a_device_whose_mac_or_address_is_shared_says_it_is_not_booted() {
        let shared = |type_: &str| {
            let mut shared = device(Some("alice"), None);
            shared.status.get_or_insert_with(Default::default).conditions = vec![walt_crds::new_condition(
                type_,
                walt_crds::ConditionStatus::True,
                "Shared",
                "shared",
                None,
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
            )];
            lent_rows(&[shared], "alice", &[], false)
        };
        let table = shared(walt_crds::MAC_CONFLICT_CONDITION);
        assert!(table.contains("(MAC shared: not booted)"), "{table}");
        let table = shared(walt_crds::ADDRESS_CONFLICT_CONDITION);
        assert!(table.contains("(address shared: not booted)"), "{table}");
    }

    #[test]
    fn register_gives_the_recorded_device_an_address_in_place_or_under_a_new_name() {
        let registration = Registration {
            address: "10.0.0.31".into(),
            model: Some("rpi-3-b".into()),
            lend: Some("alice".into()),
            ..Registration::default()
        };
        let (device, delete) = register_plan(&recorded("unknown"), &registration).expect("registered");
        assert_eq!(delete, None, "replaced in place");
        assert_eq!(device.name_any(), "unknown-525400aa0007");
        assert_eq!(device.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(device.spec.address.as_deref(), Some("10.0.0.31"));
        assert_eq!(device.spec.mac.as_deref(), Some("52:54:00:aa:00:07"));
        assert_eq!(device.spec.firmware, Some(walt_crds::Firmware::Rpi));
        assert_eq!(device.spec.boot_network.as_deref(), Some("lab2"));
        assert_eq!(device.lent_to(), Some("alice"));
        assert!(!device.labels().contains_key(DISCOVERED_LABEL));
        let renamed = Registration {
            name: Some("rpi3-01".into()),
            ..registration.clone()
        };
        let (device, delete) = register_plan(&recorded("unknown"), &renamed).expect("registered");
        assert_eq!(device.name_any(), "rpi3-01");
        assert_eq!(device.metadata.resource_version, None);
        assert_eq!(delete.as_deref(), Some("unknown-525400aa0007"));
        let no_model = Registration {
            model: None,
            ..registration
        };
        let refused = register_plan(&recorded("unknown"), &no_model).expect_err("model unknown");
        assert!(refused.to_string().contains("--model"), "{refused}");
        assert!(
            register_plan(&recorded("pc-x86-64"), &no_model).is_ok(),
            "a model its request named"
        );
        let refused = register_plan(&device, &no_model).expect_err("registered already");
        assert!(refused.to_string().contains("registered already"), "{refused}");
    }
}
