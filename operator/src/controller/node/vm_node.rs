//! VM nodes (`spec.virtual.kind: vm`): a Device of the lab (its MAC, address and boot network)
//! powered by the operator as a virtual machine. The pod `walt-node-<node>` runs `walt-operator vm`
//! (qemu-system on a tap of the lab network's bridge, [`crate::runtime::vm`]) on the cluster node
//! that holds that bridge; the VM network-boots through the boot service exactly like a lab PC, and
//! from there the Node is a physical one: the SSH probe, the verified booted image and the boot
//! watchdog ([`super::probe`], [`super::netboot`]), with one difference: a reboot, asked for or
//! decided (a new image, a watchdog retry), is a power cycle: the pod is deleted and made again.
//!
//! The pure half: [`vm_networks`] (the operator's `--vm-network`), [`plan`] (may this Device run as
//! a VM here, and on what), [`build_vm_pod`] and [`power_step`] (keep, create, or power-cycle the
//! pod); [`reconcile`] carries them out.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements, SecurityContext};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{Architecture, Device, Firmware, Node, NodeStatus};

use super::{BootTarget, pending_reboot_request, probe, reasons};
use crate::boot::state::Mac;
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, KubeResultExt, Result};
use crate::controller::shared::pods::vnode_object_name;
use crate::controller::shared::runtime::{delete, ensure_runtime_namespace, owned_by};
use crate::runtime::vm::{AccelChoice, VmArch};

/// Annotation of a VM node pod: the MAC its VM has (its Device's when it was made).
pub const VM_MAC_ANNOTATION: &str = "walt.dev/vm-mac";
/// The container of a VM node pod (what `kubectl walt node console` reads).
pub const VM_CONTAINER: &str = "vm";

/// A lab network VM nodes can run on (`--vm-network`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNetwork {
    /// Its name (Devices' `spec.bootNetwork`; `default` for those with none).
    pub name: String,
    /// The bridge on the cluster nodes' host network that reaches it.
    pub bridge: String,
    /// The labels of the cluster nodes that hold the bridge.
    pub node_selector: BTreeMap<String, String>,
}

/// The `--vm-network` entries (pure): `NETWORK=BRIDGE [LABEL=VALUE …]`; an entry that does not
/// parse is the error, named.
pub fn vm_networks(entries: &[String]) -> std::result::Result<Vec<VmNetwork>, String> {
    entries
        .iter()
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            let malformed = || format!("--vm-network {entry:?}: expected NETWORK=BRIDGE [LABEL=VALUE …]");
            let (name, rest) = entry.trim().split_once('=').ok_or_else(malformed)?;
            let mut words = rest.split_whitespace();
            let bridge = words.next().filter(|b| !b.contains('=')).ok_or_else(malformed)?;
            let node_selector = words
                .map(|word| {
                    word.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(malformed)
                })
                .collect::<std::result::Result<_, _>>()?;
            if name.trim().is_empty() || bridge.len() > 15 {
                return Err(malformed());
            }
            Ok(VmNetwork {
                name: name.trim().to_owned(),
                bridge: bridge.to_owned(),
                node_selector,
            })
        })
        .collect()
}

/// What the operator knows of VM nodes (its flags).
#[derive(Clone, Copy, Debug)]
pub struct VmSettings<'a> {
    /// `--vm-image`.
    pub image: Option<&'a str>,
    /// `--vm-network`, parsed.
    pub networks: &'a [VmNetwork],
    /// `--vm-accel`.
    pub accel: AccelChoice,
}

/// What a VM node's pod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan<'a> {
    /// The pod's image.
    pub image: &'a str,
    /// The lab network and its bridge.
    pub network: &'a VmNetwork,
    /// The VM's MAC (its Device's).
    pub mac: Mac,
    /// Its CPU, hence its board and firmware (its Device's firmware tells).
    pub arch: VmArch,
    /// How its CPU runs.
    pub accel: AccelChoice,
}

