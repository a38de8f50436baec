//! `node ls|show|boot|reboot|create-virtual|remove|wait|save|console`.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use walt_crds::{BootMode, Image, ImageName, NodeSave, NodeSavePhase, NodeSaveSpec, NodeSpec, VirtualNode};

use crate::cli::{Architecture, Compression, OutputFormat};
use crate::cluster::{Ctx, tick};
use crate::describe::{node_page, node_phase, node_ready, node_table, node_waiting_for};
use crate::dialogue::{confirm, overwrite_question};
use crate::error::{Error, Op, Result};
use crate::format::{bytes, clock, serialize_objects, short_digest};
use crate::progress::{Progress, Sample};
use crate::resolve::{ALL_NODES, image_name, list_nodes, name_of, node_set, nodes_booting};
use crate::watch::{LiveLine, interruptible};

/// `node ls`
pub async fn ls(ctx: &Ctx, format: OutputFormat) -> Result<()> {
    let nodes = list_nodes(ctx).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            if nodes.is_empty() {
                eprintln!(
                    "No nodes in namespace {}. Create a virtual one with `kubectl walt node create-virtual NAME --image IMAGE`.",
                    ctx.namespace
                );
            } else {
                print!("{}", node_table(&nodes, format));
            }
        }
        _ => print!("{}", serialize_objects(&nodes, format, false)?),
    }
    Ok(())
}

/// `node show NODE`
pub async fn show(ctx: &Ctx, name: &str, format: OutputFormat) -> Result<()> {
    let node = ctx.get_node(name).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            let uid = node.metadata.uid.clone().unwrap_or_default();
            let events = ctx.events_for(&uid).await;
            print!("{}", node_page(&node, &events));
        }
        _ => print!("{}", serialize_objects(&[node], format, true)?),
    }
    Ok(())
}

/// `node boot NODES IMAGE`
pub async fn boot(ctx: &Ctx, set: &str, image: &str) -> Result<()> {
    let nodes = node_set(ctx, set).await?;
    let spec_image = if image == "default" {
        None
    } else {
        let parsed = image_name(image)?;
        ctx.get_image(&parsed.object_name(), &parsed.to_string()).await?;
        Some(parsed.to_string())
    };
    for node in &nodes {
        let name = name_of(node);
        let patch = serde_json::json!({"spec": {"image": spec_image}});
        ctx.nodes()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                Error::api(
                    Op::named("patch", "node", "nodes.walt.dev", &name, &ctx.namespace),
                    e,
                )
            })?;
        match &spec_image {
            Some(img) => println!("{name}: will boot {img} (it reboots now)."),
            None => println!(
                "{name}: will boot the default image of model {} (it reboots now).",
                node.spec.model
            ),
        }
    }
    println!("Follow with `kubectl walt node wait {set}`.");
    Ok(())
}

/// `node reboot NODES`
pub async fn reboot(ctx: &Ctx, set: &str) -> Result<()> {
    let nodes = node_set(ctx, set).await?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for node in &nodes {
        let name = name_of(node);
        let patch = walt_crds::request::REBOOT.request_patch(&now);
        ctx.nodes()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                Error::api(
                    Op::named("patch", "node", "nodes.walt.dev", &name, &ctx.namespace),
                    e,
                )
            })?;
        println!("{name}: reboot requested.");
    }
    println!("Follow with `kubectl walt node wait {set}`.");
    Ok(())
}

/// The `spec.virtual` of a VM node (`node acquire --vm`) with these memory and CPUs (pure).
pub fn vm_of(memory: Option<&str>, cpu: Option<&str>) -> VirtualNode {
    let mut vm = VirtualNode {
        kind: walt_crds::VirtualKind::Vm,
        ..VirtualNode::default()
    };
    if let Some(memory) = memory {
        vm.memory = Quantity(memory.to_owned());
    }
    if let Some(cpu) = cpu {
        vm.cpu = Quantity(cpu.to_owned());
    }
    vm
}

/// The container of a VM node's pod that runs the VM (its log is the serial console).
pub const VM_CONTAINER: &str = "vm";

/// The pod whose log is the serial console of `node` (pure): a VM node's `walt-node-<node>` in its
/// `status.podNamespace` (else the runtime namespace of `namespace`); a container node has none.
pub fn console_pod(node: &walt_crds::Node, namespace: &str) -> Result<crate::session::RuntimePod> {
    let name = name_of(node);
    if !walt_crds::is_vm(node) {
        return Err(Error::Invalid(format!(
            "{name} is not a VM node: it has no serial console of its own (a container node runs no kernel; a device's console is on the device). \
             `kubectl walt node shell {name}` opens a shell on it"
        )));
    }
    let pod = format!("walt-node-{name}");
    crate::session::RuntimePod::named(
        Some(&pod),
        node.status.as_ref().and_then(|s| s.pod_namespace.as_ref()),
        || walt_crds::runtime_namespace(namespace),
    )
    .ok_or_else(|| Error::Invalid(format!("{name}: no pod")))
}

