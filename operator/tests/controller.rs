//! The operator (`walt-operator run`) against a real control plane (etcd +
//! kube-apiserver + controller-manager from the harness). Each test runs its
//! own operator process restricted to its own namespace (`--watch-namespace`),
//! with its own leader Lease, and checks what a user sees with kubectl.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use walt_tests::k8s::{Cluster, shared_control_plane};
use walt_tests::operator::OperatorProcess as Operator;
use walt_tests::process::{Daemon, Lifetime};
use walt_tests::wait::{Poll, Wait};

fn cluster() -> &'static Cluster {
    match shared_control_plane() {
        Ok(cluster) => cluster,
        Err(error) => panic!("cannot start the control plane: {error}"),
    }
}

/// Installs the walt CRDs (once per control plane: the shared one, or a test's own) and waits
/// until they are served.
fn install_crds(cluster: &Cluster) {
    static INSTALLED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if installed.iter().any(|server| server == cluster.server()) {
        return;
    }
    {
        let path = std::env::temp_dir().join(format!("walt-crds-{}.yaml", std::process::id()));
        std::fs::write(&path, walt_crds::crds_yaml()).expect("write CRDs");
        cluster
            .kubectl_output(&["apply", "--server-side", "-f", &path.display().to_string()])
            .expect("apply the walt CRDs");
        for crd in [
            "images",
            "nodes",
            "shellsessions",
            "nodesaves",
            "imagebuilds",
            "devices",
        ] {
            cluster
                .kubectl_output(&[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    &format!("crd/{crd}.walt.dev"),
                ])
                .expect("CRD established");
        }
    }
    installed.push(cluster.server().to_owned());
}

/// A throwaway OpenSSH key pair made with ssh-keygen (an independent tool).
fn node_key(dir: &std::path::Path) -> PathBuf {
    walt_tests::sshnode::keygen(dir, "node_key")
}

/// The operator's command line for a test namespace (lab registry unreachable unless `extra`
/// brings one, node key Secret `walt-node-key`), `extra` last.
fn operator_args(namespace: &str, identity: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--namespace",
        namespace,
        "--watch-namespace",
        namespace,
        "--lab-registry",
        "127.0.0.1:1/lab",
        "--registry-plain-http",
        "true",
        "--node-key-secret",
        "walt-node-key",
        "--shell-image",
        "127.0.0.1:1/walt/operator:test",
        "--identity",
        identity,
        "--catalog-namespace",
        "walt-catalog-none",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if extra.contains(&"--lab-registry") {
        // The test brings its own lab registry: drop the unreachable default.
        if let Some(at) = args.iter().position(|arg| arg == "--lab-registry") {
            args.drain(at..at + 2);
        }
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// One operator process for a test namespace (this crate's binary, see [`operator_binary`]).
fn start_operator(cluster: &Cluster, namespace: &str, identity: &str, extra: &[&str]) -> Operator {
    let log = std::env::temp_dir().join(format!("walt-operator-{namespace}-{identity}.log"));
    Operator::start_binary(
        &operator_binary(),
        &cluster.kubeconfig(),
        None,
        &operator_args(namespace, identity, extra),
        &log,
    )
    .expect("start walt-operator")
}

/// An operator that reaches the sshd `node` (its proxy command), probes every 2 s, and is ready.
fn operator_for_node(
    cluster: &Cluster,
    namespace: &str,
    identity: &str,
    node: &walt_tests::sshnode::SshNode,
    extra: &[&str],
) -> Operator {
    let proxy = node.proxy_command();
    let mut args = vec!["--node-proxy-command", proxy.as_str(), "--probe-interval", "2s"];
    args.extend_from_slice(extra);
    let operator = start_operator(cluster, namespace, identity, &args);
    operator.wait_ready(Duration::from_mins(1));
    operator
}

/// The operator binary: `$WALT_OPERATOR_BIN` when set (a private copy, for
/// developers sharing one cargo target directory), else cargo's.
fn operator_binary() -> PathBuf {
    std::env::var_os("WALT_OPERATOR_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_walt-operator")),
        PathBuf::from,
    )
}

/// A namespace with the node key Secret the operator needs.
fn tenant(cluster: &Cluster, prefix: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = node_key(dir.path());
    (tenant_with_key(cluster, prefix, &key), dir)
}

/// A tenant ([`tenant`]) whose namespace enforces Pod Security `baseline`, as a lab's tenants' do: walt's
/// privileged pods must go to its runtime namespace.
fn tenant_at_baseline(cluster: &Cluster, prefix: &str) -> (String, tempfile::TempDir) {
    let (namespace, dir) = tenant(cluster, prefix);
    kubectl(
        cluster,
        &namespace,
        &[
            "label",
            "namespace",
            &namespace,
            "pod-security.kubernetes.io/enforce=baseline",
        ],
    );
    (namespace, dir)
}

/// A namespace whose node key Secret holds `key`.
fn tenant_with_key(cluster: &Cluster, prefix: &str, key: &std::path::Path) -> String {
    install_crds(cluster);
    let namespace = cluster.create_namespace(prefix).expect("create namespace");
    cluster
        .create_node_key_secret(&namespace, key)
        .expect("create the node key Secret");
    namespace
}

fn kubectl(cluster: &Cluster, namespace: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", namespace];
    all.extend_from_slice(args);
    cluster
        .kubectl_output(&all)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

fn apply(cluster: &Cluster, namespace: &str, yaml: &str) {
    let path = std::env::temp_dir().join(format!("walt-apply-{}-{namespace}.yaml", std::process::id()));
    std::fs::write(&path, yaml).expect("write manifest");
    kubectl(cluster, namespace, &["apply", "-f", &path.display().to_string()]);
}

/// Registers the Device `{namespace}-{suffix}` (cluster-scoped, as a lab admin does) at `address`,
/// port 22, its host key pinned when given, lent to `namespace`; returns its name.
fn lend_device(
    cluster: &Cluster,
    namespace: &str,
    suffix: &str,
    address: &str,
    host_key: Option<&str>,
) -> String {
    let name = format!("{namespace}-{suffix}");
    let pinned = host_key.map_or_else(String::new, |key| format!(", hostKey: \"{}\"", key.trim()));
    apply(
        cluster,
        namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {name}}}\n\
             spec: {{model: rpi-4-b, address: \"{address}\", sshPort: 22, lentTo: {{namespace: {namespace}}}{pinned}}}\n"
        ),
    );
    name
}

/// Polls `jsonpath` of an object until it equals `want`.
fn wait_for(
    cluster: &Cluster,
    namespace: &str,
    object: &str,
    jsonpath: &str,
    want: &str,
    within: Duration,
    operator: &Operator,
) {
    Wait::new(&format!("{object} {jsonpath} to be {want:?}"), within)
        .every(Duration::from_millis(250))
        .until(|| {
            match cluster.kubectl_output(&[
                "-n",
                namespace,
                "get",
                object,
                "-o",
                &format!("jsonpath={jsonpath}"),
            ]) {
                Ok(out) if out.trim() == want => Poll::Ready(()),
                Ok(out) => Poll::Pending(format!("{:?}", out.trim())),
                Err(error) => Poll::Pending(error.to_string()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
}

/// The operator's Event publisher on a real API server: the same occurrence repeated is one Event
/// whose series counts it; another note on the same object and reason is an Event of its own (kube's
/// recorder counted it on the first, whose note users then read).
#[test]
fn a_repeated_event_is_counted_and_another_note_is_its_own_event() {
    use walt_operator::controller::shared::events::EventPublisher;
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "events");
    kubectl(cluster, &namespace, &["create", "configmap", "regarded"]);
    let uid = kubectl(
        cluster,
        &namespace,
        &["get", "configmap", "regarded", "-o", "jsonpath={.metadata.uid}"],
    );
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(namespace.clone()),
        name: Some("regarded".into()),
        uid: Some(uid.trim().to_owned()),
        ..Default::default()
    };
    let event = |note: &str| kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "Unreachable".into(),
        note: Some(note.into()),
        action: "Probe".into(),
        secondary: None,
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let client = cluster.client().await.expect("a client");
        let publisher = EventPublisher::new(client, "walt-operator", "events-test");
        for note in [
            "no answer from 10.0.0.1",
            "no answer from 10.0.0.1",
            "no answer from 10.0.0.2",
        ] {
            publisher
                .publish(&event(note), &regarding)
                .await
                .expect("the API server takes the Event");
        }
    });
    let shown = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "events.events.k8s.io",
            "--sort-by=.eventTime",
            "-o",
            "jsonpath={range .items[*]}{.reason}|{.note}|{.series.count}|{.reportingInstance}{\"\\n\"}{end}",
        ],
    );
    assert_eq!(
        shown.trim(),
        "Unreachable|no answer from 10.0.0.1|2|events-test\nUnreachable|no answer from 10.0.0.2||events-test",
        "one Event counted twice, one Event of its own"
    );
}

#[test]
fn startup_errors_name_the_missing_secret_and_the_fix() {
    let cluster = cluster();
    install_crds(cluster);
    let namespace = cluster.create_namespace("op-config").expect("create namespace");
    let mut command = Operator::command(
        &operator_binary(),
        &cluster.kubeconfig(),
        None,
        &[
            "--namespace",
            &namespace,
            "--lab-registry",
            "127.0.0.1:1",
            "--node-key-secret",
            "no-such-secret",
            // An admin who provides the Secrets (by default the operator creates missing ones).
            "--create-missing-secrets",
            "false",
            "--shell-image",
            "x",
            "--http-addr",
            "127.0.0.1:0",
        ]
        .map(str::to_owned),
    );
    let output = walt_tests::process::output_within(&mut command, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("Secret {namespace}/no-such-secret not found"))
            && stderr.contains("kubectl -n")
            && stderr.contains("create secret generic no-such-secret"),
        "{stderr}"
    );
    let output = Command::new(operator_binary())
        .args([
            "run",
            "--namespace",
            "x",
            "--lab-registry",
            "r",
            "--node-key-secret",
            "k",
        ])
        .env_remove("WALT_SHELL_IMAGE")
        .output()
        .expect("run walt-operator");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--shell-image"), "{stderr}");
}

#[test]
fn two_replicas_one_leader_and_takeover_on_release() {
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-lease");
    let first = start_operator(cluster, &namespace, "replica-a", &[]);
    first.wait_ready(Duration::from_mins(1));
    let mut second = start_operator(cluster, &namespace, "replica-b", &[]);
    // The second replica serves /healthz but is not ready: it does not lead.
    Wait::new("the second replica to serve /healthz", Duration::from_secs(30))
        .until(|| second.get("/healthz").map(|(code, _)| code) == Some(200))
        .unwrap_or_else(|e| panic!("{e}:\n{}", second.log()));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(second.get("/readyz").map(|(code, _)| code), Some(503));
    let holder = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "lease",
            "walt-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    assert_eq!(holder.trim(), "replica-a");
    let metrics = first.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("walt_leader 1"), "{metrics}");
    // Graceful stop of the leader releases the Lease: the other takes over at once.
    let mut first = first;
    first.stop(Duration::from_secs(20));
    second.wait_ready(Duration::from_secs(20));
    let holder = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "lease",
            "walt-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    assert_eq!(holder.trim(), "replica-b");
    assert!(first.log().contains("stopped"), "{}", first.log());
    // Killed without cleanup (SIGKILL) and restarted under the same identity
    // (a StatefulSet pod): it leads again at once, no expiry wait.
    let killed = Instant::now();
    second.restart();
    second.wait_ready(Duration::from_secs(10));
    assert!(killed.elapsed() < Duration::from_secs(10));
    second.kill();
}

const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// Sets an Image's resolved facts as the Image controller would.
fn set_image_digest(cluster: &Cluster, namespace: &str, name: &str, reference: &str, digest: &str) {
    let patch = serde_json::json!({"status": {"reference": reference, "digest": digest}}).to_string();
    kubectl(
        cluster,
        namespace,
        &[
            "patch",
            &format!("image.walt.dev/{name}"),
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ],
    );
}

#[test]
fn virtual_node_gets_pod_service_claim_and_is_recreated_when_its_image_moves() {
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-vnode");
    let operator = start_operator(cluster, &namespace, "vnode-test", &[]);
    // Its pod, Service and claim go to the tenant's runtime namespace, never the tenant's own.
    let runtime = walt_crds::runtime_namespace(&namespace);
    operator.wait_ready(Duration::from_mins(1));
    let reference = format!("127.0.0.1:1/lab/{namespace}/debian:latest");
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n",
    );
    set_image_digest(cluster, &namespace, "debian", &reference, DIGEST_A);
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: vn1}\n\
         spec: {model: pc-x86-64, image: debian, bootMode: persistent, virtual: {architecture: amd64, memory: 256Mi}}\n",
    );
    // Generous: a bound, not a duration (CI runs this beside the fault tests on two cores).
    let within = Duration::from_mins(3);
    let pinned_a = format!("127.0.0.1:1/lab/{namespace}/debian@{DIGEST_A}");
    wait_for(
        cluster,
        &runtime,
        "pod/walt-node-vn1",
        "{.metadata.annotations.walt\\.dev/boots}",
        &pinned_a,
        within,
        &operator,
    );
    let args = kubectl(
        cluster,
        &runtime,
        &[
            "get",
            "pod/walt-node-vn1",
            "-o",
            "jsonpath={.spec.containers[0].args}",
        ],
    );
    assert!(
        args.contains("\"vnode\"") && args.contains("\"--persist\",\"/persist\""),
        "{args}"
    );
    let limit = kubectl(
        cluster,
        &runtime,
        &[
            "get",
            "pod/walt-node-vn1",
            "-o",
            "jsonpath={.spec.containers[0].resources.limits.memory}",
        ],
    );
    assert_eq!(limit.trim(), "256Mi");
    let owner = kubectl(
        cluster,
        &runtime,
        &[
            "get",
            "pod/walt-node-vn1",
            "-o",
            "jsonpath={.metadata.labels.walt\\.dev/owner-kind}/{.metadata.labels.walt\\.dev/owner-namespace}/{.metadata.labels.walt\\.dev/owner-name}/{.metadata.labels.walt\\.dev/owner-uid}",
        ],
    );
    let node_uid = jsonpath(cluster, &namespace, "node.walt.dev/vn1", "{.metadata.uid}");
    assert_eq!(owner.trim(), format!("Node/{namespace}/vn1/{node_uid}"));
    assert!(
        cluster
            .kubectl_output(&["-n", &namespace, "get", "pod/walt-node-vn1"])
            .is_err(),
        "no pod in the tenant's namespace"
    );
    wait_for(
        cluster,
        &runtime,
        "service/walt-node-vn1",
        "{.spec.ports[0].port}",
        "22",
        within,
        &operator,
    );
    wait_for(
        cluster,
        &runtime,
        "pvc/walt-node-vn1-persist",
        "{.spec.resources.requests.storage}",
        "1Gi",
        within,
        &operator,
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/vn1",
        "{.status.address}",
        &format!("walt-node-vn1.{runtime}.svc"),
        within,
        &operator,
    );
    // No kubelet on this tier: the pod stays Pending, the node Booting.
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/vn1",
        "{.status.phase}",
        "Booting",
        within,
        &operator,
    );
    let events = event_reasons(cluster, &namespace, "vn1");
    assert!(events.contains("Booting"), "events: {events}");

    // The image is overwritten (its digest moves): the virtual node reboots on it.
    let uid_before = kubectl(
        cluster,
        &runtime,
        &["get", "pod/walt-node-vn1", "-o", "jsonpath={.metadata.uid}"],
    );
    set_image_digest(cluster, &namespace, "debian", &reference, DIGEST_B);
    let pinned_b = format!("127.0.0.1:1/lab/{namespace}/debian@{DIGEST_B}");
    wait_for(
        cluster,
        &runtime,
        "pod/walt-node-vn1",
        "{.metadata.annotations.walt\\.dev/boots}",
        &pinned_b,
        within,
        &operator,
    );
    let uid_after = kubectl(
        cluster,
        &runtime,
        &["get", "pod/walt-node-vn1", "-o", "jsonpath={.metadata.uid}"],
    );
    assert_ne!(uid_before.trim(), uid_after.trim(), "the pod was recreated");

    // `kubectl walt node reboot` sets the request annotation: the pod is recreated once.
    let requested = "2026-11-22T10:00:00Z";
    kubectl(
        cluster,
        &namespace,
        &[
            "annotate",
            "node.walt.dev/vn1",
            &format!("walt.dev/reboot-requested-at={requested}"),
        ],
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/vn1",
        "{.metadata.annotations.walt\\.dev/reboot-handled-at}",
        requested,
        within,
        &operator,
    );
    let uid_rebooted = Wait::new("the pod to be recreated (a new uid)", within)
        .every(Duration::from_millis(250))
        .until(|| {
            let uid = jsonpath(cluster, &runtime, "pod/walt-node-vn1", "{.metadata.uid}");
            if !uid.is_empty() && uid != uid_after.trim() {
                Poll::Ready(uid)
            } else {
                Poll::Pending(format!("uid {uid:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    // Handled once: further reconciles keep this pod.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        jsonpath(cluster, &runtime, "pod/walt-node-vn1", "{.metadata.uid}"),
        uid_rebooted,
        "one reboot per request"
    );
    let metrics = operator.get("/metrics").expect("metrics").1;
    assert!(
        metrics.contains("walt_reconciles_total{kind=\"Node\"}"),
        "{metrics}"
    );
    assert_eq!(
        jsonpath(cluster, &namespace, "node.walt.dev/vn1", "{.status.podNamespace}"),
        runtime
    );
    // Deleting the Node removes its pod, Service and claim (its finalizer: owner references cannot
    // cross namespaces).
    kubectl(
        cluster,
        &namespace,
        &["delete", "node.walt.dev/vn1", "--wait=true", "--timeout=120s"],
    );
    for object in [
        "pod/walt-node-vn1",
        "service/walt-node-vn1",
        "pvc/walt-node-vn1-persist",
    ] {
        Wait::new(&format!("{object} to go with its Node"), within)
            .every(Duration::from_millis(250))
            .until(|| {
                let args = ["-n", runtime.as_str(), "get", object, "--ignore-not-found", "-o"];
                match cluster.kubectl_output(
                    &[
                        &args[..],
                        &["jsonpath={.metadata.name}/{.metadata.deletionTimestamp}"],
                    ]
                    .concat(),
                ) {
                    // Gone, or going (a claim waits for its pod to go first).
                    Ok(out) if out.trim().is_empty() || !out.trim().ends_with('/') => Poll::Ready(()),
                    Ok(out) => Poll::Pending(out),
                    Err(error) => Poll::Pending(error.to_string()),
                }
            })
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    }
}

/// Issue 15, no privileged pod for tenants: alice's image shell runs in her runtime namespace
/// (`walt-run-<alice>`, Pod Security `privileged`, made by the operator), never in her own (which
/// stays at `baseline`), labelled with its owner (kind, namespace, name, uid: owner references cannot
/// cross namespaces); the session's status names the pod's namespace; deleting the session removes
/// the pod; a pod there whose owner is gone is swept, one without owner labels is left alone; the
/// namespace's attach RoleBinding follows the subjects of alice's RoleBindings to walt's tenant roles.
/// The test plays the kubelet (none on this tier): the pod is only created and deleted.
#[test]
fn alices_shell_runs_in_her_runtime_namespace_and_goes_with_its_owner() {
    let started = Instant::now();
    let cluster = cluster();
    let (alice, _dir) = tenant_at_baseline(cluster, "alice-rt");
    kubectl(
        cluster,
        &alice,
        &[
            "create",
            "rolebinding",
            "alice-walt",
            "--clusterrole=walt-edit",
            "--user=alice",
        ],
    );
    let operator = start_operator(cluster, &alice, "rt", &["--runtime-sweep-interval", "2s"]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &alice,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n",
    );
    set_image_digest(
        cluster,
        &alice,
        "debian",
        &format!("127.0.0.1:1/lab/{alice}/debian:latest"),
        DIGEST_A,
    );
    apply(
        cluster,
        &alice,
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: s1}\nspec: {image: debian, ttl: 10m}\n",
    );
    let runtime = walt_crds::runtime_namespace(&alice);
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &alice,
        "shellsession/s1",
        "{.status.pod} {.status.podNamespace}",
        &format!("walt-shell-s1 {runtime}"),
        within,
        &operator,
    );
    let session_uid = jsonpath(cluster, &alice, "shellsession/s1", "{.metadata.uid}");
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            "pod/walt-shell-s1",
            "{.metadata.labels.walt\\.dev/owner-kind}/{.metadata.labels.walt\\.dev/owner-namespace}/{.metadata.labels.walt\\.dev/owner-name}/{.metadata.labels.walt\\.dev/owner-uid}"
        ),
        format!("ShellSession/{alice}/s1/{session_uid}")
    );
    assert!(
        cluster
            .kubectl_output(&["-n", &alice, "get", "pod/walt-shell-s1"])
            .is_err(),
        "a shell pod in the tenant's namespace"
    );
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            &format!("namespace/{runtime}"),
            "{.metadata.labels.pod-security\\.kubernetes\\.io/enforce} {.metadata.labels.walt\\.dev/tenant}"
        ),
        format!("privileged {alice}")
    );
    // Alice's users may attach there: the RoleBinding names whoever alice's namespace binds to walt-edit.
    wait_for(
        cluster,
        &runtime,
        "rolebinding/walt-session-attach",
        "{.roleRef.name} {.subjects[*].name}",
        "walt-session-attach alice",
        within,
        &operator,
    );
    kubectl(
        cluster,
        &alice,
        &[
            "create",
            "rolebinding",
            "carol-walt",
            "--clusterrole=edit",
            "--user=carol",
        ],
    );
    wait_for(
        cluster,
        &runtime,
        "rolebinding/walt-session-attach",
        "{.subjects[*].name}",
        "alice carol",
        within,
        &operator,
    );
    kubectl(cluster, &alice, &["delete", "rolebinding", "carol-walt"]);
    wait_for(
        cluster,
        &runtime,
        "rolebinding/walt-session-attach",
        "{.subjects[*].name}",
        "alice",
        within,
        &operator,
    );
    // Deleting the session removes its pod (its finalizer).
    kubectl(
        cluster,
        &alice,
        &["delete", "shellsession/s1", "--wait=true", "--timeout=60s"],
    );
    Wait::new("the shell pod to go with its session", within)
        .every(Duration::from_millis(250))
        .until(|| {
            match cluster.kubectl_output(&[
                "-n",
                &runtime,
                "get",
                "pod/walt-shell-s1",
                "--ignore-not-found",
                "-o",
                "name",
            ]) {
                Ok(out) if out.trim().is_empty() => Poll::Ready(()),
                Ok(out) => Poll::Pending(out),
                Err(error) => Poll::Pending(error.to_string()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    // A pod whose owner is gone (a session deleted while no operator ran) is swept; one without
    // owner labels (not walt's) is left alone.
    let orphan = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: walt-shell-gone\n  labels:\n    \
         app.kubernetes.io/managed-by: walt-operator\n    walt.dev/owner-kind: ShellSession\n    \
         walt.dev/owner-namespace: {alice}\n    walt.dev/owner-name: gone\n    walt.dev/owner-uid: 00000000-0000-0000-0000-000000000000\n\
         spec: {{containers: [{{name: shell, image: busybox}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: someone-elses}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n"
    );
    apply(cluster, &runtime, &orphan);
    Wait::new("the orphan pod to be swept", within)
        .every(Duration::from_millis(250))
        .until(|| {
            match cluster.kubectl_output(&[
                "-n",
                &runtime,
                "get",
                "pod/walt-shell-gone",
                "--ignore-not-found",
                "-o",
                "name",
            ]) {
                Ok(out) if out.trim().is_empty() => Poll::Ready(()),
                Ok(out) => Poll::Pending(out),
                Err(error) => Poll::Pending(error.to_string()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        jsonpath(cluster, &runtime, "pod/someone-elses", "{.metadata.name}"),
        "someone-elses",
        "a pod without owner labels was swept"
    );
    eprintln!(
        "alices_shell_runs_in_her_runtime_namespace_and_goes_with_its_owner: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_node_pointing_to_a_missing_image_says_so() {
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-noimg");
    let operator = start_operator(cluster, &namespace, "noimg-test", &[]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: vn2}\n\
         spec: {model: pc-x86-64, image: ghost, virtual: {}}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/vn2",
        "{.status.conditions[?(@.type==\"Booted\")].reason}",
        "ImageNotFound",
        Duration::from_mins(1),
        &operator,
    );
    let message = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "node.walt.dev/vn2",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Booted\")].message}",
        ],
    );
    assert!(
        message.contains(&format!("Image {namespace}/ghost not found")),
        "{message}"
    );
    assert!(
        cluster
            .kubectl_output(&[
                "-n",
                &walt_crds::runtime_namespace(&namespace),
                "get",
                "pod/walt-node-vn2"
            ])
            .is_err(),
        "no pod without an image"
    );
}

/// What the chart's alerts and dashboard read is what the operator serves: the census counts the
/// namespace's Node by its phase, and every `walt_…` series the chart's PrometheusRule and Grafana
/// dashboard read is a metric family of the real operator's `/metrics`.
#[test]
fn the_census_counts_nodes_by_phase_and_the_charts_alerts_read_served_metrics() {
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-census");
    let operator = start_operator(cluster, &namespace, "census-test", &[]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: counted}\n\
         spec: {model: pc-x86-64, image: ghost, virtual: {}}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/counted",
        "{.status.conditions[?(@.type==\"Booted\")].reason}",
        "ImageNotFound",
        Duration::from_mins(1),
        &operator,
    );
    let phase = jsonpath(cluster, &namespace, "node.walt.dev/counted", "{.status.phase}");
    let counted = format!("walt_objects{{kind=\"Node\",phase=\"{}\"}} 1", phase.trim());
    // The census runs every 15 s.
    let metrics = Wait::new(&format!("{counted} on /metrics"), Duration::from_secs(40))
        .every(Duration::from_millis(500))
        .until(|| {
            let metrics = operator.get("/metrics").map(|(_, body)| body).unwrap_or_default();
            if metrics.contains(&counted) {
                Poll::Ready(metrics)
            } else {
                Poll::Pending(metrics)
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    let served: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let read = chart_monitoring_series();
    assert!(read.len() >= 8, "the chart's alerts and dashboard read {read:?}");
    let unserved: Vec<&String> = read
        .iter()
        .filter(|series| {
            let family = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| series.strip_suffix(suffix))
                .unwrap_or(series);
            !served.contains(family)
        })
        .collect();
    assert!(
        unserved.is_empty(),
        "the chart reads series the operator does not serve: {unserved:?}\nserved families: {served:?}"
    );
}

/// Every `walt_…` series the chart's PrometheusRule and Grafana dashboard read.
fn chart_monitoring_series() -> std::collections::BTreeSet<String> {
    let docs = walt_tests::deploy::render_chart(&[
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ])
    .expect("helm template");
    let mut exprs = Vec::new();
    for doc in &docs {
        match doc["kind"].as_str() {
            Some("PrometheusRule") => {
                for group in doc["spec"]["groups"].as_array().into_iter().flatten() {
                    for rule in group["rules"].as_array().into_iter().flatten() {
                        exprs.extend(rule["expr"].as_str().map(str::to_owned));
                    }
                }
            }
            Some("ConfigMap") if doc["metadata"]["name"].as_str() == Some("walt-dashboard") => {
                let json = doc["data"]["walt-overview.json"]
                    .as_str()
                    .expect("the dashboard JSON");
                let dashboard: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
                for panel in dashboard["panels"].as_array().into_iter().flatten() {
                    for target in panel["targets"].as_array().into_iter().flatten() {
                        exprs.extend(target["expr"].as_str().map(str::to_owned));
                    }
                }
            }
            _ => {}
        }
    }
    exprs
        .iter()
        .flat_map(|expr| walt_tests::monitoring::metric_names(expr))
        .collect()
}

#[test]
fn physical_node_is_probed_its_host_key_recorded_then_enforced_and_rebooted_when_its_image_moves() {
    let cluster = cluster();
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let namespace = tenant_with_key(cluster, "op-phys", &node.client_key());
    let operator = operator_for_node(cluster, &namespace, "phys-test", &node, &[]);
    let reference = format!("127.0.0.1:1/lab/{namespace}/debian:latest");
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n",
    );
    set_image_digest(cluster, &namespace, "debian", &reference, DIGEST_A);
    let device = lend_device(cluster, &namespace, "rpi", &node.address().to_string(), None);
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, image: debian, device: {device}}}\n"
        ),
    );
    let within = Duration::from_mins(1);
    wait_node_booted(cluster, &namespace, "rpi1", DIGEST_A, &operator);
    let recorded = kubectl(
        cluster,
        &namespace,
        &["get", "node.walt.dev/rpi1", "-o", "jsonpath={.status.hostKey}"],
    );
    let expected: Vec<&str> = node.host_public_key().split_whitespace().take(2).collect();
    let recorded: Vec<&str> = recorded.split_whitespace().take(2).collect();
    assert_eq!(
        recorded, expected,
        "the host key the node presented (checked with its own sshd key file)"
    );
    let events = event_reasons(cluster, &namespace, "rpi1");
    assert!(events.contains("HostKeyRecorded"), "events: {events}");

    assert_eq!(
        jsonpath(cluster, &namespace, "node.walt.dev/rpi1", "{.status.device}"),
        device,
        "the Node shows its Device"
    );
    let bound = cluster
        .kubectl_output(&[
            "get",
            &format!("device/{device}"),
            "-o",
            "jsonpath={.status.boundTo.namespace}/{.status.boundTo.node}",
        ])
        .expect("read the Device");
    assert_eq!(bound, format!("{namespace}/rpi1"), "the Device shows its Node");

    // A second Device at the same address with a wrong pinned host key: its Node is refused.
    let impostor = lend_device(
        cluster,
        &namespace,
        "impostor",
        &node.address().to_string(),
        Some(node.client_public_key().trim()),
    );
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: impostor}}\n\
             spec: {{model: rpi-4-b, image: debian, device: {impostor}}}\n"
        ),
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/impostor",
        "{.status.conditions[?(@.type==\"Reachable\")].reason}",
        "HostKeyMismatch",
        within,
        &operator,
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/impostor",
        "{.status.phase}",
        "Unreachable",
        within,
        &operator,
    );

    // The image it boots is overwritten: the node is rebooted over SSH.
    set_image_digest(cluster, &namespace, "debian", &reference, DIGEST_B);
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/rpi1",
        "{.status.bootedImage.digest}",
        DIGEST_B,
        within,
        &operator,
    );
    let events = event_reasons(cluster, &namespace, "rpi1");
    assert!(events.contains("Rebooting"), "events: {events}");
}

