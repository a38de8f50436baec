//! Image shells on the cluster tier: real shell pods (kubelet + containerd + runc) running the walt
//! image, started by the real operator, used through the real plugin in a PTY.
//!
//! The operator runs on this machine inside the node's network namespace (where the pods' addresses
//! and the lab registry at the node address exist), with the harness's admin kubeconfig. Two tests,
//! one cluster each (one at a time), because one cluster start serves every step of a test.
//!
//! `image_shells_on_the_cluster_tier`, one node:
//! 1. `kubectl walt image shell demo` (amd64): type commands, the API server restarts under the open
//!    shell (the plugin attaches again and the shell goes on), exit, answer the dialogue with a new
//!    name → the operator saves it (blobs mounted across repositories) → the new Image is Ready,
//!    `skopeo` + `umoci` show the change, the shell pod is gone, the session is deleted.
//! 2. Ctrl-D at the dialogue discards → the Image keeps its digest, the pod is gone.
//! 3. Enter at the dialogue overwrites the image itself → its digest moves to the saved one.
//! 4. Without the plugin: a ShellSession made with kubectl whose pod is deleted under it → Failed,
//!    saying so; deleting a running session leaves no pod (finalizer).
//! 5. An arm64 image on this amd64 node (qemu-user through binfmt_misc): the plugin says it is
//!    emulated before the prompt, `uname -m` says aarch64,
//!    Ctrl-D discards.
//! 6. `image cp` of a local directory into an image (new layer, tag moved, bytes checked with
//!    skopeo + umoci) and of a file out of it.
//!
//! `native_architecture_first_on_two_nodes`: a second node labelled arm64; each image's shell lands
//! on the node of its CPU and says it runs natively; with the arm64 node cordoned, the arm64 shell
//! runs emulated and says so; the same for an arm64 `kubectl walt image build`; an arm64 virtual
//! node's pod lands on the arm64 node and `kubectl walt node show` says native (see the test's docs).

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use walt_tests::image_build::Arch;
use walt_tests::k8s::images::Arch as NodeArch;
use walt_tests::k8s::{Cluster, ClusterOptions, SecondNode};
use walt_tests::operator::OperatorProcess;
use walt_tests::operator_lab::{OperatorLab, kubectl};
use walt_tests::pty::Pty;
use walt_tests::wait::{Poll, Wait};