/// Why a Device does not run as this Node's VM: the Booted reason and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRefused {
    /// The condition's and Event's reason.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Whether a MAC is locally administered (the second bit of its first byte): the addresses no NIC
/// is made with, so a VM never takes a real device's (pure).
pub fn locally_administered(mac: Mac) -> bool {
    mac.0[0] & 0x02 != 0 && mac.0[0] & 0x01 == 0
}

/// Whether `device` may run as `node`'s VM, and on what (pure). The Device must be a VM slot: a
/// locally administered MAC (a tenant holding a real device cannot make a VM answer in its place),
/// firmware `ipxe` (an amd64 VM: its NIC's iPXE ROM) or `u-boot` (an arm64 VM: U-Boot), the Node's
/// `spec.virtual.architecture` that CPU; its boot network must be one of `--vm-network`; the
/// operator needs `--vm-image`.
pub fn plan<'a>(
    node: &Node,
    device: &Device,
    settings: &VmSettings<'a>,
) -> std::result::Result<VmPlan<'a>, VmRefused> {
    let refuse = |reason, message: String| Err(VmRefused { reason, message });
    let name = device.name_any();
    let Some(image) = settings.image else {
        return refuse(
            reasons::VM_NOT_CONFIGURED,
            "this lab runs no VM nodes: the operator has no --vm-image (a lab admin sets vmNodes in the chart)".into(),
        );
    };
    let mac = match device.spec.mac.as_deref().map(str::parse::<Mac>) {
        Some(Ok(mac)) if locally_administered(mac) => mac,
        Some(Ok(mac)) => {
            return refuse(
                reasons::VM_DEVICE_REFUSED,
                format!(
                    "the Device {name} has the MAC {mac} of a real NIC (not locally administered): it is not a VM slot, a VM must not answer in its place"
                ),
            );
        }
        _ => {
            return refuse(
                reasons::VM_DEVICE_REFUSED,
                format!(
                    "the Device {name} has no spec.mac: a VM slot has a locally administered MAC (52:54:00:…)"
                ),
            );
        }
    };
    let arch = match device.spec.firmware.and_then(Firmware::vm_architecture) {
        Some(Architecture::Amd64) => VmArch::Amd64,
        Some(Architecture::Arm64) => VmArch::Arm64,
        _ => {
            return refuse(
                reasons::VM_DEVICE_REFUSED,
                format!(
                    "the Device {name} is not network-booted with firmware ipxe (an amd64 VM's NIC ROM) or u-boot (an arm64 VM's firmware): it is not a VM slot"
                ),
            );
        }
    };
    let architecture = node
        .spec
        .virtual_node
        .as_ref()
        .map_or(Architecture::Amd64, |v| v.architecture);
    if architecture.as_str() != arch.as_str() {
        return refuse(
            reasons::VM_DEVICE_REFUSED,
            format!(
                "the Device {name} is an {arch} VM slot (its firmware boots {arch}), the Node's spec.virtual.architecture is {architecture}: set it to {arch} (`kubectl walt node acquire --vm` takes it from the Device)",
                arch = arch.as_str(),
                architecture = architecture.as_str()
            ),
        );
    }
    let wanted = crate::controller::boot_source::network_of(device);
    let Some(network) = settings.networks.iter().find(|n| n.name == wanted) else {
        return refuse(
            reasons::VM_NOT_CONFIGURED,
            format!(
                "the Device {name} boots on the lab network {wanted}, where the operator runs no VM (no --vm-network {wanted}=BRIDGE)"
            ),
        );
    };
    Ok(VmPlan {
        image,
        network,
        mac,
        arch,
        accel: settings.accel,
    })
}

fn accel_arg(accel: AccelChoice) -> &'static str {
    match accel {
        AccelChoice::Auto => "auto",
        AccelChoice::Kvm => "kvm",
        AccelChoice::Tcg => "tcg",
    }
}