/// `kubectl walt node reboot` on a physical node: the operator reboots it
/// over SSH once (the fixture's sshd, PID 1 of the node, is gone), records
/// the request as handled and says so in an Event.
#[test]
fn physical_node_reboots_once_when_asked() {
    let cluster = cluster();
    let mut node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let namespace = tenant_with_key(cluster, "op-reboot", &node.client_key());
    let operator = operator_for_node(cluster, &namespace, "reboot-test", &node, &[]);
    let device = lend_device(cluster, &namespace, "rpi", &node.address().to_string(), None);
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, device: {device}}}\n"
        ),
    );
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/rpi1",
        "{.status.phase}",
        "Ready",
        within,
        &operator,
    );
    assert!(node.is_running());
    let requested = "2026-11-22T10:00:00Z";
    kubectl(
        cluster,
        &namespace,
        &[
            "annotate",
            "node.walt.dev/rpi1",
            &format!("walt.dev/reboot-requested-at={requested}"),
        ],
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/rpi1",
        "{.metadata.annotations.walt\\.dev/reboot-handled-at}",
        requested,
        within,
        &operator,
    );
    Wait::new(
        "the node to reboot (its processes to stop)",
        Duration::from_secs(20),
    )
    .until(|| !node.is_running())
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
    wait_event(
        cluster,
        &namespace,
        "rpi1",
        "Rebooting",
        &format!("reboot requested at {requested}"),
        &operator,
    );
}

/// An Image is resolved at a real registry: digest as skopeo pushed it, node
/// models from the `walt.node.models` label; a missing repository gets
/// `Ready=False` naming the registry, and a Warning Event.
#[test]
fn image_resolves_at_the_registry_and_failures_name_it() {
    use walt_tests::images::{Arch, OciLayout};
    use walt_tests::registry::Registry;
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-image");
    let registry = Registry::start().expect("start a docker-registry on loopback");
    let layout = OciLayout::walt_busybox(Arch::Amd64, "pc-x86-64,qemu-arm64").expect("busybox image");
    let pushed = layout
        .push("base", &registry, &format!("lab/{namespace}/busybox:latest"))
        .expect("skopeo copy to the registry");
    let reference = registry.reference(&format!("lab/{namespace}/busybox:latest"));
    let skopeo_digest = skopeo_digest(&reference).expect("skopeo inspect the pushed image");
    assert_eq!(skopeo_digest, pushed);
    let lab = format!("{}/lab", registry.host());
    let operator = start_operator(cluster, &namespace, "image", &["--lab-registry", &lab]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: busybox\nspec:\n  reference: {reference}\n"
        ),
    );
    wait_for(
        cluster,
        &namespace,
        "image/busybox",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
        Duration::from_mins(1),
        &operator,
    );
    let digest = kubectl(
        cluster,
        &namespace,
        &["get", "image/busybox", "-o", "jsonpath={.status.digest}"],
    );
    assert_eq!(digest.trim(), skopeo_digest);
    let models = kubectl(
        cluster,
        &namespace,
        &["get", "image/busybox", "-o", "jsonpath={.status.nodeModels[*]}"],
    );
    assert_eq!(models.trim(), "pc-x86-64 qemu-arm64");
    let arch = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "image/busybox",
            "-o",
            "jsonpath={.status.platform.architecture} {.status.layers}",
        ],
    );
    assert_eq!(arch.trim(), "amd64 1");

    let missing = registry.reference(&format!("lab/{namespace}/no-such-image:latest"));
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: missing\nspec:\n  reference: {missing}\n"
        ),
    );
    wait_for(
        cluster,
        &namespace,
        "image/missing",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "False",
        Duration::from_mins(1),
        &operator,
    );
    let message = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "image/missing",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
        ],
    );
    assert!(
        message.contains(&registry.host()),
        "message does not name the registry: {message}"
    );
    assert!(message.contains("no-such-image"), "{message}");
    Wait::new("a ResolveFailed Event", Duration::from_secs(30))
        .every(Duration::from_millis(500))
        .until(|| {
            let events = kubectl(cluster, &namespace, &["get", "events", "-o", "wide"]);
            if events.contains("ResolveFailed") {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("\n{events}"))
            }
        })
        .unwrap();
}

/// Waits until Node `name` is Ready and has booted `digest`.
fn wait_node_booted(cluster: &Cluster, namespace: &str, name: &str, digest: &str, operator: &Operator) {
    let node = format!("node.walt.dev/{name}");
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        namespace,
        &node,
        "{.status.phase}",
        "Ready",
        within,
        operator,
    );
    wait_for(
        cluster,
        namespace,
        &node,
        "{.status.bootedImage.digest}",
        digest,
        within,
        operator,
    );
}

/// The manifest digest skopeo (an independent client) reads for `reference`,
/// or its error when there is no such tag.
fn skopeo_digest(reference: &str) -> Result<String, String> {
    let output = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo inspect (apt-get install skopeo)");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

fn jsonpath(cluster: &Cluster, namespace: &str, object: &str, path: &str) -> String {
    kubectl(
        cluster,
        namespace,
        &["get", object, "-o", &format!("jsonpath={path}")],
    )
    .trim()
    .to_owned()
}

fn event_reasons(cluster: &Cluster, namespace: &str, name: &str) -> String {
    kubectl(
        cluster,
        namespace,
        &[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={.items[*].reason}",
        ],
    )
}

/// Waits for an Event about object `name` with `reason` whose message contains `text`.
fn wait_event(cluster: &Cluster, namespace: &str, name: &str, reason: &str, text: &str, operator: &Operator) {
    Wait::new(
        &format!("a {reason} Event about {name} saying {text:?}"),
        Duration::from_secs(30),
    )
    .every(Duration::from_millis(250))
    .until(|| {
        let messages = kubectl(
            cluster,
            namespace,
            &[
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={name},reason={reason}"),
                "-o",
                "jsonpath={.items[*].message}",
            ],
        );
        if messages.contains(text) {
            Poll::Ready(())
        } else {
            Poll::Pending(format!("messages {messages:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
}

/// A lab for node saves: a registry holding the base image `debian` of the
/// tenant, an sshd node booted from it, an operator, the Image and the Node
/// (Ready, booted digest recorded).
struct SaveLab {
    registry: walt_tests::registry::Registry,
    node: walt_tests::sshnode::SshNode,
    namespace: String,
    operator: Operator,
    base_digest: String,
}

impl SaveLab {
    fn start(prefix: &str, node: walt_tests::sshnode::SshNode) -> SaveLab {
        Self::start_with(prefix, node, &[])
    }

    fn start_with(prefix: &str, node: walt_tests::sshnode::SshNode, extra: &[&str]) -> SaveLab {
        let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
        Self::start_on(registry, prefix, node, extra)
    }

    /// A save lab on this registry (one that records requests, say).
    fn start_on(
        registry: walt_tests::registry::Registry,
        prefix: &str,
        node: walt_tests::sshnode::SshNode,
        extra: &[&str],
    ) -> SaveLab {
        use walt_tests::images::{Arch, OciLayout};
        let cluster = cluster();
        let namespace = tenant_with_key(cluster, prefix, &node.client_key());
        let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
        let base_digest = layout
            .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
            .expect("skopeo copy the base image to the registry");
        let lab = format!("{}/lab", registry.host());
        let mut args = vec!["--lab-registry", lab.as_str()];
        args.extend_from_slice(extra);
        let operator = operator_for_node(cluster, &namespace, "save", &node, &args);
        let device = lend_device(cluster, &namespace, "rpi", &node.address().to_string(), None);
        apply(
            cluster,
            &namespace,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: debian}}\nspec: {{}}\n---\n\
                 apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
                 spec: {{model: rpi-4-b, image: debian, device: {device}}}\n"
            ),
        );
        let within = Duration::from_mins(1);
        wait_for(
            cluster,
            &namespace,
            "image/debian",
            "{.status.digest}",
            &base_digest,
            within,
            &operator,
        );
        wait_node_booted(cluster, &namespace, "rpi1", &base_digest, &operator);
        SaveLab {
            registry,
            node,
            namespace,
            operator,
            base_digest,
        }
    }

    fn save(&self, name: &str, image: &str, extra: &str) {
        apply(
            cluster(),
            &self.namespace,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {{name: {name}}}\n\
                 spec: {{node: rpi1, image: \"{image}\"{extra}}}\n"
            ),
        );
    }

    fn wait(&self, object: &str, path: &str, want: &str, within: Duration) {
        wait_for(
            cluster(),
            &self.namespace,
            object,
            path,
            want,
            within,
            &self.operator,
        );
    }

    fn get(&self, object: &str, path: &str) -> String {
        jsonpath(cluster(), &self.namespace, object, path)
    }

    /// Writes `bytes` of random data (which does not compress) into `/srv/big` on the node.
    fn write_random_file(&self, bytes: u64) {
        self.node
            .run(&format!(
                "mkdir -p /srv && head -c {bytes} /dev/urandom > /srv/big"
            ))
            .unwrap_or_else(|error| panic!("write {bytes} random bytes on the node: {error}"));
    }

    /// Waits until NodeSave `save` succeeded, and checks that the lab registry's `image` (`name:tag`)
    /// points at the digest its status names.
    fn wait_saved(&self, save: &str, image: &str, within: Duration) {
        let object = format!("nodesave/{save}");
        self.wait(&object, "{.status.phase}", "Succeeded", within);
        let tag = self
            .registry
            .reference(&format!("lab/{}/{image}", self.namespace));
        assert_eq!(
            skopeo_digest(&tag),
            Ok(self.get(&object, "{.status.result.digest}")),
            "{image} points at what {save} saved"
        );
    }

    /// Waits until a save runs and has read bytes from the node (fails if it finished first).
    fn wait_progress(&self, save: &str) {
        Wait::new(&format!("{save} to report progress"), Duration::from_mins(1))
            .every(Duration::from_millis(100))
            .until(|| {
                let phase = self.get(save, "{.status.phase}");
                let bytes: u64 = self.get(save, "{.status.progress.bytes}").parse().unwrap_or(0);
                if phase == "Succeeded" {
                    return Err("it finished before the test could interrupt it: make the file bigger");
                }
                Ok(if phase == "Running" && bytes > 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("phase {phase:?}, {bytes} bytes"))
                })
            })
            .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", self.operator.log()));
    }
}

/// A NodeSave against a real sshd node: the node's changes become a new image
/// (created, modified and deleted files, checked with skopeo + umoci), the
/// Image is created with the new digest; saving over an existing image is
/// refused without `overwrite: true` and, with it, moves the tag and reboots
/// the node that boots it.
#[test]
fn node_save_creates_an_image_refuses_to_overwrite_then_overwrites_and_reboots() {
    use walt_tests::images::skopeo_umoci_unpack;
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start("op-save", node);
    let cluster = cluster();
    lab.node
        .run(
            "set -e
mkdir -p /srv && echo created > /srv/created
echo 'walt:x:1000:1000::/:/bin/sh' >> /etc/passwd
rm /etc/group
mkdir -p /var/log && echo noise > /var/log/messages",
        )
        .expect("change files on the node");
    lab.save("save1", "debian:v2", "");
    let within = Duration::from_mins(2);
    lab.wait("nodesave/save1", "{.status.phase}", "Succeeded", within);
    let digest = lab.get("nodesave/save1", "{.status.result.digest}");
    assert!(digest.starts_with("sha256:"), "result digest: {digest:?}");
    assert_eq!(
        lab.get("nodesave/save1", "{.status.baseImage.digest}"),
        lab.base_digest
    );
    let repository = format!("lab/{}/debian", lab.namespace);
    assert_eq!(
        skopeo_digest(&lab.registry.reference(&format!("{repository}:v2"))),
        Ok(digest.clone()),
        "the tag points at the saved digest"
    );
    // The Image was created for the new name, and resolves to the new digest.
    lab.wait(
        "image/debian.v2",
        "{.status.digest}",
        &digest,
        Duration::from_mins(1),
    );
    let work = tempfile::tempdir().expect("temp dir");
    let rootfs =
        skopeo_umoci_unpack(&lab.registry, &format!("{repository}:v2"), work.path()).expect("unpack");
    assert_eq!(
        std::fs::read(rootfs.join("srv/created")).expect("created file"),
        b"created\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/passwd")).expect("modified file"),
        "root:x:0:0:root:/root:/bin/sh\nwalt:x:1000:1000::/:/bin/sh\n"
    );
    assert!(!rootfs.join("etc/group").exists(), "deleted file is gone");
    assert!(!rootfs.join("var/log/messages").exists(), "WalT exclusion /log/");
    assert!(rootfs.join("bin/busybox").is_file(), "base files stay");
    let reasons = event_reasons(cluster, &lab.namespace, "save1");
    assert!(
        reasons.contains("Started") && reasons.contains("Saved"),
        "events: {reasons}"
    );
    let columns = kubectl(cluster, &lab.namespace, &["get", "nodesave/save1"]);
    assert!(
        columns.contains("Succeeded") && columns.contains("debian:v2"),
        "{columns}"
    );

    // The base image exists: refused without overwrite, and no tag moved.
    lab.save("save2", "debian", "");
    lab.wait(
        "nodesave/save2",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(1),
    );
    let reason = lab.get(
        "nodesave/save2",
        "{.status.conditions[?(@.type==\"Complete\")].reason}",
    );
    let message = lab.get(
        "nodesave/save2",
        "{.status.conditions[?(@.type==\"Complete\")].message}",
    );
    assert_eq!(reason, "ImageExists", "{message}");
    assert!(message.contains("overwrite: true"), "{message}");
    assert_eq!(
        skopeo_digest(&lab.registry.reference(&format!("{repository}:latest"))),
        Ok(lab.base_digest.clone())
    );

    // With overwrite: the tag moves, the Image follows, the node that boots it reboots.
    lab.save("save3", "debian", ", overwrite: true");
    lab.wait("nodesave/save3", "{.status.phase}", "Succeeded", within);
    let overwritten = lab.get("nodesave/save3", "{.status.result.digest}");
    assert_ne!(overwritten, lab.base_digest);
    assert_eq!(
        skopeo_digest(&lab.registry.reference(&format!("{repository}:latest"))),
        Ok(overwritten.clone())
    );
    let message = lab.get(
        "nodesave/save3",
        "{.status.conditions[?(@.type==\"Complete\")].message}",
    );
    assert!(message.contains("rebooting 1 node(s)"), "{message}");
    lab.wait(
        "image/debian",
        "{.status.digest}",
        &overwritten,
        Duration::from_mins(1),
    );
    lab.wait(
        "node.walt.dev/rpi1",
        "{.status.bootedImage.digest}",
        &overwritten,
        Duration::from_mins(1),
    );
    let reasons = event_reasons(cluster, &lab.namespace, "rpi1");
    assert!(reasons.contains("Rebooting"), "events: {reasons}");
}