fn jsonpath(cluster: &Cluster, ns: &str, object: &str, path: &str) -> String {
    cluster
        .kubectl_output(&["-n", ns, "get", object, "-o", &format!("jsonpath={path}")])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn wait_jsonpath(
    cluster: &Cluster,
    ns: &str,
    object: &str,
    path: &str,
    want: &str,
    operator: &OperatorProcess,
) {
    Wait::new(&format!("{object} {path} to be {want:?}"), Duration::from_mins(3))
        .every(Duration::from_millis(500))
        .until(|| {
            let last = jsonpath(cluster, ns, object, path);
            if last == want {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{last:?}"))
            }
        })
        .unwrap_or_else(|e| {
            let describe = cluster
                .kubectl_output(&["-n", ns, "describe", object])
                .unwrap_or_default();
            panic!(
                "{e}:\n{describe}\noperator log (end):\n{}",
                tail(&operator.log(), 60)
            )
        });
}

/// Waits (1 minute at most) until `done` says so.
fn wait_until(what: &str, done: impl FnMut() -> bool) {
    Wait::new(what, Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(done)
        .unwrap_or_else(|e| panic!("{e}"));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn apply(cluster: &Cluster, ns: &str, yaml: &str, dir: &Path) {
    let path = dir.join("manifest.yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    kubectl(cluster, &["-n", ns, "apply", "-f", &path.display().to_string()]);
}

/// The shell pods of tenant namespace `ns`'s sessions (in its runtime namespace, `walt-run-<ns>`).
fn pods_of_sessions(cluster: &Cluster, ns: &str) -> String {
    kubectl(
        cluster,
        &[
            "-n",
            &walt_crds::runtime_namespace(ns),
            "get",
            "pods",
            "-l",
            "walt.dev/shell-session",
            "-o",
            "name",
        ],
    )
}

/// Unpacks `reference` (on this machine's side of the node registry) with skopeo + umoci and
/// returns the root filesystem's directory.
fn unpack(reference: &str, dir: &Path) -> std::path::PathBuf {
    let layout = dir.join(format!("oci-{}", reference.replace(['/', ':', '.'], "_")));
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", layout.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = dir.join(format!("bundle-{}", reference.replace(['/', ':', '.'], "_")));
    let out = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:x", layout.display()))
        .arg(&bundle)
        .output()
        .expect("run umoci");
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

fn digest_of(reference: &str) -> String {
    walt_tests::lab::remote_digest(reference, &walt_tests::registry_auth::RegistryAuth::Anonymous)
        .unwrap_or_default()
}

/// The tests here each start a cluster: one at a time (CI machines have few cores).
fn one_cluster_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An [`OperatorLab`] whose `images` are Ready as walt Images.
fn shell_lab(options: ClusterOptions, images: &[(&str, Arch)]) -> Option<OperatorLab> {
    let lab = OperatorLab::start(options, "shells", images)?;
    for (name, _) in images {
        apply(
            &lab.cluster,
            &lab.ns,
            &format!("apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\nspec: {{}}\n"),
            lab.work.path(),
        );
        wait_jsonpath(
            &lab.cluster,
            &lab.ns,
            &format!("image.walt.dev/{name}"),
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
            &lab.operator,
        );
    }
    Some(lab)
}

/// A shell on `image` (whose `uname -m` says `machine`): `while_open` looks at it once the prompt is
/// near, then it changes a file, and Ctrl-D at the dialogue discards: nothing is saved, no tag moves,
/// the pod goes.
fn discard_shell(lab: &OperatorLab, image: &str, machine: &str, while_open: impl FnOnce(&Pty)) {
    let (cluster, registry, ns) = (&lab.cluster, &lab.registry, &lab.ns);
    let before = digest_of(&format!("{registry}/lab/{ns}/{image}:latest"));
    let mut pty = Pty::spawn(&lab.walt(&["image", "shell", image]));
    pty.expect_within("Type `exit` or Ctrl-D", Duration::from_mins(4));
    while_open(&pty);
    std::thread::sleep(Duration::from_secs(2));
    pty.send("touch /root/scratch; echo on-$(uname -m)\n");
    pty.expect_within(&format!("on-{machine}"), Duration::from_mins(1));
    pty.send("exit\n");
    pty.expect_within("Save as a new image", Duration::from_mins(2));
    pty.send("\x04");
    let (code, shown) = pty.wait_within(Duration::from_mins(1));
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains(&format!("Discarded: image {image} was left as it was")),
        "{shown}"
    );
    assert!(
        !shown.contains("\"exitCode\""),
        "the runtime's JSON result is for the operator, not the terminal:\n{shown}"
    );
    assert_eq!(
        digest_of(&format!("{registry}/lab/{ns}/{image}:latest")),
        before,
        "no tag moved"
    );
    wait_until("the discarded shell's pod is deleted", || {
        pods_of_sessions(cluster, ns).is_empty()
    });
}

#[test]
fn image_shells_on_the_cluster_tier() {
    let _one = one_cluster_at_a_time();
    let Some(lab) = shell_lab(
        ClusterOptions::cluster(),
        &[("demo", Arch::Amd64), ("demo-arm", Arch::Arm64)],
    ) else {
        return;
    };
    let (cluster, registry, ns, work, operator) =
        (&lab.cluster, &lab.registry, &lab.ns, &lab.work, &lab.operator);
    let walt = |args: &[&str]| lab.walt(args);

    // A shell on `image` (whose `uname -m` says `machine`) that changes a file, then Ctrl-D at the
    // dialogue: nothing is saved, no tag moves, the pod goes.
    let emulation_note =
        |image: &str| format!("Note: {image} is built for another CPU: it runs through qemu-user emulation");
    let discard_shell = |image: &str, machine: &str| {
        discard_shell(&lab, image, machine, |pty| {
            // Told before the prompt, from the cluster node's CPU and the image's platform.
            assert_eq!(
                pty.text().contains(&emulation_note(image)),
                machine != "x86_64",
                "the emulation note is shown exactly when the image's CPU differs:\n{}",
                pty.text()
            );
        });
    };

    // 1. A change saved under a new name.
    let mut pty = Pty::spawn(&walt(&["image", "shell", "demo"]));
    pty.expect_within("Type `exit` or Ctrl-D", Duration::from_mins(4));
    std::thread::sleep(Duration::from_secs(2));
    pty.send("echo shell-was-here > /etc/walt-shell; rm /etc/motd; echo in-$(uname -m)\n");
    pty.expect_within("in-x86_64", Duration::from_mins(1));
    // The API server restarts under the open shell (the attachment goes through it): the plugin says
    // so, attaches again, and the shell goes on with its change.
    let outage = Instant::now();
    cluster.stop_api_server();
    std::thread::sleep(Duration::from_secs(3));
    cluster
        .start_api_server()
        .unwrap_or_else(|e| panic!("start kube-apiserver again: {e}"));
    pty.expect_within("attached again to your shell", Duration::from_mins(2));
    eprintln!(
        "the image shell was attached again {:.1} s after the API server stopped",
        outage.elapsed().as_secs_f64()
    );
    assert!(
        pty.text().contains("walt: lost the connection"),
        "the user is told why the shell went quiet:\n{}",
        pty.text()
    );
    pty.send("echo still-$(cat /etc/walt-shell)\n");
    pty.expect_within("still-shell-was-here", Duration::from_mins(1));
    // The shell pod is evicted (the Eviction API, as `kubectl drain` does): the changes are kept in
    // the cluster node's walt cache; the operator makes the pod again there, the plugin says so and
    // attaches to it, and the new shell finds the changes (the deletion too).
    let (pod, cluster_node) = shell_pod_and_node(cluster, ns);
    let evicted = Instant::now();
    evict(cluster, &walt_crds::runtime_namespace(ns), &pod, work.path());
    pty.expect_within(
        "a new shell pod continues on the changes kept",
        Duration::from_mins(2),
    );
    // The second time: the first was after the API server's restart.
    pty.expect_times_within("attached again to your shell", 2, Duration::from_mins(3));
    eprintln!(
        "the image shell was attached again {:.1} s after its pod was evicted",
        evicted.elapsed().as_secs_f64()
    );
    assert_eq!(
        shell_pod_and_node(cluster, ns).1,
        cluster_node,
        "the new pod runs where the changes are"
    );
    assert_eq!(
        jsonpath(cluster, ns, "shellsessions", "{.items[0].status.podRestarts}"),
        "1"
    );
    std::thread::sleep(Duration::from_secs(2));
    pty.send("echo kept-$(cat /etc/walt-shell); ls /etc/motd || echo motd-still-$(echo gone)\n");
    pty.expect_within("kept-shell-was-here", Duration::from_mins(1));
    pty.expect_within("motd-still-gone", Duration::from_mins(1));
    pty.send("exit\n");
    pty.expect_within("Your changes: ", Duration::from_mins(2));
    pty.expect("Save as a new image, or press Enter to overwrite demo:");
    pty.send("demo-v2\n");
    let (code, shown) = pty.wait_within(Duration::from_mins(2));
    assert_eq!(code, 0, "image shell exit status:\n{shown}");
    assert!(shown.contains("Saved as demo-v2: "), "{shown}");
    assert!(pty.cooked(), "the terminal is restored");
    wait_jsonpath(
        cluster,
        ns,
        "image.walt.dev/demo-v2",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
        operator,
    );
    let saved = format!("{registry}/lab/{ns}/demo-v2:latest");
    assert_eq!(
        jsonpath(cluster, ns, "image.walt.dev/demo-v2", "{.status.digest}"),
        digest_of(&saved),
        "the Image reports what the registry holds"
    );
    let rootfs = unpack(&saved, work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/walt-shell")).expect("the new file"),
        "shell-was-here\n"
    );
    assert!(
        !rootfs.join("etc/motd").exists(),
        "the deleted file is gone in the saved image"
    );
    assert!(rootfs.join("bin/busybox").exists(), "the base layer is there");
    wait_until("the shell pod is deleted", || {
        pods_of_sessions(cluster, ns).is_empty()
    });
    wait_until("the session is deleted", || {
        kubectl(cluster, &["-n", ns, "get", "shellsessions", "-o", "name"]).is_empty()
    });

    // 2. Discarded with Ctrl-D at the dialogue.
    discard_shell("demo", "x86_64");

    // 3. Enter overwrites the image itself: its digest moves to the saved one.
    let before = jsonpath(cluster, ns, "image.walt.dev/demo", "{.status.digest}");
    let mut pty = Pty::spawn(&walt(&["image", "shell", "demo"]));
    pty.expect_within("Type `exit` or Ctrl-D", Duration::from_mins(4));
    std::thread::sleep(Duration::from_secs(2));
    pty.send("echo overwritten > /etc/walt-overwrite; echo done-$((40+2))\n");
    pty.expect_within("done-42", Duration::from_mins(1));
    pty.send("exit\n");
    pty.expect_within(
        "Save as a new image, or press Enter to overwrite demo:",
        Duration::from_mins(2),
    );
    pty.send("\n");
    let (code, shown) = pty.wait_within(Duration::from_mins(2));
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("Saved as demo: "), "{shown}");
    let after = Wait::new(
        "the Image to be resolved again after the overwrite (a new digest)",
        Duration::from_mins(1),
    )
    .every(Duration::from_millis(500))
    .until(|| {
        let after = jsonpath(cluster, ns, "image.walt.dev/demo", "{.status.digest}");
        if after == before {
            Poll::Pending(format!("still {before}"))
        } else {
            Poll::Ready(after)
        }
    })
    .unwrap();
    assert_eq!(after, digest_of(&format!("{registry}/lab/{ns}/demo:latest")));
    let rootfs = unpack(&format!("{registry}/lab/{ns}/demo:latest"), work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/walt-overwrite")).expect("file"),
        "overwritten\n"
    );

    // 4. The operator alone: a pod deleted under a running session is made again on the same changes,
    //    saying why; deleting the session leaves nothing (its finalizer deletes the pod first).
    apply(
        cluster,
        ns,
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: lost}\nspec: {image: demo-v2}\n",
        work.path(),
    );
    wait_jsonpath(
        cluster,
        ns,
        "shellsession/lost",
        "{.status.phase}",
        "Running",
        operator,
    );
    assert_eq!(
        jsonpath(cluster, ns, "shellsession/lost", "{.status.pod}"),
        "walt-shell-lost"
    );
    kubectl(
        cluster,
        &[
            "-n",
            &walt_crds::runtime_namespace(ns),
            "delete",
            "pod",
            "walt-shell-lost",
            "--wait=false",
        ],
    );
    wait_jsonpath(
        cluster,
        ns,
        "shellsession/lost",
        "{.status.podRestarts}",
        "1",
        operator,
    );
    wait_jsonpath(
        cluster,
        ns,
        "shellsession/lost",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
        operator,
    );
    let said = jsonpath(
        cluster,
        ns,
        "shellsession/lost",
        "{.status.phase} {.status.conditions[?(@.type==\"Ready\")].message}",
    );
    assert!(
        said.starts_with("Running on the changes kept from the lost pod"),
        "{said}"
    );
    let events = kubectl(
        cluster,
        &[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            "reason=ShellPodLost",
            "-o",
            "name",
        ],
    );
    assert!(!events.is_empty(), "the loss is an Event of the session");
    kubectl(
        cluster,
        &["-n", ns, "delete", "shellsession/lost", "--timeout=120s"],
    );
    apply(
        cluster,
        ns,
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: gone}\nspec: {image: demo-v2}\n",
        work.path(),
    );
    wait_jsonpath(
        cluster,
        ns,
        "shellsession/gone",
        "{.status.phase}",
        "Running",
        operator,
    );
    kubectl(
        cluster,
        &["-n", ns, "delete", "shellsession/gone", "--timeout=120s"],
    );
    wait_until("no shell pod is left", || {
        pods_of_sessions(cluster, ns).is_empty()
    });

    // 5. Emulated arm64 (qemu-user through binfmt_misc), discarded with Ctrl-D at the dialogue.
    discard_shell("demo-arm", "aarch64");

    // 6. `image cp`: a local directory into an image (a new layer on top, the tag moves), and a
    //    file out of it; the copied bytes are checked in the registry with skopeo + umoci.
    let local = work.path().join("payload");
    std::fs::create_dir_all(local.join("sub")).expect("payload dir");
    std::fs::write(local.join("sub/data.txt"), "copied-in\n").expect("payload file");
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    std::fs::write(local.join("blob.bin"), &binary).expect("payload binary");
    let before = digest_of(&format!("{registry}/lab/{ns}/demo-v2:latest"));
    let out = walt(&[
        "image",
        "cp",
        &local.display().to_string(),
        "demo-v2:/opt/",
        "--yes",
    ])
    .output()
    .expect("run kubectl walt image cp");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "image cp into demo-v2: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("Copied {} to demo-v2:/opt/ (", local.display())),
        "{said}"
    );
    let after = digest_of(&format!("{registry}/lab/{ns}/demo-v2:latest"));
    assert_ne!(after, before, "the tag moved to the image with the copied files");
    let after_cp = work.path().join("after-cp");
    std::fs::create_dir_all(&after_cp).expect("dir");
    let rootfs = unpack(&format!("{registry}/lab/{ns}/demo-v2:latest"), &after_cp);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("opt/payload/sub/data.txt")).expect("copied file"),
        "copied-in\n"
    );
    assert_eq!(
        std::fs::read(rootfs.join("opt/payload/blob.bin")).expect("copied binary"),
        binary,
        "binary content survives the TTY transfer"
    );
    assert!(
        rootfs.join("etc/walt-shell").exists(),
        "what the image held stays"
    );
    let copied_out = work.path().join("walt-shell.out");
    let out = walt(&[
        "image",
        "cp",
        "demo-v2:/etc/walt-shell",
        &copied_out.display().to_string(),
    ])
    .output()
    .expect("run kubectl walt image cp");
    assert!(
        out.status.success(),
        "image cp out of demo-v2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&copied_out).expect("the file copied out"),
        "shell-was-here\n"
    );
    assert_eq!(
        digest_of(&format!("{registry}/lab/{ns}/demo-v2:latest")),
        after,
        "copying out moves no tag"
    );
    wait_until("the copy sessions' pods are deleted", || {
        pods_of_sessions(cluster, ns).is_empty()
    });
}

