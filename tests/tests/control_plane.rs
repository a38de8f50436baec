//! Control plane tier: a real etcd + kube-apiserver (+ controller manager, scheduler) started by
//! the harness, checked with kubectl (an independent client) and kube-rs.

use std::path::{Path, PathBuf};

use walt_tests::deploy;
use walt_tests::k8s::{Cluster, DEFAULT_USERS, run_kubectl, shared_control_plane};
use walt_tests::operator::{OperatorProcess, operator_binary};
use walt_tests::process::{Daemon, Lifetime};
use walt_tests::wait::{Poll, wait_for};

fn cluster() -> &'static Cluster {
    match shared_control_plane() {
        Ok(cluster) => cluster,
        Err(e) => panic!("cannot start the control plane: {e}"),
    }
}

fn groups(user: &str) -> &'static [&'static str] {
    DEFAULT_USERS
        .iter()
        .find(|(name, _)| *name == user)
        .map(|(_, groups)| *groups)
        .expect("a default user")
}

#[test]
fn readyz_is_ok() {
    let out = cluster()
        .kubectl_output(&["get", "--raw", "/readyz"])
        .expect("kubectl get --raw /readyz");
    assert_eq!(out.trim(), "ok");
    let version = cluster()
        .kubectl_output(&["version", "-o", "json"])
        .expect("kubectl version");
    let version: serde_json::Value = serde_json::from_str(&version).expect("version JSON");
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        walt_tests::k8s::binaries::PINNED_VERSION,
        "the API server reports the pinned release"
    );
}

#[test]
fn controller_manager_creates_service_accounts() {
    let cluster = cluster();
    let ns = cluster.create_namespace("sa").expect("create namespace");
    let out = wait_for(
        &format!("the default service account in {ns}"),
        std::time::Duration::from_mins(1),
        || match cluster.kubectl_output(&["get", "-n", &ns, "serviceaccount/default", "-o", "name"]) {
            Ok(out) => Poll::Ready(out),
            Err(e) => Poll::Pending(e.to_string()),
        },
    )
    .unwrap();
    assert_eq!(out.trim(), "serviceaccount/default");
}

#[test]
fn alice_cannot_read_bobs_namespace() {
    let cluster = cluster();
    let alice_ns = cluster.create_namespace("alice").expect("create namespace");
    let bob_ns = cluster.create_namespace("bob").expect("create namespace");
    for (user, ns) in [("alice", &alice_ns), ("bob", &bob_ns)] {
        cluster
            .kubectl_output(&[
                "create",
                "rolebinding",
                &format!("{user}-edit"),
                "--clusterrole=edit",
                &format!("--user={user}"),
                "-n",
                ns,
            ])
            .expect("bind the edit role");
    }
    cluster
        .kubectl_output(&[
            "create",
            "configmap",
            "secret-plans",
            "-n",
            &bob_ns,
            "--from-literal=x=1",
        ])
        .expect("create bob's configmap");

    let as_user = |user: &str| cluster.kubectl_as(user, groups(user)).expect("user kubeconfig");
    // Bob reads his namespace; Alice reads hers but not Bob's: the API server says why.
    let bobs = run_kubectl(
        as_user("bob"),
        &["get", "configmap", "secret-plans", "-n", &bob_ns, "-o", "name"],
    )
    .expect("bob reads his own namespace");
    assert_eq!(bobs.trim(), "configmap/secret-plans");
    run_kubectl(as_user("alice"), &["get", "configmaps", "-n", &alice_ns])
        .expect("alice reads her own namespace");
    let refused = run_kubectl(
        as_user("alice"),
        &["get", "configmap", "secret-plans", "-n", &bob_ns],
    )
    .expect_err("alice must not read bob's namespace");
    let message = refused.to_string();
    assert!(
        message.contains("Forbidden") && message.contains(r#"User "alice" cannot get resource "configmaps""#),
        "unexpected refusal: {message}"
    );
    let who = run_kubectl(
        as_user("alice"),
        &["auth", "whoami", "-o", "jsonpath={.status.userInfo.groups}"],
    )
    .expect("kubectl auth whoami");
    assert!(
        who.contains("walt-users") && who.contains("team-alice"),
        "groups: {who}"
    );

    // The same through kube-rs, which the operator and plugin use.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let alice = cluster
            .user_client("alice", groups("alice"))
            .await
            .expect("alice client");
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(alice, &bob_ns);
        match api.get("secret-plans").await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("alice read bob's configmap through kube-rs: {other:?}"),
        }
    });
}

#[test]
fn owned_control_plane_stops_when_dropped() {
    let cluster = Cluster::start(walt_tests::k8s::ClusterOptions::control_plane())
        .unwrap_or_else(|e| panic!("cannot start a control plane: {e}"));
    let state: walt_tests::k8s::State =
        serde_json::from_str(&std::fs::read_to_string(cluster.dir().join("state.json")).expect("state.json"))
            .expect("state");
    let dir = cluster.dir().to_path_buf();
    assert!(
        state
            .pids
            .iter()
            .all(|(_, pid)| walt_tests::process::pid_alive(*pid))
    );
    drop(cluster);
    for (name, pid) in &state.pids {
        assert!(
            !walt_tests::process::pid_alive(*pid),
            "{name} (PID {pid}) still runs"
        );
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

/// `kubectl ARGS` with `input` on stdin, as admin.
fn kubectl_stdin(cluster: &Cluster, args: &[&str], input: &str) -> Result<String, String> {
    use std::io::Write as _;
    let mut child = cluster
        .kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write kubectl input");
    let out = child.wait_with_output().expect("kubectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn walt_crds_apply_and_the_api_server_validates_the_examples() {
    let cluster = cluster();
    let crds = walt_crds::crds();
    assert_eq!(
        crds.len(),
        6,
        "Image, Node, ShellSession, NodeSave, ImageBuild, Device"
    );
    kubectl_stdin(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        &walt_crds::crds_yaml(),
    )
    .unwrap_or_else(|e| panic!("the API server refused the walt CRDs: {e}"));
    for crd in &crds {
        let name = crd.metadata.name.as_deref().expect("CRD name");
        cluster
            .kubectl_output(&[
                "wait",
                "--for=condition=Established",
                &format!("crd/{name}"),
                "--timeout=60s",
            ])
            .unwrap_or_else(|e| panic!("{name} is not Established: {e}"));
    }

    // Every valid example is accepted as it is.
    let valid_ns = cluster.create_namespace("examples").expect("namespace");
    let valid = walt_crds::examples::valid_examples().expect("list the valid examples");
    assert!(!valid.is_empty(), "no valid examples in deploy/examples");
    for path in &valid {
        let file = path.to_string_lossy();
        cluster
            .kubectl_output(&["create", "-n", &valid_ns, "-f", &file])
            .unwrap_or_else(|e| panic!("the API server refused the valid example {file}: {e}"));
    }
    let listed = cluster
        .kubectl_output(&["get", "walt", "-n", &valid_ns, "-o", "name"])
        .expect("kubectl get walt (the category)");
    // Devices are cluster-scoped: `get walt -n` lists every Device of the cluster besides the namespace's.
    let namespaced = listed
        .lines()
        .filter(|line| !line.starts_with("device.walt.dev/"))
        .count();
    let devices = valid
        .iter()
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("device-"))
        })
        .count();
    assert_eq!(namespaced, valid.len() - devices, "kubectl get walt: {listed}");

    // Every invalid example is refused by the API server, with the message it documents.
    let invalid = walt_crds::examples::invalid_examples().expect("list the invalid examples");
    assert!(
        !invalid.is_empty(),
        "no invalid examples in deploy/examples/invalid"
    );
    let mut failures = Vec::new();
    for example in &invalid {
        let file = example.path.to_string_lossy().into_owned();
        let ns = cluster.create_namespace("invalid").expect("namespace");
        let verb = if let Some(base) = &example.update_of {
            let base = base.to_string_lossy();
            if let Err(e) = cluster.kubectl_output(&["create", "-n", &ns, "-f", &base]) {
                failures.push(format!("{file}: its base {base} was refused: {e}"));
                continue;
            }
            "apply"
        } else {
            "create"
        };
        match cluster.kubectl_output(&[verb, "-n", &ns, "-f", &file]) {
            Ok(out) => failures.push(format!("{file}: accepted ({})", out.trim())),
            Err(e) => {
                let message = e.to_string();
                // kubectl words what the server answered: "The Node "x" is invalid: …" (422) or
                // "Error from server (…)"; a client-side refusal would say neither.
                let from_server = message.contains("is invalid") || message.contains("Error from server");
                if !from_server || !message.contains(&example.expect) {
                    failures.push(format!(
                        "{file}: expected the API server to say {:?}, got: {message}",
                        example.expect
                    ));
                }
            }
        }
        let _ = cluster.kubectl_output(&["delete", "namespace", &ns, "--wait=false"]);
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid examples misbehave:\n{}",
        failures.len(),
        invalid.len(),
        failures.join("\n")
    );
}