/// The operator is killed (SIGKILL) in the middle of a save: the tag has not
/// moved (skopeo finds no such tag); restarted, it runs the save again from
/// the start and finishes it. A save deleted while it runs stops and moves no tag either.
#[test]
fn operator_killed_mid_save_moves_no_tag_and_finishes_after_restart() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let mut lab = SaveLab::start("op-savekill", node);
    let cluster = cluster();
    // Enough data that the save is still running when the operator is killed.
    lab.node
        .run("mkdir -p /srv && head -c 268435456 /dev/urandom > /srv/big && echo small > /srv/small")
        .expect("write a big file on the node");
    lab.save("big", "debian:big", "");
    let tag = lab
        .registry
        .reference(&format!("lab/{}/debian:big", lab.namespace));
    lab.wait_progress("nodesave/big");
    lab.operator.kill();
    assert!(
        skopeo_digest(&tag).is_err(),
        "a tag moved although the save was interrupted"
    );
    assert_eq!(lab.get("nodesave/big", "{.status.phase}"), "Running");
    lab.operator.restart();
    lab.wait(
        "nodesave/big",
        "{.status.phase}",
        "Succeeded",
        Duration::from_mins(4),
    );
    let digest = lab.get("nodesave/big", "{.status.result.digest}");
    assert_eq!(skopeo_digest(&tag), Ok(digest));
    let reasons = event_reasons(cluster, &lab.namespace, "big");
    assert!(reasons.contains("Restarted"), "events: {reasons}");
    let size: u64 = lab
        .get("nodesave/big", "{.status.result.layerSize}")
        .parse()
        .expect("layer size");
    assert!(size > 256 << 20, "random data does not compress: {size}");

    // A NodeSave deleted while it runs (an interrupted `kubectl walt node save`) stops, and moves no tag.
    lab.save("gone", "debian:gone", "");
    lab.wait_progress("nodesave/gone");
    kubectl(
        cluster,
        &lab.namespace,
        &["delete", "nodesave/gone", "--wait=false"],
    );
    Wait::new("the save to be cancelled", Duration::from_mins(2))
        .every(Duration::from_millis(250))
        .until(|| lab.operator.log().contains("node save cancelled"))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", lab.operator.log()));
    let gone = lab
        .registry
        .reference(&format!("lab/{}/debian:gone", lab.namespace));
    assert!(skopeo_digest(&gone).is_err(), "a deleted save moved a tag");
    let images = kubectl(cluster, &lab.namespace, &["get", "images", "-o", "name"]);
    assert!(!images.contains("debian.gone"), "{images}");
}

/// A save's status writes are conditional on the version of the NodeSave they were decided on (issue
/// #17). A label written mid-save (metadata, no decision) gets the operator's next write refused
/// (409) and written again on the new version (the operator logs `WriteAgain`): the save goes on and
/// succeeds. Another writer ending a running save, as a second replica that decided on its own copy
/// would, gets the operator's next progress write refused; the operator reads the NodeSave again,
/// stops its run and writes nothing more: the other writer's end stays, no tag moves, no Image is
/// made. Without the precondition the operator overwrote that end (`Succeeded` 1.8 s after it) and
/// moved the tag.
#[test]
fn a_save_ended_by_another_writer_mid_run_is_neither_overwritten_nor_published() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start("op-stale", node);
    let cluster = cluster();
    // Enough data that the saves are still running when the other writes land.
    lab.write_random_file(256 << 20);

    lab.save("labelled", "debian:labelled", "");
    lab.wait_progress("nodesave/labelled");
    kubectl(
        cluster,
        &lab.namespace,
        &["label", "nodesave/labelled", "walt.dev/test=labelled"],
    );
    lab.wait_saved("labelled", "debian:labelled", Duration::from_mins(4));

    lab.save("ended", "debian:ended", "");
    lab.wait_progress("nodesave/ended");
    let ended = r#"{"status":{"phase":"Failed","conditions":[{"type":"Complete","status":"True","reason":"EndedElsewhere","message":"ended by another replica","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    kubectl(
        cluster,
        &lab.namespace,
        &[
            "patch",
            "nodesave/ended",
            "--subresource=status",
            "--type=merge",
            "-p",
            ended,
        ],
    );
    let stopped = Instant::now();
    let says = "{.status.phase} {.status.conditions[?(@.type==\"Complete\")].reason}";
    Wait::new("the operator to stop the save", Duration::from_mins(1))
        .every(Duration::from_millis(250))
        .until(|| {
            let status = lab.get("nodesave/ended", says);
            if status != "Failed EndedElsewhere" {
                return Err(format!("the operator overwrote another writer's end: {status}"));
            }
            Ok(if lab.operator.log().contains("node save stopped") {
                Poll::Ready(())
            } else {
                Poll::Pending(status)
            })
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", lab.operator.log()));
    eprintln!(
        "the run stopped {:.1} s after the other writer's end",
        stopped.elapsed().as_secs_f64()
    );
    let log = lab.operator.log();
    assert!(
        log.contains("another writer ended it meanwhile: Failed (EndedElsewhere: ended by another replica)"),
        "the operator says why it stopped:\n{log}"
    );
    // Past two more progress intervals (3 s): nothing more written, nothing published.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(lab.get("nodesave/ended", says), "Failed EndedElsewhere");
    let tag = lab
        .registry
        .reference(&format!("lab/{}/debian:ended", lab.namespace));
    assert!(
        skopeo_digest(&tag).is_err(),
        "a save another writer ended moved its tag"
    );
    let images = kubectl(cluster, &lab.namespace, &["get", "images", "-o", "name"]);
    assert!(!images.contains("debian.ended"), "{images}");
}

/// The registry killed mid-push and restarted: the save is tried again (a `Retrying` Event) and
/// succeeds, the tag moved once to the whole image. A registry gone for longer than the retries
/// fails the save with the registry's words, and moves no tag.
#[test]
fn registry_killed_mid_save_is_retried_and_a_registry_gone_fails_cleanly() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let mut lab = SaveLab::start_with(
        "op-regkill",
        node,
        // 3, 6 and 12 s between attempts: the registry is back within them.
        &["--save-retries", "3", "--save-retry-delay", "3s"],
    );
    let cluster = cluster();
    lab.write_random_file(128 << 20);
    lab.save("big", "debian:big", "");
    lab.wait_progress("nodesave/big");
    lab.registry.kill();
    // The registry stays away until the save has met it gone: a restart within a fixed sleep could
    // fall between two of the upload's requests on a slow machine, and nothing would be retried.
    Wait::new("the save to retry (a Retrying Event)", Duration::from_mins(2))
        .every(Duration::from_millis(200))
        .until(|| {
            let reasons = event_reasons(cluster, &lab.namespace, "big");
            Ok::<_, String>(if reasons.contains("Retrying") {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("events: {reasons}"))
            })
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", lab.operator.log()));
    lab.registry
        .restart()
        .expect("restart the registry on its port and storage");
    lab.wait_saved("big", "debian:big", Duration::from_mins(5));

    // Gone for good: 3 retries (3, 6, 12 s), then Failed with what the registry (not) said.
    lab.registry.kill();
    lab.save("late", "debian:late", "");
    lab.wait(
        "nodesave/late",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(2),
    );
    let message = kubectl(
        cluster,
        &lab.namespace,
        &[
            "get",
            "nodesave/late",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Complete')].message}",
        ],
    );
    assert!(
        message.contains("gave up after 4 attempts") && message.contains("127.0.0.1"),
        "the failure names the registry and the attempts: {message}"
    );
    lab.registry.restart().expect("restart the registry");
    let late = lab
        .registry
        .reference(&format!("lab/{}/debian:late", lab.namespace));
    assert!(skopeo_digest(&late).is_err(), "a failed save moved a tag");
}

/// A registry that accepts connections and answers nothing (frozen with SIGSTOP while the save pushes:
/// the kernel still takes connections and the first bytes of the upload) fails the save within a bound:
/// the step it is in (the upload, or the check of the base's blobs right after it) stops at
/// `--registry-timeout` (3 s, a `Retrying` Event naming the step and the bound), the one retry
/// (`--save-retries 1`) meets the same silence reading the base, and the save is `Failed` naming the
/// registry and the bound, no tag moved. Thawed, the registry takes the next save of 128 MiB, whose
/// upload runs longer than the bound: the bound is on silence, not on the transfer.
#[test]
fn a_registry_that_answers_nothing_fails_the_save_at_the_registry_timeout() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start_with(
        "op-regsilent",
        node,
        &[
            "--registry-timeout",
            "3s",
            "--save-retries",
            "1",
            "--save-retry-delay",
            "1s",
        ],
    );
    let cluster = cluster();
    lab.write_random_file(128 << 20);
    lab.save("silent", "debian", ", overwrite: true");
    lab.wait_progress("nodesave/silent");
    lab.registry.freeze().expect("freeze the registry");
    let frozen = Instant::now();
    lab.wait(
        "nodesave/silent",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(1),
    );
    let failed_after = frozen.elapsed();
    lab.registry.thaw().expect("thaw the registry");
    eprintln!(
        "the save failed {:.1} s after the registry froze (--registry-timeout 3s, 1 retry after 1 s)",
        failed_after.as_secs_f64()
    );
    // Which step meets the silence depends on how far the upload got before the freeze landed: the
    // new layer's upload (most runs), or, when it had just finished, the check of the base's blobs
    // that follows it. Either is bounded by the same timeout, and the Event names the step.
    wait_event(
        cluster,
        &lab.namespace,
        "silent",
        "Retrying",
        "failed: silent for 3 s (--registry-timeout)",
        &lab.operator,
    );
    let says = lab.get(
        "nodesave/silent",
        "{.status.conditions[?(@.type==\"Complete\")].message}",
    );
    assert!(
        says.contains(&format!("registry {}", lab.registry.host()))
            && says.contains("silent for 3 s (--registry-timeout)")
            && says.contains("gave up after 2 attempts"),
        "the failure names the registry, the bound and the attempts: {says}"
    );
    // The upload (when the freeze lands in it) flows on into the frozen registry's socket buffers
    // (megabytes on loopback) until they are full, then 3 s; the retry, 1 s later, meets 3 s of
    // silence reading the base. The first part is as slow as the compression of what fills the
    // buffers (38.8 s measured with a load of 11 on 2 cores); an unbounded client would wait for ever.
    assert!(failed_after < Duration::from_mins(2), "{failed_after:?}");
    let latest = lab
        .registry
        .reference(&format!("lab/{}/debian:latest", lab.namespace));
    assert_eq!(
        skopeo_digest(&latest),
        Ok(lab.base_digest.clone()),
        "the name still points where it did"
    );
    assert_eq!(lab.get("image/debian", "{.status.digest}"), lab.base_digest);

    let started = Instant::now();
    lab.save("after", "debian:after", "");
    lab.wait_saved("after", "debian:after", Duration::from_mins(5));
    eprintln!(
        "the next save (128 MiB) succeeded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Fills `disk` with a file `filler` but for `left` bytes (zeros: a tmpfs keeps them all).
fn fill_but(disk: &walt_tests::tmpfs::Tmpfs, left: u64) -> PathBuf {
    let free = disk.free_bytes().expect("free bytes of the tmpfs");
    let filler = disk.path().join("filler");
    let file = std::fs::File::create(&filler).expect("create the filler");
    let mut writer = std::io::BufWriter::new(file);
    std::io::copy(
        &mut std::io::Read::take(std::io::repeat(0), free.saturating_sub(left)),
        &mut writer,
    )
    .expect("write the filler");
    std::io::Write::flush(&mut writer).expect("flush the filler");
    filler
}

/// The registry's disk full mid-save: its storage is a 48 MiB tmpfs, filled but for 8 MiB, and the node
/// has 16 MiB (random) to save. The save fails (`PushFailed`), saying the registry's storage is full and
/// where (Distribution's words name the upload file it could not write); no tag moved, the Image is
/// where it was. Once the filler is removed, the same save made again succeeds.
#[test]
fn a_full_registry_disk_fails_the_save_cleanly_and_the_next_succeeds_once_freed() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let registry = walt_tests::registry::Registry::start_with_storage_limit(48 << 20)
        .expect("start a docker-registry on a 48 MiB tmpfs (needs root)");
    let lab = SaveLab::start_on(registry, "op-regfull", node, &["--save-retries", "0"]);
    let disk = lab.registry.disk().expect("the registry's tmpfs");
    let filler = fill_but(disk, 8 << 20);
    lab.write_random_file(16 << 20);
    let started = Instant::now();
    lab.save("full", "debian", ", overwrite: true");
    lab.wait(
        "nodesave/full",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(2),
    );
    eprintln!(
        "the save failed {:.1} s after it was created",
        started.elapsed().as_secs_f64()
    );
    let says = lab.get(
        "nodesave/full",
        "{.status.conditions[?(@.type==\"Complete\")].reason}: {.status.conditions[?(@.type==\"Complete\")].message}",
    );
    assert!(
        says.starts_with("PushFailed: ")
            && says.contains(&format!("registry {}", lab.registry.host()))
            && says.contains("the registry's storage is full")
            && says.contains("no space left on device")
            && says.contains(&disk.path().display().to_string()),
        "the failure says the registry's disk is full and where: {says}"
    );
    let latest = lab
        .registry
        .reference(&format!("lab/{}/debian:latest", lab.namespace));
    assert_eq!(
        skopeo_digest(&latest),
        Ok(lab.base_digest.clone()),
        "the name still points where it did"
    );
    assert_eq!(lab.get("image/debian", "{.status.digest}"), lab.base_digest);
    eprintln!(
        "free on the registry's disk after the failure: {} bytes (the failed upload stays in its _uploads until the registry purges it)",
        disk.free_bytes().unwrap_or(0)
    );

    std::fs::remove_file(&filler).expect("free the registry's disk");
    let started = Instant::now();
    lab.save("freed", "debian", ", overwrite: true");
    lab.wait(
        "nodesave/freed",
        "{.status.phase}",
        "Succeeded",
        Duration::from_mins(2),
    );
    eprintln!(
        "once freed, the save succeeded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        skopeo_digest(&latest),
        Ok(lab.get("nodesave/freed", "{.status.result.digest}"))
    );
}

/// Multi-tenancy is Kubernetes RBAC: alice, who may edit walt objects in her
/// namespace only, cannot create a NodeSave in bob's namespace nor read his
/// Nodes; the API server says so.
#[test]
fn alice_cannot_save_or_read_bobs_nodes() {
    let cluster = cluster();
    install_crds(cluster);
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: walt-test-edit}\n\
                rules:\n- apiGroups: [walt.dev]\n  resources: [images, nodes, shellsessions, nodesaves]\n  \
                verbs: [get, list, watch, create, update, patch, delete]\n";
    let path = std::env::temp_dir().join(format!("walt-test-role-{}.yaml", std::process::id()));
    std::fs::write(&path, role).expect("write role");
    cluster
        .kubectl_output(&["apply", "-f", &path.display().to_string()])
        .expect("apply the role");
    let alice_ns = cluster.create_namespace("alice").expect("create namespace");
    let bob_ns = cluster.create_namespace("bob").expect("create namespace");
    for (user, namespace) in [("alice", &alice_ns), ("bob", &bob_ns)] {
        kubectl(
            cluster,
            namespace,
            &[
                "create",
                "rolebinding",
                &format!("{user}-walt"),
                "--clusterrole=walt-test-edit",
                &format!("--user={user}"),
            ],
        );
    }
    let manifest = std::env::temp_dir().join(format!("walt-test-save-{}.yaml", std::process::id()));
    std::fs::write(
        &manifest,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: steal}\nspec: {node: rpi1, image: mine}\n",
    )
    .expect("write manifest");
    let manifest = manifest.display().to_string();
    let as_user = |user: &str, groups: &[&str]| cluster.kubectl_as(user, groups).expect("user kubeconfig");
    let alice_groups = ["walt-users", "team-alice"];
    let bob_groups = ["walt-users", "team-bob"];
    walt_tests::k8s::run_kubectl(
        as_user("bob", &bob_groups),
        &["-n", &bob_ns, "create", "--dry-run=server", "-f", &manifest],
    )
    .expect("bob may save in his namespace");
    walt_tests::k8s::run_kubectl(
        as_user("alice", &alice_groups),
        &["-n", &alice_ns, "create", "--dry-run=server", "-f", &manifest],
    )
    .expect("alice may save in her namespace");
    let refused = walt_tests::k8s::run_kubectl(
        as_user("alice", &alice_groups),
        &["-n", &bob_ns, "create", "-f", &manifest],
    )
    .expect_err("alice must not create a NodeSave in bob's namespace")
    .to_string();
    println!("alice creating a NodeSave in {bob_ns}: {refused}");
    assert!(
        refused.contains("Forbidden")
            && refused.contains(r#"User "alice" cannot create resource "nodesaves" in API group "walt.dev""#),
        "unexpected refusal: {refused}"
    );
    let refused = walt_tests::k8s::run_kubectl(
        as_user("alice", &alice_groups),
        &["-n", &bob_ns, "get", "nodes.walt.dev"],
    )
    .expect_err("alice must not list bob's Nodes")
    .to_string();
    println!("alice listing Nodes in {bob_ns}: {refused}");
    assert!(
        refused.contains(r#"User "alice" cannot list resource "nodes" in API group "walt.dev""#),
        "unexpected refusal: {refused}"
    );
}

/// `spec.source` is copied into the lab registry (from another registry, with the Image's pull
/// secret), keeping its digest, with progress in status and Events; the shell mode is read from the
/// layers; a source that does not exist is reported with the registry's answer.
#[test]
fn image_source_is_cloned_into_the_lab_registry_with_its_digest_and_shell_mode() {
    use walt_tests::images::{Arch, OciLayout, skopeo_inspect_raw};
    use walt_tests::registry::Registry;
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-clone");
    let upstream = Registry::start_with_basic_auth("puller", "s3cret").expect("start an upstream registry");
    let lab_registry = Registry::start().expect("start the lab registry");
    let with_init = OciLayout::walt_busybox(Arch::Arm64, "rpi-4-b").expect("arm64 busybox image");
    let upstream_digest = with_init
        .push("base", &upstream, "upstream/walt-busybox:arm64")
        .expect("push to the upstream registry");
    let basic = OciLayout::busybox(Arch::Amd64).expect("amd64 busybox image");
    basic
        .push("base", &upstream, "upstream/busybox:1")
        .expect("push to the upstream registry");
    let secret_file = std::env::temp_dir().join(format!("walt-pull-secret-{}.json", std::process::id()));
    std::fs::write(&secret_file, upstream.docker_config_json()).expect("write the pull secret");
    kubectl(
        cluster,
        &namespace,
        &[
            "create",
            "secret",
            "generic",
            "upstream-pull",
            "--type=kubernetes.io/dockerconfigjson",
            &format!("--from-file=.dockerconfigjson={}", secret_file.display()),
        ],
    );
    let lab = format!("{}/lab", lab_registry.host());
    let operator = start_operator(
        cluster,
        &namespace,
        "clone",
        &["--lab-registry", &lab, "--plain-http-sources", &upstream.host()],
    );
    operator.wait_ready(Duration::from_mins(1));
    let image = |name: &str, source: &str, arch: &str| {
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  source: {source}\n  platform:\n    architecture: {arch}\n  pullSecretRef:\n    name: upstream-pull\n"
        )
    };
    apply(
        cluster,
        &namespace,
        &image(
            "rpi-busybox",
            &upstream.reference("upstream/walt-busybox:arm64"),
            "arm64",
        ),
    );
    apply(
        cluster,
        &namespace,
        &image("busybox.v1", &upstream.reference("upstream/busybox:1"), "amd64"),
    );
    for name in ["rpi-busybox", "busybox.v1"] {
        wait_for(
            cluster,
            &namespace,
            &format!("image/{name}"),
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
            Duration::from_mins(2),
            &operator,
        );
    }
    let status = |name: &str, path: &str| {
        kubectl(
            cluster,
            &namespace,
            &["get", &format!("image/{name}"), "-o", &format!("jsonpath={path}")],
        )
        .trim()
        .to_owned()
    };
    // skopeo, reading the lab registry, agrees with the digest the status reports and the upstream's.
    let lab_reference = format!("{lab}/{namespace}/rpi-busybox:latest");
    assert_eq!(status("rpi-busybox", "{.status.reference}"), lab_reference);
    let inspected = walt_tests::images::skopeo_inspect_format(
        &lab_registry,
        &format!("lab/{namespace}/rpi-busybox:latest"),
        "{{.Digest}} {{.Architecture}}",
    )
    .expect("skopeo inspect the clone");
    let (lab_digest, lab_arch) = inspected.split_once(' ').expect("digest and architecture");
    assert_eq!(lab_arch, "arm64");
    let reported = status("rpi-busybox", "{.status.digest}");
    // The upstream push may be an index (skopeo --all); the clone is the arm64 manifest inside it.
    assert_eq!(reported, lab_digest);
    assert_eq!(
        status("rpi-busybox", "{.status.clone.sourceDigest}"),
        lab_digest,
        "the clone keeps the upstream manifest digest (upstream {upstream_digest})"
    );
    let copied = status(
        "rpi-busybox",
        "{.status.clone.copiedBytes} {.status.clone.totalBytes}",
    );
    let (copied, total) = copied.split_once(' ').expect("copied and total bytes");
    assert_eq!(copied, total);
    assert!(total.parse::<u64>().expect("a byte count") > 0);
    assert_eq!(
        status(
            "rpi-busybox",
            "{.status.platform.architecture} {.status.shellMode} {.status.nodeModels[*]}"
        ),
        "arm64 Init rpi-4-b"
    );
    assert_eq!(
        status(
            "busybox.v1",
            "{.status.reference} {.status.platform.architecture} {.status.shellMode}"
        ),
        format!("{lab}/{namespace}/busybox:v1 amd64 Basic")
    );
    let events = kubectl(cluster, &namespace, &["get", "events", "-o", "wide"]);
    assert!(
        events.contains("Cloning") && events.contains("Cloned"),
        "{events}"
    );

    // A source that is not there: Ready=False, the registry's answer, nothing tagged in the lab.
    apply(
        cluster,
        &namespace,
        &image("ghost", &upstream.reference("upstream/ghost:1"), "amd64"),
    );
    wait_for(
        cluster,
        &namespace,
        "image/ghost",
        "{.status.conditions[?(@.type==\"Ready\")].reason}",
        "SourceFailed",
        Duration::from_mins(1),
        &operator,
    );
    let message = status("ghost", "{.status.conditions[?(@.type==\"Ready\")].message}");
    assert!(message.contains("upstream/ghost"), "{message}");
    assert!(
        skopeo_inspect_raw(&lab_registry, &format!("lab/{namespace}/ghost:latest")).is_err(),
        "nothing may be tagged for a failed clone"
    );
}