/// `node console NODE [--no-follow] [--tail N]`: the VM's serial console (its pod's log), from its
/// last power-on.
pub async fn console(ctx: &Ctx, name: &str, follow: bool, tail: Option<i64>) -> Result<()> {
    use futures::AsyncBufReadExt as _;
    use futures::TryStreamExt as _;
    let node = ctx.get_node(name).await?;
    let pod = console_pod(&node, &ctx.namespace)?;
    let params = kube::api::LogParams {
        container: Some(VM_CONTAINER.to_owned()),
        follow,
        tail_lines: tail,
        ..kube::api::LogParams::default()
    };
    let stream = ctx
        .pods_in(&pod.namespace)
        .log_stream(&pod.name, &params)
        .await
        .map_err(|e| {
            Error::api(
                Op::named(
                    "get",
                    "VM console (pod log)",
                    "pods/log",
                    &pod.name,
                    &pod.namespace,
                ),
                e,
            )
        })?;
    eprintln!(
        "--- serial console of the VM node {name} (pod {}/{}){} ---",
        pod.namespace,
        pod.name,
        if follow { "; Ctrl-C to stop" } else { "" }
    );
    let mut lines = stream.lines();
    while let Some(line) = lines
        .try_next()
        .await
        .map_err(Error::io("reading the VM console"))?
    {
        println!("{line}");
    }
    Ok(())
}

/// The options of `node create-virtual`.
#[derive(Debug)]
pub struct VirtualOptions<'a> {
    /// The node name.
    pub name: &'a str,
    /// The image it boots.
    pub image: &'a str,
    /// Architecture, else the image's.
    pub arch: Option<Architecture>,
    /// Model, else derived.
    pub model: Option<&'a str>,
    /// Keep /persist.
    pub persistent: bool,
    /// Memory limit.
    pub memory: Option<&'a str>,
    /// CPU limit.
    pub cpu: Option<&'a str>,
}

/// `node create-virtual NAME --image IMAGE`
pub async fn create_virtual(ctx: &Ctx, opts: &VirtualOptions<'_>) -> Result<()> {
    let parsed = image_name(opts.image)?;
    let image = ctx.get_image(&parsed.object_name(), &parsed.to_string()).await?;
    let image_arch = image
        .status
        .as_ref()
        .and_then(|s| s.platform.as_ref())
        .map(|p| p.architecture.clone());
    let architecture = match (opts.arch, image_arch.as_deref()) {
        (Some(a), Some(img)) if a.as_str() != img => {
            return Err(Error::Invalid(format!(
                "image {parsed} is built for {img}, not {}: drop --arch, or pick an {} image",
                a.as_str(),
                a.as_str()
            )));
        }
        (Some(Architecture::Arm64), _) | (None, Some("arm64")) => walt_crds::Architecture::Arm64,
        _ => walt_crds::Architecture::Amd64,
    };
    let model = opts.model.map_or_else(
        || {
            image
                .status
                .as_ref()
                .and_then(|s| s.node_models.first().cloned())
                .unwrap_or_else(|| {
                    if architecture == walt_crds::Architecture::Arm64 {
                        "qemu-arm64".into()
                    } else {
                        "pc-x86-64".into()
                    }
                })
        },
        str::to_string,
    );
    let mut virtual_node = VirtualNode {
        architecture,
        ..VirtualNode::default()
    };
    if let Some(m) = opts.memory {
        virtual_node.memory = Quantity(m.to_string());
    }
    if let Some(c) = opts.cpu {
        virtual_node.cpu = Quantity(c.to_string());
    }
    let node = walt_crds::Node::new(
        opts.name,
        NodeSpec {
            model: model.clone(),
            image: Some(parsed.to_string()),
            boot_mode: if opts.persistent {
                BootMode::Persistent
            } else {
                BootMode::Volatile
            },
            virtual_node: Some(virtual_node),
            ..NodeSpec::default()
        },
    );
    ctx.nodes()
        .create(&PostParams::default(), &node)
        .await
        .map_err(|e| {
            Error::api(
                Op::named("create", "node", "nodes.walt.dev", opts.name, &ctx.namespace),
                e,
            )
        })?;
    println!(
        "Virtual node {} created ({model}, {}), booting {parsed}. Follow with `kubectl walt node wait {}`.",
        opts.name,
        architecture.as_str(),
        opts.name
    );
    Ok(())
}