/// The chart's objects of these `kinds` (`helm template` with `args`), as one YAML stream.
fn chart_objects(args: &[&str], kinds: &[&str], keep: impl Fn(&serde_json::Value) -> bool) -> String {
    walt_tests::deploy::render_chart(args)
        .expect("helm template")
        .iter()
        .filter(|doc| kinds.iter().any(|kind| doc["kind"].as_str() == Some(kind)) && keep(doc))
        .map(|doc| serde_saphyr::to_string(doc).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `kubectl ARGS` as `user` (a default user of the harness) with `input` on stdin.
fn kubectl_as_stdin(cluster: &Cluster, user: &str, args: &[&str], input: &str) -> Result<String, String> {
    use std::io::Write as _;
    let mut child = cluster
        .kubectl_as(user, groups(user))
        .expect("a user's kubeconfig")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write kubectl input");
    let out = child.wait_with_output().expect("kubectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Issue 15, registry paths confined, at admission: with the chart's ValidatingAdmissionPolicy
/// `…-registry-paths` on the real API server, alice (walt-edit in her namespace) cannot make an Image
/// that reads bob's path of the lab registry, clones from it, clones into it or into the catalog, or
/// sneaks out of her path with `..`; nor move an Image of hers there later. Each attempt is refused
/// with a message that says what to do and leaves no object behind; her own path, the catalog (read)
/// and registries outside the lab stay usable.
#[test]
fn alice_cannot_point_an_image_at_bobs_registry_path_or_write_the_catalog() {
    let cluster = cluster();
    kubectl_stdin(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        &walt_crds::crds_yaml(),
    )
    .unwrap_or_else(|e| panic!("the API server refused the walt CRDs: {e}"));
    cluster
        .kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "crd/images.walt.dev",
            "--timeout=60s",
        ])
        .expect("the Image CRD is served");
    let alice = cluster.create_namespace("alice-reg").expect("namespace");
    let bob = cluster.create_namespace("bob-reg").expect("namespace");
    let catalog = cluster.create_namespace("catalog-reg").expect("namespace");
    let lab = "registry.lab.test:5000";
    let args = [
        "--namespace",
        alice.as_str(),
        "--set",
        &format!("fullnameOverride={alice}"),
        "--set",
        "registry.embedded.enabled=false",
        "--set",
        &format!("registry.external={lab}"),
        "--set",
        &format!("operator.catalogNamespace={catalog}"),
    ];
    let roles = chart_objects(&[], &["ClusterRole"], |doc| {
        doc["metadata"]["name"]
            .as_str()
            .is_some_and(|name| ["walt-view", "walt-edit", "walt-admin"].contains(&name))
    });
    kubectl_stdin(cluster, &["apply", "--server-side", "-f", "-"], &roles).expect("the chart's user roles");
    cluster
        .kubectl_output(&[
            "-n",
            &alice,
            "create",
            "rolebinding",
            "alice",
            "--clusterrole=walt-edit",
            "--user=alice",
        ])
        .expect("alice edits her namespace");
    // The policy as the chart ships it, bound to alice's namespace only (other tests share the API server).
    let mut policy = chart_objects(
        &args,
        &["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"],
        |doc| doc["metadata"]["name"].as_str() == Some(&format!("{alice}-registry-paths")),
    );
    assert!(
        policy.contains("kind: ValidatingAdmissionPolicyBinding"),
        "{policy}"
    );
    policy = policy.replace(
        "  validationActions:",
        &format!(
            "  matchResources:\n    namespaceSelector:\n      matchLabels:\n        kubernetes.io/metadata.name: {alice}\n  validationActions:"
        ),
    );
    policy.push_str("---\n");
    policy.push_str(&chart_objects(&args, &["ConfigMap"], |doc| {
        doc["metadata"]["name"].as_str() == Some(&format!("{alice}-registry-paths"))
    }));
    kubectl_stdin(cluster, &["apply", "-f", "-"], &policy).expect("apply the registry paths policy");

    let image = |name: &str, spec: &str| {
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: {name}, namespace: {alice}}}\nspec: {spec}\n"
        )
    };
    let create = |name: &str, spec: &str| {
        kubectl_as_stdin(cluster, "alice", &["create", "-f", "-"], &image(name, spec))
    };
    // The policy takes a moment to be in force.
    let bobs = format!("{lab}/walt/{bob}/secret:latest");
    let refused = wait_for(
        "the admission policy to refuse alice's Image on bob's path",
        std::time::Duration::from_mins(1),
        || match create("peek", &format!("{{reference: {bobs}}}")) {
            Err(refused) => Poll::Ready(refused),
            Ok(out) => {
                let _ = cluster.kubectl_output(&["-n", &alice, "delete", "image", "peek"]);
                Poll::Pending(out)
            }
        },
    )
    .unwrap();
    let own = format!("{lab}/walt/{alice}/");
    assert!(
        refused.contains(&format!(
            "spec.reference {bobs} is outside the registry path of namespace {alice}"
        )) && refused.contains(&format!("reads only its own images under {own}"))
            && refused.contains(&format!(
                "leave spec.reference empty for the default {own}NAME:TAG"
            )),
        "{refused}"
    );
    let attacks = [
        (
            "clone-bob",
            format!("{{source: {bobs}}}"),
            format!("spec.source {bobs} is outside the registry path of namespace {alice}"),
        ),
        (
            "into-bob",
            format!("{{source: docker.io/library/busybox:1, reference: {bobs}}}"),
            format!("spec.reference {bobs} is outside the registry path"),
        ),
        (
            "into-catalog",
            format!("{{source: docker.io/library/busybox:1, reference: {lab}/walt/{catalog}/busybox:1}}"),
            "is the lab's shared catalog, read-only to tenants".to_owned(),
        ),
        (
            "dot-dot",
            format!("{{reference: {own}../{bob}/secret:latest}}"),
            "is outside the registry path".to_owned(),
        ),
        (
            "other-prefix",
            format!("{{reference: {lab}/{alice}/x:1}}"),
            "is outside the registry path".to_owned(),
        ),
        (
            "host-in-capitals",
            format!("{{reference: REGISTRY.LAB.TEST:5000/walt/{bob}/secret:latest}}"),
            "is outside the registry path".to_owned(),
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, expect) in &attacks {
        match create(name, spec) {
            Ok(out) => failures.push(format!("{name} ({spec}) was admitted: {out}")),
            Err(refused) if !refused.contains(expect.as_str()) => {
                failures.push(format!("{name} ({spec}): expected {expect:?}, got {refused}"));
            }
            Err(_) => {}
        }
    }
    // What stays hers to do: her own path, reading the catalog, cloning from it, registries outside the lab.
    for (name, spec) in [
        ("mine", format!("{{reference: {own}debian:12}}")),
        ("defaulted", "{}".to_owned()),
        (
            "from-catalog",
            format!("{{reference: {lab}/walt/{catalog}/debian:12}}"),
        ),
        (
            "clone-catalog",
            format!("{{source: {lab}/walt/{catalog}/debian:12}}"),
        ),
        ("upstream", "{reference: docker.io/library/debian:12}".to_owned()),
    ] {
        if let Err(refused) = create(name, &spec) {
            failures.push(format!("{name} ({spec}) was refused: {refused}"));
        }
    }
    // Moving an admitted Image onto bob's path later is refused too.
    match kubectl_as_stdin(
        cluster,
        "alice",
        &[
            "-n",
            &alice,
            "patch",
            "image",
            "mine",
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"reference\":\"{bobs}\"}}}}"),
        ],
        "",
    ) {
        Ok(out) => failures.push(format!("moving mine to bob's path was admitted: {out}")),
        Err(refused) if !refused.contains("is outside the registry path") => {
            failures.push(format!("moving mine to bob's path: {refused}"));
        }
        Err(_) => {}
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing left behind: only the Images she may have, unchanged.
    let left = cluster
        .kubectl_output(&[
            "-n",
            &alice,
            "get",
            "images",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.reference} {end}",
        ])
        .expect("list alice's Images");
    let mut left: Vec<&str> = left.split_whitespace().collect();
    left.sort_unstable();
    assert_eq!(
        left,
        [
            "clone-catalog=".to_owned(),
            "defaulted=".to_owned(),
            format!("from-catalog={lab}/walt/{catalog}/debian:12"),
            format!("mine={own}debian:12"),
            "upstream=docker.io/library/debian:12".to_owned(),
        ],
        "alice's Images after the attacks"
    );
    let bobs_objects = cluster
        .kubectl_output(&["-n", &bob, "get", "walt", "-o", "name"])
        .expect("list bob's objects");
    assert!(
        bobs_objects
            .lines()
            .all(|line| line.starts_with("device.walt.dev/")),
        "{bobs_objects}"
    );
    let _ = kubectl_stdin(cluster, &["delete", "-f", "-"], &policy);
}