/// OpenSSH's `ssh` to the operator's gateway on loopback, as `user` with `key`
/// (an independent client: what users run with `kubectl walt node proxy`).
fn gateway_ssh(operator: &Operator, user: &str, key: &std::path::Path, command: &str) -> Command {
    let mut ssh = Command::new("ssh");
    ssh.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args(["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"])
    .arg("-i")
    .arg(key)
    .args(["-p", &operator.gateway.port().to_string()])
    .arg(format!("{user}@127.0.0.1"))
    .arg(command);
    ssh
}

fn shell_session_yaml(name: &str, node: &str, public_key: &str, ttl: &str) -> String {
    format!(
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {{name: {name}}}\n\
         spec: {{node: {node}, publicKey: \"{}\", ttl: {ttl}}}\n",
        public_key.trim()
    )
}

/// A node shell through the operator's own gateway, with OpenSSH: the
/// session's key reaches its node while the session runs; at its ttl it is
/// Expired and the key is refused; deleting a session closes its open
/// connection and refuses new ones; a session on a missing Node fails saying so.
#[test]
fn node_shell_through_the_operator_gateway_until_ttl_or_deletion() {
    let cluster = cluster();
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let namespace = tenant_with_key(cluster, "op-nshell", &node.client_key());
    let operator = operator_for_node(
        cluster,
        &namespace,
        "nshell-test",
        &node,
        &["--gateway-service-port", "2022"],
    );
    let device = lend_device(
        cluster,
        &namespace,
        "rpi",
        &node.address().to_string(),
        Some(node.host_public_key().trim()),
    );
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, device: {device}}}\n"
        ),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");
    let within = Duration::from_mins(1);

    // A short ttl: Running, usable, then Expired and refused.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("short", "rpi1", &public_key, "25s"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/short",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let gateway = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "shellsession/short",
            "-o",
            "jsonpath={.status.gateway.service} {.status.gateway.port} {.status.gateway.user}",
        ],
    );
    assert_eq!(gateway, format!("walt-gateway.{namespace} 2022 short"));
    let out = gateway_ssh(
        &operator,
        "short",
        &user_key,
        "echo walt-$((6*7)); cat /etc/hostname >/dev/null; id -u",
    )
    .output()
    .expect("run ssh");
    assert!(
        out.status.success(),
        "ssh through the gateway: {}\noperator log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        operator.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "walt-42\n0\n");
    // Another key, or another session's name, is refused.
    let out = gateway_ssh(&operator, "nosuch", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(out.status.code(), Some(255), "unknown session refused");
    wait_for(
        cluster,
        &namespace,
        "shellsession/short",
        "{.status.phase}",
        "Expired",
        within,
        &operator,
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/short",
        "{.status.conditions[?(@.type==\"Complete\")].reason}",
        "TTLExpired",
        within,
        &operator,
    );
    let out = gateway_ssh(&operator, "short", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(
        out.status.code(),
        Some(255),
        "an expired session's key is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

    // Deleting a session closes its open connection and refuses new ones.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("long", "rpi1", &public_key, "1h"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/long",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let mut open = gateway_ssh(&operator, "long", &user_key, "echo connected; sleep 120")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ssh");
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(open.stdout.as_mut().expect("stdout")),
        &mut first_line,
    )
    .expect("read");
    assert_eq!(first_line, "connected\n");
    let started = Instant::now();
    kubectl(
        cluster,
        &namespace,
        &["delete", "shellsession/long", "--wait=true", "--timeout=60s"],
    );
    let closed = Wait::new(
        "the open connection to close after the session's deletion",
        Duration::from_secs(20),
    )
    .every(Duration::from_millis(100))
    .until(|| open.try_wait().expect("wait ssh"));
    if let Err(e) = closed {
        let _ = open.kill();
        panic!("{e}");
    }
    eprintln!(
        "open connection closed {:?} after the delete started",
        started.elapsed()
    );
    let out = gateway_ssh(&operator, "long", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(out.status.code(), Some(255), "a deleted session's key is refused");

    // A session with no traffic for its idleTimeout is Expired, and its key refused.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("idle", "rpi1", &public_key, "1h")
            .replace("ttl: 1h", "ttl: 1h, idleTimeout: 20s"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/idle",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let out = gateway_ssh(&operator, "idle", &user_key, "echo active")
        .output()
        .expect("run ssh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(
        cluster,
        &namespace,
        "shellsession/idle",
        "{.status.conditions[?(@.type==\"Complete\")].reason}",
        "IdleTimeout",
        within,
        &operator,
    );
    let activity = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "shellsession/idle",
            "-o",
            "jsonpath={.status.lastActivity}",
        ],
    );
    assert!(
        !activity.is_empty(),
        "the gateway recorded the session's activity"
    );
    let out = gateway_ssh(&operator, "idle", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(
        out.status.code(),
        Some(255),
        "an idle-expired session's key is refused"
    );

    // A session on a Node that does not exist fails, saying so.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("lost", "nosuchnode", &public_key, "1h"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/lost",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    let message = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "shellsession/lost",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Complete\")].message}",
        ],
    );
    assert!(message.contains("nosuchnode not found"), "{message}");
    let audit = operator.log();
    assert!(
        audit.contains("gateway session ended"),
        "audit line missing:\n{audit}"
    );
}

/// The lab takes a Device back while a tenant's node shell on it is open: within the recheck
/// interval the gateway closes the open connection (it checks on its own, whatever the
/// ShellSession says), refuses new ones, and the session ends `Failed` saying the device is no
/// longer lent; nothing a tenant writes is needed for it.
#[test]
fn a_device_taken_back_closes_its_open_shell_and_ends_the_session() {
    let cluster = cluster();
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let namespace = tenant_with_key(cluster, "op-revoke", &node.client_key());
    let operator = operator_for_node(cluster, &namespace, "revoke-test", &node, &[]);
    let device = lend_device(
        cluster,
        &namespace,
        "rpi",
        &node.address().to_string(),
        Some(node.host_public_key().trim()),
    );
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, device: {device}}}\n"
        ),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("work", "rpi1", &public_key, "1h"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/work",
        "{.status.phase}",
        "Running",
        Duration::from_mins(1),
        &operator,
    );
    let mut open = gateway_ssh(&operator, "work", &user_key, "echo connected; sleep 300")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ssh");
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(open.stdout.as_mut().expect("stdout")),
        &mut first_line,
    )
    .expect("read");
    assert_eq!(first_line, "connected\n");

    // The lab lends the device to another namespace.
    let started = Instant::now();
    cluster
        .kubectl_output(&[
            "patch",
            &format!("device/{device}"),
            "--type=merge",
            "-p",
            "{\"spec\":{\"lentTo\":{\"namespace\":\"somebody-else\"}}}",
        ])
        .expect("take the device back");
    let closed = Wait::new(
        "the open connection to close after the device was taken back",
        Duration::from_mins(1),
    )
    .every(Duration::from_millis(200))
    .until(|| open.try_wait().expect("wait ssh"));
    if let Err(e) = closed {
        let _ = open.kill();
        panic!("{e}\noperator log:\n{}", operator.log());
    }
    eprintln!(
        "open connection closed {:?} after the device was taken back",
        started.elapsed()
    );
    let out = gateway_ssh(&operator, "work", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(
        out.status.code(),
        Some(255),
        "the key is refused once the device is taken back"
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/work",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(1),
        &operator,
    );
    let message = jsonpath(
        cluster,
        &namespace,
        "shellsession/work",
        "{.status.conditions[*].message}",
    );
    assert!(
        message.contains(&format!("not lent to the namespace {namespace}")),
        "{message}"
    );
}

/// `walt.dev/squash-requested-at` on an Image: the operator rewrites it as one layer under the same
/// tag; umoci sees exactly the files of the layered original (deletions and a recreated directory
/// included), the status says one layer, and an Event says what happened, once per request.
#[test]
fn image_squash_request_rewrites_the_image_as_one_layer_with_the_same_files() {
    use walt_tests::images::{Arch, OciLayout, skopeo_umoci_unpack};
    use walt_tests::registry::Registry;
    use walt_tests::tree::{SnapshotOptions, assert_same_tree};
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-squash");
    let layered = format!("lab/{namespace}/layered:latest");
    let registry = Registry::start().expect("start a docker-registry on loopback");
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    layout
        .add_layer("base", "v2", |root| {
            std::fs::write(root.join("etc/walt-note"), "first\n")?;
            std::fs::create_dir_all(root.join("opt/data"))?;
            std::fs::write(root.join("opt/data/old"), "old\n")?;
            std::fs::write(root.join("bin/extra"), "extra\n")
        })
        .expect("second layer");
    layout
        .add_layer("v2", "v3", |root| {
            std::fs::write(root.join("etc/walt-note"), "second\n")?;
            std::fs::remove_dir_all(root.join("opt/data"))?;
            std::fs::create_dir_all(root.join("opt/data"))?;
            std::fs::write(root.join("opt/data/new"), "new\n")?;
            std::fs::remove_file(root.join("bin/extra"))
        })
        .expect("third layer");
    layout
        .push("v3", &registry, &layered)
        .expect("push the layered image");
    let expected_dir = tempfile::tempdir().expect("tempdir");
    let expected = layout
        .umoci_unpack("v3", expected_dir.path())
        .expect("umoci unpack the original");
    let lab = format!("{}/lab", registry.host());
    let operator = start_operator(cluster, &namespace, "squash", &["--lab-registry", &lab]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: layered\nspec:\n  reference: {}\n",
            registry.reference(&layered)
        ),
    );
    wait_for(
        cluster,
        &namespace,
        "image/layered",
        "{.status.layers}",
        "3",
        Duration::from_mins(1),
        &operator,
    );
    let before = jsonpath(cluster, &namespace, "image/layered", "{.status.digest}");
    kubectl(
        cluster,
        &namespace,
        &[
            "annotate",
            "image/layered",
            "walt.dev/squash-requested-at=2026-11-22T10:00:00Z",
        ],
    );
    wait_for(
        cluster,
        &namespace,
        "image/layered",
        "{.metadata.annotations.walt\\.dev/squash-handled-at}",
        "2026-11-22T10:00:00Z",
        Duration::from_mins(2),
        &operator,
    );
    wait_for(
        cluster,
        &namespace,
        "image/layered",
        "{.status.layers}",
        "1",
        Duration::from_mins(1),
        &operator,
    );
    let after = jsonpath(cluster, &namespace, "image/layered", "{.status.digest}");
    assert_ne!(before, after, "the tag must point to the squashed image");
    assert_eq!(
        skopeo_digest(&registry.reference(&layered)).expect("skopeo inspect"),
        after
    );
    let actual_dir = tempfile::tempdir().expect("tempdir");
    let actual = skopeo_umoci_unpack(&registry, &layered, actual_dir.path())
        .expect("skopeo + umoci unpack the squashed image");
    assert_same_tree(&expected, &actual, &SnapshotOptions::default());
    let events = kubectl(cluster, &namespace, &["get", "events", "-o", "wide"]);
    assert!(
        events.contains("Squashed") && events.contains("3 layers squashed into one"),
        "{events}"
    );
}

/// Saves wait their turn: with `--max-concurrent-saves 1` a second save
/// waits for the slot (`WaitingForSlot`), and a save writing the image another
/// save writes waits for it (`ImageBusy`, WalT's one-at-a-time rule); all
/// three end Succeeded, and the overwrite lands last.
#[test]
fn saves_wait_for_a_slot_and_for_their_image() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start_with("op-savewait", node, &["--max-concurrent-saves", "1"]);
    lab.node
        .run("mkdir -p /srv && head -c 33554432 /dev/urandom > /srv/blob")
        .expect("write a file on the node");
    lab.save("first", "x", "");
    lab.wait(
        "nodesave/first",
        "{.status.phase}",
        "Running",
        Duration::from_mins(1),
    );
    // Created while "first" runs, in the same second maybe, with a smaller name: it still waits.
    lab.save("again", "x", ", overwrite: true");
    lab.save("other", "y", "");
    let within = Duration::from_mins(3);
    for save in ["first", "other", "again"] {
        lab.wait(
            &format!("nodesave/{save}"),
            "{.status.phase}",
            "Succeeded",
            within,
        );
    }
    let waits: String = ["first", "other", "again"]
        .iter()
        .map(|save| event_reasons(cluster(), &lab.namespace, save))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(waits.contains("WaitingForSlot"), "events: {waits}");
    wait_event(
        cluster(),
        &lab.namespace,
        "again",
        "ImageBusy",
        "NodeSave/first holds it",
        &lab.operator,
    );
    let finished = |save: &str| lab.get(&format!("nodesave/{save}"), "{.status.completionTime}");
    assert!(
        finished("first") <= finished("again"),
        "the overwrite ran after the first save of x"
    );
    let digest = lab.get("nodesave/again", "{.status.result.digest}");
    lab.wait("image/x", "{.status.digest}", &digest, Duration::from_mins(1));
}

/// A save of a **virtual** node reaches its pod by the pod IP (no Service DNS,
/// no kube-proxy). This tier has no kubelet, so the test plays it: it runs
/// the pod's command (`walt-operator vnode`, the real runtime) on a loopback
/// address and reports that address as the pod's IP in the pod status.
#[test]
fn virtual_node_save_reaches_the_pod_by_its_ip() {
    use walt_tests::images::{Arch, OciLayout, skopeo_umoci_unpack};
    let cluster = cluster();
    let (namespace, keys) = tenant(cluster, "op-vsave");
    let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
    let base_digest = OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
        .expect("push the base image");
    let lab = format!("{}/lab", registry.host());
    let operator = start_operator(cluster, &namespace, "vsave", &["--lab-registry", &lab]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n---\n\
         apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: vn1}\n\
         spec: {model: pc-x86-64, image: debian, virtual: {architecture: amd64}}\n",
    );
    let within = Duration::from_mins(1);
    let runtime = walt_crds::runtime_namespace(&namespace);
    let pinned = format!("{}/lab/{namespace}/debian@{base_digest}", registry.host());
    wait_for(
        cluster,
        &runtime,
        "pod/walt-node-vn1",
        "{.metadata.annotations.walt\\.dev/boots}",
        &pinned,
        within,
        &operator,
    );

    // The "kubelet": run the pod's runtime on 127.X.Y.22, port 22 like in the pod.
    let pid = std::process::id();
    let ip = format!("127.{}.{}.22", 100 + pid % 100, (pid / 100) % 250);
    let work = keys.path();
    let public = std::fs::read_to_string(work.join("node_key.pub")).expect("node public key");
    std::fs::write(work.join("authorized_keys"), public).expect("authorized_keys");
    let mut vnode = Command::new(operator_binary());
    vnode
        .args(["vnode", "--image", &pinned, "--name", "vn1", "--authorized-keys"])
        .arg(work.join("authorized_keys"))
        .args([
            "--listen",
            &format!("{ip}:22"),
            "--insecure-registry",
            &registry.host(),
        ])
        .arg("--cache-dir")
        .arg(work.join("cache"));
    let vnode_log = work.join("vnode.log");
    let _vnode =
        Daemon::spawn("walt-operator vnode", vnode, &vnode_log, Lifetime::Test).expect("start the vnode");
    Wait::new("the vnode to start", Duration::from_mins(2))
        .until(|| {
            std::fs::read_to_string(&vnode_log)
                .unwrap_or_default()
                .contains("vnode ready")
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}:\n{}",
                std::fs::read_to_string(&vnode_log).unwrap_or_default()
            )
        });
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "containerStatuses": [{"name": "node", "ready": true, "restartCount": 0, "image": "walt", "imageID": "walt",
                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}})
    .to_string();
    kubectl(
        cluster,
        &runtime,
        &[
            "patch",
            "pod/walt-node-vn1",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ],
    );
    wait_node_booted(cluster, &namespace, "vn1", &base_digest, &operator);

    // A change made on the node over OpenSSH (the lab's node key), then saved.
    let changed = Command::new("ssh")
        .args(["-i", &work.join("node_key").display().to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
        ])
        .arg(format!("root@{ip}"))
        .arg("mkdir -p /srv && echo virtual > /srv/vfile")
        .output()
        .expect("ssh (apt-get install openssh-client)");
    assert!(
        changed.status.success(),
        "ssh to the vnode: {}\n{}",
        String::from_utf8_lossy(&changed.stderr),
        std::fs::read_to_string(&vnode_log).unwrap_or_default()
    );
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: vsave}\nspec: {node: vn1, image: \"debian:v\"}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "nodesave/vsave",
        "{.status.phase}",
        "Succeeded",
        Duration::from_mins(2),
        &operator,
    );
    let unpacked = tempfile::tempdir().expect("temp dir");
    let rootfs = skopeo_umoci_unpack(&registry, &format!("lab/{namespace}/debian:v"), unpacked.path())
        .expect("unpack");
    assert_eq!(
        std::fs::read(rootfs.join("srv/vfile")).expect("saved file"),
        b"virtual\n"
    );
}