/// Evicts pod `pod` of namespace `ns` through the Eviction API (what `kubectl drain` and the
/// kubelet's API-initiated evictions use: the pod is deleted gracefully, its runtime gets SIGTERM).
fn evict(cluster: &Cluster, ns: &str, pod: &str, dir: &Path) {
    let body = dir.join("eviction.json");
    std::fs::write(
        &body,
        serde_json::json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": ns},
        })
        .to_string(),
    )
    .expect("write the eviction");
    kubectl(
        cluster,
        &[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{pod}/eviction"),
            "-f",
            &body.display().to_string(),
        ],
    );
}

/// The shell pod of the one session of tenant namespace `ns`, and the cluster node it runs on.
fn shell_pod_and_node(cluster: &Cluster, ns: &str) -> (String, String) {
    let pod = kubectl(
        cluster,
        &[
            "-n",
            ns,
            "get",
            "shellsessions",
            "-o",
            "jsonpath={.items[0].status.pod}",
        ],
    );
    let node = kubectl(
        cluster,
        &[
            "-n",
            &walt_crds::runtime_namespace(ns),
            "get",
            "pod",
            pod.trim(),
            "-o",
            "jsonpath={.spec.nodeName}",
        ],
    );
    (pod.trim().to_owned(), node.trim().to_owned())
}