/// `node remove NODES`
pub async fn remove(ctx: &Ctx, set: &str) -> Result<()> {
    if crate::format::split_set(set).iter().any(|n| n == ALL_NODES) {
        return Err(Error::Invalid(format!(
            "{ALL_NODES} is not accepted by `node remove`: name the nodes to remove"
        )));
    }
    let nodes = node_set(ctx, set).await?;
    for node in &nodes {
        let name = name_of(node);
        ctx.nodes()
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(|e| {
                Error::api(
                    Op::named("delete", "node", "nodes.walt.dev", &name, &ctx.namespace),
                    e,
                )
            })?;
        println!("{name}: removed.");
    }
    Ok(())
}

/// `node wait NODES`
pub async fn wait(ctx: &Ctx, set: &str, timeout: Duration) -> Result<()> {
    let wanted: Vec<String> = node_set(ctx, set).await?.iter().map(name_of).collect();
    let start = Instant::now();
    let mut announced: Vec<String> = Vec::new();
    let work = async {
        loop {
            let nodes = list_nodes(ctx).await?;
            let mut pending = Vec::new();
            for name in &wanted {
                match nodes.iter().find(|n| &name_of(*n) == name) {
                    None => {
                        return Err(Error::Failed(format!(
                            "node {name:?} was removed while waiting for it"
                        )));
                    }
                    Some(node) if node_ready(node) => {
                        if !announced.contains(name) {
                            println!("{name}: Ready");
                            announced.push(name.clone());
                        }
                    }
                    Some(node) => pending.push(format!("{name} ({})", node_waiting_for(node))),
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout(format!(
                    "after {}s waiting for {}: `kubectl walt node show NODE` shows why",
                    timeout.as_secs(),
                    pending.join(", ")
                )));
            }
            tick().await;
        }
    };
    interruptible(work).await
}

/// The options of `node save`.
#[derive(Debug)]
pub struct SaveOptions<'a> {
    /// The node.
    pub node: &'a str,
    /// The image name.
    pub image: &'a str,
    /// Overwrite without asking.
    pub overwrite: bool,
    /// Do not reboot after an overwrite.
    pub no_reboot: bool,
    /// Extra excludes.
    pub exclude: &'a [String],
    /// Compression.
    pub compression: Compression,
    /// Return at once.
    pub no_wait: bool,
}

/// `node save NODE IMAGE`
pub async fn save(ctx: &Ctx, opts: &SaveOptions<'_>) -> Result<()> {
    let target = image_name(opts.image)?;
    // The node and the target image are read at once (one round trip's time), judged in this order.
    let (object_name, images) = (target.object_name(), ctx.images());
    let (node, existing) = tokio::join!(ctx.get_node(opts.node), images.get_opt(&object_name));
    let node = node?;
    if !node_ready(&node) {
        return Err(Error::NotReady {
            node: opts.node.to_string(),
            phase: node_phase(&node),
            hint: format!(
                "a save reads a running node; wait with `kubectl walt node wait {}` or see `kubectl walt node show {}`",
                opts.node, opts.node
            ),
        });
    }
    let mut overwrite = opts.overwrite;
    if existing.ok().flatten().is_some() && !overwrite {
        let nodes = list_nodes(ctx).await?;
        let booted_by = nodes_booting(&nodes, &target);
        if crate::terminal::interactive() {
            let question = format!(
                "Image {target} exists. {}",
                overwrite_question(&target.to_string(), &booted_by)
            );
            let answer = tokio::task::spawn_blocking(move || {
                confirm(&question, &mut std::io::stdin().lock(), &mut std::io::stderr())
            })
            .await
            .map_err(|e| Error::Failed(format!("the confirmation prompt failed: {e}")))?
            .map_err(Error::io("cannot read the answer"))?;
            if !answer {
                return Err(Error::Failed(format!(
                    "not saved: image {target} was left as it was"
                )));
            }
            overwrite = true;
        } else {
            return Err(Error::AlreadyExists {
                kind: "image",
                name: target.to_string(),
                namespace: ctx.namespace.clone(),
                hint: "add --overwrite to replace it (the nodes that boot it reboot), or choose another name"
                    .into(),
            });
        }
    }
    let mut exclude: Vec<String> = walt_crds::node_save::DEFAULT_EXCLUDES
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    exclude.extend(opts.exclude.iter().cloned());
    let mut save = NodeSave::new(
        "",
        NodeSaveSpec {
            node: opts.node.to_string(),
            image: target.to_string(),
            overwrite,
            reboot_nodes: !opts.no_reboot,
            exclude,
            compression: match opts.compression {
                Compression::Gzip => walt_crds::Compression::Gzip,
                Compression::Zstd => walt_crds::Compression::Zstd,
            },
        },
    );
    save.metadata.name = None;
    save.metadata.generate_name = Some(format!("{}-save-", opts.node));
    let created = ctx
        .saves()
        .create(&PostParams::default(), &save)
        .await
        .map_err(|e| {
            Error::api(
                Op::collection("create", "node save", "nodesaves.walt.dev", &ctx.namespace),
                e,
            )
        })?;
    let save_name = name_of(&created);
    if opts.no_wait {
        println!("nodesave.walt.dev/{save_name} created: follow with `kubectl get nodesave {save_name} -w`.");
        return Ok(());
    }
    let result = interruptible(follow_save(ctx, &save_name, opts.node, &target)).await;
    if matches!(result, Err(Error::Interrupted)) {
        let _ = ctx.saves().delete(&save_name, &DeleteParams::default()).await;
        eprintln!(
            "Interrupted: the save {save_name} was cancelled and deleted; image {target} was not changed."
        );
    }
    result
}