/// The pod of a VM node (pure): `walt-operator vm` on the host network of a cluster node holding
/// the lab bridge, privileged (it opens `/dev/net/tun` and `/dev/kvm`, and plugs its tap into a
/// bridge of the host's network namespace: device access Kubernetes grants only to privileged
/// containers), never restarted (a powered-off VM is powered on again by the operator, which
/// knows why), standard input open for the console. The VM's memory and CPUs are requested, not
/// limited: qemu's `-m` and `-smp` bound the guest, and a limit at the guest's size would kill
/// qemu for its own few MiB.
pub fn build_vm_pod(node: &Node, plan: &VmPlan<'_>) -> Pod {
    let virtual_node = node.spec.virtual_node.clone().unwrap_or_default();
    let mut metadata = super::build::owned_meta(node, vnode_object_name(&node.name_any()));
    metadata.annotations = Some(BTreeMap::from([(
        VM_MAC_ANNOTATION.to_owned(),
        plan.mac.to_string(),
    )]));
    let mut args = [
        "vm",
        "--mac",
        &plan.mac.to_string(),
        "--bridge",
        &plan.network.bridge,
        "--memory",
        &virtual_node.memory.0,
        "--cpus",
        &virtual_node.cpu.0,
        "--accel",
        accel_arg(plan.accel),
    ]
    .map(str::to_owned)
    .to_vec();
    // amd64 is the runner's default: amd64 pods keep the arguments they always had.
    if plan.arch != VmArch::Amd64 {
        args.extend(["--arch".to_owned(), plan.arch.as_str().to_owned()]);
    }
    Pod {
        metadata,
        spec: Some(PodSpec {
            host_network: Some(true),
            node_selector: (!plan.network.node_selector.is_empty())
                .then(|| plan.network.node_selector.clone()),
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(10),
            containers: vec![Container {
                name: VM_CONTAINER.into(),
                image: Some(plan.image.to_owned()),
                command: Some(vec!["walt-operator".into()]),
                args: Some(args),
                stdin: Some(true),
                stdin_once: Some(false),
                tty: Some(false),
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    ..SecurityContext::default()
                }),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".to_owned(), virtual_node.cpu.clone()),
                        ("memory".to_owned(), virtual_node.memory.clone()),
                    ])),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// What to do with a VM node's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PowerStep {
    /// It runs the VM it should: keep it.
    Keep,
    /// There is none: power the VM on.
    Create,
    /// A pod of that name exists that this Node does not own: neither used nor replaced.
    NotOurs,
    /// Power-cycle the VM (delete the pod; it is made again next time): `note` says why,
    /// `handled` is the reboot request this handles, if one asked for it.
    PowerCycle {
        /// Why (the Event's note).
        note: String,
        /// The reboot request this handles.
        handled: Option<String>,
    },
}

/// Decides what happens to a VM node's pod (pure): one the Node does not own is left alone; a
/// reboot request power-cycles the VM (whether the VM answers or not: a hung one too); so does a
/// VM that powered off (its pod ended) or one with another MAC than its Device's now. Reboots the
/// operator decides itself (a new image, the watchdog) come from the probe's decision.
pub fn power_step(node: &Node, plan: &VmPlan<'_>, existing: Option<&Pod>) -> PowerStep {
    let Some(pod) = existing else {
        return PowerStep::Create;
    };
    if !owned_by(&pod.metadata, "Node", node) {
        return PowerStep::NotOurs;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PowerStep::Keep;
    }
    if let Some(requested) = pending_reboot_request(node) {
        return PowerStep::PowerCycle {
            note: format!("reboot requested at {requested}: power-cycling the VM"),
            handled: Some(requested),
        };
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return PowerStep::PowerCycle {
            note: "the VM powered off (its pod ended): powering it on again".into(),
            handled: None,
        };
    }
    let mac = plan.mac.to_string();
    if pod.annotations().get(VM_MAC_ANNOTATION) != Some(&mac) {
        return PowerStep::PowerCycle {
            note: format!("the Device's MAC is now {mac}: power-cycling the VM with it"),
            handled: None,
        };
    }
    PowerStep::Keep
}

