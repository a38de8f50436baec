//! Network boot on the cluster tier (issue 16): the chart's boot service and a VM node run as pods
//! under the real kubelet and containerd of the harness's cluster node, and a VM network-boots the
//! image a user chose, as on a lab's cluster.
//!
//! The lab network is a bridge in the cluster node's network namespace (10.123.1.1/24: where the
//! node's host-network pods, the boot service and the VM node, see it). The chart is installed with
//! `bootService.enabled` and that network (authoritative DHCP, the node's address on the bridge as
//! the devices' router: the VM's way back to the operator and the SSH gateway on the pod network,
//! which the node routes) and `vmNodes.image`, the harness's VM node image (`walt-operator` and
//! Debian's qemu, [`lab::ensure_vm_node_image`]). A lab admin registers a VM slot Device; a user
//! pushes a WalT-layout image (Debian's kernel, an NFS-root initramfs, busybox, sshd) and runs
//! `kubectl walt node acquire DEVICE --vm --image os`. The test asserts what the user sees: the VM
//! node pod Running, the Node's booted image verified (`ImageVerified=True`, the pushed digest),
//! `kubectl walt node console` showing the boot, `kubectl walt node shell -- uname -r` answering
//! from the network-booted kernel, and `kubectl walt node reboot` power-cycling the VM (a new
//! pod) into a boot verified again. Then the user changes the node over `kubectl walt node shell`
//! (a new file, a file of the image deleted) and runs `kubectl walt node save vm1 saved`: the
//! operator saves the changes over SSH on top of the node's verified booted digest (the NodeSave's
//! base), and skopeo + umoci show the new file and not the deleted one. `kubectl walt node boot vm1
//! saved` power-cycles the VM (a new pod) into a boot verified with the saved digest, where
//! `node shell` finds the changes, the deletion included.

use std::time::{Duration, Instant};

use walt_tests::deploy::run;
use walt_tests::image_build::{self, BuildProfile};
use walt_tests::k8s::{Cluster, ClusterOptions};
use walt_tests::lab::{self, Kube};
use walt_tests::netboot::{
    BOOTED_MARKER, LabNetwork, MODEL, debian_kernel, vm_node_os_image, vm_node_os_root,
};
use walt_tests::wait::{Poll, Wait};

/// The tenant's namespace.
const NS: &str = "netboot";
/// The VM slot Device (cluster-scoped) and the Node made on it.
const DEVICE: &str = "vm-slot-1";
const NODE: &str = "vm1";
/// The VM's MAC (locally administered: a VM slot's).
const MAC: &str = "52:54:00:dd:00:01";
/// The lab network's third byte (10.123.1.0/24).
const LAB_NET: u8 = 1;
/// The file of the image the node deletes, the file it adds and what it writes there, and the image
/// it saves its changes as.
const DELETED: &str = "/etc/delete-me";
const NEW_FILE: &str = "/root/saved-note";
const NEW_CONTENT: &str = "kept";
const SAVED: &str = "saved";
/// The boot service Deployment of the network `default` (release `walt`).
const BOOT_DEPLOYMENT: &str = "deployment/walt-boot-default";

/// The chart values on top of the lab's: the boot service on `net` (the node's address there is
/// also the devices' router) and VM nodes from `vm_image`, emulated (TCG: no KVM guest support
/// here). The boot cache in an emptyDir: nothing is written on the host.
fn boot_values(net: &LabNetwork, vm_image: &str) -> String {
    let (repository, tag) = vm_image.rsplit_once(':').expect("a tagged reference");
    format!(
        "bootService:\n  enabled: true\n  cache: emptyDir\n  networks:\n  - name: default\n    \
         listen: {server}\n    interface: br0\n    dhcp: authoritative\n    router: {server}\n\
         vmNodes:\n  image: {repository}:{tag}\n  accel: tcg\n",
        server = net.server
    )
}