/// Counts the TCP connections made to a listener on `ip` (a port chosen by the system).
struct ConnectionRecorder {
    address: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnectionRecorder {
    fn start(ip: &str) -> Self {
        Self::start_at(ip, 0)
    }

    /// On `ip:port` (0: a port chosen by the system).
    fn start_at(ip: &str, port: u16) -> Self {
        let listener = std::net::TcpListener::bind((ip, port)).expect("bind the recording listener");
        let address = listener.local_addr().expect("listener address");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { address, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The chart's admission policies (charts/walt/files/admission.yaml, what templates/admission.yaml
/// ships), applied as they are (idempotent).
fn install_admission_policies(cluster: &Cluster) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/walt/files/admission.yaml");
    cluster
        .kubectl_output(&["apply", "-f", &path.display().to_string()])
        .expect("apply the chart's admission policies");
}

/// Devices are the lab's: a Device lent to bob and then taken back from alice is never reached for
/// alice's Node (no TCP connection at all: probe, shell, save), her Node and objects say why; with the
/// chart's admission policy, the API server refuses alice's Node naming bob's device, and a Node with
/// an address of its own is refused by the schema.
#[test]
fn alice_cannot_reach_a_device_lent_to_bob() {
    let cluster = cluster();
    let (alice_ns, _alice_key) = tenant(cluster, "alice-dev");
    let bob_ns = cluster.create_namespace("bob-dev").expect("create namespace");
    let recorder = ConnectionRecorder::start("127.0.0.23");
    let device = format!("{bob_ns}-pi");
    let device_yaml = |lent_to: &str| {
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {device}}}\n\
             spec: {{model: rpi-4-b, address: \"{}\", sshPort: {}, lentTo: {{namespace: {lent_to}}}}}\n",
            recorder.address.ip(),
            recorder.address.port()
        )
    };
    // The device was lent to alice, who made a Node on it; the lab took it back and lent it to bob
    // before any operator ran: alice's Node names a device that is not hers (admission saw a valid
    // Node; the operator must refuse on its own).
    apply(cluster, &alice_ns, &device_yaml(&alice_ns));
    apply(
        cluster,
        &alice_ns,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: stolen}}\nspec: {{model: rpi-4-b, device: {device}}}\n"
        ),
    );
    apply(cluster, &alice_ns, &device_yaml(&bob_ns));
    let operator = start_operator(cluster, &alice_ns, "device-test", &["--probe-interval", "2s"]);
    operator.wait_ready(Duration::from_mins(1));
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &alice_ns,
        "node.walt.dev/stolen",
        "{.status.conditions[?(@.type==\"Reachable\")].reason}",
        "DeviceNotLent",
        within,
        &operator,
    );
    wait_event(
        cluster,
        &alice_ns,
        "stolen",
        "DeviceNotLent",
        "ask a lab admin to lend it",
        &operator,
    );
    let message = jsonpath(
        cluster,
        &alice_ns,
        "node.walt.dev/stolen",
        "{.status.conditions[?(@.type==\"Reachable\")].message}",
    );
    assert!(
        message.contains(&format!("not lent to the namespace {alice_ns}")),
        "{message}"
    );
    // A shell and a save on it are refused too, saying why.
    let dir = tempfile::tempdir().expect("temp dir");
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");
    apply(
        cluster,
        &alice_ns,
        &shell_session_yaml("peek", "stolen", &public_key, "10m"),
    );
    apply(
        cluster,
        &alice_ns,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: copy}\nspec: {node: stolen, image: loot}\n",
    );
    wait_for(
        cluster,
        &alice_ns,
        "shellsession/peek",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    let shell_message = jsonpath(
        cluster,
        &alice_ns,
        "shellsession/peek",
        "{.status.conditions[*].message}",
    );
    assert!(shell_message.contains("not lent"), "{shell_message}");
    wait_for(
        cluster,
        &alice_ns,
        "nodesave/copy",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    let save_message = jsonpath(
        cluster,
        &alice_ns,
        "nodesave/copy",
        "{.status.conditions[*].message}",
    );
    assert!(save_message.contains("not lent"), "{save_message}");
    // Several probe intervals later: not one connection reached the device.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        recorder.connections(),
        0,
        "the operator connected to bob's device"
    );
    let bound = cluster
        .kubectl_output(&[
            "get",
            &format!("device/{device}"),
            "-o",
            "jsonpath={.status.boundTo}",
        ])
        .expect("read the Device");
    assert!(
        bound.trim().is_empty(),
        "bob's device was bound for alice: {bound}"
    );

    // Admission: alice (editing walt objects in her namespace) cannot name bob's device.
    install_admission_policies(cluster);
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: walt-test-edit}\n\
                rules:\n- apiGroups: [walt.dev]\n  resources: [images, nodes, shellsessions, nodesaves]\n  \
                verbs: [get, list, watch, create, update, patch, delete]\n";
    let role_path = dir.path().join("role.yaml");
    std::fs::write(&role_path, role).expect("write role");
    cluster
        .kubectl_output(&["apply", "-f", &role_path.display().to_string()])
        .expect("apply the role");
    kubectl(
        cluster,
        &alice_ns,
        &[
            "create",
            "rolebinding",
            "alice-walt",
            "--clusterrole=walt-test-edit",
            "--user=alice",
        ],
    );
    let alice = || {
        cluster
            .kubectl_as("alice", &["walt-users"])
            .expect("alice's kubeconfig")
    };
    let manifest = dir.path().join("node.yaml");
    std::fs::write(
        &manifest,
        format!("apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: grab}}\nspec: {{model: rpi-4-b, device: {device}}}\n"),
    )
    .expect("write manifest");
    let manifest = manifest.display().to_string();
    // The policy takes effect within seconds of its creation.
    let refused = Wait::new(
        "the admission policy to refuse alice's Node",
        Duration::from_secs(30),
    )
    .every(Duration::from_millis(500))
    .until(|| {
        match walt_tests::k8s::run_kubectl(
            alice(),
            &["-n", &alice_ns, "create", "--dry-run=server", "-f", &manifest],
        ) {
            Ok(_) => Poll::Pending("admitted".to_owned()),
            Err(error) => Poll::Ready(error.to_string()),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        refused.contains(&format!(
            "the Device {device} is not lent to the namespace {alice_ns}"
        )) && refused.contains("kubectl walt device ls"),
        "unexpected refusal: {refused}"
    );
    // Alice cannot write Devices at all (lend one to herself, or point one elsewhere).
    let take = walt_tests::k8s::run_kubectl(
        alice(),
        &[
            "patch",
            &format!("device/{device}"),
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"lentTo\":{{\"namespace\":\"{alice_ns}\"}}}}}}"),
        ],
    )
    .expect_err("alice must not write a Device")
    .to_string();
    assert!(take.contains("Forbidden"), "{take}");
    // A Node with an address of its own: there is no such field, and no Node without a device.
    std::fs::write(
        dir.path().join("address.yaml"),
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: direct}\nspec: {model: rpi-4-b, address: 127.0.0.23}\n",
    )
    .expect("write manifest");
    let refused = walt_tests::k8s::run_kubectl(
        alice(),
        &[
            "-n",
            &alice_ns,
            "create",
            "-f",
            &dir.path().join("address.yaml").display().to_string(),
        ],
    )
    .expect_err("a Node with spec.address must be refused")
    .to_string();
    assert!(
        refused.contains("spec.address") || refused.contains("a Node needs spec.device"),
        "{refused}"
    );
    assert_eq!(
        recorder.connections(),
        0,
        "the operator connected to bob's device"
    );
}