/// Follows the NodeSave to its end, showing its progress; wakes at each write of the operator (a
/// watch), not at a poll.
async fn follow_save(ctx: &Ctx, save_name: &str, node: &str, target: &ImageName) -> Result<()> {
    let image = target.to_string();
    let start = Instant::now();
    let mut progress = Progress::new(format!("saving {node}"), None);
    let mut line = LiveLine::stderr();
    let mut last_phase = None;
    let mut changes = crate::cluster::changes_of(ctx.saves(), save_name);
    loop {
        let save = ctx.saves().get(save_name).await.map_err(|e| {
            Error::api(
                Op::named(
                    "get",
                    "node save",
                    "nodesaves.walt.dev",
                    save_name,
                    &ctx.namespace,
                ),
                e,
            )
        })?;
        let status = save.status.clone().unwrap_or_default();
        if last_phase != Some(status.phase) {
            if status.phase == NodeSavePhase::Pushing {
                line.finish();
                eprintln!("pushing the new image…");
            }
            last_phase = Some(status.phase);
        }
        if let Some(p) = &status.progress
            && (progress.observe(Sample {
                at: start.elapsed(),
                bytes: p.bytes,
                files: p.files,
            }) || status.phase == NodeSavePhase::Running)
        {
            line.show(&progress.render());
        }
        match status.phase {
            NodeSavePhase::Succeeded => {
                let result = status.result.clone().unwrap_or_default();
                // "Saved" means usable: the Image shows the saved digest Ready (a node can boot it).
                let shown = match result.digest.as_deref() {
                    Some(digest) => wait_image_shows(ctx, target, digest, &mut line).await,
                    None => true,
                };
                line.finish();
                if !shown {
                    eprintln!(
                        "Note: image {image} does not show the saved digest Ready yet (after {}s): `kubectl walt image show {image}` says why.",
                        IMAGE_READY_WAIT.as_secs()
                    );
                }
                let changes = status.changes.clone().unwrap_or_default();
                println!(
                    "Saved {node} as {image}: {}",
                    result
                        .digest
                        .as_deref()
                        .map_or_else(|| "?".into(), str::to_string)
                );
                println!(
                    "  changes: {} added, {} modified, {} deleted ({}); layer {}{}",
                    changes.added,
                    changes.modified,
                    changes.deleted,
                    bytes(changes.bytes),
                    result.layer_size.map_or_else(|| "?".into(), bytes),
                    result
                        .layer_digest
                        .as_deref()
                        .map_or_else(String::new, |d| format!(" ({})", short_digest(d)))
                );
                if let Some(base) = &status.base_image {
                    println!(
                        "  on top of {}{}",
                        base.name.clone().unwrap_or_else(|| "?".into()),
                        base.digest
                            .as_deref()
                            .map_or_else(String::new, |d| format!("@{}", short_digest(d)))
                    );
                }
                if let Some(d) = &status.duration {
                    println!("  took {d}");
                }
                return Ok(());
            }
            NodeSavePhase::Failed => {
                line.finish();
                let why = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == walt_crds::condition_types::COMPLETE)
                    .map_or_else(
                        || "no reason given".into(),
                        |c| format!("{}: {}", c.reason, c.message),
                    );
                return Err(Error::Failed(format!(
                    "saving node {node:?} as {image} failed ({why}); nothing was tagged. `kubectl describe nodesave {save_name}` has the details."
                )));
            }
            _ => {
                if status.progress.is_none() {
                    line.show(&format!("saving {node}: {:?}…", status.phase));
                }
            }
        }
        crate::cluster::next_change(&mut changes).await;
    }
}