/// What helps to understand a failure: the pods, the Node, the Events, the operator's and the boot
/// service's logs, the VM's console.
fn diagnose(kube: &Kube) -> String {
    let get = |args: &[&str]| run(kube.kubectl().args(args)).unwrap_or_else(|e| e.to_string());
    format!(
        "pods:\n{}\nnode:\n{}\nevents:\n{}\noperator:\n{}\nboot service:\n{}\nVM console:\n{}",
        get(&["get", "pods", "-A", "-o", "wide"]),
        node(kube, "{.status}"),
        get(&["-n", NS, "get", "events", "--sort-by=.metadata.creationTimestamp"]),
        get(&[
            "-n",
            lab::SYSTEM_NAMESPACE,
            "logs",
            "deployment/walt-operator",
            "--tail=40"
        ]),
        get(&["-n", lab::SYSTEM_NAMESPACE, "logs", BOOT_DEPLOYMENT, "--tail=40"]),
        get(&[
            "-n",
            &format!("walt-run-{NS}"),
            "logs",
            &format!("walt-node-{NODE}"),
            "--tail=40"
        ]),
    )
}

/// `jsonpath` of the Node.
fn node(kube: &Kube, jsonpath: &str) -> String {
    run(kube.kubectl().args([
        "-n",
        NS,
        "get",
        "nodes.walt.dev",
        NODE,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ]))
    .unwrap_or_default()
    .trim()
    .to_owned()
}

