//! `device ls`, `node acquire DEVICE [--as NODE]`, `node release NODE` (WalT's `node acquire` and
//! `node release`): the lab's devices lent to the namespace, and the Nodes that hold them.
//!
//! Devices are cluster-scoped and written by lab admins only; a tenant reads them
//! (`walt-device-viewer`) and claims one by creating a Node naming it (`spec.device`). The decisions
//! here are pure ([`lent_rows`], [`acquire_plan`], [`release_check`]); the API calls are at the edges.

use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use walt_crds::{Device, Node, NodeSpec};

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
        let mut row = vec![
            device.name_any(),
            device.spec.model.clone(),
            format!("{}:{}", device.spec.address, device.spec.ssh_port),
            node,
        ];
        if all {
            row.push(device.lent_to().unwrap_or("-").to_owned());
        }
        row.push(age_since(device.metadata.creation_timestamp.as_ref()));
        table.row(row);
    }
    table.render()
}

/// The Node `node acquire` creates (pure): named `as_name` (default: the device's name), of the
/// device's model, naming the device (run as a VM node, `spec.virtual.kind: vm`, when `vm` is
/// given); refused with what to do when the device is not lent to `namespace` or a Node of the
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

/// `device ls [--all]`
pub async fn ls(ctx: &Ctx, all: bool, format: OutputFormat) -> Result<()> {
    let list = devices(ctx)
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api(Op::named("list", "device", "devices.walt.dev", "", ""), e))?
        .items;
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
                address: "192.0.2.11".into(),
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
        let vm_node = acquire_plan(&device(Some("alice"), None), "alice", &[], None, None, Some(vm))
            .expect("acquire as a VM");
        assert!(walt_crds::is_vm(&vm_node));
        assert_eq!(vm_node.spec.device.as_deref(), Some("pi1"));
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
}