/// How long `node save` waits, after the save, for the Image to show the saved digest Ready: the
/// operator's Image controller resolves it within milliseconds of the save's end; past this the save
/// is still reported, with where to look.
const IMAGE_READY_WAIT: Duration = Duration::from_secs(30);

/// Whether `image` shows `digest` Ready (pure): from then on it is the saved image, usable.
fn shows_saved(image: &Image, digest: &str) -> bool {
    image.status.as_ref().is_some_and(|status| {
        status.digest.as_deref() == Some(digest)
            && walt_crds::is_condition_true(&status.conditions, walt_crds::condition_types::READY)
    })
}

/// Waits until Image `target` shows `digest` Ready, waking at each change of it (a watch), for
/// [`IMAGE_READY_WAIT`] at most; false when it did not in time (the save itself is done).
async fn wait_image_shows(ctx: &Ctx, target: &ImageName, digest: &str, line: &mut LiveLine) -> bool {
    let object = target.object_name();
    let start = Instant::now();
    let mut changes = crate::cluster::changes_of(ctx.images(), &object);
    loop {
        // An error reading it is waited out like an Image not updated yet: the wait is bounded.
        if let Ok(Some(image)) = ctx.images().get_opt(&object).await
            && shows_saved(&image, digest)
        {
            return true;
        }
        if start.elapsed() >= IMAGE_READY_WAIT {
            return false;
        }
        line.show(&format!(
            "saved; waiting for image {target} to show it Ready  ({})",
            clock(start.elapsed())
        ));
        crate::cluster::next_change(&mut changes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(vm: bool) -> walt_crds::Node {
        let mut node = walt_crds::Node::new(
            "vm-01",
            NodeSpec {
                model: "pc-x86-64".into(),
                device: vm.then(|| "vm-01".to_owned()),
                virtual_node: Some(if vm {
                    vm_of(Some("1Gi"), None)
                } else {
                    VirtualNode::default()
                }),
                ..NodeSpec::default()
            },
        );
        node.metadata.namespace = Some("alice".into());
        node
    }

    #[test]
    fn the_console_of_a_vm_node_is_its_pods_log_and_a_container_node_has_none() {
        let pod = console_pod(&node(true), "alice").expect("a VM node");
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("walt-run-alice", "walt-node-vm-01")
        );
        let mut moved = node(true);
        moved.status = Some(walt_crds::NodeStatus {
            pod_namespace: Some("elsewhere".into()),
            ..walt_crds::NodeStatus::default()
        });
        assert_eq!(
            console_pod(&moved, "alice").expect("a VM node").namespace,
            "elsewhere"
        );
        let refused = console_pod(&node(false), "alice").expect_err("a container node");
        assert!(
            refused.to_string().contains("vm-01 is not a VM node")
                && refused.to_string().contains("kubectl walt node shell vm-01"),
            "{refused}"
        );
        assert_eq!(vm_of(Some("1Gi"), Some("2")).memory.0, "1Gi");
        assert_eq!(vm_of(None, None).cpu.0, "1");
    }

    #[test]
    fn a_saved_image_is_shown_once_its_image_is_ready_with_the_saved_digest() {
        let image = |digest: Option<&str>, ready: Option<bool>| {
            let mut image = Image::new("tuned", walt_crds::ImageSpec::default());
            image.status = Some(walt_crds::ImageStatus {
                digest: digest.map(str::to_owned),
                conditions: ready
                    .map(|ready| {
                        walt_crds::new_condition(
                            walt_crds::condition_types::READY,
                            ready.into(),
                            "Resolved",
                            "",
                            None,
                            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                            ),
                        )
                    })
                    .into_iter()
                    .collect(),
                ..walt_crds::ImageStatus::default()
            });
            image
        };
        assert!(shows_saved(&image(Some("sha256:new"), Some(true)), "sha256:new"));
        assert!(
            !shows_saved(&image(Some("sha256:old"), Some(true)), "sha256:new"),
            "an overwritten image still Ready with its previous digest"
        );
        assert!(!shows_saved(
            &image(Some("sha256:new"), Some(false)),
            "sha256:new"
        ));
        assert!(!shows_saved(&image(Some("sha256:new"), None), "sha256:new"));
        assert!(!shows_saved(
            &Image::new("tuned", walt_crds::ImageSpec::default()),
            "sha256:new"
        ));
    }
}