/// Waits until the VM node's pod, other than the pod `not`, is Running under the kubelet; its uid.
fn vm_pod_running(kube: &Kube, not: Option<&str>, within: Duration) -> String {
    Wait::new("the VM node's pod to run", within)
        .every(Duration::from_secs(1))
        .until(|| {
            let state = run(kube.kubectl().args([
                "-n",
                &format!("walt-run-{NS}"),
                "get",
                "pod",
                &format!("walt-node-{NODE}"),
                "-o",
                "jsonpath={.metadata.uid} {.status.phase} {.metadata.deletionTimestamp}",
            ]))
            .unwrap_or_default();
            let fields: Vec<&str> = state.split_whitespace().collect();
            match fields.as_slice() {
                [uid, "Running"] if Some(*uid) != not => Poll::Ready((*uid).to_owned()),
                _ => Poll::Pending(state),
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(kube)))
}

/// Waits until the Node's booted image is `digest`, verified, and the Node Ready.
fn wait_verified(kube: &Kube, digest: &str, within: Duration) {
    Wait::new(&format!("the Node's verified booted image {digest}"), within)
        .every(Duration::from_secs(1))
        .until(|| {
            let seen = node(
                kube,
                "{.status.bootedImage.digest} \
                 {.status.conditions[?(@.type==\"ImageVerified\")].status} {.status.phase}",
            );
            if seen == format!("{digest} True Ready") {
                Poll::Ready(())
            } else {
                Poll::Pending(seen)
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(kube)));
}

/// `kubectl walt -n NS args`: its standard output, asserting success.
fn walt_ok(kube: &Kube, args: &[&str]) -> String {
    let output = kube.walt(NS, args).output().expect("run kubectl walt");
    assert!(
        output.status.success(),
        "kubectl walt {args:?} failed ({}):\n{}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        diagnose(kube)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The VM's console as `kubectl walt node console` shows it, once it holds the booted marker.
fn console_when_booted(kube: &Kube, within: Duration) -> String {
    Wait::new("kubectl walt node console to show the booted marker", within)
        .every(Duration::from_secs(2))
        .until(|| {
            let output = kube
                .walt(NS, &["node", "console", NODE, "--no-follow"])
                .output()
                .expect("run kubectl walt");
            let shown = String::from_utf8_lossy(&output.stdout).into_owned();
            if shown.contains(BOOTED_MARKER) {
                Poll::Ready(shown)
            } else {
                Poll::Pending(format!(
                    "{} lines{}",
                    shown.lines().count(),
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(kube)))
}

#[test]
fn a_vm_node_pod_network_boots_from_the_boot_service_pod() {
    if !walt_tests::k8s::cluster_tier_runs("a_vm_node_pod_network_boots_from_the_boot_service_pod") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions::cluster()).expect("start the cluster tier");
    let node_registry = cluster.registry().expect("the cluster tier has a node registry");
    let net = LabNetwork::on_cluster_node(
        cluster.node_netns().expect("the cluster node's namespace"),
        LAB_NET,
    )
    .expect("the lab network on the cluster node");
    let kube = Kube::new(cluster.kubeconfig()).expect("kubectl");
    let vm_image = lab::ensure_vm_node_image(&node_registry, BuildProfile::Check).expect("the VM node image");
    lab::install_release_with(
        &kube,
        &node_registry,
        BuildProfile::Check,
        &boot_values(&net, &vm_image),
    )
    .unwrap_or_else(|e| panic!("install walt: {e}"));
    for workload in ["deployment/walt-operator", BOOT_DEPLOYMENT] {
        if let Err(e) = run(kube.kubectl().args([
            "-n",
            lab::SYSTEM_NAMESPACE,
            "rollout",
            "status",
            workload,
            "--timeout=300s",
        ])) {
            panic!("{workload} does not run: {e}\n{}", diagnose(&kube));
        }
    }
    let installed = started.elapsed();

    // The user's image, pushed where the Image `os` of the namespace resolves to.
    let scratch = tempfile::tempdir().expect("scratch dir");
    let root = scratch.path().join("image-root");
    vm_node_os_root(&root).expect("the image root");
    std::fs::write(
        root.join(DELETED.trim_start_matches('/')),
        "deleted on the node, then saved\n",
    )
    .expect("the file the node deletes");
    let layout = vm_node_os_image(&root).expect("the image layout");
    let registry = lab::LabRegistry::open(&kube).expect("reach the lab registry");
    let pushed = format!("{}/walt/{NS}/os:latest", registry.address());
    let auth = registry.auth(&pushed).expect("lab registry credentials");
    image_build::push_layout(layout.path(), "vm", &pushed, true, &auth).expect("push the image");
    let digest = lab::remote_digest(&pushed, &auth).expect("the pushed image's digest");
    drop(registry);
    run(kube.kubectl().args(["create", "namespace", NS])).expect("namespace");
    kube.apply(&format!(
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: os, namespace: {NS}}}\nspec: {{}}\n---\n\
         apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {DEVICE}}}\n\
         spec: {{address: '{}', sshPort: 22, model: {MODEL}, mac: '{MAC}', firmware: ipxe, lentTo: {{namespace: {NS}}}}}\n",
        net.device_ip(0)
    ))
    .expect("the Image and the Device");

    // The user's VM node: its pod runs under the kubelet, the VM network-boots the image.
    let acquired = Instant::now();
    walt_ok(
        &kube,
        &["node", "acquire", DEVICE, "--vm", "--image", "os", "--as", NODE],
    );
    let pod = vm_pod_running(&kube, None, Duration::from_mins(5));
    let running = acquired.elapsed();
    wait_verified(&kube, &digest, Duration::from_mins(6));
    let verified = acquired.elapsed();
    // A first boot the watchdog had to power-cycle (no boot notification within 180 s) shows in the
    // figures: it is the product's recovery, not the boot's time.
    let watchdog_cycles = run(kube.kubectl().args([
        "-n",
        NS,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={NODE},reason=BootTimeout"),
        "-o",
        "name",
    ]))
    .unwrap_or_default()
    .lines()
    .count();
    let console = console_when_booted(&kube, Duration::from_mins(1));
    assert!(
        console
            .lines()
            .any(|l| l.contains(BOOTED_MARKER) && l.contains(&digest)),
        "node console shows the boot of the image's digest: {console}"
    );
    assert!(
        console.contains(&format!(
            "walt-initrd: mounting {}:/var/lib/walt/nodes/{MAC}/fs",
            net.server
        )),
        "node console shows the root mounted from the boot service: {console}"
    );
    let kernel = debian_kernel().expect("the Debian kernel").release;
    let shell_started = Instant::now();
    let uname = walt_ok(&kube, &["node", "shell", NODE, "--", "uname", "-r"]);
    let shell = shell_started.elapsed();
    assert_eq!(
        uname.trim(),
        kernel,
        "node shell runs on the network-booted kernel"
    );

    // A reboot power-cycles the VM: a new pod, a new boot, verified again.
    let reboot_asked = Instant::now();
    walt_ok(&kube, &["node", "reboot", NODE]);
    let pod = vm_pod_running(&kube, Some(&pod), Duration::from_mins(3));
    let console = console_when_booted(&kube, Duration::from_mins(6));
    assert_eq!(
        console.matches(BOOTED_MARKER).count(),
        1,
        "the new pod's console starts over at power-on: {console}"
    );
    wait_verified(&kube, &digest, Duration::from_mins(3));
    let reverified = reboot_asked.elapsed();

    // A change on the node (a new file, a file of the image deleted), saved as a new image by the
    // operator over SSH to the network-booted node, on top of its verified booted image.
    walt_ok(
        &kube,
        &[
            "node",
            "shell",
            NODE,
            "--",
            "sh",
            "-c",
            &format!("echo {NEW_CONTENT} > {NEW_FILE} && rm {DELETED} && sync"),
        ],
    );
    let save_started = Instant::now();
    walt_ok(&kube, &["node", "save", NODE, SAVED]);
    let saved_in = save_started.elapsed();
    let saves = run(kube.kubectl().args([
        "-n",
        NS,
        "get",
        "nodesaves.walt.dev",
        "-o",
        "jsonpath={range .items[*]}{.status.phase} {.status.baseImage.digest} {.status.result.digest}{\"\\n\"}{end}",
    ]))
    .unwrap_or_else(|e| panic!("the NodeSaves: {e}"));
    let saved = match saves.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["Succeeded", base, saved] => {
            assert_eq!(
                *base, digest,
                "the save's base is the node's verified booted image"
            );
            (*saved).to_owned()
        }
        _ => panic!("one NodeSave, succeeded, with its base and result: {saves}"),
    };
    assert_ne!(saved, digest, "the saved image is a new one");
    let registry = lab::LabRegistry::open(&kube).expect("reach the lab registry");
    let saved_reference = format!("{}/walt/{NS}/{SAVED}:latest", registry.address());
    let auth = registry.auth(&saved_reference).expect("lab registry credentials");
    assert_eq!(
        lab::remote_digest(&saved_reference, &auth).as_deref(),
        Some(saved.as_str()),
        "the registry serves the saved digest"
    );
    let unpacked = scratch.path().join("saved");
    std::fs::create_dir_all(&unpacked).expect("the unpack dir");
    let rootfs = registry
        .unpack(&saved_reference, &unpacked)
        .expect("skopeo copy + umoci unpack of the saved image");
    drop(registry);
    assert_eq!(
        std::fs::read_to_string(rootfs.join(NEW_FILE.trim_start_matches('/'))).ok(),
        Some(format!("{NEW_CONTENT}\n")),
        "umoci shows the new file"
    );
    assert!(
        !rootfs.join(DELETED.trim_start_matches('/')).exists(),
        "umoci shows no {DELETED}: the whiteout of the deletion"
    );
    assert!(
        rootfs.join("etc/init.d/rcS").exists(),
        "umoci shows the base image's files under the change"
    );

    // The node boots the saved image: a power cycle (a new pod) into a boot verified with the saved
    // digest, where the changes are, the deletion included.
    let boot_asked = Instant::now();
    walt_ok(&kube, &["node", "boot", NODE, SAVED]);
    vm_pod_running(&kube, Some(&pod), Duration::from_mins(3));
    wait_verified(&kube, &saved, Duration::from_mins(6));
    let saved_verified = boot_asked.elapsed();
    let found = walt_ok(
        &kube,
        &[
            "node",
            "shell",
            NODE,
            "--",
            "sh",
            "-c",
            &format!(
                "cat {NEW_FILE}; test -e {DELETED} && echo still-there || echo deleted; cat /etc/walt/image-digest"
            ),
        ],
    );
    assert_eq!(
        found,
        format!("{NEW_CONTENT}\ndeleted\n{saved}\n"),
        "the node runs the saved image with the changes (deletion included)"
    );
    println!(
        "figures: cluster tier VM node: cluster up + images + helm install {:.1} s; node acquire → VM pod Running {:.1} s, \
         → bootedImage verified {:.1} s (power-on → verified {:.1} s, {} watchdog power cycles); node shell {:.1} s; node reboot → verified again {:.1} s; \
         node save {:.1} s; node boot of the saved image → verified {:.1} s; test {:.1} s",
        installed.as_secs_f64(),
        running.as_secs_f64(),
        verified.as_secs_f64(),
        verified.saturating_sub(running).as_secs_f64(),
        watchdog_cycles,
        shell.as_secs_f64(),
        reverified.as_secs_f64(),
        saved_in.as_secs_f64(),
        saved_verified.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