/// Issue 15, a virtual node is reachable only by its own Node. Alice has no field to point a
/// virtual Node at an address (the API server refuses `spec.address`), and a pod she made with the
/// name of her virtual node's pod, whose IP is bob's virtual node, is never used, reached or
/// replaced: her Node says why (`PodNotOurs`, a Warning Event), a node shell on it ends `Failed`
/// saying why, a node save never starts, a shell naming bob's Node fails (`NodeNotFound`: names are
/// of her namespace), and not one TCP connection reaches bob's node.
#[test]
fn alices_virtual_node_reaches_only_a_pod_it_owns_never_bobs() {
    let started = Instant::now();
    let cluster = cluster();
    let (alice, dir) = tenant(cluster, "alice-vn");
    // Bob's virtual node: the SSH port of its pod's IP, recording every connection.
    let pid = std::process::id();
    let bobs_ip = format!("127.{}.{}.23", 100 + pid % 100, (pid / 100) % 250);
    let bobs_node = ConnectionRecorder::start_at(&bobs_ip, 22);
    let operator = start_operator(cluster, &alice, "vn-squat", &[]);
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &alice,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n",
    );
    set_image_digest(
        cluster,
        &alice,
        "debian",
        &format!("127.0.0.1:1/lab/{alice}/debian:latest"),
        DIGEST_A,
    );
    // A pod with her virtual node's pod name in her runtime namespace, running at bob's node's IP
    // (the test plays the kubelet), that is not her Node's: no owner labels with its uid. Alice
    // cannot make it (she may create nothing in walt-run-alice: the control plane test
    // `alice_runs_no_privileged_pod_and_attaches_only_to_her_own_sessions`); here a cluster admin
    // does, to show the operator still never reaches it.
    let runtime = walt_crds::runtime_namespace(&alice);
    cluster
        .kubectl_output(&["create", "namespace", &runtime])
        .expect("create the runtime namespace");
    cluster
        .kubectl_output(&[
            "label",
            "namespace",
            &runtime,
            "app.kubernetes.io/managed-by=walt-operator",
            &format!("walt.dev/tenant={alice}"),
        ])
        .expect("label the runtime namespace");
    apply(
        cluster,
        &runtime,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: walt-node-steal}\n\
         spec: {containers: [{name: node, image: busybox}]}\n",
    );
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": bobs_ip, "podIPs": [{"ip": bobs_ip}],
        "containerStatuses": [{"name": "node", "ready": true, "restartCount": 0, "image": "busybox", "imageID": "busybox",
                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}})
    .to_string();
    kubectl(
        cluster,
        &runtime,
        &[
            "patch",
            "pod/walt-node-steal",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ],
    );
    apply(
        cluster,
        &alice,
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: steal}\n\
         spec: {model: pc-x86-64, image: debian, virtual: {architecture: amd64}}\n",
    );
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &alice,
        "node.walt.dev/steal",
        "{.status.phase} {.status.conditions[?(@.type==\"Booted\")].reason}",
        "Pending PodNotOurs",
        within,
        &operator,
    );
    wait_event(
        cluster,
        &alice,
        "steal",
        "PodNotOurs",
        "a pod named walt-node-steal exists",
        &operator,
    );
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            "pod/walt-node-steal",
            "{.metadata.labels.walt\\.dev/owner-uid}"
        ),
        "",
        "the operator took the pod over"
    );
    // A node shell and a node save on it.
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");
    apply(
        cluster,
        &alice,
        &shell_session_yaml("peek", "steal", &public_key, "10m"),
    );
    apply(
        cluster,
        &alice,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: copy}\nspec: {node: steal, image: loot}\n",
    );
    wait_for(
        cluster,
        &alice,
        "shellsession/peek",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    let says = jsonpath(
        cluster,
        &alice,
        "shellsession/peek",
        "{.status.conditions[*].message}",
    );
    assert!(
        says.contains("the pod walt-node-steal is not virtual node steal's"),
        "{says}"
    );
    wait_event(
        cluster,
        &alice,
        "peek",
        "PodNotOurs",
        "does not reach it",
        &operator,
    );
    // A shell naming bob's virtual node reaches a Node of her own namespace or nothing.
    let bob = cluster.create_namespace("bob-vn").expect("create namespace");
    apply(
        cluster,
        &bob,
        "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: bobs-vn}\n\
         spec: {model: pc-x86-64, image: debian, virtual: {architecture: amd64}}\n",
    );
    apply(
        cluster,
        &alice,
        &shell_session_yaml("cross", "bobs-vn", &public_key, "10m"),
    );
    wait_for(
        cluster,
        &alice,
        "shellsession/cross",
        "{.status.phase} {.status.conditions[?(@.type==\"Ready\")].reason}",
        "Failed NodeNotFound",
        within,
        &operator,
    );
    // The save waits for a Ready node, which this one never is.
    std::thread::sleep(Duration::from_secs(3));
    let save = jsonpath(cluster, &alice, "nodesave/copy", "{.status.phase}");
    assert!(
        save == "Pending" || save == "Failed" || save.is_empty(),
        "the save on a pod that is not the node's: {save}"
    );
    // No address of her own: the field does not exist.
    std::fs::write(
        dir.path().join("address.yaml"),
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: direct}}\n\
             spec: {{model: pc-x86-64, address: {bobs_ip}, virtual: {{architecture: amd64}}}}\n"
        ),
    )
    .expect("write manifest");
    let refused = cluster
        .kubectl_output(&[
            "-n",
            &alice,
            "create",
            "-f",
            &dir.path().join("address.yaml").display().to_string(),
        ])
        .expect_err("a Node with spec.address must be refused")
        .to_string();
    assert!(refused.contains("spec.address"), "{refused}");
    assert_eq!(
        bobs_node.connections(),
        0,
        "the operator connected to bob's virtual node"
    );
    eprintln!(
        "alices_virtual_node_reaches_only_a_pod_it_owns_never_bobs: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The `{.status.boundTo}` of Device `device` as `namespace/node`, empty when unbound.
fn bound_to(cluster: &Cluster, device: &str) -> String {
    cluster
        .kubectl_output(&[
            "get",
            &format!("device/{device}"),
            "-o",
            "jsonpath={.status.boundTo.namespace}{\"/\"}{.status.boundTo.node}",
        ])
        .expect("read the Device")
        .trim()
        .trim_matches('/')
        .to_owned()
}

/// Waits until Device `device` is bound to `want` (`namespace/node`; empty: to nothing).
fn wait_bound(cluster: &Cluster, device: &str, want: &str, operator: &Operator) {
    Wait::new(
        &format!("Device {device} bound to {want:?}"),
        Duration::from_mins(1),
    )
    .every(Duration::from_millis(250))
    .until(|| {
        let bound = bound_to(cluster, device);
        if bound == want {
            Poll::Ready(())
        } else {
            Poll::Pending(format!("bound to {bound:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
}

/// The PersistentVolume rule for Devices: the lab admin's loan stays, a Node's claim lasts as long
/// as the Node. A Device bound to a Node is released (`status.boundTo` cleared, Event `Released`)
/// when the Node is released (`kubectl walt node release` deletes it), when it was deleted while no
/// operator ran, and when its namespace is deleted; it is released (Event `TakenBack`) when the lab
/// takes it back, and the former holder says `DeviceNotLent`. Each time another Node of the
/// namespace it is lent to can then take it.
#[test]
fn a_device_is_released_when_its_node_goes_or_the_lab_takes_it_back() {
    let started = Instant::now();
    let cluster = cluster();
    let (operator_ns, _key) = tenant(cluster, "dev-rel-op");
    let alice = cluster.create_namespace("alice-rel").expect("create namespace");
    let device = format!("{alice}-pi");
    let lend = |namespace: &str| {
        apply(
            cluster,
            &operator_ns,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {device}}}\n\
                 spec: {{model: rpi-4-b, address: 127.0.0.1, sshPort: 1, lentTo: {{namespace: {namespace}}}}}\n"
            ),
        );
    };
    let node = |name: &str| {
        apply(
            cluster,
            &alice,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{model: rpi-4-b, device: {device}}}\n"
            ),
        );
    };
    // The operator's own namespace is not the tenant's, so deleting the tenant's leaves it running.
    let mut args = operator_args(&operator_ns, "release", &["--probe-interval", "2s"]);
    let watch = args
        .iter()
        .position(|arg| arg == "--watch-namespace")
        .expect("--watch-namespace")
        + 1;
    args[watch].clone_from(&alice);
    let start = || {
        let log = std::env::temp_dir().join(format!("walt-operator-{alice}-release.log"));
        let operator = Operator::start_binary(&operator_binary(), &cluster.kubeconfig(), None, &args, &log)
            .expect("start walt-operator");
        operator.wait_ready(Duration::from_mins(1));
        operator
    };
    let mut operator = start();
    let device_events = |reason: &str| {
        cluster
            .event_messages(&device, reason)
            .expect("list the Device's Events")
    };

    // Bound, then released by `node release` (the Node deleted): the loan stays.
    lend(&alice);
    node("n1");
    wait_bound(cluster, &device, &format!("{alice}/n1"), &operator);
    kubectl(cluster, &alice, &["delete", "node.walt.dev/n1"]);
    wait_bound(cluster, &device, "", &operator);
    assert_eq!(
        jsonpath(
            cluster,
            &alice,
            &format!("device/{device}"),
            "{.spec.lentTo.namespace}"
        ),
        alice,
        "the loan is the admin's and stays"
    );
    let released = device_events("Released");
    assert!(
        released.contains(&format!(
            "the Node {alice}/n1 bound to the Device {device} is gone"
        )) && released.contains(&format!("still lent to the namespace {alice}")),
        "{released:?}"
    );

    // Free for the next Node of the namespace; a Node deleted while no operator runs is released
    // when one starts.
    node("n2");
    wait_bound(cluster, &device, &format!("{alice}/n2"), &operator);
    operator.stop(Duration::from_secs(10));
    kubectl(cluster, &alice, &["delete", "node.walt.dev/n2"]);
    assert_eq!(bound_to(cluster, &device), format!("{alice}/n2"));
    operator = start();
    wait_bound(cluster, &device, "", &operator);

    // Taken back by the lab: released, and the former holder says why it is no longer reached.
    node("n3");
    wait_bound(cluster, &device, &format!("{alice}/n3"), &operator);
    lend("walt-nobody");
    wait_bound(cluster, &device, "", &operator);
    let taken = device_events("TakenBack");
    assert!(
        taken.contains(&format!(
            "taken back from the namespace {alice}: the Node {alice}/n3 no longer holds it"
        )),
        "{taken:?}"
    );
    wait_for(
        cluster,
        &alice,
        "node.walt.dev/n3",
        "{.status.conditions[?(@.type==\"Reachable\")].reason}",
        "DeviceNotLent",
        Duration::from_mins(1),
        &operator,
    );
    assert_eq!(
        jsonpath(cluster, &alice, "node.walt.dev/n3", "{.status.device}"),
        "",
        "the former holder still names the device"
    );

    // Lent again; its namespace deleted with the Node in it: released.
    lend(&alice);
    wait_bound(cluster, &device, &format!("{alice}/n3"), &operator);
    kubectl(
        cluster,
        &operator_ns,
        &["delete", "namespace", &alice, "--wait=false"],
    );
    wait_bound(cluster, &device, "", &operator);
    kubectl(cluster, &operator_ns, &["delete", &format!("device/{device}")]);
    eprintln!(
        "a_device_is_released_when_its_node_goes_or_the_lab_takes_it_back: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The objects of a `helm template` of the chart of these `kinds`, as one YAML stream.
fn chart_objects(args: &[&str], kinds: &[&str], keep: impl Fn(&serde_json::Value) -> bool) -> String {
    let docs = walt_tests::deploy::render_chart(args).expect("helm template");
    docs.iter()
        .filter(|doc| kinds.iter().any(|kind| doc["kind"].as_str() == Some(kind)) && keep(doc))
        .map(|doc| serde_saphyr::to_string(doc).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Applies the chart's user roles (walt-view, walt-edit, walt-admin) as the chart renders them.
fn install_user_roles(cluster: &Cluster) {
    let roles = chart_objects(&[], &["ClusterRole"], |doc| {
        doc["metadata"]["name"]
            .as_str()
            .is_some_and(|name| ["walt-view", "walt-edit", "walt-admin"].contains(&name))
    });
    let path = std::env::temp_dir().join(format!("walt-user-roles-{}.yaml", std::process::id()));
    std::fs::write(&path, roles).expect("write roles");
    cluster
        .kubectl_output(&["apply", "--server-side", "-f", &path.display().to_string()])
        .expect("apply the chart's user roles");
}

/// Runs kubectl as alice (a tenant of the default users) in `namespace`.
fn as_alice(cluster: &Cluster, namespace: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", namespace];
    all.extend_from_slice(args);
    walt_tests::k8s::run_kubectl(
        cluster
            .kubectl_as("alice", &["walt-users", "team-alice"])
            .expect("alice's kubeconfig"),
        &all,
    )
    .map_err(|error| error.to_string())
}

/// Issue 15, state only the operator writes. Alice holds the chart's strongest tenant role
/// (walt-admin) in her namespace: the API server refuses her every status write (403), so she can
/// neither forge a `Running` session the gateway would admit nor move its activity record; the
/// annotation the gateway once wrote, which she can write, no longer extends the idle time; a ttl or
/// idleTimeout over the lab's ceiling is clamped by the operator and its condition says so.
#[test]
fn a_tenant_cannot_write_status_forge_running_or_extend_idle_time() {
    let cluster = cluster();
    install_user_roles(cluster);
    let (namespace, _dir) = tenant(cluster, "op-tenancy");
    // walt-admin and walt-view, as aggregated into Kubernetes' admin role.
    for role in ["walt-admin", "walt-view"] {
        kubectl(
            cluster,
            &namespace,
            &[
                "create",
                "rolebinding",
                &format!("alice-{role}"),
                &format!("--clusterrole={role}"),
                "--user=alice",
            ],
        );
    }
    let operator = start_operator(
        cluster,
        &namespace,
        "tenancy-test",
        &["--max-session-ttl", "2h", "--max-session-idle-timeout", "30m"],
    );
    operator.wait_ready(Duration::from_mins(1));
    let within = Duration::from_mins(1);
    // A device on loopback (nothing listens there: the probe is refused, no traffic leaves).
    let device = lend_device(cluster, &namespace, "pi", "127.0.0.9", None);
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, device: {device}}}\n"
        ),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");

    // A session on a missing node, created with a forged status: the API server drops it, the
    // operator fails the session, alice cannot patch it Running, the gateway refuses its key.
    let forged = shell_session_yaml("forged", "nosuchnode", &public_key, "1h") + "status: {phase: Running}\n";
    let path = dir.path().join("forged.yaml");
    std::fs::write(&path, forged).expect("write manifest");
    as_alice(
        cluster,
        &namespace,
        &["create", "-f", &path.display().to_string()],
    )
    .expect("alice creates a session");
    wait_for(
        cluster,
        &namespace,
        "shellsession/forged",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    for patch in [
        r#"{"status":{"phase":"Running"}}"#,
        r#"{"status":{"lastActivity":"2100-01-01T00:00:00Z"}}"#,
    ] {
        let refused = as_alice(
            cluster,
            &namespace,
            &[
                "patch",
                "shellsession/forged",
                "--subresource=status",
                "--type=merge",
                "-p",
                patch,
            ],
        )
        .expect_err("a tenant must not write status");
        assert!(
            refused.contains("Forbidden")
                && refused
                    .contains(r#"cannot patch resource "shellsessions/status" in API group "walt.dev""#),
            "unexpected refusal: {refused}"
        );
    }
    let out = gateway_ssh(&operator, "forged", &user_key, "true")
        .output()
        .expect("run ssh");
    assert_eq!(out.status.code(), Some(255), "a forged session's key is refused");
    assert_eq!(
        jsonpath(cluster, &namespace, "shellsession/forged", "{.status.phase}"),
        "Failed"
    );

    // Over the lab's ceilings: Running for the ceiling, and the condition says so.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("greedy", "rpi1", &public_key, "100h")
            .replace("ttl: 100h", "ttl: 100h, idleTimeout: 5h"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/greedy",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let ready = jsonpath(
        cluster,
        &namespace,
        "shellsession/greedy",
        "{.status.conditions[?(@.type==\"Ready\")].message}",
    );
    assert!(
        ready.contains("spec.ttl 100h0m0s is over the lab's ceiling 2h0m0s (--max-session-ttl)")
            && ready.contains("spec.idleTimeout 5h0m0s is over the lab's ceiling 30m0s"),
        "{ready}"
    );

    // Idle for 20 s while alice keeps writing the old activity annotation: still IdleTimeout.
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("idle", "rpi1", &public_key, "1h")
            .replace("ttl: 1h", "ttl: 1h, idleTimeout: 20s"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/idle",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let running_at = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Bounded, so a failed wait below cannot leave this thread (and the scope) running.
            for _ in 0..40 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                as_alice(
                    cluster,
                    &namespace,
                    &[
                        "annotate",
                        "--overwrite",
                        "shellsession/idle",
                        &format!("walt.dev/last-activity={now}"),
                    ],
                )
                .expect("alice may annotate her session");
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        wait_for(
            cluster,
            &namespace,
            "shellsession/idle",
            "{.status.conditions[?(@.type==\"Complete\")].reason}",
            "IdleTimeout",
            within,
            &operator,
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(
        running_at.elapsed() < Duration::from_secs(45),
        "the annotation extended the idle time: {:?}",
        running_at.elapsed()
    );
}

/// Issue 15, ceilings at admission: the chart's ValidatingAdmissionPolicy (bound here to one
/// namespace only, the control plane is shared) refuses a ShellSession over the ceilings of its
/// ConfigMap parameter, saying the ceiling; one within them is accepted.
#[test]
fn the_chart_refuses_sessions_over_the_lab_ceilings_at_admission() {
    let cluster = cluster();
    install_user_roles(cluster);
    let (namespace, _dir) = tenant(cluster, "op-ceilings");
    kubectl(
        cluster,
        &namespace,
        &[
            "create",
            "rolebinding",
            "alice",
            "--clusterrole=walt-edit",
            "--user=alice",
        ],
    );
    let args = [
        "--namespace",
        namespace.as_str(),
        "--set",
        &format!("fullnameOverride={namespace}"),
        "--set",
        "sessionLimits.maxTtl=2h",
        "--set",
        "sessionLimits.maxIdleTimeout=30m",
    ];
    let mut objects = chart_objects(
        &args,
        &["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"],
        |_| true,
    );
    objects = objects.replace(
        "  validationActions:",
        &format!(
            "  matchResources:\n    namespaceSelector:\n      matchLabels:\n        kubernetes.io/metadata.name: {namespace}\n  validationActions:"
        ),
    );
    objects.push_str("---\n");
    objects.push_str(&chart_objects(&args, &["ConfigMap"], |doc| {
        doc["metadata"]["name"].as_str() == Some(&format!("{namespace}-session-limits"))
    }));
    let path = std::env::temp_dir().join(format!("walt-limits-{namespace}.yaml"));
    std::fs::write(&path, &objects).expect("write policy");
    cluster
        .kubectl_output(&["apply", "-f", &path.display().to_string()])
        .expect("apply the policy");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINmSuQ/gQGDMIEuOaUKquLGqbQDj1Arq8ZriXb9X8SgB walt";
    let create = |name: &str, ttl: &str, idle: &str| {
        let manifest = shell_session_yaml(name, "rpi1", key, ttl).replace(
            &format!("ttl: {ttl}"),
            &format!("ttl: {ttl}, idleTimeout: {idle}"),
        );
        let path = std::env::temp_dir().join(format!("walt-limits-{namespace}-{name}.yaml"));
        std::fs::write(&path, manifest).expect("write manifest");
        as_alice(
            cluster,
            &namespace,
            &["create", "--dry-run=server", "-f", &path.display().to_string()],
        )
    };
    // The policy takes a moment to be in force.
    let refused = Wait::new("the admission policy to refuse a 5h ttl", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| match create("long", "5h", "10m") {
            Err(refused) => Poll::Ready(refused),
            Ok(out) => Poll::Pending(out),
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        refused.contains("spec.ttl 5h is over the lab's ceiling 2h (sessionLimits.maxTtl)"),
        "{refused}"
    );
    let refused = create("idle", "1h", "90m").expect_err("idle over the ceiling");
    assert!(
        refused.contains("spec.idleTimeout 90m is over the lab's ceiling 30m"),
        "{refused}"
    );
    create("fine", "1h30m", "30m").expect("within the ceilings");
    let _ = cluster.kubectl_output(&["delete", "-f", &path.display().to_string()]);
}

/// The Warning Events of an object with this reason, their messages one per line.
fn warnings(cluster: &Cluster, namespace: &str, name: &str, reason: &str) -> String {
    kubectl(
        cluster,
        namespace,
        &[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name},type=Warning,reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ],
    )
}

/// Issue 15, registry paths confined, in the operator (admission bypassed: no policy on this
/// namespace). Alice's Images that read bob's path of the lab registry, clone from it or clone into
/// it are refused before any registry call (`Ready=False RegistryPathForbidden` and a Warning Event
/// saying what to do); the catalog resolves for her but a squash or a NodeSave overwrite of it is
/// refused (`Squashed=False`, the save `Failed`), without a write. The registry's own access log
/// proves no request went to bob's path and none but reads to the catalog; bob's and the catalog's
/// tags are where they were.
#[test]
fn alice_cannot_read_or_overwrite_bobs_images_or_the_catalog() {
    use walt_tests::images::{Arch, OciLayout};
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let registry = walt_tests::registry::Registry::start_recording_requests()
        .expect("start a docker-registry on loopback");
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    let bob = "bob-reg";
    let bobs = format!("lab/{bob}/secret:latest");
    let bob_digest = layout.push("base", &registry, &bobs).expect("push bob's image");
    // operator_args' catalog namespace, under the lab prefix.
    let catalog = "lab/walt-catalog-none/base:latest";
    let catalog_digest = layout
        .add_layer("base", "cat", |root| {
            std::fs::write(root.join("etc/catalog"), "shared\n")
        })
        .and_then(|()| layout.push("cat", &registry, catalog))
        .expect("push the catalog's image");
    let mark = registry.log_mark();
    let lab = SaveLab::start_on(registry, "op-paths", node, &[]);
    let cluster = cluster();
    let namespace = &lab.namespace;
    let own = format!("{}/lab/{namespace}/debian:latest", lab.registry.host());
    let bobs_reference = lab.registry.reference(&bobs);
    apply(
        cluster,
        namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: peek}}\nspec: {{reference: \"{bobs_reference}\"}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: grab}}\nspec: {{source: \"{bobs_reference}\"}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: plant}}\nspec: {{source: \"{own}\", reference: \"{bobs_reference}\"}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: shared}}\nspec: {{reference: \"{}\"}}\n",
            lab.registry.reference(catalog)
        ),
    );
    let ready = "{.status.conditions[?(@.type==\"Ready\")].reason}";
    for (name, field) in [
        ("peek", "spec.reference"),
        ("grab", "spec.source"),
        ("plant", "spec.reference"),
    ] {
        lab.wait(
            &format!("image/{name}"),
            ready,
            "RegistryPathForbidden",
            Duration::from_mins(1),
        );
        let message = lab.get(
            &format!("image/{name}"),
            "{.status.conditions[?(@.type==\"Ready\")].message}",
        );
        assert!(
            message.starts_with(&format!("{field} {bobs_reference}"))
                && message.contains(&format!("outside the registry path of namespace {namespace}"))
                && message.contains(&format!("{}/lab/{namespace}/", lab.registry.host())),
            "{name}: {message}"
        );
        assert_eq!(
            lab.get(&format!("image/{name}"), "{.status.digest}"),
            "",
            "{name} learned a digest"
        );
        let events = warnings(cluster, namespace, name, "RegistryPathForbidden");
        assert!(
            events.contains("outside the registry path"),
            "{name}: events {events:?}"
        );
    }
    // The catalog is hers to read …
    lab.wait(
        "image/shared",
        "{.status.digest}",
        &catalog_digest,
        Duration::from_mins(1),
    );
    // … not to write: a squash request is refused and said so.
    kubectl(
        cluster,
        namespace,
        &[
            "annotate",
            "image/shared",
            "walt.dev/squash-requested-at=2026-12-05T10:00:00Z",
        ],
    );
    lab.wait(
        "image/shared",
        "{.status.conditions[?(@.type==\"Squashed\")].reason}",
        "RegistryPathForbidden",
        Duration::from_mins(1),
    );
    let message = lab.get(
        "image/shared",
        "{.status.conditions[?(@.type==\"Squashed\")].message}",
    );
    assert!(
        message.contains("shared catalog, read-only to tenants"),
        "{message}"
    );
    assert!(
        warnings(cluster, namespace, "shared", "RegistryPathForbidden").contains("read-only to tenants"),
        "no Warning Event for the refused squash"
    );
    // Nor by a node save over it.
    lab.save("over-catalog", "shared", ", overwrite: true");
    lab.wait(
        "nodesave/over-catalog",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(1),
    );
    let complete = "{.status.conditions[?(@.type==\"Complete\")]}";
    let condition = lab.get("nodesave/over-catalog", complete);
    assert!(
        condition.contains("RegistryPathForbidden") && condition.contains("read-only to tenants"),
        "{condition}"
    );
    assert!(
        warnings(cluster, namespace, "over-catalog", "RegistryPathForbidden").contains("spec.image"),
        "no Warning Event for the refused save"
    );
    // Nor by an image shell saved onto it, or onto her Image that points at bob's path: the shell
    // ends Failed saying why (the test plays the kubelet for the shell pods' end).
    for (session, target, says) in [
        ("onto-catalog", "shared", "read-only to tenants"),
        ("onto-bob", "plant", "outside the registry path"),
    ] {
        apply(
            cluster,
            namespace,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {{name: {session}}}\n\
                 spec: {{image: debian, saveAs: {target}, ttl: 10m}}\n"
            ),
        );
        end_shell_pod(&lab, session, &lab.base_digest);
        lab.wait(
            &format!("shellsession/{session}"),
            "{.status.phase}",
            "Failed",
            Duration::from_mins(1),
        );
        let condition = lab.get(
            &format!("shellsession/{session}"),
            "{.status.conditions[?(@.reason==\"RegistryPathForbidden\")].message}",
        );
        assert!(
            condition.starts_with("spec.saveAs") && condition.contains(says),
            "{session}: {condition:?}"
        );
        assert!(
            warnings(cluster, namespace, session, "RegistryPathForbidden").contains(says),
            "{session}: no Warning Event for the refused save"
        );
    }
    // Nothing reached bob's path; the catalog was only read.
    let to_bob = lab.registry.requests_to(&format!("lab/{bob}/"), mark);
    assert!(to_bob.is_empty(), "requests to bob's path: {to_bob:#?}");
    let to_catalog = lab.registry.requests_to("lab/walt-catalog-none/", mark);
    assert!(
        !to_catalog.is_empty(),
        "the catalog was never read: is the access log on?"
    );
    let writes: Vec<_> = to_catalog
        .iter()
        .filter(|line| {
            ["\"PUT ", "\"POST ", "\"PATCH ", "\"DELETE "]
                .iter()
                .any(|verb| line.contains(verb))
        })
        .collect();
    assert!(writes.is_empty(), "writes to the catalog: {writes:#?}");
    assert_eq!(skopeo_digest(&bobs_reference), Ok(bob_digest), "bob's tag moved");
    assert_eq!(
        skopeo_digest(&lab.registry.reference(catalog)),
        Ok(catalog_digest),
        "the catalog's tag moved"
    );
}

/// Issue 15, no lab-wide credential in tenant namespaces: the operator, given the token Secret,
/// serves the registry's tokens (a real registry with token authentication trusts only them): it
/// resolves Images with its own lab credential through them, and the Secret it writes into a
/// namespace with a virtual node holds that namespace's credential (`tenant/<ns>`), not the lab's —
/// with it skopeo reads the namespace's own path and the registry refuses another namespace's.
#[test]
fn the_operator_issues_registry_tokens_and_a_namespace_gets_only_its_own_credential() {
    use base64::Engine as _;
    use walt_tests::images::{Arch, OciLayout};
    use walt_tests::registry::{Registry, TokenAuth, free_port, token_signing_key};
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-tokens");
    let (key_pem, cert_pem) = token_signing_key().expect("a token signing key");
    let token_port = free_port().expect("a free port");
    let registry = Registry::start_with_token_auth(&TokenAuth {
        realm: format!("http://127.0.0.1:{token_port}/token"),
        service: "walt-registry".into(),
        issuer: "walt-operator".into(),
        root_cert_pem: cert_pem,
    })
    .expect("docker-registry with token auth");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&key_path, &key_pem).expect("write key");
    kubectl(
        cluster,
        &namespace,
        &[
            "create",
            "secret",
            "generic",
            "walt-registry-token",
            &format!("--from-file=tls.key={}", key_path.display()),
            "--from-literal=tls.crt=unused-by-the-operator",
            "--from-literal=tenant-secret=a-tenant-secret-for-this-test",
        ],
    );
    kubectl(
        cluster,
        &namespace,
        &[
            "create",
            "secret",
            "docker-registry",
            "walt-lab-registry",
            &format!("--docker-server={}", registry.host()),
            "--docker-username=walt",
            "--docker-password=lab-password",
        ],
    );
    let lab = format!("{}/lab", registry.host());
    let token_addr = format!("127.0.0.1:{token_port}");
    let operator = start_operator(
        cluster,
        &namespace,
        "tokens",
        &[
            "--lab-registry",
            &lab,
            "--registry-credentials-secret",
            "walt-lab-registry",
            "--registry-token-secret",
            "walt-registry-token",
            "--registry-token-addr",
            &token_addr,
        ],
    );
    operator.wait_ready(Duration::from_mins(1));
    // The lab pushes with its own credential: through a token of the operator's.
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    let push = |repository: &str| {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                "walt:lab-password",
            ])
            .arg(format!("oci:{}:base", layout.path().display()))
            .arg(format!("docker://{}", registry.reference(repository)))
            .output()
            .expect("skopeo");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    push(&format!("lab/{namespace}/debian:latest"));
    push("lab/bob-tokens/secret:latest");
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n---\n\
         apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {name: vn1}\n\
         spec: {model: pc-x86-64, image: debian, virtual: {architecture: amd64}}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "image/debian",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
        Duration::from_mins(1),
        &operator,
    );
    // Written into the tenant's runtime namespace, which its pods mount from and it cannot read;
    // never into its own namespace.
    let runtime = walt_crds::runtime_namespace(&namespace);
    wait_for(
        cluster,
        &runtime,
        "secret/walt-registry-credentials",
        "{.type}",
        "kubernetes.io/dockerconfigjson",
        Duration::from_mins(1),
        &operator,
    );
    let document = kubectl(
        cluster,
        &runtime,
        &[
            "get",
            "secret/walt-registry-credentials",
            "-o",
            "jsonpath={.data.\\.dockerconfigjson}",
        ],
    );
    let document: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(document.trim())
            .expect("base64"),
    )
    .expect("json");
    let auth = document["auths"][registry.host()]["auth"]
        .as_str()
        .expect("an auth for the lab registry");
    let creds = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(auth)
            .expect("base64"),
    )
    .expect("utf8");
    assert!(creds.starts_with(&format!("tenant/{namespace}:")), "{creds}");
    assert!(
        cluster
            .kubectl_output(&["-n", &namespace, "get", "secret/walt-registry-credentials"])
            .is_err(),
        "the credential was written into the tenant's namespace"
    );
    assert!(
        !creds.contains("lab-password"),
        "the lab credential was copied into the namespace"
    );
    let inspect = |repository: &str| {
        Command::new("skopeo")
            .args([
                "inspect",
                "--tls-verify=false",
                "--creds",
                &creds,
                "--format",
                "{{.Digest}}",
            ])
            .arg(format!("docker://{}", registry.reference(repository)))
            .output()
            .expect("skopeo")
    };
    let own = inspect(&format!("lab/{namespace}/debian:latest"));
    assert!(own.status.success(), "{}", String::from_utf8_lossy(&own.stderr));
    let other = inspect("lab/bob-tokens/secret:latest");
    let refused = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && (refused.contains("unauthorized") || refused.contains("401")),
        "the namespace's credential read bob's image: {refused}"
    );
}

/// Waits until `pod` of `namespace` is gone.
fn wait_pod_gone(cluster: &Cluster, namespace: &str, pod: &str, operator: &Operator) {
    Wait::new(&format!("pod {pod} to be deleted"), Duration::from_mins(1))
        .every(Duration::from_millis(250))
        .until(|| {
            let out = cluster
                .kubectl_output(&["-n", namespace, "get", "pods", "-o", "name"])
                .unwrap_or_default();
            if out.contains(&format!("pod/{pod}\n")) || out.trim_end().ends_with(&format!("pod/{pod}")) {
                Poll::Pending(out)
            } else {
                Poll::Ready(())
            }
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
}

/// Ends the build pod `pod` as the kubelet would report it: container terminated with `exit_code`
/// and the termination message `message`.
fn end_build_pod(cluster: &Cluster, namespace: &str, pod: &str, exit_code: i32, message: &str) {
    let status = serde_json::json!({"status": {
        "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
        "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0, "image": "walt", "imageID": "walt",
            "state": {"terminated": {"exitCode": exit_code, "reason": if exit_code == 0 { "Completed" } else { "Error" },
                                     "message": message}}}]}})
    .to_string();
    kubectl(
        cluster,
        namespace,
        &[
            "patch",
            &format!("pod/{pod}"),
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ],
    );
}

fn image_build_yaml(name: &str, image: &str, overwrite: bool) -> String {
    format!(
        "apiVersion: walt.dev/v1alpha1\nkind: ImageBuild\nmetadata: {{name: {name}}}\n\
         spec: {{image: \"{image}\", overwrite: {overwrite}, buildArgs: [{{name: GREETING, value: hi}}]}}\n"
    )
}