/// A cluster node's CPU as the scheduler sees it: its `kubernetes.io/arch` label.
fn node_arch_label(cluster: &Cluster, node: &str) -> String {
    kubectl(
        cluster,
        &[
            "get",
            "node",
            node,
            "-o",
            r"jsonpath={.metadata.labels.kubernetes\.io/arch}",
        ],
    )
    .trim()
    .to_owned()
}

/// Native architecture first, on a cluster of two nodes: `walt-node` (this machine's amd64) and a
/// second node whose kubelet registers it as arm64 (see `walt_tests::k8s::SecondNode::architecture`:
/// its processes still run on this amd64 CPU, so an arm64 image runs through qemu-user on either;
/// what this checks is where walt puts the shell pod and what it tells the user).
/// 1. The second node says arm64, and keeps saying it (the kubelet re-asserts its own labels).
/// 2. An arm64 image's shell lands on the arm64 node: the plugin says it runs natively,
///    `status.emulated` is false, the Ready message names the node.
/// 3. An amd64 image's shell lands on the amd64 node, also native.
/// 4. With the arm64 node cordoned, the arm64 shell falls back to the amd64 node, emulated, and
///    the plugin and `status.emulated` say so.
/// 5. `kubectl walt image build --from-dir` of a Dockerfile `FROM` the arm64 image with a `RUN`: the
///    build pod runs on the arm64 node (the plugin sent the base it read, the operator preferred that
///    Image's CPU), the plugin's `Built …` line says `(arm64, …)` without `emulated` and names the
///    node, the ImageBuild's `status.clusterNode` and `status.result.emulated` say the same.
/// 6. The same build with the arm64 node cordoned: on the amd64 node, `(arm64, emulated, …)`. And
///    the same build `FROM` the amd64 image: on the amd64 node, `(amd64, …)`, native (without the
///    preference the scheduler put pods on the arm64 node, seen with shells).
/// 7. `kubectl walt node create-virtual --arch arm64`: the virtual node's pod runs on the arm64 node,
///    the Node's `status.clusterNode` and `status.emulated` (false) say so, and so does
///    `kubectl walt node show` ("Runs on: cluster node … native").
#[test]
fn native_architecture_first_on_two_nodes() {
    let _one = one_cluster_at_a_time();
    let started = Instant::now();
    let Some(lab) = shell_lab(
        ClusterOptions::cluster().with_second_node(SecondNode::architecture(NodeArch::Arm64)),
        &[("demo", Arch::Amd64), ("demo-arm", Arch::Arm64)],
    ) else {
        return;
    };
    eprintln!(
        "two-node cluster, walt image and operator ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (cluster, ns) = (&lab.cluster, lab.ns.as_str());
    let amd_node = cluster.node_name().expect("the first node").to_owned();
    let arm_node = cluster.second_node_name().expect("the second node").to_owned();

    // 1. Both nodes Ready, each with its CPU label.
    let nodes = kubectl(
        cluster,
        &[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{" "}{end}"#,
        ],
    );
    assert_eq!(
        nodes.trim(),
        format!("{amd_node}=True {arm_node}=True"),
        "kubectl get nodes"
    );
    assert_eq!(node_arch_label(cluster, &amd_node), "amd64");
    assert_eq!(node_arch_label(cluster, &arm_node), "arm64");

    // One shell: on which node it lands, what the plugin says before the prompt, what the status says.
    let shell = |image: &str, on: &str, emulated: bool| {
        let started = Instant::now();
        discard_shell(
            &lab,
            image,
            if image == "demo" { "x86_64" } else { "aarch64" },
            |pty| {
                let (pod, node) = shell_pod_and_node(cluster, ns);
                assert_eq!(node, on, "the shell pod {pod} of {image} runs on {on}");
                let status = jsonpath(cluster, ns, "shellsessions", "{.items[0].status.emulated}");
                assert_eq!(
                    status,
                    emulated.to_string(),
                    "status.emulated of {image}'s shell on {on}"
                );
                let ready = jsonpath(
                    cluster,
                    ns,
                    "shellsessions",
                    "{.items[0].status.conditions[?(@.type==\"Ready\")].message}",
                );
                assert!(
                    ready.contains(&format!(" on cluster node {on} (")),
                    "the Ready message names the node: {ready}"
                );
                let arch = if image == "demo" { "amd64" } else { "arm64" };
                let note = if emulated {
                    format!(
                        "Note: {image} is built for another CPU: it runs through qemu-user emulation (slower than native; no {arch} cluster node could take it)."
                    )
                } else {
                    format!(
                        "Note: {image} runs natively on a cluster node of its CPU ({arch}), no emulation."
                    )
                };
                assert!(
                    pty.text().contains(&note),
                    "the user is told {note:?}:\n{}",
                    pty.text()
                );
            },
        );
        eprintln!(
            "{image} shell on {on} ({}): {:.1} s from the command to the discarded session",
            if emulated { "emulated" } else { "native" },
            started.elapsed().as_secs_f64()
        );
    };

    // 2. and 3. Each image on the node of its CPU.
    shell("demo-arm", &arm_node, false);
    shell("demo", &amd_node, false);

    // 4. No arm64 node to take it: emulated on the amd64 node, and said so.
    kubectl(cluster, &["cordon", &arm_node]);
    shell("demo-arm", &amd_node, true);
    kubectl(cluster, &["uncordon", &arm_node]);

    // 5. and 6. An arm64 build: native on the arm64 node; with that node cordoned, emulated. An
    // amd64 build: native on the amd64 node.
    build(&lab, "built-arm", "demo-arm", &arm_node, false);
    kubectl(cluster, &["cordon", &arm_node]);
    build(&lab, "built-arm-fallback", "demo-arm", &amd_node, true);
    kubectl(cluster, &["uncordon", &arm_node]);
    build(&lab, "built-amd", "demo", &amd_node, false);

    // 7. An arm64 virtual node: its pod on the arm64 node, native, and said so.
    let started_node = Instant::now();
    let output = lab
        .walt(&[
            "node",
            "create-virtual",
            "vnode-arm",
            "--image",
            "demo-arm",
            "--arch",
            "arm64",
            "--cpu",
            "300m",
        ])
        .output()
        .expect("run kubectl walt node create-virtual");
    assert!(
        output.status.success(),
        "node create-virtual: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_jsonpath(
        cluster,
        ns,
        "nodes.walt.dev/vnode-arm",
        "{.status.clusterNode}",
        &arm_node,
        &lab.operator,
    );
    let pod_node = kubectl(
        cluster,
        &[
            "-n",
            &walt_crds::runtime_namespace(ns),
            "get",
            "pod",
            "walt-node-vnode-arm",
            "-o",
            "jsonpath={.spec.nodeName}",
        ],
    );
    assert_eq!(
        pod_node.trim(),
        arm_node,
        "the virtual node's pod runs on the arm64 node"
    );
    assert_eq!(
        jsonpath(cluster, ns, "nodes.walt.dev/vnode-arm", "{.status.emulated}"),
        "false"
    );
    let show = lab
        .walt(&["node", "show", "vnode-arm"])
        .output()
        .expect("run kubectl walt node show");
    let shown = String::from_utf8_lossy(&show.stdout);
    let runs_on = format!("Runs on:     cluster node {arm_node}, native (no emulation)");
    assert!(shown.contains(&runs_on), "node show says {runs_on:?}:\n{shown}");
    eprintln!(
        "arm64 virtual node on {arm_node} (native): {:.1} s from create-virtual to its status saying so",
        started_node.elapsed().as_secs_f64()
    );

    // The kubelet left the label as it registered it through all its status updates.
    assert_eq!(node_arch_label(cluster, &arm_node), "arm64");
    eprintln!(
        "native architecture first: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// `kubectl walt image build --from-dir` of an image `name` `FROM` the lab's Image `base` (`demo` is
/// amd64, `demo-arm` arm64) with a `RUN` step, no step cache (every build runs it): it runs on
/// cluster node `on`, and the plugin's `Built …` line and the ImageBuild's status say so and whether
/// emulated.
fn build(lab: &OperatorLab, name: &str, base: &str, on: &str, emulated: bool) {
    let (cluster, ns) = (&lab.cluster, lab.ns.as_str());
    let arch = if base == "demo" { "amd64" } else { "arm64" };
    let context = lab.work.path().join(format!("context-{name}"));
    std::fs::create_dir_all(&context).expect("make the build context");
    let from = format!("{}/lab/{ns}/{base}:latest", lab.for_pods);
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {from}\nRUN echo built-on-$(uname -m) > /etc/built\n"),
    )
    .expect("write the Dockerfile");
    let started = Instant::now();
    let output = lab
        .walt(&[
            "image",
            "build",
            "--from-dir",
            &context.display().to_string(),
            "--no-cache",
            name,
        ])
        .output()
        .expect("run kubectl walt image build");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "image build {name}:\n{stdout}\n{stderr}\noperator:\n{}",
        tail(&lab.operator.log(), 60)
    );
    let built = stdout
        .lines()
        .find(|line| line.starts_with(&format!("Built {name}: ")))
        .unwrap_or_else(|| panic!("no Built line:\n{stdout}"));
    assert!(
        built.ends_with(&format!(" on cluster node {on}")),
        "the build ran on {on}: {built}"
    );
    if emulated {
        assert!(built.contains(&format!("({arch}, emulated, ")), "{built}");
    } else {
        assert!(
            built.contains(&format!("({arch}, ")) && !built.contains("emulated"),
            "{built}"
        );
    }
    let of_build = |field: &str| {
        jsonpath(
            cluster,
            ns,
            "imagebuilds",
            &format!("{{.items[?(@.spec.image==\"{name}\")].{field}}}"),
        )
    };
    assert_eq!(of_build("spec.baseImage"), from, "the base the plugin read");
    assert_eq!(of_build("status.clusterNode"), on);
    assert_eq!(of_build("status.result.emulated"), emulated.to_string());
    eprintln!(
        "{built} ({:.1} s from the command to its end)",
        started.elapsed().as_secs_f64()
    );
}