/// The status of a VM node being power-cycled (pure): rebooting since now, and a new boot for the
/// watchdog to watch.
pub fn power_cycled(node: &Node, mut status: NodeStatus, note: &str, now: Timestamp) -> NodeStatus {
    super::decide::mark_rebooting(&mut status, node, note.to_owned(), now);
    if let Some(boot) = status.boot.as_mut() {
        boot.started_at = Some(Time(now));
        boot.retries = 0;
    }
    status
}

/// The status of a VM node just powered on (pure): a boot starts, which the watchdog watches (a VM
/// whose firmware never gets as far as mounting its root is retried too); the retries so far are
/// kept (the watchdog's own power cycles come through here).
pub fn powered_on(mut status: NodeStatus, now: Timestamp) -> NodeStatus {
    status.boot.get_or_insert_with(Default::default).started_at = Some(Time(now));
    status
}

/// The status of a VM node that cannot run (pure): pending, `Booted=False` with the reason.
pub fn refused(node: &Node, status: NodeStatus, refusal: &VmRefused, now: Timestamp) -> NodeStatus {
    super::virtual_node::pending_because(node, status, refusal.reason, refusal.message.clone(), now)
}

/// Reconciles a VM node: its Device claimed, its pod kept, made or power-cycled, then probed and
/// judged like a device walt network-boots.
pub async fn reconcile(
    node: &Node,
    context: &Context,
    target: Option<BootTarget>,
    mut status: NodeStatus,
) -> Result<Action> {
    let namespace = node.namespace().unwrap_or_default();
    let device = match probe::claim_device(context, node).await? {
        Ok(device) => device,
        Err(refused) => return probe::refuse(context, node, status, &refused).await,
    };
    let networks = vm_networks(&context.config.args.vm_network).map_err(Error::Invalid)?;
    let settings = VmSettings {
        image: context.config.args.vm_image.as_deref(),
        networks: &networks,
        accel: context.config.args.vm_accel,
    };
    let plan = match plan(node, &device, &settings) {
        Ok(plan) => plan,
        Err(refusal) => {
            let status = refused(node, status, &refusal, Timestamp::now());
            super::virtual_node::refuse(context, node, &status, refusal.reason, refusal.message).await?;
            return Ok(Action::requeue(Duration::from_mins(5)));
        }
    };
    let runtime = match ensure_runtime_namespace(context, &namespace).await {
        Ok(runtime) => runtime,
        Err(Error::Invalid(message)) => {
            let refusal = VmRefused {
                reason: reasons::RUNTIME_NAMESPACE_REFUSED,
                message,
            };
            let status = refused(node, status, &refusal, Timestamp::now());
            super::virtual_node::refuse(context, node, &status, refusal.reason, refusal.message).await?;
            return Ok(Action::requeue(Duration::from_mins(10)));
        }
        Err(error) => return Err(error),
    };
    status.pod_namespace = Some(runtime.clone());
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &runtime);
    let pod_name = vnode_object_name(&node.name_any());
    let existing = pods
        .get_opt(&pod_name)
        .await
        .context(|| format!("reading Pod {pod_name}"))?;
    match power_step(node, &plan, existing.as_ref()) {
        PowerStep::Keep => {}
        PowerStep::NotOurs => {
            let (status, message) = super::virtual_node::pod_not_ours(node, status, Timestamp::now());
            super::virtual_node::refuse(context, node, &status, reasons::POD_NOT_OURS, message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        PowerStep::Create => {
            context.apply(&pods, &build_vm_pod(node, &plan)).await?;
            status = powered_on(status, Timestamp::now());
            let note = format!(
                "powered on the VM {} ({}, on {}) in pod {runtime}/{pod_name}",
                device.name_any(),
                plan.mac,
                plan.network.bridge
            );
            context
                .event(node, EventType::Normal, reasons::BOOTING, "PowerOn", note)
                .await;
        }
        PowerStep::PowerCycle { note, handled } => {
            power_off(context, node, &runtime).await?;
            context
                .event(
                    node,
                    EventType::Normal,
                    reasons::REBOOTING,
                    "Reboot",
                    note.clone(),
                )
                .await;
            let status = power_cycled(node, status, &note, Timestamp::now());
            super::record_reboot(context, node, &status).await?;
            if let Some(requested) = &handled {
                context
                    .mark_handled(node, walt_crds::request::REBOOT, requested)
                    .await?;
            }
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    }
    probe::reconcile_physical(node, context, target, status).await
}

/// Powers a VM node off: its pod is deleted (qemu gets SIGTERM; the tap goes with it).
pub async fn power_off(context: &Context, node: &Node, runtime: &str) -> Result<()> {
    delete::<Pod>(context, runtime, &vnode_object_name(&node.name_any())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceSpec, NodeSpec, VirtualKind, VirtualNode};

    fn node() -> Node {
        let mut node = Node::new(
            "vm1",
            NodeSpec {
                model: "pc-x86-64".into(),
                device: Some("vm-01".into()),
                image: Some("debian".into()),
                virtual_node: Some(VirtualNode {
                    kind: VirtualKind::Vm,
                    memory: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                    ..VirtualNode::default()
                }),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("lab".into());
        node.metadata.uid = Some("uid-vm1".into());
        node
    }

    fn device(mac: &str, firmware: Option<Firmware>, network: Option<&str>) -> Device {
        Device::new(
            "vm-01",
            DeviceSpec {
                address: Some("10.123.0.10".into()),
                ssh_port: 22,
                model: "pc-x86-64".into(),
                host_key: None,
                mac: Some(mac.into()),
                firmware,
                boot_network: network.map(str::to_owned),
                lent_to: None,
            },
        )
    }

    fn networks() -> Vec<VmNetwork> {
        vm_networks(&[
            "default=br-lab kubernetes.io/hostname=lab-gw".into(),
            "b=br1".into(),
        ])
        .expect("networks")
    }

    fn settings(networks: &[VmNetwork]) -> VmSettings<'_> {
        VmSettings {
            image: Some("registry/walt/vm:1"),
            networks,
            accel: AccelChoice::Auto,
        }
    }

    #[test]
    fn vm_networks_name_a_bridge_and_where_it_is() {
        let parsed = networks();
        assert_eq!(parsed[0].name, "default");
        assert_eq!(parsed[0].bridge, "br-lab");
        assert_eq!(
            parsed[0].node_selector,
            BTreeMap::from([("kubernetes.io/hostname".to_owned(), "lab-gw".to_owned())])
        );
        assert!(parsed[1].node_selector.is_empty());
        for bad in [
            "br0",
            "default=",
            "default=a=b",
            "default=br0 nolabel",
            "x=a-bridge-name-too-long",
        ] {
            let error = vm_networks(&[bad.into()]).expect_err(bad);
            assert!(error.contains("expected NETWORK=BRIDGE"), "{error}");
        }
    }

    #[test]
    fn only_a_vm_slot_on_a_vm_network_runs_as_a_vm() {
        let networks = networks();
        let settings = settings(&networks);
        let slot = device("52:54:00:12:34:56", Some(Firmware::Ipxe), None);
        let plan = plan(&node(), &slot, &settings).expect("a VM slot");
        assert_eq!(
            (plan.network.bridge.as_str(), plan.mac.to_string().as_str()),
            ("br-lab", "52:54:00:12:34:56")
        );
        let refused = |device: &Device, settings: &VmSettings<'_>| {
            super::plan(&node(), device, settings).expect_err("refused")
        };
        let real = refused(
            &device("b8:27:eb:00:00:01", Some(Firmware::Ipxe), None),
            &settings,
        );
        assert_eq!(real.reason, reasons::VM_DEVICE_REFUSED);
        assert!(real.message.contains("of a real NIC"), "{}", real.message);
        let rpi = refused(&device("52:54:00:12:34:56", Some(Firmware::Rpi), None), &settings);
        assert!(
            rpi.message.contains("firmware ipxe") && rpi.message.contains("or u-boot"),
            "{}",
            rpi.message
        );
        let elsewhere = refused(
            &device("52:54:00:12:34:56", Some(Firmware::Ipxe), Some("c")),
            &settings,
        );
        assert_eq!(elsewhere.reason, reasons::VM_NOT_CONFIGURED);
        assert!(
            elsewhere.message.contains("--vm-network c=BRIDGE"),
            "{}",
            elsewhere.message
        );
        let no_image = VmSettings {
            image: None,
            ..settings
        };
        assert!(refused(&slot, &no_image).message.contains("--vm-image"));
        let mut arm = node();
        if let Some(v) = arm.spec.virtual_node.as_mut() {
            v.architecture = Architecture::Arm64;
        }
        assert!(super::plan(&arm, &slot, &settings).is_err());
    }

    #[test]
    fn the_vm_pod_runs_walt_operator_vm_on_the_bridges_host_with_the_devices_mac() {
        let networks = networks();
        let settings = settings(&networks);
        let slot = device("52:54:00:12:34:56", Some(Firmware::Ipxe), None);
        let plan = plan(&node(), &slot, &settings).expect("a VM slot");
        let pod = build_vm_pod(&node(), &plan);
        crate::controller::shared::runtime::assert_placed_for(&pod.metadata, "walt-run-lab", "Node", &node());
        assert_eq!(pod.metadata.name.as_deref(), Some("walt-node-vm1"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.node_selector
                .and_then(|s| s.get("kubernetes.io/hostname").cloned())
                .as_deref(),
            Some("lab-gw")
        );
        let container = &spec.containers[0];
        assert_eq!(container.name, VM_CONTAINER);
        assert_eq!(container.image.as_deref(), Some("registry/walt/vm:1"));
        let command: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .cloned()
            .collect();
        assert_eq!(
            command.join(" "),
            "walt-operator vm --mac 52:54:00:12:34:56 --bridge br-lab --memory 1Gi --cpus 1 --accel auto"
        );
        assert_eq!(
            container.stdin,
            Some(true),
            "the console takes input through an attach"
        );
        assert_eq!(
            container.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );
        let requests = container
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .expect("requests");
        assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("1Gi"));
        assert!(
            container
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_none()
        );
        let machine = crate::runtime::vm::machine(&runner_args(&command), false).expect("a machine");
        assert_eq!((machine.memory_mib, machine.cpus), (1024, 1));
        assert_eq!(machine.arch, VmArch::Amd64);
    }

    /// The pod's command line as the VM runner parses it (`walt-operator vm …`).
    fn runner_args(command: &[String]) -> crate::runtime::vm::Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Vm(crate::runtime::vm::Args),
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(command).expect("walt-operator vm parses them");
        let Sub::Vm(args) = parsed.command;
        args
    }

    fn command_of(pod: &Pod) -> Vec<String> {
        let container = &pod.spec.as_ref().expect("spec").containers[0];
        container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .cloned()
            .collect()
    }

    #[test]
    fn a_u_boot_vm_slot_runs_as_an_arm64_vm_for_an_arm64_node() {
        let networks = networks();
        let settings = settings(&networks);
        let slot = device("52:54:00:12:34:57", Some(Firmware::UBoot), None);
        let amd64 = plan(&node(), &slot, &settings).expect_err("the Node says amd64");
        assert_eq!(amd64.reason, reasons::VM_DEVICE_REFUSED);
        assert!(
            amd64.message.contains("is an arm64 VM slot") && amd64.message.contains("set it to arm64"),
            "{}",
            amd64.message
        );
        let mut arm = node();
        if let Some(v) = arm.spec.virtual_node.as_mut() {
            v.architecture = Architecture::Arm64;
        }
        let plan = plan(&arm, &slot, &settings).expect("an arm64 VM");
        assert_eq!(plan.arch, VmArch::Arm64);
        let command = command_of(&build_vm_pod(&arm, &plan));
        assert_eq!(
            command.join(" "),
            "walt-operator vm --mac 52:54:00:12:34:57 --bridge br-lab --memory 1Gi --cpus 1 --accel auto --arch arm64"
        );
        let machine = crate::runtime::vm::machine(&runner_args(&command), false).expect("a machine");
        assert_eq!(machine.arch, VmArch::Arm64);
        let qemu = crate::runtime::vm::qemu_args(&machine, 3).join(" ");
        assert!(
            qemu.contains("-machine virt") && qemu.contains("-bios /usr/lib/u-boot/qemu_arm64/u-boot.bin"),
            "{qemu}"
        );
        let riscv = {
            let mut n = arm.clone();
            if let Some(v) = n.spec.virtual_node.as_mut() {
                v.architecture = Architecture::Riscv64;
            }
            n
        };
        let refused = super::plan(&riscv, &slot, &settings).expect_err("no riscv64 VM");
        assert!(refused.message.contains("set it to arm64"), "{}", refused.message);
    }

    fn pod(mac: &str, phase: Option<&str>) -> Pod {
        let networks = networks();
        let settings = settings(&networks);
        let slot = device(mac, Some(Firmware::Ipxe), None);
        let mut pod = build_vm_pod(&node(), &plan(&node(), &slot, &settings).expect("plan"));
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: phase.map(str::to_owned),
            ..Default::default()
        });
        pod
    }

    #[test]
    fn a_reboot_request_a_powered_off_vm_or_a_new_mac_power_cycle_it() {
        let networks = networks();
        let settings = settings(&networks);
        let slot = device("52:54:00:12:34:56", Some(Firmware::Ipxe), None);
        let plan = plan(&node(), &slot, &settings).expect("plan");
        assert_eq!(power_step(&node(), &plan, None), PowerStep::Create);
        let running = pod("52:54:00:12:34:56", Some("Running"));
        assert_eq!(power_step(&node(), &plan, Some(&running)), PowerStep::Keep);
        let mut asked = node();
        asked.metadata.annotations = Some(BTreeMap::from([(
            walt_crds::request::REBOOT.requested.to_owned(),
            "t1".to_owned(),
        )]));
        assert!(matches!(
            power_step(&asked, &plan, Some(&running)),
            PowerStep::PowerCycle { handled: Some(ref t), .. } if t == "t1"
        ));
        let off = pod("52:54:00:12:34:56", Some("Succeeded"));
        assert!(matches!(
            power_step(&node(), &plan, Some(&off)),
            PowerStep::PowerCycle { handled: None, ref note } if note.contains("powered off")
        ));
        let other_mac = pod("52:54:00:00:00:01", Some("Running"));
        assert!(matches!(
            power_step(&node(), &plan, Some(&other_mac)),
            PowerStep::PowerCycle { .. }
        ));
        let mut squatter = running.clone();
        squatter.metadata.labels = None;
        assert_eq!(power_step(&node(), &plan, Some(&squatter)), PowerStep::NotOurs);
        let now = Timestamp::from_second(1_000).expect("time");
        let cycled = power_cycled(&node(), NodeStatus::default(), "why", now);
        assert_eq!(cycled.phase, walt_crds::NodePhase::Rebooting);
        assert_eq!(
            super::super::decide::reboot_sent_at(&cycled),
            Some(now),
            "the probe tells the new boot from the old by it"
        );
        let retried = NodeStatus {
            boot: Some(walt_crds::NodeBoot {
                retries: 3,
                ..walt_crds::NodeBoot::default()
            }),
            ..NodeStatus::default()
        };
        let on = powered_on(retried, now).boot.expect("a boot");
        assert_eq!(
            (on.started_at, on.retries),
            (Some(Time(now)), 3),
            "a power-on is watched; the watchdog's count goes on"
        );
    }

    #[test]
    fn qemus_mac_rule_locally_administered() {
        assert!(locally_administered("52:54:00:12:34:56".parse().expect("mac")));
        assert!(locally_administered("0a:00:00:00:00:01".parse().expect("mac")));
        assert!(!locally_administered("b8:27:eb:00:00:01".parse().expect("mac")));
        assert!(
            !locally_administered("03:00:00:00:00:01".parse().expect("mac")),
            "multicast"
        );
    }
}