/// ImageBuilds against the real API server (no kubelet here: the test reports the build pod's end as
/// the kubelet would): an existing image without `overwrite` is refused before any pod; a new one gets a
/// build pod reading its context on stdin, pushing under a scratch tag of the tenant's own repository;
/// a second build of the same name waits for it (`ImageBusy`, no pod) and starts once it ended; a failed
/// step fails the build with its message and moves no tag; a pushed result becomes the image (tag moved
/// by the operator, Image created); deleting a running build deletes its pod.
#[test]
fn image_build_refuses_builds_runs_its_pod_tags_the_result_and_cleans_up() {
    use walt_tests::images::{Arch, OciLayout};
    use walt_tests::registry::Registry;
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-build");
    let registry = Registry::start().expect("start a docker-registry on loopback");
    let layout = OciLayout::walt_busybox(Arch::Amd64, "pc-x86-64").expect("busybox image");
    let lab = format!("{}/lab", registry.host());
    let operator = start_operator(cluster, &namespace, "build", &["--lab-registry", &lab]);
    operator.wait_ready(Duration::from_mins(1));
    let within = Duration::from_mins(1);
    // Build pods run in the tenant's runtime namespace.
    let runtime = walt_crds::runtime_namespace(&namespace);

    // An existing image is not replaced without overwrite: Failed before any pod.
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: app}\nspec: {}\n",
    );
    apply(cluster, &namespace, &image_build_yaml("exists", "app", false));
    wait_for(
        cluster,
        &namespace,
        "imagebuild/exists",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    assert_eq!(
        jsonpath(
            cluster,
            &namespace,
            "imagebuild/exists",
            "{.status.conditions[?(@.type==\"Complete\")].reason}"
        ),
        "ImageExists"
    );
    assert!(
        jsonpath(
            cluster,
            &namespace,
            "imagebuild/exists",
            "{.status.conditions[0].message}"
        )
        .contains("--overwrite"),
        "the message says what to do"
    );
    for pods_in in [&namespace, &runtime] {
        assert!(
            cluster
                .kubectl_output(&["-n", pods_in, "get", "pods", "-o", "name"])
                .unwrap_or_default()
                .trim()
                .is_empty(),
            "no build pod for a refused build"
        );
    }

    // A new image: the build pod reads the context on stdin and pushes into the tenant's own path.
    apply(cluster, &namespace, &image_build_yaml("failing", "fresh", false));
    wait_for(
        cluster,
        &namespace,
        "imagebuild/failing",
        "{.status.phase}",
        "Building",
        within,
        &operator,
    );
    assert_eq!(
        jsonpath(
            cluster,
            &namespace,
            "imagebuild/failing",
            "{.status.pod} {.status.podNamespace}"
        ),
        format!("walt-build-failing {runtime}")
    );
    let args = jsonpath(
        cluster,
        &runtime,
        "pod/walt-build-failing",
        "{.spec.containers[0].args}",
    );
    let scratch = format!("{}/lab/{namespace}/fresh:build-", registry.host());
    assert!(
        args.contains("\"build\",\"--context-tar\",\"-\",\"--to\"")
            && args.contains(&scratch)
            && args.contains("\"--build-arg\",\"GREETING=hi\""),
        "{args}"
    );
    // Standard input open for the client's archive, no terminal (false is not stored), no token.
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            "pod/walt-build-failing",
            "{.spec.containers[0].stdin}/{.spec.containers[0].tty}/{.spec.automountServiceAccountToken}"
        ),
        "true//false"
    );
    // A second build of the same name waits for the running one (one writer per image).
    apply(cluster, &namespace, &image_build_yaml("good", "fresh", false));
    wait_for(
        cluster,
        &namespace,
        "imagebuild/good",
        "{.status.conditions[?(@.type==\"Complete\")].reason}",
        "ImageBusy",
        within,
        &operator,
    );
    let waiting = jsonpath(
        cluster,
        &namespace,
        "imagebuild/good",
        "{.status.phase}: {.status.conditions[0].message}",
    );
    assert!(
        waiting.starts_with("Pending: ImageBuild/failing works on image fresh"),
        "{waiting}"
    );
    assert!(
        !kubectl(cluster, &runtime, &["get", "pods", "-o", "name"]).contains("walt-build-good"),
        "no pod for a waiting build"
    );
    end_build_pod(
        cluster,
        &runtime,
        "walt-build-failing",
        1,
        "walt-operator: step 2/2 (Dockerfile line 2) RUN echo boom; exit 3: the command exited with status 3 (its output is above)",
    );
    wait_for(
        cluster,
        &namespace,
        "imagebuild/failing",
        "{.status.phase}",
        "Failed",
        within,
        &operator,
    );
    let message = jsonpath(
        cluster,
        &namespace,
        "imagebuild/failing",
        "{.status.conditions[0].message}",
    );
    assert!(
        message.starts_with(
            "step 2/2 (Dockerfile line 2) RUN echo boom; exit 3: the command exited with status 3"
        ) && message.contains("no tag moved"),
        "{message}"
    );
    wait_event(
        cluster,
        &namespace,
        "failing",
        "BuildFailed",
        "step 2/2",
        &operator,
    );
    wait_pod_gone(cluster, &runtime, "walt-build-failing", &operator);
    assert!(
        cluster
            .kubectl_output(&["-n", &namespace, "get", "image/fresh"])
            .is_err(),
        "a failed build makes no Image"
    );
    assert!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/fresh:latest"))).is_err(),
        "and moves no tag"
    );

    // The waiting build starts once the failed one ended; its pushed result (here pushed by the
    // test under the scratch tag) becomes the image.
    wait_for(
        cluster,
        &namespace,
        "imagebuild/good",
        "{.status.phase}",
        "Building",
        within,
        &operator,
    );
    let args = jsonpath(
        cluster,
        &runtime,
        "pod/walt-build-good",
        "{.spec.containers[0].args}",
    );
    let push_to = args
        .split('"')
        .find(|arg| arg.contains(":build-"))
        .expect("the scratch reference")
        .to_owned();
    let scratch_path = push_to
        .trim_start_matches(&format!("{}/", registry.host()))
        .to_owned();
    let digest = layout
        .push("base", &registry, &scratch_path)
        .expect("push the build's result");
    let result = serde_json::json!({"digest": digest, "reference": push_to, "architecture": "amd64",
        "emulated": false, "steps": 3, "cached": 1, "layersPushed": 1, "pushed": true, "seconds": 1.0});
    end_build_pod(cluster, &runtime, "walt-build-good", 0, &result.to_string());
    wait_for(
        cluster,
        &namespace,
        "imagebuild/good",
        "{.status.phase}",
        "Succeeded",
        within,
        &operator,
    );
    assert_eq!(
        jsonpath(
            cluster,
            &namespace,
            "imagebuild/good",
            "{.status.result.digest} {.status.result.image}"
        ),
        format!("{digest} fresh")
    );
    assert_eq!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/fresh:latest"))),
        Ok(digest.clone()),
        "the operator moved the tag to the build's digest"
    );
    wait_for(
        cluster,
        &namespace,
        "image/fresh",
        "{.status.digest}",
        &digest,
        within,
        &operator,
    );
    wait_pod_gone(cluster, &runtime, "walt-build-good", &operator);
    let columns = kubectl(cluster, &namespace, &["get", "imagebuilds"]);
    assert!(
        columns.contains("Succeeded") && columns.contains(&digest["sha256:".len()..][..12]),
        "{columns}"
    );

    // Deleting a running build deletes its pod (the finalizer), and the build goes.
    apply(
        cluster,
        &namespace,
        &image_build_yaml("cancelled", "other", false),
    );
    wait_for(
        cluster,
        &namespace,
        "imagebuild/cancelled",
        "{.status.pod}",
        "walt-build-cancelled",
        within,
        &operator,
    );
    kubectl(
        cluster,
        &namespace,
        &["delete", "imagebuild/cancelled", "--wait=true", "--timeout=60s"],
    );
    wait_pod_gone(cluster, &runtime, "walt-build-cancelled", &operator);
    assert!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/other:latest"))).is_err(),
        "no tag moved"
    );
}

/// Waits until `object` of `namespace` is gone (`--ignore-not-found` answers nothing).
fn wait_gone(cluster: &Cluster, namespace: &str, object: &str, what: &str, operator: &Operator) {
    Wait::new(what, Duration::from_mins(1))
        .every(Duration::from_millis(250))
        .until(|| {
            match cluster.kubectl_output(&[
                "-n",
                namespace,
                "get",
                object,
                "--ignore-not-found",
                "-o",
                "name",
            ]) {
                Ok(out) if out.trim().is_empty() => Poll::Ready(()),
                Ok(out) => Poll::Pending(out),
                Err(error) => Poll::Pending(error.to_string()),
            }
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", operator.log()));
}

/// Issues 15 and 19, no pod rights for builds: alice's ImageBuild runs its build pod in her runtime
/// namespace (`walt-run-<alice>`, made by the operator), never in her own (at Pod Security
/// `baseline`, which refuses the privileged build pod), labelled with its owner (kind, namespace,
/// name, uid); the build's status names the pod's namespace; deleting the build removes the pod; a
/// build pod there whose ImageBuild is gone is swept, a live build's is kept. A namespace of the
/// runtime namespace's name that walt did not make is refused: the build fails
/// `RuntimeNamespaceRefused` with a Warning Event saying what to do, and no pod is made anywhere.
/// The test plays the kubelet (none on this tier): the pod is only created and deleted.
#[test]
fn alices_build_runs_in_her_runtime_namespace_and_goes_with_its_owner() {
    let started = Instant::now();
    let cluster = cluster();
    let (alice, _dir) = tenant_at_baseline(cluster, "alice-bld");
    // Someone else's namespace holds the runtime namespace's name before walt makes it.
    let runtime = walt_crds::runtime_namespace(&alice);
    cluster
        .kubectl_output(&["create", "namespace", &runtime])
        .expect("create the squatted namespace");
    let operator = start_operator(cluster, &alice, "bld", &["--runtime-sweep-interval", "2s"]);
    operator.wait_ready(Duration::from_mins(1));
    let within = Duration::from_mins(1);
    apply(cluster, &alice, &image_build_yaml("squatted", "app", false));
    wait_for(
        cluster,
        &alice,
        "imagebuild/squatted",
        "{.status.phase} {.status.conditions[?(@.type==\"Complete\")].reason}",
        "Failed RuntimeNamespaceRefused",
        within,
        &operator,
    );
    let message = jsonpath(
        cluster,
        &alice,
        "imagebuild/squatted",
        "{.status.conditions[0].message}",
    );
    assert!(
        message.contains(&format!(
            "the namespace {runtime} exists but is not walt's runtime namespace of {alice}"
        )) && message.contains("a cluster admin deletes or renames it")
            && message.ends_with("no build pod was made"),
        "{message}"
    );
    wait_event(
        cluster,
        &alice,
        "squatted",
        "RuntimeNamespaceRefused",
        "not walt's runtime namespace",
        &operator,
    );
    for namespace in [&alice, &runtime] {
        assert!(
            kubectl(cluster, namespace, &["get", "pods", "-o", "name"])
                .trim()
                .is_empty(),
            "a build pod in {namespace} though the runtime namespace was refused"
        );
    }
    // Made walt's (as if the operator had made it): builds run there.
    kubectl(
        cluster,
        &alice,
        &[
            "label",
            "namespace",
            &runtime,
            "app.kubernetes.io/managed-by=walt-operator",
            &format!("walt.dev/tenant={alice}"),
            "pod-security.kubernetes.io/enforce=privileged",
        ],
    );
    apply(cluster, &alice, &image_build_yaml("b1", "app", false));
    wait_for(
        cluster,
        &alice,
        "imagebuild/b1",
        "{.status.phase} {.status.pod} {.status.podNamespace}",
        &format!("Building walt-build-b1 {runtime}"),
        within,
        &operator,
    );
    let build_uid = jsonpath(cluster, &alice, "imagebuild/b1", "{.metadata.uid}");
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            "pod/walt-build-b1",
            "{.metadata.labels.walt\\.dev/owner-kind}/{.metadata.labels.walt\\.dev/owner-namespace}/{.metadata.labels.walt\\.dev/owner-name}/{.metadata.labels.walt\\.dev/owner-uid}/{.metadata.labels.walt\\.dev/image-build}"
        ),
        format!("ImageBuild/{alice}/b1/{build_uid}/b1")
    );
    assert_eq!(
        jsonpath(
            cluster,
            &runtime,
            "pod/walt-build-b1",
            "{.metadata.ownerReferences}"
        ),
        "",
        "no cross-namespace owner reference"
    );
    assert!(
        cluster
            .kubectl_output(&["-n", &alice, "get", "pod/walt-build-b1"])
            .is_err(),
        "a build pod in the tenant's namespace"
    );
    // A build pod whose ImageBuild is gone (deleted while no operator ran) is swept; the live
    // build's pod stays.
    let orphan = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: walt-build-gone\n  labels:\n    \
         app.kubernetes.io/managed-by: walt-operator\n    walt.dev/owner-kind: ImageBuild\n    \
         walt.dev/owner-namespace: {alice}\n    walt.dev/owner-name: gone\n    walt.dev/owner-uid: 00000000-0000-0000-0000-000000000000\n\
         spec: {{containers: [{{name: build, image: busybox}}]}}\n"
    );
    apply(cluster, &runtime, &orphan);
    wait_gone(
        cluster,
        &runtime,
        "pod/walt-build-gone",
        "the orphan build pod to be swept",
        &operator,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        jsonpath(cluster, &runtime, "pod/walt-build-b1", "{.metadata.name}"),
        "walt-build-b1",
        "the live build's pod was swept"
    );
    // Deleting the build removes its pod (its finalizer).
    kubectl(
        cluster,
        &alice,
        &["delete", "imagebuild/b1", "--wait=true", "--timeout=60s"],
    );
    wait_gone(
        cluster,
        &runtime,
        "pod/walt-build-b1",
        "the build pod to go with its build",
        &operator,
    );
    eprintln!(
        "alices_build_runs_in_her_runtime_namespace_and_goes_with_its_owner: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A proxy command reaching each of `nodes` at its own address from its own lab namespace: one
/// operator, several sshd nodes. The address is `$0` of a fixed script, never executed.
fn proxy_to(nodes: &[&walt_tests::sshnode::SshNode]) -> String {
    use std::fmt::Write as _;
    let mut cases = String::new();
    for node in nodes {
        let _ = write!(
            cases,
            "{address}) exec ip netns exec {netns} socat - TCP:{address}:22;; ",
            address = node.address(),
            netns = node.lab_netns()
        );
    }
    format!("sh -c 'case \"$0\" in {cases}esac; exit 1' %h")
}

/// What a node stuck on a file mid-save runs for every command (see [`stall_tar`]): its `tar -cf`
/// sends the start of the archive, then nothing, its output left open; anything else runs as asked.
const STALLING_NODE: &str = r#"case "$SSH_ORIGINAL_COMMAND" in
  *" -cf "*) sh -c "$SSH_ORIGINAL_COMMAND" | head -c 20000; exec sleep 3600 ;;
esac
exec sh -c "$SSH_ORIGINAL_COMMAND""#;

/// Makes the node's saves stall mid-archive ([`STALLING_NODE`], run by sshd for every command), with
/// a megabyte to save.
fn stall_tar(node: &walt_tests::sshnode::SshNode) {
    node.run(&format!(
        "mkdir -p /srv && head -c 1000000 /dev/urandom > /srv/blob && cat > /walt-stall <<'EOF'\n{STALLING_NODE}\nEOF"
    ))
    .expect("prepare the node");
    node.force_command("exec /bin/sh /walt-stall")
        .expect("wrap the node's commands");
}

/// A hung node (its probe command never returns), a flooding one (its probe writes without end) and
/// one whose tar stalls mid-save sit beside a healthy node, with one reconcile worker per kind and
/// one save slot: each bad node fails with its reason within its bound (`CommandTimedOut`,
/// `OutputTooLarge`, a save `NodeFailed` "sent nothing for 3 s" that moved no tag), and the healthy
/// node still becomes Ready and its save, queued behind the stalled one, succeeds.
#[test]
fn a_hung_or_flooding_node_fails_with_its_reason_and_never_stalls_the_others() {
    use std::fmt::Write as _;
    use walt_tests::images::{Arch, OciLayout};
    use walt_tests::sshnode::SshNode;
    let cluster = cluster();
    let start =
        || SshNode::busybox().expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let (good, hung, flood, stalling) = (start(), start(), start(), start());
    for bad in [&hung, &flood, &stalling] {
        bad.authorize_key(good.client_public_key())
            .expect("authorize the lab's node key");
    }
    // Whatever the operator asks, the hung node never answers and the flooding one never stops.
    hung.force_command("exec sleep 3600").expect("make the node hang");
    flood
        .force_command("exec yes walt-flood")
        .expect("make the node flood");
    stall_tar(&stalling);
    good.run("mkdir -p /srv && echo saved > /srv/good")
        .expect("change a file on the node");

    let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
    let namespace = tenant_with_key(cluster, "op-hang", &good.client_key());
    let base = OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
        .expect("skopeo copy the base image to the registry");
    let lab = format!("{}/lab", registry.host());
    let proxy = proxy_to(&[&good, &hung, &flood, &stalling]);
    let operator = start_operator(
        cluster,
        &namespace,
        "hang",
        &[
            "--lab-registry",
            &lab,
            "--node-proxy-command",
            &proxy,
            "--probe-interval",
            "2s",
            "--node-command-timeout",
            "2s",
            "--node-output-limit",
            "64Ki",
            "--node-stall-timeout",
            "3s",
            "--max-concurrent-reconciles",
            "1",
            "--max-concurrent-saves",
            "1",
        ],
    );
    operator.wait_ready(Duration::from_mins(1));
    // The bad nodes first: with one reconcile worker, the good node's probes queue behind theirs.
    let mut objects =
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n".to_owned();
    for (name, node) in [
        ("hung", &hung),
        ("flood", &flood),
        ("stalling", &stalling),
        ("good", &good),
    ] {
        let device = lend_device(cluster, &namespace, name, &node.address().to_string(), None);
        let _ = write!(
            objects,
            "---\napiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\n\
             spec: {{model: rpi-4-b, image: debian, device: {device}}}\n"
        );
    }
    let started = Instant::now();
    apply(cluster, &namespace, &objects);
    wait_node_booted(cluster, &namespace, "good", &base, &operator);
    eprintln!(
        "the good node was Ready {:.1} s after the Nodes were created",
        started.elapsed().as_secs_f64()
    );

    let reachable = "{.status.conditions[?(@.type==\"Reachable\")].reason}";
    let said = |node: &str| {
        jsonpath(
            cluster,
            &namespace,
            &format!("node.walt.dev/{node}"),
            "{.status.phase}: {.status.conditions[?(@.type==\"Reachable\")].message}",
        )
    };
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/hung",
        reachable,
        "CommandTimedOut",
        within,
        &operator,
    );
    let hung_says = said("hung");
    assert!(
        hung_says.starts_with("Unreachable: ")
            && hung_says.contains("did not finish `cat /proc/uptime")
            && hung_says.contains("within 2 s"),
        "{hung_says}"
    );
    wait_for(
        cluster,
        &namespace,
        "node.walt.dev/flood",
        reachable,
        "OutputTooLarge",
        within,
        &operator,
    );
    let flood_says = said("flood");
    assert!(
        flood_says.starts_with("Unreachable: ") && flood_says.contains("more than 65536 bytes of output"),
        "{flood_says}"
    );

    // The stalled save holds the only slot; the good one waits for it, then runs.
    wait_node_booted(cluster, &namespace, "stalling", &base, &operator);
    let save = |name: &str, node: &str, image: &str| {
        apply(
            cluster,
            &namespace,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {{name: {name}}}\n\
                 spec: {{node: {node}, image: \"{image}\"}}\n"
            ),
        );
    };
    save("stalled", "stalling", "stalled");
    wait_for(
        cluster,
        &namespace,
        "nodesave/stalled",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    save("healthy", "good", "debian:v2");
    wait_for(
        cluster,
        &namespace,
        "nodesave/healthy",
        "{.status.phase}",
        "Succeeded",
        within,
        &operator,
    );
    let complete = "{.status.phase} {.status.conditions[?(@.type==\"Complete\")].reason}: \
                    {.status.conditions[?(@.type==\"Complete\")].message}";
    let stalled_says = jsonpath(cluster, &namespace, "nodesave/stalled", complete);
    assert!(
        stalled_says.starts_with("Failed NodeFailed: ") && stalled_says.contains("sent nothing for 3 s"),
        "{stalled_says}"
    );
    assert!(
        event_reasons(cluster, &namespace, "healthy").contains("WaitingForSlot"),
        "the healthy save queued behind the stalled one"
    );
    // Nothing half-published: no tag, no Image for the stalled save; the healthy one's tag is its digest.
    assert!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/stalled:latest"))).is_err(),
        "a stalled save moved a tag"
    );
    let images = kubectl(cluster, &namespace, &["get", "images", "-o", "name"]);
    assert!(!images.contains("/stalled"), "{images}");
    assert_eq!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/debian:v2"))),
        Ok(jsonpath(
            cluster,
            &namespace,
            "nodesave/healthy",
            "{.status.result.digest}"
        ))
    );
}

/// The network between the operator and the node cut in the middle of a save (the node's end of its
/// link down, like a pulled cable), then back: the save fails cleanly at the stall bound, saying the
/// node went silent; the name it would have overwritten still points at the digest it had; once the
/// link is back the node is Ready again and the next save succeeds.
#[test]
fn network_cut_mid_save_fails_cleanly_and_the_name_stays() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start_with("op-netcut", node, &["--node-stall-timeout", "5s"]);
    // 512 MiB: on an idle machine a 128 MiB save ended between its first progress and the cut.
    lab.write_random_file(512 << 20);
    lab.save("cut", "debian", ", overwrite: true");
    lab.wait_progress("nodesave/cut");
    lab.node.set_link(false).expect("cut the node's link");
    let cut = Instant::now();
    lab.wait(
        "nodesave/cut",
        "{.status.phase}",
        "Failed",
        Duration::from_mins(2),
    );
    eprintln!(
        "the save failed {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    lab.node.set_link(true).expect("restore the node's link");
    let says = lab.get(
        "nodesave/cut",
        "{.status.conditions[?(@.type==\"Complete\")].reason}: {.status.conditions[?(@.type==\"Complete\")].message}",
    );
    assert!(
        says.starts_with("NodeFailed: ") && says.contains("sent nothing for 5 s"),
        "{says}"
    );
    let latest = lab
        .registry
        .reference(&format!("lab/{}/debian:latest", lab.namespace));
    assert_eq!(
        skopeo_digest(&latest),
        Ok(lab.base_digest.clone()),
        "the name still points where it did"
    );
    assert_eq!(lab.get("image/debian", "{.status.digest}"), lab.base_digest);
    lab.wait(
        "node.walt.dev/rpi1",
        "{.status.phase}",
        "Ready",
        Duration::from_mins(3),
    );
    lab.save("after", "debian:after", "");
    lab.wait_saved("after", "debian:after", Duration::from_mins(5));
}

/// Stops the API server, keeps it away for `down`, starts it again (etcd keeps everything).
fn restart_api_server(cluster: &Cluster, down: Duration) {
    let started = Instant::now();
    cluster.stop_api_server();
    std::thread::sleep(down);
    let ready = cluster
        .start_api_server()
        .unwrap_or_else(|e| panic!("start kube-apiserver again: {e}"));
    eprintln!(
        "kube-apiserver was away {:.1} s (ready {:.1} s after it started again)",
        started.elapsed().as_secs_f64(),
        ready.as_secs_f64()
    );
}