/// Issue 15, saves confined, at admission: with the chart's `…-save-targets` policy on the real API
/// server, alice (walt-edit) cannot point an image shell's `saveAs` or a NodeSave's `image` at an
/// Image of hers whose reference is the catalog (which she may read) or bob's path (an Image made
/// before the lab installed the policies), at creation or by a later change; each refusal says
/// which Image, which path and what to do, and leaves nothing behind. Saves under her own path and
/// under new names stay admitted.
#[test]
fn alice_cannot_save_a_shell_or_a_node_into_bobs_path_or_the_catalog() {
    let started = std::time::Instant::now();
    let cluster = cluster();
    kubectl_stdin(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        &walt_crds::crds_yaml(),
    )
    .unwrap_or_else(|e| panic!("the API server refused the walt CRDs: {e}"));
    for crd in ["images", "shellsessions", "nodesaves"] {
        cluster
            .kubectl_output(&[
                "wait",
                "--for=condition=Established",
                &format!("crd/{crd}.walt.dev"),
                "--timeout=60s",
            ])
            .expect("the walt CRDs are served");
    }
    let alice = cluster.create_namespace("alice-save").expect("namespace");
    let bob = cluster.create_namespace("bob-save").expect("namespace");
    let catalog = cluster.create_namespace("catalog-save").expect("namespace");
    let lab = "registry.lab.test:5000";
    let own = format!("{lab}/walt/{alice}/");
    let bobs = format!("{lab}/walt/{bob}/secret:latest");
    let shared = format!("{lab}/walt/{catalog}/debian:12");
    // An Image on bob's path made before the lab installed walt's policies.
    kubectl_stdin(
        cluster,
        &["create", "-f", "-"],
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: planted, namespace: {alice}}}\nspec: {{reference: {bobs}}}\n"
        ),
    )
    .expect("create the planted Image");
    let args = [
        "--namespace",
        alice.as_str(),
        "--set",
        &format!("fullnameOverride={alice}"),
        "--set",
        "registry.embedded.enabled=false",
        "--set",
        &format!("registry.external={lab}"),
        "--set",
        &format!("operator.catalogNamespace={catalog}"),
    ];
    let roles = chart_objects(&[], &["ClusterRole"], |doc| {
        doc["metadata"]["name"]
            .as_str()
            .is_some_and(|name| ["walt-view", "walt-edit", "walt-admin"].contains(&name))
    });
    kubectl_stdin(cluster, &["apply", "--server-side", "-f", "-"], &roles).expect("the chart's user roles");
    cluster
        .kubectl_output(&[
            "-n",
            &alice,
            "create",
            "rolebinding",
            "alice",
            "--clusterrole=walt-edit",
            "--user=alice",
        ])
        .expect("alice edits her namespace");
    // The chart's policies, bound to alice's namespace only (other tests share the API server).
    let names = [format!("{alice}-registry-paths"), format!("{alice}-save-targets")];
    let mut policy = chart_objects(
        &args,
        &["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"],
        |doc| {
            doc["metadata"]["name"]
                .as_str()
                .is_some_and(|name| names.iter().any(|wanted| wanted == name))
        },
    );
    assert_eq!(
        policy.matches("kind: ValidatingAdmissionPolicyBinding").count(),
        2,
        "{policy}"
    );
    policy = policy.replace(
        "  validationActions:",
        &format!(
            "  matchResources:\n    namespaceSelector:\n      matchLabels:\n        kubernetes.io/metadata.name: {alice}\n  validationActions:"
        ),
    );
    policy.push_str("---\n");
    policy.push_str(&chart_objects(&args, &["ConfigMap"], |doc| {
        doc["metadata"]["name"].as_str() == Some(&format!("{alice}-registry-paths"))
    }));
    kubectl_stdin(cluster, &["apply", "-f", "-"], &policy).expect("apply the policies");

    let as_alice = |verb: &[&str], yaml: &str| {
        let mut all = vec!["-n", alice.as_str()];
        all.extend_from_slice(verb);
        all.extend_from_slice(&["-f", "-"]);
        kubectl_as_stdin(cluster, "alice", &all, yaml)
    };
    let object = |kind: &str, name: &str, spec: &str| {
        format!("apiVersion: walt.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    // Hers to read: the catalog; hers to write: her own path.
    as_alice(
        &["create"],
        &object("Image", "shared", &format!("{{reference: {shared}}}")),
    )
    .expect("alice may read the catalog");
    as_alice(
        &["create"],
        &object("Image", "mine", &format!("{{reference: {own}debian:12}}")),
    )
    .expect("alice may use her own path");
    let onto_catalog = object("ShellSession", "onto-catalog", "{image: mine, saveAs: shared}");
    let refused = wait_for(
        "the save-targets policy to refuse a shell saved onto the catalog",
        std::time::Duration::from_mins(1),
        || match as_alice(&["create"], &onto_catalog) {
            Err(refused) => Poll::Ready(refused),
            Ok(out) => {
                let _ = cluster.kubectl_output(&["-n", &alice, "delete", "shellsession", "onto-catalog"]);
                Poll::Pending(out)
            }
        },
    )
    .unwrap();
    assert!(
        refused.contains(&format!(
            "spec.saveAs shared names the Image shared, whose spec.reference {shared} is outside the registry path of namespace {alice}"
        )) && refused.contains("is the lab's shared catalog, read-only to tenants")
            && refused.contains(&format!("save under another image name (it goes to {own}NAME:TAG)")),
        "{refused}"
    );
    let mut failures = Vec::new();
    for (what, yaml, expect) in [
        (
            "a shell saved onto bob's path",
            object("ShellSession", "onto-bob", "{image: mine, saveAs: planted}"),
            format!("spec.saveAs planted names the Image planted, whose spec.reference {bobs} is outside"),
        ),
        (
            "a shell saved onto the catalog with the tag written",
            object(
                "ShellSession",
                "onto-catalog-tag",
                "{image: mine, saveAs: \"shared:latest\"}",
            ),
            "names the Image shared".to_owned(),
        ),
        (
            "a node save over the catalog",
            object(
                "NodeSave",
                "over-catalog",
                "{node: n1, image: shared, overwrite: true}",
            ),
            format!("spec.image shared names the Image shared, whose spec.reference {shared} is outside"),
        ),
        (
            "a node save over bob's path",
            object(
                "NodeSave",
                "over-bob",
                "{node: n1, image: planted, overwrite: true}",
            ),
            format!("spec.image planted names the Image planted, whose spec.reference {bobs} is outside"),
        ),
    ] {
        match as_alice(&["create"], &yaml) {
            Ok(out) => failures.push(format!("{what} was admitted: {out}")),
            Err(refused) if !refused.contains(&expect) => {
                failures.push(format!("{what}: expected {expect:?}, got {refused}"));
            }
            Err(_) => {}
        }
    }
    // A shell admitted without a decision cannot decide for the catalog later.
    as_alice(&["create"], &object("ShellSession", "later", "{image: mine}")).expect("a shell on her image");
    match kubectl_as_stdin(
        cluster,
        "alice",
        &[
            "-n",
            &alice,
            "patch",
            "shellsession",
            "later",
            "--type=merge",
            "-p",
            "{\"spec\":{\"saveAs\":\"shared\"}}",
        ],
        "",
    ) {
        Ok(out) => failures.push(format!("deciding to save onto the catalog was admitted: {out}")),
        Err(refused) if !refused.contains("names the Image shared") => {
            failures.push(format!("deciding to save onto the catalog: {refused}"));
        }
        Err(_) => {}
    }
    // Hers to do: save under her own path, or under a new name.
    for (what, yaml) in [
        (
            "a shell saved as her own image",
            object("ShellSession", "own", "{image: shared, saveAs: mine}"),
        ),
        (
            "a shell saved as a new name",
            object("ShellSession", "fresh", "{image: mine, saveAs: \"fresh:v1\"}"),
        ),
        (
            "a node save as a new name",
            object("NodeSave", "copy", "{node: n1, image: \"mine:v2\"}"),
        ),
    ] {
        if let Err(refused) = as_alice(&["create", "--dry-run=server"], &yaml) {
            failures.push(format!("{what} was refused: {refused}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing left behind: the one undecided shell.
    let left = cluster
        .kubectl_output(&[
            "-n",
            &alice,
            "get",
            "shellsessions,nodesaves",
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name}:{.spec.saveAs} {end}",
        ])
        .expect("list alice's sessions and saves");
    assert_eq!(
        left.trim(),
        "ShellSession/later:",
        "alice's objects after the attacks"
    );
    let _ = kubectl_stdin(cluster, &["delete", "-f", "-"], &policy);
    eprintln!(
        "alice_cannot_save_a_shell_or_a_node_into_bobs_path_or_the_catalog: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Issue 15, no credential for tenants to read: alice holds everything the README tells a lab to
/// grant a tenant (`edit` in her namespace, which aggregates walt-edit; the gateway's port-forward
/// Role in the release namespace; walt-device-viewer), and the API server still refuses her every
/// Secret that holds a node or lab registry credential: the node key, the registry token key and the
/// lab credential in the release namespace, bob's registry credential, any Secret listed across
/// namespaces. (Her pods' `walt-registry-credentials` is in her runtime namespace `walt-run-<her
/// namespace>`, which she cannot read, and holds only `tenant/<her namespace>`, see
/// `the_operator_issues_registry_tokens_and_a_namespace_gets_only_its_own_credential`.)
#[test]
fn alice_reads_no_secret_with_a_registry_or_node_credential() {
    let started = std::time::Instant::now();
    let cluster = cluster();
    let system = cluster.create_namespace("walt-sys-sec").expect("namespace");
    let alice = cluster.create_namespace("alice-sec").expect("namespace");
    let bob = cluster.create_namespace("bob-sec").expect("namespace");
    let args = [
        "--namespace",
        system.as_str(),
        "--set",
        &format!("fullnameOverride={system}"),
    ];
    let gateway_role = format!("{system}-gateway-forward");
    let roles = chart_objects(&args, &["ClusterRole", "Role"], |doc| {
        doc["metadata"]["name"].as_str().is_some_and(|name| {
            ["walt-view", "walt-edit", "walt-admin", "walt-device-viewer"].contains(&name)
                || name == gateway_role
        })
    });
    assert_eq!(roles.matches("kind: Role\n").count(), 1, "{roles}");
    kubectl_stdin(cluster, &["apply", "--server-side", "-f", "-"], &roles).expect("the chart's roles");
    // The Secrets the operator keeps (or writes into a namespace), with stand-in contents.
    let secrets = [
        (system.as_str(), "walt-node-key".to_owned()),
        (system.as_str(), format!("{system}-registry-token")),
        (system.as_str(), "walt-registry-credentials".to_owned()),
        (bob.as_str(), "walt-registry-credentials".to_owned()),
    ];
    for (namespace, name) in &secrets {
        cluster
            .kubectl_output(&[
                "-n",
                namespace,
                "create",
                "secret",
                "generic",
                name,
                "--from-literal=password=do-not-leak",
            ])
            .expect("create a Secret");
    }
    for (namespace, binding) in [
        (
            alice.as_str(),
            vec![
                "create",
                "rolebinding",
                "alice",
                "--clusterrole=edit",
                "--user=alice",
            ],
        ),
        (
            system.as_str(),
            vec![
                "create",
                "rolebinding",
                "alice-gateway",
                "--role",
                gateway_role.as_str(),
                "--user=alice",
            ],
        ),
    ] {
        let mut all = vec!["-n", namespace];
        all.extend(binding);
        cluster.kubectl_output(&all).expect("bind alice");
    }
    let viewer = format!("alice-devices-{system}");
    cluster
        .kubectl_output(&[
            "create",
            "clusterrolebinding",
            &viewer,
            "--clusterrole=walt-device-viewer",
            "--user=alice",
        ])
        .expect("alice sees the lab's devices");
    let as_alice = |args: &[&str]| {
        run_kubectl(
            cluster.kubectl_as("alice", groups("alice")).expect("kubeconfig"),
            args,
        )
    };
    // What she was given works (the check can fail): her namespace, the gateway's pods.
    as_alice(&["-n", &alice, "get", "secrets"]).expect("alice reads her own namespace's Secrets");
    as_alice(&["-n", &system, "get", "pods"]).expect("alice finds the gateway's pods");
    let mut leaks = Vec::new();
    for (namespace, name) in &secrets {
        match as_alice(&["-n", namespace, "get", "secret", name, "-o", "jsonpath={.data}"]) {
            Ok(data) => leaks.push(format!("{namespace}/{name}: {data}")),
            Err(refused) if !refused.to_string().contains("Forbidden") => {
                leaks.push(format!("{namespace}/{name}: unexpected {refused}"));
            }
            Err(_) => {}
        }
    }
    for args in [
        vec!["get", "secrets", "--all-namespaces"],
        vec!["-n", system.as_str(), "get", "secrets"],
        vec!["-n", bob.as_str(), "get", "secrets"],
    ] {
        if let Ok(out) = as_alice(&args) {
            leaks.push(format!("{args:?}: {out}"));
        }
    }
    for (verb, resource, namespace) in [
        ("get", "secrets", system.as_str()),
        ("list", "secrets", system.as_str()),
        ("watch", "secrets", system.as_str()),
        ("create", "pods/exec", system.as_str()),
        ("get", "secrets", bob.as_str()),
    ] {
        // `auth can-i` exits 0 for yes only.
        if let Ok(answer) = as_alice(&["auth", "can-i", verb, resource, "-n", namespace]) {
            leaks.push(format!("can-i {verb} {resource} -n {namespace}: {answer}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "alice reached credentials:\n{}",
        leaks.join("\n")
    );
    let _ = cluster.kubectl_output(&["delete", "clusterrolebinding", &viewer]);
    eprintln!(
        "alice_reads_no_secret_with_a_registry_or_node_credential: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A pod spec (as JSON) of one container `c` with `security` as its securityContext, `host_users` as
/// `spec.hostUsers` when given.
fn pod_json(name: &str, security: &serde_json::Value, host_users: Option<bool>) -> String {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": security}]},
    });
    if let Some(host_users) = host_users {
        pod["spec"]["hostUsers"] = serde_json::Value::Bool(host_users);
    }
    pod.to_string()
}

/// Issue 15, no privileged pods for tenants (design (b): walt's pods that need mount rights run in
/// an operator-owned runtime namespace per tenant). With alice's namespace at Pod Security
/// `baseline` (enforced) and the chart's roles on the real API server, alice (`edit`, which
/// aggregates walt-edit, in her namespace): is refused a privileged pod there by Pod Security, and
/// so is the user-namespaced pod design (a) would need (`hostUsers: false`, `SYS_ADMIN`, seccomp
/// `Unconfined`); may create no pod at all in her runtime namespace `walt-run-<alice>` (the
/// operator's, Pod Security `privileged`), nor exec into her shell pod there, nor read its Secrets;
/// may attach to her own session's pod but not to bob's; with walt-edit alone she has no pod right
/// at all in a namespace (shells, builds and virtual nodes need none there). The runtime namespaces and their attach
/// RoleBinding are made here as the operator makes them (checked against the real operator by
/// `controller::alices_shell_runs_in_her_runtime_namespace_and_goes_with_its_owner`).
#[test]
fn alice_runs_no_privileged_pod_and_attaches_only_to_her_own_sessions() {
    let started = std::time::Instant::now();
    let cluster = cluster();
    let system = cluster.create_namespace("walt-sys-psa").expect("namespace");
    let alice = cluster.create_namespace("alice-psa").expect("namespace");
    let bob = cluster.create_namespace("bob-psa").expect("namespace");
    let args = [
        "--namespace",
        system.as_str(),
        "--set",
        &format!("fullnameOverride={system}"),
    ];
    let attach_role = format!("{system}-session-attach");
    let roles = chart_objects(&args, &["ClusterRole"], |doc| {
        doc["metadata"]["name"].as_str().is_some_and(|name| {
            ["walt-view", "walt-edit", "walt-admin"].contains(&name) || name == attach_role
        })
    });
    assert_eq!(roles.matches("kind: ClusterRole\n").count(), 4, "{roles}");
    kubectl_stdin(cluster, &["apply", "--server-side", "-f", "-"], &roles).expect("the chart's roles");
    let mut tenants = Vec::new();
    for (user, tenant) in [("alice", alice.as_str()), ("bob", bob.as_str())] {
        cluster
            .kubectl_output(&[
                "label",
                "namespace",
                tenant,
                "pod-security.kubernetes.io/enforce=baseline",
            ])
            .expect("baseline");
        cluster
            .kubectl_output(&[
                "-n",
                tenant,
                "create",
                "rolebinding",
                user,
                "--clusterrole=edit",
                &format!("--user={user}"),
            ])
            .expect("bind the tenant");
        // What the operator makes for a tenant (controller/shared/runtime.rs): its runtime namespace,
        // the attach RoleBinding to the tenant's users, and a shell pod (privileged where the cluster
        // has no user namespaces).
        let runtime = walt_crds::runtime_namespace(tenant);
        let objects = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {runtime}\n  labels:\n    \
             app.kubernetes.io/managed-by: walt-operator\n    walt.dev/tenant: {tenant}\n    \
             pod-security.kubernetes.io/enforce: privileged\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: walt-session-attach, namespace: {runtime}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {attach_role}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: walt-shell-s1\n  namespace: {runtime}\n  labels:\n    \
             app.kubernetes.io/managed-by: walt-operator\n    walt.dev/owner-kind: ShellSession\n    \
             walt.dev/owner-namespace: {tenant}\n    walt.dev/owner-name: s1\n    walt.dev/owner-uid: u-{user}\n\
             spec:\n  containers: [{{name: shell, image: busybox, stdin: true, tty: true, securityContext: {{privileged: true}}}}]\n"
        );
        kubectl_stdin(cluster, &["apply", "-f", "-"], &objects).expect("the operator's objects");
        tenants.push(runtime);
    }
    let (alice_runtime, bob_runtime) = (tenants[0].clone(), tenants[1].clone());
    let as_alice_stdin = |args: &[&str], input: &str| kubectl_as_stdin(cluster, "alice", args, input);
    let mut wrong = Vec::new();
    // Her namespace at baseline: an ordinary pod passes (dry run: the check can fail) ...
    let plain = pod_json("plain", &serde_json::json!({}), None);
    if let Err(refused) = as_alice_stdin(&["-n", &alice, "create", "--dry-run=server", "-f", "-"], &plain) {
        wrong.push(format!(
            "an ordinary pod was refused in alice's namespace: {refused}"
        ));
    }
    // ... a privileged one, and the user-namespaced one of design (a), are refused by Pod Security.
    let refusals = [
        (
            "privileged",
            pod_json("root", &serde_json::json!({"privileged": true}), None),
            "privileged (container \"c\" must not set securityContext.privileged=true)",
        ),
        (
            "user-namespaced with SYS_ADMIN and seccomp Unconfined",
            pod_json(
                "userns",
                &serde_json::json!({"capabilities": {"add": ["SYS_ADMIN"]}, "seccompProfile": {"type": "Unconfined"}}),
                Some(false),
            ),
            "non-default capabilities (container \"c\" must not include \"SYS_ADMIN\" in securityContext.capabilities.add)",
        ),
    ];
    for (what, pod, words) in &refusals {
        match as_alice_stdin(&["-n", &alice, "create", "-f", "-"], pod) {
            Ok(out) => wrong.push(format!("alice created a {what} pod in her namespace: {out}")),
            Err(refused) => {
                eprintln!("alice's {what} pod: {}", refused.trim());
                if !(refused.contains("violates PodSecurity \"baseline:latest\"") && refused.contains(words))
                {
                    wrong.push(format!(
                        "the {what} pod was refused, but not by Pod Security saying {words:?}: {refused}"
                    ));
                }
            }
        }
    }
    if let Err(refused) = as_alice_stdin(
        &["-n", &alice, "create", "--dry-run=server", "-f", "-"],
        &pod_json(
            "unconfined",
            &serde_json::json!({"seccompProfile": {"type": "Unconfined"}}),
            None,
        ),
    ) {
        eprintln!("alice's seccomp-Unconfined pod: {}", refused.trim());
        if !refused.contains("seccompProfile (container \"c\" must not set securityContext.seccompProfile.type to \"Unconfined\")") {
            wrong.push(format!("seccomp Unconfined refused, but not by Pod Security: {refused}"));
        }
    } else {
        wrong.push("a seccomp-Unconfined pod passed baseline".to_owned());
    }
    // Her runtime namespace: no pod of her own, not even an ordinary one.
    match as_alice_stdin(&["-n", &alice_runtime, "create", "-f", "-"], &plain) {
        Ok(out) => wrong.push(format!("alice created a pod in her runtime namespace: {out}")),
        Err(refused) => {
            eprintln!("alice's pod in her runtime namespace: {}", refused.trim());
            if !refused.contains(&format!(
                "pods is forbidden: User \"alice\" cannot create resource \"pods\" in API group \"\" in the namespace \"{alice_runtime}\""
            )) {
                wrong.push(format!("refused, but not by RBAC: {refused}"));
            }
        }
    }
    // `auth can-i VERB pods/attach` would ask about a pod named `attach`: the subresource is a flag.
    let can = |verb: &str, resource: &str, namespace: &str| {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let subresource = format!("--subresource={subresource}");
        let mut args = vec!["auth", "can-i", verb, resource, "-n", namespace];
        if subresource.len() > "--subresource=".len() {
            args.push(&subresource);
        }
        run_kubectl(
            cluster.kubectl_as("alice", groups("alice")).expect("kubeconfig"),
            &args,
        )
        .is_ok()
    };
    for (verb, resource, namespace, allowed) in [
        ("create", "pods/attach", alice_runtime.as_str(), true),
        ("get", "pods", alice_runtime.as_str(), true),
        ("get", "pods/log", alice_runtime.as_str(), true),
        ("create", "pods/exec", alice_runtime.as_str(), false),
        ("create", "pods/portforward", alice_runtime.as_str(), false),
        ("create", "pods", alice_runtime.as_str(), false),
        ("delete", "pods", alice_runtime.as_str(), false),
        ("patch", "pods", alice_runtime.as_str(), false),
        ("get", "secrets", alice_runtime.as_str(), false),
        ("create", "rolebindings", alice_runtime.as_str(), false),
        ("create", "pods/attach", bob_runtime.as_str(), false),
        ("get", "pods", bob_runtime.as_str(), false),
    ] {
        if can(verb, resource, namespace) != allowed {
            wrong.push(format!(
                "can-i {verb} {resource} -n {namespace}: expected {allowed}"
            ));
        }
    }
    // walt-edit alone (what the chart aggregates into edit) grants no pod right in a tenant's
    // namespace: shell, build and virtual node pods run in its runtime namespace.
    let edit_only = cluster.create_namespace("alice-walt-edit").expect("namespace");
    cluster
        .kubectl_output(&[
            "-n",
            &edit_only,
            "create",
            "rolebinding",
            "alice",
            "--clusterrole=walt-edit",
            "--user=alice",
        ])
        .expect("bind alice to walt-edit");
    walt_tests::wait::Wait::new(
        "alice's walt-edit binding to apply",
        std::time::Duration::from_secs(20),
    )
    .every(std::time::Duration::from_millis(200))
    .until(|| {
        if can("create", "imagebuilds.walt.dev", &edit_only) {
            Poll::Ready(())
        } else {
            Poll::Pending("no".to_owned())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for (verb, resource, allowed) in [
        ("create", "shellsessions.walt.dev", true),
        ("get", "pods", false),
        ("list", "pods", false),
        ("create", "pods", false),
        ("create", "pods/attach", false),
        ("create", "pods/exec", false),
        ("create", "pods/portforward", false),
    ] {
        if can(verb, resource, &edit_only) != allowed {
            wrong.push(format!(
                "with walt-edit only: can-i {verb} {resource} -n {edit_only}: expected {allowed}"
            ));
        }
    }
    let alice_kubectl = |args: &[&str]| {
        run_kubectl(
            cluster.kubectl_as("alice", groups("alice")).expect("kubeconfig"),
            args,
        )
    };
    match alice_kubectl(&["-n", &alice_runtime, "exec", "walt-shell-s1", "--", "true"]) {
        Ok(out) => wrong.push(format!("alice exec'd into her shell pod: {out}")),
        Err(refused)
            if refused.to_string().contains("Forbidden") || refused.to_string().contains("forbidden") =>
        {
            eprintln!("alice's exec: {refused}");
        }
        Err(refused) => wrong.push(format!("exec refused, but not by RBAC: {refused}")),
    }
    if let Ok(out) = alice_kubectl(&["-n", &bob_runtime, "get", "pod", "walt-shell-s1"]) {
        wrong.push(format!("alice sees bob's shell pod: {out}"));
    }
    alice_kubectl(&["-n", &alice_runtime, "get", "pod", "walt-shell-s1"])
        .unwrap_or_else(|e| panic!("alice cannot see her own shell pod: {e}"));
    for namespace in [&alice_runtime, &bob_runtime] {
        let _ = cluster.kubectl_output(&["delete", "namespace", namespace, "--wait=false"]);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    eprintln!(
        "alice_runs_no_privileged_pod_and_attaches_only_to_her_own_sessions: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The chart's monitoring objects, checked by the Prometheus Operator's own CRDs on the real API
/// server (a rule with a malformed `for` is refused: the check can fail) and by Prometheus's
/// `promtool`; every metric they read is documented in the README.
#[test]
fn the_charts_servicemonitor_alerts_and_dashboard_are_valid_for_the_prometheus_operator_and_promtool() {
    let cluster = cluster();
    let crds = walt_tests::monitoring::prometheus_operator_crds().expect("the Prometheus Operator's CRDs");
    for crd in &crds {
        let path = crd.to_str().expect("a UTF-8 module path");
        cluster
            .kubectl_output(&["apply", "--server-side", "-f", path])
            .unwrap_or_else(|e| panic!("applying {path}: {e}"));
    }
    cluster
        .kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "--timeout=60s",
        ])
        .expect("the monitoring CRDs are established");
    let namespace = "monitoring-check";
    let _ = cluster.kubectl_output(&["create", "namespace", namespace]);
    let mut docs = walt_tests::deploy::render_chart(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ])
    .expect("helm template");
    docs.retain(|doc| {
        matches!(doc["kind"].as_str(), Some("ServiceMonitor" | "PrometheusRule"))
            || doc["metadata"]["name"].as_str() == Some("walt-dashboard")
    });
    assert_eq!(
        docs.len(),
        3,
        "a ServiceMonitor, a PrometheusRule and the dashboard ConfigMap"
    );
    for doc in &mut docs {
        doc["metadata"]["namespace"] = namespace.into();
    }
    let stream = |docs: &[serde_json::Value]| {
        docs.iter()
            .map(|doc| serde_saphyr::to_string(doc).expect("yaml"))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let applied = kubectl_stdin(cluster, &["apply", "--dry-run=server", "-f", "-"], &stream(&docs))
        .unwrap_or_else(|e| panic!("the API server refused the chart's monitoring objects: {e}"));
    assert!(
        applied.contains("prometheusrule.monitoring.coreos.com/walt"),
        "{applied}"
    );
    let rule = docs
        .iter()
        .find(|doc| doc["kind"].as_str() == Some("PrometheusRule"))
        .expect("the PrometheusRule")
        .clone();
    let mut broken = rule.clone();
    broken["spec"]["groups"][0]["rules"][0]["for"] = "soon".into();
    let refused = kubectl_stdin(
        cluster,
        &["apply", "--dry-run=server", "-f", "-"],
        &stream(&[broken]),
    )
    .expect_err("a rule whose `for` is not a duration is refused");
    assert!(refused.contains("for"), "{refused}");

    let promtool = walt_tests::monitoring::promtool().expect("promtool");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("walt-rules.yaml");
    std::fs::write(&rules, serde_saphyr::to_string(&rule["spec"]).expect("yaml")).expect("write the rules");
    let checked = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "promtool refused the chart's alerts: {said}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(said.contains("SUCCESS: 5 rules found"), "{said}");

    let readme = std::fs::read_to_string(walt_tests::deploy::repo_root().join("README.md")).expect("README");
    let dashboard: serde_json::Value = serde_json::from_str(
        docs.iter()
            .find_map(|doc| doc["data"]["walt-overview.json"].as_str())
            .expect("the dashboard JSON"),
    )
    .expect("the dashboard is JSON");
    let exprs = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|rule| rule["expr"].as_str().map(str::to_owned))
        .chain(
            dashboard["panels"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
                .filter_map(|target| target["expr"].as_str().map(str::to_owned)),
        );
    let undocumented: Vec<String> = exprs
        .flat_map(|expr| walt_tests::monitoring::metric_names(&expr))
        .map(|series| series.trim_end_matches("_bucket").to_owned())
        .filter(|family| !readme.contains(&format!("`{family}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from the README: {undocumented:?}"
    );
    let _ = cluster.kubectl_output(&["delete", "namespace", namespace, "--wait=false"]);
}

/// A stand-in for the Prometheus Operator's ServiceMonitor CRD (the monitoring overlay needs the kind).
const SERVICE_MONITOR_CRD: &str = r"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {plural: servicemonitors, singular: servicemonitor, kind: ServiceMonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

/// A kubeconfig that authenticates as ServiceAccount `namespace/name` (a bound token), in `dir`.
fn service_account_kubeconfig(cluster: &Cluster, namespace: &str, name: &str, dir: &Path) -> PathBuf {
    let token = cluster
        .kubectl_output(&["-n", namespace, "create", "token", name, "--duration=1h"])
        .expect("kubectl create token");
    let admin = cluster
        .kubectl_output(&["config", "view", "--raw", "--minify", "-o", "json"])
        .expect("kubectl config view");
    let mut config: serde_json::Value = serde_json::from_str(&admin).expect("kubeconfig JSON");
    config["users"][0]["user"] = serde_json::json!({"token": token.trim()});
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, config.to_string()).expect("write kubeconfig");
    path
}

/// Name → value of the plain (`value:`) environment variables of the rendered operator Deployment.
fn operator_env(docs: &[serde_json::Value]) -> Vec<(String, String)> {
    let deployment = docs
        .iter()
        .find(|doc| {
            let (kind, _, name) = deploy::object_id(doc);
            kind == "Deployment" && name == "walt-operator"
        })
        .expect("the operator Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|var| {
            Some((
                var["name"].as_str()?.to_owned(),
                var["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn secret_versions(cluster: &Cluster, names: &[&str]) -> Result<Vec<String>, String> {
    names
        .iter()
        .map(|name| secret_field(cluster, name, "{.metadata.resourceVersion}"))
        .collect()
}

/// A field of Secret `walt-system/name`, by JSONPath.
fn secret_field(cluster: &Cluster, name: &str, jsonpath: &str) -> Result<String, String> {
    cluster
        .kubectl_output(&[
            "-n",
            "walt-system",
            "get",
            "secret",
            name,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
        .map_err(|e| format!("reading Secret walt-system/{name} {jsonpath}: {e}"))
}

/// Runs `walt-operator run` with the rendered Deployment's environment, as its ServiceAccount, until
/// `done` answers; returns its log. Its servers listen on loopback, the registry token endpoint on
/// `token_port`.
fn run_operator_until(
    env: &[(String, String)],
    kubeconfig: &Path,
    log: &Path,
    token_port: u16,
    what: &str,
    done: impl FnMut() -> Poll<()>,
) -> String {
    let port = || walt_tests::k8s::free_port().expect("a free port");
    let args = [
        "--http-addr".to_owned(),
        format!("127.0.0.1:{}", port()),
        "--gateway-addr".to_owned(),
        format!("127.0.0.1:{}", port()),
        "--registry-token-addr".to_owned(),
        format!("127.0.0.1:{token_port}"),
    ];
    let mut command = OperatorProcess::command(&operator_binary(), kubeconfig, None, &args);
    command
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("WALT_NAMESPACE", "walt-system")
        .env("POD_NAME", "gitops-test")
        // Only its own namespace: the other tests' objects are not its business.
        .env("WALT_WATCH_NAMESPACE", "walt-system");
    let mut daemon =
        Daemon::spawn("walt-operator", command, log, Lifetime::Test).expect("start walt-operator");
    let waited = wait_for(what, std::time::Duration::from_mins(2), done);
    daemon.stop(std::time::Duration::from_secs(10));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Err(error) = waited {
        panic!("{error}\noperator log:\n{text}");
    }
    text
}

/// What the operator logs when it creates each of its Secrets.
const CREATION_NOTES: [&str; 3] = [
    "created the lab's node key",
    "created the registry token key",
    "created the lab registry credential (user walt",
];

/// `GET /token` (a pull and push scope) of the operator's registry token endpoint on `port`, with
/// basic credentials: the whole HTTP response.
fn fetch_token(port: u16, user: &str, password: &str) -> Result<String, String> {
    use base64::Engine as _;
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    write!(
        stream,
        "GET /token?service=walt-registry&scope=repository:walt/walt-system/x:pull,push HTTP/1.1\r\n\
         Host: 127.0.0.1\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    Ok(response)
}

/// A key of Secret `walt-system/name`, decoded.
fn secret_text(cluster: &Cluster, name: &str, key: &str) -> String {
    use base64::Engine as _;
    let encoded = secret_field(cluster, name, &format!("{{.data.{}}}", key.replace('.', "\\.")))
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .expect("base64 Secret data");
    String::from_utf8(bytes).expect("text")
}

#[test]
fn gitops_manifests_apply_from_git_alone_and_the_operator_creates_its_secrets() {
    // A control plane of its own: the base installs cluster-wide objects (CRDs, the admission policy
    // that refuses Nodes on devices not lent to their namespace) that the other tests must not see.
    let owned = Cluster::start(walt_tests::k8s::ClusterOptions::control_plane())
        .unwrap_or_else(|e| panic!("cannot start a control plane: {e}"));
    let cluster = &owned;
    // What Argo CD or Flux sees: the tracked files only.
    let checkout = deploy::clean_checkout().expect("a clean checkout");
    let deploy_dir = checkout.path().join("deploy");
    // The namespace, as Argo CD's CreateNamespace or the Flux example make it; the monitoring overlay's kind.
    kubectl_stdin(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: walt-system\n---\n{SERVICE_MONITOR_CRD}"
        ),
    )
    .expect("namespace and ServiceMonitor CRD");
    cluster
        .kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "--timeout=60s",
        ])
        .expect("ServiceMonitor CRD established");

    // Every kustomization passes the API server's validation (server-side dry run).
    for dir in deploy::kustomizations(&deploy_dir).expect("kustomizations") {
        let dir = dir.to_string_lossy().into_owned();
        cluster
            .kubectl_output(&["apply", "--server-side", "--dry-run=server", "-k", &dir])
            .unwrap_or_else(|e| panic!("kubectl apply --dry-run=server -k {dir}: {e}"));
    }

    // The base for real, then the operator as its ServiceAccount with the base's configuration.
    let base = deploy_dir.join("base");
    cluster
        .kubectl_output(&["apply", "--server-side", "-k", &base.to_string_lossy()])
        .expect("kubectl apply -k deploy/base");
    let scratch = tempfile::tempdir().expect("tempdir");
    let kubeconfig = service_account_kubeconfig(cluster, "walt-system", "walt-operator", scratch.path());
    let env = operator_env(&deploy::kustomize(&base).expect("render deploy/base"));
    let names = [
        "walt-node-key",
        "walt-registry-token",
        "walt-registry-credentials",
    ];
    let token_port = walt_tests::k8s::free_port().expect("a free port");
    let log = run_operator_until(
        &env,
        &kubeconfig,
        &scratch.path().join("first.log"),
        token_port,
        "the operator to create its Secrets and start",
        || match secret_versions(cluster, &names) {
            Ok(_)
                if std::fs::read_to_string(scratch.path().join("first.log"))
                    .is_ok_and(|log| log.contains("SSH gateway ready")) =>
            {
                Poll::Ready(())
            }
            Ok(_) => Poll::Pending("Secrets exist, the operator has not started yet".into()),
            Err(e) => Poll::Pending(e),
        },
    );
    // The created key and credential work together: the operator (restarted below) issues tokens
    // to the created lab credential, and to nothing else.
    for note in CREATION_NOTES {
        assert!(log.contains(note), "no `{note}` in the log:\n{log}");
    }
    let events = cluster
        .kubectl_output(&[
            "-n",
            "walt-system",
            "get",
            "events.events.k8s.io",
            "--field-selector",
            "reason=SecretCreated",
            "-o",
            "jsonpath={range .items[*]}{.regarding.name}{\"\\n\"}{end}",
        ])
        .expect("events");
    for name in names {
        assert!(
            events.lines().any(|l| l == name),
            "no SecretCreated Event for {name}: {events}"
        );
    }
    let types = cluster
        .kubectl_output(&[
            "-n",
            "walt-system",
            "get",
            "secret",
            "walt-node-key",
            "walt-registry-token",
            "walt-registry-credentials",
            "-o",
            "jsonpath={range .items[*]}{.type}{\"\\n\"}{end}",
        ])
        .expect("secret types");
    assert_eq!(
        types.trim(),
        "kubernetes.io/ssh-auth\nOpaque\nkubernetes.io/dockerconfigjson"
    );
    assert!(
        secret_text(cluster, "walt-registry-token", "tls.crt").starts_with("-----BEGIN CERTIFICATE-----")
    );
    let user = secret_text(cluster, "walt-registry-credentials", "username");
    let password = secret_text(cluster, "walt-registry-credentials", "password");
    assert_eq!(user, "walt");
    assert_eq!(password.len(), 32);

    // A second start changes nothing: existing Secrets are never overwritten.
    let before = secret_versions(cluster, &names).expect("versions");
    let mut answers = (String::new(), String::new());
    let second = run_operator_until(
        &env,
        &kubeconfig,
        &scratch.path().join("second.log"),
        token_port,
        "the operator to start again and answer GET /token",
        || {
            if !std::fs::read_to_string(scratch.path().join("second.log"))
                .is_ok_and(|log| log.contains("SSH gateway ready"))
            {
                return Poll::Pending("not started".into());
            }
            match (
                fetch_token(token_port, &user, &password),
                fetch_token(token_port, &user, "not-the-password"),
            ) {
                (Ok(good), Ok(bad)) => {
                    answers = (good, bad);
                    Poll::Ready(())
                }
                (Err(e), _) | (_, Err(e)) => Poll::Pending(format!("GET /token: {e}")),
            }
        },
    );
    let (good, bad) = answers;
    assert!(
        good.starts_with("HTTP/1.1 200") && good.contains("\"token\""),
        "the created lab credential got no token:\n{good}"
    );
    assert!(bad.starts_with("HTTP/1.1 401"), "a wrong password got:\n{bad}");
    for note in CREATION_NOTES {
        assert!(
            !second.contains(note),
            "the second start logged `{note}`:\n{second}"
        );
    }
    assert_eq!(secret_versions(cluster, &names).expect("versions"), before);
}

/// The operator's API-server egress in the chart's NetworkPolicy (`to` of its first egress rule).
fn operator_api_egress(docs: &[serde_json::Value]) -> Option<Vec<String>> {
    let policy = docs
        .iter()
        .find(|doc| doc["kind"] == "NetworkPolicy" && doc["metadata"]["name"] == "walt-operator")
        .expect("the operator's NetworkPolicy");
    let to = policy["spec"]["egress"][0]["to"].as_array()?;
    Some(
        to.iter()
            .map(|peer| peer["ipBlock"]["cidr"].as_str().unwrap_or_default().to_owned())
            .collect(),
    )
}

#[test]
fn the_operators_api_egress_is_the_api_servers_own_address_when_installed_on_a_cluster() {
    let cluster = cluster();
    // This tier's API server listens on loopback and publishes no endpoints
    // (--endpoint-reconciler-type=none); the cluster tier's does, as every cluster's. Publish them
    // as its reconciler would (two addresses, as an HA control plane has).
    let slice = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"]}, {"addresses": ["192.0.2.11"]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}"#;
    kubectl_stdin(cluster, &["apply", "-f", "-"], slice).expect("the kubernetes EndpointSlice");
    let expected = vec!["192.0.2.10/32".to_owned(), "192.0.2.11/32".to_owned()];
    // What `helm install` renders: the chart looks the API server's endpoints up.
    let kubeconfig = cluster.kubeconfig();
    let kubeconfig = kubeconfig.to_str().expect("a UTF-8 kubeconfig path");
    let installed =
        deploy::render_chart(&["--dry-run=server", "--kubeconfig", kubeconfig]).expect("helm template");
    assert_eq!(operator_api_egress(&installed), Some(expected));
    // Rendered without a cluster (GitOps), nothing can be looked up: any address on the API ports,
    // which the installation notes warn about.
    let offline = deploy::render_chart(&[]).expect("helm template");
    let _ = cluster.kubectl_output(&["delete", "endpointslice", "kubernetes", "-n", "default"]);
    assert_eq!(operator_api_egress(&offline), None);
}