/// The API server restarted (etcd kept) while a node shell is open, while a node save runs and
/// while the operator watches: the open shell goes on and the session stays Running; the save runs
/// once to its end (no restart from scratch), its status and the new Image catch up; objects
/// created after the restart are reconciled. The operator keeps its leadership through an outage
/// shorter than its Lease.
#[test]
fn api_server_restarts_lose_nothing() {
    use walt_tests::images::{Arch, OciLayout};
    // A control plane of this test's own: the shared one serves the other tests meanwhile.
    let cluster = Cluster::start(walt_tests::k8s::ClusterOptions::control_plane())
        .expect("start a control plane for this test");
    let cluster = &cluster;
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
    let namespace = tenant_with_key(cluster, "op-apirestart", &node.client_key());
    let base = OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
        .expect("skopeo copy the base image to the registry");
    let lab = format!("{}/lab", registry.host());
    let operator = operator_for_node(
        cluster,
        &namespace,
        "apirestart",
        &node,
        &[
            "--lab-registry",
            &lab,
            "--gateway-service-port",
            "2022",
            // Longer than the API server's restart on a loaded machine (renewal gaps included).
            "--lease-duration",
            "60s",
        ],
    );
    let device = lend_device(
        cluster,
        &namespace,
        "rpi",
        &node.address().to_string(),
        Some(node.host_public_key().trim()),
    );
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: debian}}\nspec: {{}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: rpi1}}\n\
             spec: {{model: rpi-4-b, image: debian, device: {device}}}\n"
        ),
    );
    wait_node_booted(cluster, &namespace, "rpi1", &base, &operator);
    let within = Duration::from_mins(1);

    // 1. A node shell open through the gateway across the restart.
    let dir = tempfile::tempdir().expect("temp dir");
    let user_key = walt_tests::sshnode::keygen(dir.path(), "user");
    let public_key = std::fs::read_to_string(user_key.with_extension("pub")).expect("public key");
    apply(
        cluster,
        &namespace,
        &shell_session_yaml("shell", "rpi1", &public_key, "10m"),
    );
    wait_for(
        cluster,
        &namespace,
        "shellsession/shell",
        "{.status.phase}",
        "Running",
        within,
        &operator,
    );
    let open = gateway_ssh(
        &operator,
        "shell",
        &user_key,
        "echo opened; sleep 12; echo survived",
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("run ssh");
    std::thread::sleep(Duration::from_secs(2));
    restart_api_server(cluster, Duration::from_secs(2));
    let out = open.wait_with_output().expect("wait for ssh");
    assert!(
        out.status.success(),
        "the open shell ended: {}\noperator log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        operator.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "opened\nsurvived\n");
    assert_eq!(
        jsonpath(cluster, &namespace, "shellsession/shell", "{.status.phase}"),
        "Running"
    );
    let again = gateway_ssh(&operator, "shell", &user_key, "echo again")
        .output()
        .expect("run ssh");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "again\n",
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // 2. A save running across the restart.
    node.run("mkdir -p /srv && head -c 134217728 /dev/urandom > /srv/big")
        .expect("write a big file on the node");
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: big}\nspec: {node: rpi1, image: \"debian:big\"}\n",
    );
    Wait::new("the save to report progress", within)
        .every(Duration::from_millis(100))
        .until(|| {
            let bytes: u64 = jsonpath(cluster, &namespace, "nodesave/big", "{.status.progress.bytes}")
                .parse()
                .unwrap_or(0);
            if bytes > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{bytes} bytes"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
    restart_api_server(cluster, Duration::from_secs(3));
    wait_for(
        cluster,
        &namespace,
        "nodesave/big",
        "{.status.phase}",
        "Succeeded",
        Duration::from_mins(4),
        &operator,
    );
    let digest = jsonpath(cluster, &namespace, "nodesave/big", "{.status.result.digest}");
    assert_eq!(
        skopeo_digest(&registry.reference(&format!("lab/{namespace}/debian:big"))),
        Ok(digest.clone())
    );
    wait_for(
        cluster,
        &namespace,
        "image/debian.big",
        "{.status.digest}",
        &digest,
        within,
        &operator,
    );
    let bytes: u64 = jsonpath(cluster, &namespace, "nodesave/big", "{.status.progress.bytes}")
        .parse()
        .expect("progress bytes");
    assert!(bytes > 128 << 20, "the progress caught up: {bytes}");
    let reasons = event_reasons(cluster, &namespace, "big");
    assert!(!reasons.contains("Restarted"), "the save ran once: {reasons}");
    assert!(
        !operator.log().contains("lost leadership"),
        "the operator kept its leadership:\n{}",
        operator.log()
    );

    // 3. The watches resumed: an object created after the restarts is reconciled.
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: NodeSave\nmetadata: {name: after}\nspec: {node: rpi1, image: \"debian:after\"}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "nodesave/after",
        "{.status.phase}",
        "Succeeded",
        Duration::from_mins(2),
        &operator,
    );
    assert_eq!(
        jsonpath(cluster, &namespace, "node.walt.dev/rpi1", "{.status.phase}"),
        "Ready"
    );
}

/// Plays the kubelet for an image shell of `lab`: waits until the operator created the pod of
/// ShellSession `session`, then writes into its status the end of a shell whose user decided to save,
/// with `digest` as what the shell pushed (it must be in the lab registry).
fn end_shell_pod(lab: &SaveLab, session: &str, digest: &str) {
    let cluster = cluster();
    let pod = format!("pod/walt-shell-{session}");
    let runtime = walt_crds::runtime_namespace(&lab.namespace);
    Wait::new(&format!("{pod} to be created"), Duration::from_mins(1))
        .every(Duration::from_millis(250))
        .until(|| {
            cluster
                .kubectl_output(&["-n", &runtime, "get", &pod, "-o", "name"])
                .is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", lab.operator.log()));
    let outcome = serde_json::json!({
        "digest": digest, "summary": {"added": 1, "modified": 0, "deleted": 0, "bytes": 6},
        "emulated": false, "mode": "basic", "exitCode": 0,
    });
    let status = serde_json::json!({"status": {"phase": "Succeeded", "containerStatuses": [{
        "name": "shell", "ready": false, "restartCount": 0, "image": "walt", "imageID": "walt",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": outcome.to_string()}},
    }]}});
    kubectl(
        cluster,
        &runtime,
        &[
            "patch",
            &pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
    );
}

/// Two image shells whose users save as one new name `x`: the older shell holds the name (its
/// `saveAs` claim), so the younger one, decided first, waits (`Ready=False` `WaitingForImage` naming
/// `ShellSession/first`, phase still `AwaitingDecision`) until the older one has saved; then it saves,
/// and `x` ends at the younger one's digest, the last writer's, in the registry and in its Image. The
/// test plays the kubelet for both shell pods' ends (digests already in the registry: the images
/// they opened, `debian` and `other`, the base relabelled).
#[test]
fn two_shells_saving_as_one_new_name_take_turns() {
    use walt_tests::images::{Arch, OciLayout};
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start("op-twoshells", node);
    let cluster = cluster();
    let within = Duration::from_mins(1);
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
    layout
        .set_label("base", "walt.test", "second")
        .expect("relabel the base");
    let second = layout
        .push(
            "base",
            &lab.registry,
            &format!("lab/{}/other:latest", lab.namespace),
        )
        .expect("push the relabelled base");
    assert_ne!(second, lab.base_digest);
    // Each shell opens an image of its own (one shell at a time per opened image).
    apply(
        cluster,
        &lab.namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: other}\nspec: {}\n",
    );
    lab.wait("image/other", "{.status.digest}", &second, within);
    for (name, image) in [("first", "debian"), ("second", "other")] {
        apply(
            cluster,
            &lab.namespace,
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {{name: {name}}}\n\
                 spec: {{image: {image}, saveAs: x, ttl: 10m}}\n"
            ),
        );
    }
    end_shell_pod(&lab, "second", &second);
    lab.wait(
        "shellsession/second",
        "{.status.phase} {.status.conditions[?(@.type==\"Ready\")].reason}",
        "AwaitingDecision WaitingForImage",
        within,
    );
    let says = lab.get(
        "shellsession/second",
        "{.status.conditions[?(@.type==\"Ready\")].message}",
    );
    assert!(says.contains("ShellSession/first"), "{says}");
    let x = lab.registry.reference(&format!("lab/{}/x:latest", lab.namespace));
    assert!(
        skopeo_digest(&x).is_err(),
        "x was written while the older shell held it"
    );
    end_shell_pod(&lab, "first", &lab.base_digest);
    lab.wait("shellsession/first", "{.status.phase}", "Saved", within);
    lab.wait("shellsession/second", "{.status.phase}", "Saved", within);
    assert_eq!(
        skopeo_digest(&x),
        Ok(second.clone()),
        "x is the last writer's digest"
    );
    lab.wait("image/x", "{.status.digest}", &second, within);
}

/// Two writers on one name: a NodeSave writing `x` (its node's tar stalls, so it runs a while) and an
/// image shell whose user decided to save as `x`. The shell's save waits while the save holds the
/// name (`Ready=False` `WaitingForImage` naming it, phase still `AwaitingDecision`); once the save has
/// failed cleanly (no tag), the shell saves, and `x` ends at the shell's digest in the registry and in
/// its Image. The test plays the kubelet: the shell pod's end is written into its status, with the
/// digest a shell would have pushed (here the base's, already in the registry).
#[test]
fn a_save_and_a_shells_save_as_on_one_name_take_turns() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let lab = SaveLab::start_with("op-twowriters", node, &["--node-stall-timeout", "20s"]);
    stall_tar(&lab.node);
    let cluster = cluster();
    let within = Duration::from_mins(1);
    lab.save("writer", "x", "");
    lab.wait("nodesave/writer", "{.status.phase}", "Running", within);
    apply(
        cluster,
        &lab.namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: sh}\n\
         spec: {image: debian, saveAs: x, ttl: 10m}\n",
    );
    end_shell_pod(&lab, "sh", &lab.base_digest);
    lab.wait(
        "shellsession/sh",
        "{.status.phase} {.status.conditions[?(@.type==\"Ready\")].reason}",
        "AwaitingDecision WaitingForImage",
        within,
    );
    let says = lab.get(
        "shellsession/sh",
        "{.status.conditions[?(@.type==\"Ready\")].message}",
    );
    assert!(says.contains("NodeSave/writer works on image x"), "{says}");
    assert_eq!(
        lab.get("nodesave/writer", "{.status.phase}"),
        "Running",
        "the save still holds x"
    );
    lab.wait("nodesave/writer", "{.status.phase}", "Failed", within);
    lab.wait("shellsession/sh", "{.status.phase}", "Saved", within);
    let x = lab.registry.reference(&format!("lab/{}/x:latest", lab.namespace));
    assert_eq!(
        skopeo_digest(&x),
        Ok(lab.base_digest.clone()),
        "x is the shell's digest"
    );
    lab.wait("image/x", "{.status.digest}", &lab.base_digest, within);
}

/// A reconcile that never ends (an Image whose source registry accepts the connection and never says
/// a word: the registry client waits for ever) is abandoned at `--reconcile-timeout`, counted as
/// `error="timeout"` and said in the log; it does not keep the worker: with one Image worker, another
/// Image is still resolved.
#[test]
fn a_reconcile_that_never_ends_is_abandoned_at_the_reconcile_timeout() {
    use walt_tests::images::{Arch, OciLayout};
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-rtimeout");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a silent registry");
    let silent_address = silent.local_addr().expect("its address").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
    let base = OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
        .expect("skopeo copy the base image to the registry");
    let lab = format!("{}/lab", registry.host());
    let operator = start_operator(
        cluster,
        &namespace,
        "rtimeout",
        &[
            "--lab-registry",
            &lab,
            "--plain-http-sources",
            &silent_address,
            "--reconcile-timeout",
            "3s",
            "--max-concurrent-reconciles",
            "1",
        ],
    );
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: stuck}}\n\
             spec: {{source: \"{silent_address}/walt/stuck:1\"}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: debian}}\nspec: {{}}\n"
        ),
    );
    let within = Duration::from_mins(1);
    wait_for(
        cluster,
        &namespace,
        "image/debian",
        "{.status.digest}",
        &base,
        within,
        &operator,
    );
    let counter = "walt_reconcile_errors_total{kind=\"Image\",error=\"timeout\"} ";
    Wait::new("a timed-out Image reconcile counted in /metrics", within)
        .every(Duration::from_millis(250))
        .until(|| {
            let metrics = operator.get("/metrics").map(|(_, body)| body).unwrap_or_default();
            let count = metrics
                .lines()
                .find_map(|line| line.strip_prefix(counter))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if count >= 1.0 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{counter}{count}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
    let log = operator.log();
    assert!(
        log.contains("the Image reconcile took longer than 3 s (--reconcile-timeout) and was abandoned"),
        "{log}"
    );
}

/// The leader killed mid-clone without a chance to clean up (SIGKILL, as the OOM killer does): no tag
/// in the lab registry until the whole image is there; the standby replica takes the Lease over once it
/// expires and finishes the clone without sending again the blobs the first one had copied; the Image
/// ends Ready at the source's digest.
#[test]
fn leader_killed_mid_clone_moves_no_tag_and_the_standby_finishes_it() {
    use walt_tests::images::{Arch, OciLayout, skopeo_inspect_raw};
    use walt_tests::registry::Registry;
    let cluster = cluster();
    let (namespace, _dir) = tenant(cluster, "op-clonekill");
    let upstream = Registry::start().expect("start an upstream registry");
    let lab_registry = Registry::start_recording_requests().expect("start the lab registry");
    // Two layers of random data (they do not compress) above busybox: the kill falls in the second.
    let layout = OciLayout::busybox(Arch::Amd64).expect("amd64 busybox image");
    let data = tempfile::tempdir().expect("tempdir");
    // The second is large so that the leader is still copying it when the test sees two blobs done.
    for (layer, from, mib) in [("a", "base", 32), ("b", "a", 192)] {
        let dir = data.path().join(layer);
        std::fs::create_dir_all(&dir).expect("layer dir");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {mib}M /dev/urandom > {}/big-{layer}",
                dir.display()
            ))
            .status()
            .expect("random data");
        assert!(status.success());
        layout.add_layer_from_dir(from, layer, &dir).expect("a big layer");
    }
    let source_digest = layout
        .push("b", &upstream, "upstream/big:1")
        .expect("push to the upstream registry");
    let manifest = skopeo_inspect_raw(&upstream, "upstream/big:1").expect("the source manifest");
    let first_big_layer = manifest["layers"][1]["digest"]
        .as_str()
        .expect("a layer digest")
        .to_owned();
    let lab = format!("{}/lab", lab_registry.host());
    let args = ["--lab-registry", &lab, "--plain-http-sources", &upstream.host()];
    let mut leader = start_operator(cluster, &namespace, "clone-a", &args);
    leader.wait_ready(Duration::from_mins(1));
    let standby = start_operator(cluster, &namespace, "clone-b", &args);
    apply(
        cluster,
        &namespace,
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: big\nspec:\n  source: {}\n  platform:\n    architecture: amd64\n",
            upstream.reference("upstream/big:1")
        ),
    );
    // busybox and the first big layer copied: the second is on its way.
    Wait::new("two blobs of the clone copied", Duration::from_mins(3))
        .every(Duration::from_millis(100))
        .until(|| {
            let copied = kubectl(
                cluster,
                &namespace,
                &["get", "image/big", "-o", "jsonpath={.status.clone.copiedBlobs}"],
            );
            Ok::<_, String>(if copied.trim().parse::<u32>().unwrap_or(0) >= 2 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("copiedBlobs {copied:?}"))
            })
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", leader.log()));
    upstream.freeze().expect("freeze the upstream registry");
    leader.kill();
    let killed_at = lab_registry.log_mark();
    let tag = format!("{lab}/{namespace}/big:latest");
    assert!(
        skopeo_digest(&tag).is_err(),
        "a tag moved although the clone was interrupted"
    );
    upstream.thaw().expect("thaw the upstream registry");
    wait_for(
        cluster,
        &namespace,
        "image/big",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
        Duration::from_mins(3),
        &standby,
    );
    assert_eq!(skopeo_digest(&tag), Ok(source_digest.clone()));
    assert_eq!(
        kubectl(
            cluster,
            &namespace,
            &["get", "image/big", "-o", "jsonpath={.status.digest}"]
        )
        .trim(),
        source_digest
    );
    let holder = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "lease",
            "walt-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    assert_eq!(holder.trim(), "clone-b", "the standby leads");
    let after = lab_registry.requests_to(&format!("lab/{namespace}/big/blobs"), killed_at);
    assert!(
        after
            .iter()
            .any(|line| line.contains("HEAD") && line.contains(&first_big_layer) && line.contains("\" 200 ")),
        "the standby found the leader's blob in the lab registry: {after:?}"
    );
    let resent: Vec<&String> = after
        .iter()
        .filter(|line| line.contains("PUT") && line.contains(&first_big_layer))
        .collect();
    assert!(
        resent.is_empty(),
        "the standby sent again a blob the leader had copied: {resent:?}"
    );
    assert!(
        after.iter().any(|line| line.contains("PUT")),
        "the standby copied the rest: {after:?}"
    );
}

/// The operator killed (SIGKILL) while an image shell's pod commits the user's changes: the pod's
/// result is not lost. The pod ends while no operator runs; the restarted operator reads the result
/// from the pod, moves the `saveAs` name to the committed digest once, creates its Image and deletes
/// the pod. The test plays the kubelet for the pod's end (a digest already in the registry).
#[test]
fn operator_killed_while_a_shell_commits_saves_the_result_after_restart() {
    let node = walt_tests::sshnode::SshNode::busybox()
        .expect("start an sshd node (needs root, openssh-server, socat, iproute2)");
    let mut lab = SaveLab::start("op-commitkill", node);
    let cluster = cluster();
    let within = Duration::from_mins(1);
    apply(
        cluster,
        &lab.namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: sh}\n\
         spec: {image: debian, saveAs: committed, ttl: 10m}\n",
    );
    let pod = "pod/walt-shell-sh";
    let runtime = walt_crds::runtime_namespace(&lab.namespace);
    Wait::new("the shell pod", within)
        .every(Duration::from_millis(250))
        .until(|| {
            cluster
                .kubectl_output(&["-n", &runtime, "get", pod, "-o", "name"])
                .is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", lab.operator.log()));
    lab.operator.kill();
    end_shell_pod(&lab, "sh", &lab.base_digest);
    let tag = lab
        .registry
        .reference(&format!("lab/{}/committed:latest", lab.namespace));
    assert!(skopeo_digest(&tag).is_err(), "no operator ran to move the tag");
    lab.operator.restart();
    lab.wait(
        "shellsession/sh",
        "{.status.phase}",
        "Saved",
        Duration::from_mins(2),
    );
    assert_eq!(skopeo_digest(&tag), Ok(lab.base_digest.clone()));
    lab.wait("image/committed", "{.status.digest}", &lab.base_digest, within);
    Wait::new("the finished shell's pod to be deleted", within)
        .every(Duration::from_millis(250))
        .until(|| {
            cluster
                .kubectl_output(&["-n", &runtime, "get", pod, "-o", "name"])
                .is_err()
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", lab.operator.log()));
}

/// The operator's host clock 10 minutes ahead of the API server's (libfaketime): session lifetimes
/// follow the API server's clock. An image shell with a 5-minute ttl starts and runs instead of
/// expiring at once (its age, read on the operator's clock, would be 10 minutes), the times the
/// operator writes into its status are the API server's, and the operator says it saw the offset.
#[test]
fn an_operator_clock_ten_minutes_ahead_keeps_session_lifetimes_right() {
    use walt_tests::images::{Arch, OciLayout};
    use walt_tests::registry::Registry;
    let cluster = cluster();
    let (namespace, dir) = tenant(cluster, "op-skew");
    let registry = Registry::start().expect("start the lab registry");
    let digest = OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, &format!("lab/{namespace}/debian:latest"))
        .expect("push the base image");
    // The operator binary under libfaketime (CLOCK_REALTIME and the monotonic clock shifted alike).
    let wrapper = dir.path().join("walt-operator-ahead");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec faketime -f +600s {} \"$@\"\n",
            operator_binary().display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the wrapper executable");
    let lab = format!("{}/lab", registry.host());
    let operator = Operator::start_binary(
        &wrapper,
        &cluster.kubeconfig(),
        None,
        &operator_args(&namespace, "skewed", &["--lab-registry", &lab]),
        &std::env::temp_dir().join(format!("walt-operator-{namespace}-skewed.log")),
    )
    .expect("start walt-operator under faketime");
    operator.wait_ready(Duration::from_mins(1));
    apply(
        cluster,
        &namespace,
        "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {name: debian}\nspec: {}\n---\n\
         apiVersion: walt.dev/v1alpha1\nkind: ShellSession\nmetadata: {name: sh}\n\
         spec: {image: debian, ttl: 5m}\n",
    );
    wait_for(
        cluster,
        &namespace,
        "image/debian",
        "{.status.digest}",
        &digest,
        Duration::from_mins(1),
        &operator,
    );
    Wait::new("the shell pod", Duration::from_mins(1))
        .every(Duration::from_millis(250))
        .until(|| {
            cluster
                .kubectl_output(&[
                    "-n",
                    &walt_crds::runtime_namespace(&namespace),
                    "get",
                    "pod/walt-shell-sh",
                    "-o",
                    "name",
                ])
                .is_ok()
        })
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", operator.log()));
    std::thread::sleep(Duration::from_secs(3));
    let times = kubectl(
        cluster,
        &namespace,
        &[
            "get",
            "shellsession/sh",
            "-o",
            "jsonpath={.status.phase} {.metadata.creationTimestamp} {.status.startTime}",
        ],
    );
    let fields: Vec<&str> = times.split_whitespace().collect();
    assert!(
        matches!(fields.first(), Some(&("Starting" | "Running"))),
        "a 5-minute session lives although the operator's clock is 10 minutes ahead: {times}\n{}",
        operator.log()
    );
    if let [_, created, started] = fields[..] {
        let created: k8s_openapi::jiff::Timestamp = created.parse().expect("creationTimestamp");
        let started: k8s_openapi::jiff::Timestamp = started.parse().expect("startTime");
        let apart = started.duration_since(created).as_secs();
        assert!(
            (-5..=120).contains(&apart),
            "startTime is on the API server's clock ({apart} s after creation, not 600): {times}"
        );
    }
    assert!(
        operator
            .log()
            .contains("the API server's clock is 600 s behind the operator's")
            || operator
                .log()
                .contains("the API server's clock is 599 s behind the operator's"),
        "the operator says what it measured:\n{}",
        operator.log()
    );
}
