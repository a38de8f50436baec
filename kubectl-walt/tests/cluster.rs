//! `kubectl walt` against a real kube-apiserver (the harness's control plane tier) with the walt
//! CRDs installed: every command's requests and output, RBAC refusals for an ordinary user, and
//! completion with names from the cluster.
//!
//! Here the test writes the operator's answers itself through the status subresource (a save
//! failing mid-way, each progress state, a session's gateway), to check what the plugin shows for
//! answers that are hard to provoke from a real operator, and what it writes back (spec fields,
//! deletions). The same commands against the real operator: `tests/operator.rs`.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use walt_crds::{Image, ImageSpec, Node, NodeSave, NodeSpec, ShellSession, VirtualNode};
use walt_tests::k8s::{Cluster, shared_control_plane};
use walt_tests::wait::{Poll, Wait, wait_for_async};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The shared control plane with the walt CRDs installed (once per test binary).
fn cluster() -> &'static Cluster {
    static READY: OnceLock<()> = OnceLock::new();
    let cluster = shared_control_plane().expect("control plane (see tests/k8s for the binaries)");
    READY.get_or_init(|| {
        runtime().block_on(async {
            let client = cluster.client().await.expect("admin client");
            let crds: Api<CustomResourceDefinition> = Api::all(client);
            for crd in walt_crds::crds() {
                match crds.create(&PostParams::default(), &crd).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => panic!("install CRD: {e}"),
                }
            }
            let names: Vec<String> = walt_crds::crds()
                .into_iter()
                .map(|crd| crd.metadata.name.expect("crd name"))
                .collect();
            wait_for_async(
                "the walt CRDs to be established",
                Duration::from_mins(1),
                async || {
                    let mut waiting = Vec::new();
                    for name in &names {
                        let got = crds.get(name).await.expect("get crd");
                        let established = got
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        if !established {
                            waiting.push(name.as_str());
                        }
                    }
                    if waiting.is_empty() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending(format!("not established: {}", waiting.join(", ")))
                    }
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        });
    });
    cluster
}

/// Runs the plugin as a user would, with a kubeconfig and a namespace.
#[derive(Debug, Clone)]
struct Walt {
    kubeconfig: PathBuf,
    namespace: String,
}

impl Walt {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-walt"));
        command
            .args(["-n", &self.namespace])
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("WALT_GATEWAY_ADDRESS")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kubectl-walt")
    }

    /// Runs, expects success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl walt {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs, expects failure with exit status 1, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "kubectl walt {args:?} should fail:\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl-walt")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh namespace, the admin client, and the plugin as admin there.
fn setup(prefix: &str) -> (String, Walt) {
    let cluster = cluster();
    let namespace = cluster.create_namespace(prefix).expect("namespace");
    let walt = Walt {
        kubeconfig: cluster.kubeconfig(),
        namespace: namespace.clone(),
    };
    (namespace, walt)
}

async fn admin() -> Client {
    cluster().client().await.expect("admin client")
}

fn node(name: &str, image: Option<&str>) -> Node {
    Node::new(
        name,
        NodeSpec {
            model: "rpi-3-b".into(),
            image: image.map(str::to_string),
            device: Some(format!("{name}-device")),
            ..NodeSpec::default()
        },
    )
}

async fn create_node(ns: &str, node: &Node) {
    let api: Api<Node> = Api::namespaced(admin().await, ns);
    api.create(&PostParams::default(), node)
        .await
        .expect("create node");
}

/// Sets a status as the operator would (status subresource, merge patch).
async fn set_status<K>(ns: &str, name: &str, status: serde_json::Value)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(admin().await, ns);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "status": status })),
    )
    .await
    .expect("patch status");
}

async fn create_image(ns: &str, name: &str, ready: bool, arch: &str) {
    let api: Api<Image> = Api::namespaced(admin().await, ns);
    api.create(&PostParams::default(), &Image::new(name, ImageSpec::default()))
        .await
        .expect("create image");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    set_status::<Image>(
        ns,
        name,
        serde_json::json!({
            "reference": format!("registry.lab/{ns}/{name}:latest"),
            "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
            "platform": {"os": "linux", "architecture": arch},
            "nodeModels": ["rpi-3-b"],
            "shellMode": "Basic",
            "layers": 3,
            "size": 31_457_280,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                "reason": if ready { "Resolved" } else { "RegistryError" },
                "message": if ready { "digest resolved" } else { "manifest unknown" },
                "lastTransitionTime": now}],
        }),
    )
    .await;
}

fn ready_status() -> serde_json::Value {
    serde_json::json!({
        "phase": "Ready",
        "address": "192.0.2.10:22",
        "bootedImage": {"name": "rpi-debian", "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222"},
    })
}

#[test]
fn node_and_image_listing_and_show() {
    let (ns, walt) = setup("walt-ls");
    let empty = walt.run(&["node", "ls"]);
    assert!(empty.status.success());
    assert!(text(&empty.stderr).contains(&format!("No nodes in namespace {ns}.")));
    let rt = runtime();
    rt.block_on(async {
        create_image(&ns, "rpi-debian", true, "arm64").await;
        create_image(&ns, "pc-base.v2", false, "amd64").await;
        create_node(&ns, &node("rpi3-01", Some("rpi-debian"))).await;
        create_node(&ns, &node("rpi3-02", None)).await;
        set_status::<Node>(&ns, "rpi3-01", ready_status()).await;
    });

    let table = walt.ok(&["node", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME      MODEL     IMAGE        PHASE     AGE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("rpi3-01   rpi-3-b   rpi-debian   Ready     "),
        "{table}"
    );
    assert!(
        lines[2].starts_with("rpi3-02   rpi-3-b   default      Pending   "),
        "{table}"
    );
    let wide = walt.ok(&["node", "ls", "-o", "wide"]);
    assert!(
        // SERVED: nothing served by a boot service for this node (it boots over SSH).
        wide.contains("192.0.2.10:22   rpi-debian@sha256:222222222222   -        volatile"),
        "{wide}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&walt.ok(&["node", "ls", "-o", "json"])).expect("json");
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"][0]["metadata"]["name"], "rpi3-01");
    let yaml = walt.ok(&["node", "show", "rpi3-01", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Node") && yaml.contains("name: rpi3-01"),
        "{yaml}"
    );

    let page = walt.ok(&["node", "show", "rpi3-01"]);
    assert!(page.contains("Name:        rpi3-01\n"), "{page}");
    assert!(
        page.contains("Booted:      rpi-debian@sha256:222222222222\n"),
        "{page}"
    );
    assert!(page.contains("Phase:       Ready\n"), "{page}");

    let missing = walt.fails(&["node", "show", "rpi9"]);
    assert!(
        missing.contains(&format!(
            "node \"rpi9\" not found in namespace \"{ns}\": list the nodes with `kubectl walt node ls`"
        )),
        "{missing}"
    );

    let images = walt.ok(&["image", "ls"]);
    let lines: Vec<&str> = images.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{images}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("pc-base:v2   False (RegistryError)   amd64")),
        "{images}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("rpi-debian   True")
            && l.contains("rpi-3-b")
            && l.contains("30.0MiB")
            && l.contains("1 node")),
        "{images}"
    );
    let show = walt.ok(&["image", "show", "rpi-debian"]);
    assert!(show.contains("Booted by:   rpi3-01\n"), "{show}");
    assert!(show.contains("Platform:    linux/arm64\n"), "{show}");
    assert!(show.contains("Ready   True     Resolved"), "{show}");
    let missing = walt.fails(&["image", "show", "nope"]);
    assert!(missing.contains("image \"nope\" not found"), "{missing}");
}

#[test]
fn node_boot_reboot_create_virtual_remove() {
    let (ns, walt) = setup("walt-boot");
    let rt = runtime();
    rt.block_on(async {
        create_image(&ns, "rpi-debian", true, "arm64").await;
        create_image(&ns, "tuned", true, "arm64").await;
        create_node(&ns, &node("rpi3-01", Some("rpi-debian"))).await;
        create_node(&ns, &node("rpi3-02", Some("rpi-debian"))).await;
    });
    let out = walt.ok(&["node", "boot", "rpi3-01,rpi3-02", "tuned"]);
    assert!(
        out.contains("rpi3-01: will boot tuned (it reboots now).\nrpi3-02: will boot tuned"),
        "{out}"
    );
    let err = walt.fails(&["node", "boot", "rpi3-01", "missing-image"]);
    assert!(err.contains("image \"missing-image\" not found"), "{err}");
    let err = walt.fails(&["node", "boot", "rpi3-01,rpi3-09", "tuned"]);
    assert!(err.contains("node \"rpi3-09\" not found"), "{err}");
    walt.ok(&["node", "boot", "rpi3-02", "default"]);
    let out = walt.ok(&["node", "reboot", "all-nodes"]);
    assert!(
        out.contains("rpi3-01: reboot requested.") && out.contains("rpi3-02: reboot requested."),
        "{out}"
    );

    let out = walt.ok(&[
        "node",
        "create-virtual",
        "vpi",
        "--image",
        "tuned",
        "--memory",
        "768Mi",
    ]);
    assert!(
        out.contains("Virtual node vpi created (rpi-3-b, arm64), booting tuned."),
        "{out}"
    );
    let err = walt.fails(&[
        "node",
        "create-virtual",
        "vx",
        "--image",
        "tuned",
        "--arch",
        "amd64",
    ]);
    assert!(err.contains("image tuned is built for arm64, not amd64"), "{err}");

    rt.block_on(async {
        let api: Api<Node> = Api::namespaced(admin().await, &ns);
        let n1 = api.get("rpi3-01").await.expect("get");
        assert_eq!(n1.spec.image.as_deref(), Some("tuned"));
        assert!(
            n1.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("walt.dev/reboot-requested-at")
        );
        assert_eq!(api.get("rpi3-02").await.expect("get").spec.image, None);
        let v = api.get("vpi").await.expect("virtual node");
        let virt: VirtualNode = v.spec.virtual_node.expect("virtual");
        assert_eq!(virt.architecture.as_str(), "arm64");
        assert_eq!(virt.memory.0, "768Mi");
    });

    // Images in use cannot go; free ones can.
    let err = walt.fails(&["image", "rm", "tuned"]);
    assert!(
        err.contains("cannot remove image tuned: 2 nodes boot it (rpi3-01, vpi)"),
        "{err}"
    );
    let out = walt.ok(&["node", "remove", "vpi"]);
    assert_eq!(out, "vpi: removed.\n");
    let err = walt.fails(&["node", "remove", "all-nodes"]);
    assert!(err.contains("all-nodes is not accepted"), "{err}");
    walt.ok(&["image", "rm", "rpi-debian"]);
    let images = walt.ok(&["image", "ls"]);
    assert!(!images.contains("rpi-debian"), "{images}");
}

#[test]
fn node_wait_follows_the_phase() {
    let (ns, walt) = setup("walt-wait");
    let rt = runtime();
    rt.block_on(create_node(&ns, &node("rpi3-01", None)));
    let child = walt.spawn(&["node", "wait", "rpi3-01", "--timeout", "60s"]);
    std::thread::sleep(Duration::from_secs(2));
    rt.block_on(set_status::<Node>(&ns, "rpi3-01", ready_status()));
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "rpi3-01: Ready\n");

    rt.block_on(create_node(&ns, &node("rpi3-02", None)));
    let err = walt.fails(&["node", "wait", "rpi3-02", "--timeout", "2s"]);
    assert!(
        err.contains("timed out after 2s waiting for rpi3-02 (Pending)"),
        "{err}"
    );
}

#[test]
fn image_clone_creates_the_image_and_waits_for_ready() {
    let (ns, walt) = setup("walt-clone");
    let out = walt.ok(&[
        "image",
        "clone",
        "docker.io/waltplatform/rpi-debian:latest",
        "--no-wait",
    ]);
    assert!(
        out.contains("image.walt.dev/rpi-debian created from docker.io/waltplatform/rpi-debian:latest"),
        "{out}"
    );
    let rt = runtime();
    rt.block_on(async {
        let api: Api<Image> = Api::namespaced(admin().await, &ns);
        let image = api.get("rpi-debian").await.expect("image");
        assert_eq!(
            image.spec.source.as_deref(),
            Some("docker.io/waltplatform/rpi-debian:latest")
        );
    });

    // Waiting: the plugin shows the operator's progress and the result.
    let child = walt.spawn(&[
        "image",
        "clone",
        "registry.example/lab/pc:v3",
        "--platform",
        "linux/amd64",
    ]);
    rt.block_on(async {
        let api: Api<Image> = Api::namespaced(admin().await, &ns);
        let image = wait_for_async(
            "the plugin to create the Image",
            Duration::from_secs(30),
            async || api.get_opt("pc.v3").await.expect("get"),
        )
        .await
        .unwrap();
        assert_eq!(image.spec.platform.expect("platform").architecture, "amd64");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        set_status::<Image>(
            &ns,
            "pc.v3",
            serde_json::json!({"conditions": [{"type": "Ready", "status": "False",
            "reason": "Cloning", "message": "copying 3 layers", "lastTransitionTime": now}]}),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        create_image_status_ready(&ns, "pc.v3").await;
    });
    let out = child.wait_with_output().expect("clone");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Image pc:v3 is ready: sha256:1111"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("cloning pc:v3: Cloning copying 3 layers"),
        "{}",
        text(&out.stderr)
    );

    let err = walt.fails(&["image", "clone", "registry.example/x/Bad_Repo", "Bad"]);
    assert!(err.contains("invalid image name \"Bad\""), "{err}");
}

async fn create_image_status_ready(ns: &str, name: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    set_status::<Image>(
        ns,
        name,
        serde_json::json!({
            "reference": format!("registry.lab/{ns}/{name}:latest"),
            "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
            "platform": {"os": "linux", "architecture": "amd64"},
            "layers": 2, "size": 1024,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Resolved", "message": "ok", "lastTransitionTime": now}],
        }),
    )
    .await;
}

#[test]
fn image_duplicate_and_rename() {
    let (ns, walt) = setup("walt-dup");
    let rt = runtime();
    rt.block_on(create_image(&ns, "rpi-debian", true, "arm64"));
    // The operator clones the copy; the test answers as it would.
    let finish_copy = |name: &'static str| {
        let ns = ns.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let api: Api<Image> = Api::namespaced(admin().await, &ns);
                let image = wait_for_async(&format!("the copy {name} to be created"), Duration::from_secs(30), async || {
                    api.get_opt(name).await.expect("get")
                })
                .await
                .unwrap();
                assert_eq!(
                    image.spec.source.as_deref(),
                    Some(format!("registry.lab/{ns}/rpi-debian@sha256:1111111111111111111111111111111111111111111111111111111111111111").as_str())
                );
                create_image_status_ready(&ns, name).await;
            });
        })
    };
    let helper = finish_copy("rpi-exp");
    let out = walt.ok(&["image", "duplicate", "rpi-debian", "rpi-exp"]);
    helper.join().expect("helper");
    assert_eq!(out, "Duplicated rpi-debian as rpi-exp (sha256:111111111111).\n");
    let err = walt.fails(&["image", "duplicate", "rpi-debian", "rpi-exp"]);
    assert!(err.contains("image \"rpi-exp\" already exists"), "{err}");

    let helper = finish_copy("rpi-v2");
    let out = walt.ok(&["image", "rename", "rpi-debian", "rpi-v2"]);
    helper.join().expect("helper");
    assert_eq!(out, "Renamed rpi-debian to rpi-v2.\n");
    let list = walt.ok(&["image", "ls"]);
    assert!(list.contains("rpi-v2") && !list.contains("rpi-debian "), "{list}");

    // Squash: the plugin asks through an annotation and waits until the operator (played here) says
    // it handled that very request.
    let ns_for_operator = ns.clone();
    let operator = std::thread::spawn(move || {
        runtime().block_on(async move {
            let api: Api<Image> = Api::namespaced(admin().await, &ns_for_operator);
            let requested = wait_for_async(
                "the plugin to ask for the squash",
                Duration::from_secs(30),
                async || {
                    let image = api.get("rpi-v2").await.expect("get");
                    image
                        .metadata
                        .annotations
                        .and_then(|mut a| a.remove("walt.dev/squash-requested-at"))
                },
            )
            .await
            .unwrap();
            let patch =
                serde_json::json!({"metadata": {"annotations": {"walt.dev/squash-handled-at": requested}}});
            api.patch(
                "rpi-v2",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .expect("mark the squash handled");
        });
    });
    let out = walt.ok(&["image", "squash", "rpi-v2", "--yes"]);
    operator.join().expect("operator");
    assert!(out.contains("Image rpi-v2 squashed"), "{out}");
}

#[test]
fn node_save_shows_progress_digest_and_summary() {
    let (ns, walt) = setup("walt-save");
    let rt = runtime();
    rt.block_on(async {
        create_image(&ns, "rpi-debian", true, "arm64").await;
        create_node(&ns, &node("rpi3-01", Some("rpi-debian"))).await;
    });
    let err = walt.fails(&["node", "save", "rpi3-01", "tuned"]);
    assert!(
        err.contains("node \"rpi3-01\" is not ready (phase Pending)"),
        "{err}"
    );
    rt.block_on(set_status::<Node>(&ns, "rpi3-01", ready_status()));
    let err = walt.fails(&["node", "save", "rpi3-01", "rpi-debian"]);
    assert!(
        err.contains("image \"rpi-debian\" already exists") && err.contains("add --overwrite"),
        "{err}"
    );

    let mut child = walt.spawn(&["node", "save", "rpi3-01", "tuned", "--exclude", "/var/cache/"]);
    let save_name = rt.block_on(async {
        let api: Api<NodeSave> = Api::namespaced(admin().await, &ns);
        let save = wait_for_async("a NodeSave to be created", Duration::from_secs(30), async || {
            api.list(&ListParams::default()).await.expect("list").items.pop()
        })
        .await
        .unwrap();
        assert_eq!(save.spec.node, "rpi3-01");
        assert_eq!(save.spec.image, "tuned");
        assert!(!save.spec.overwrite);
        assert!(save.spec.exclude.contains(&"/var/cache/".to_string()));
        assert!(save.spec.exclude.contains(&"machine-id".to_string()), "defaults are kept");
        let name = save.metadata.name.clone().expect("name");
        assert!(name.starts_with("rpi3-01-save-"));
        for (bytes, files) in [(1_048_576u64, 10u64), (5_242_880, 52)] {
            set_status::<NodeSave>(&ns, &name, serde_json::json!({"phase": "Running", "progress": {"bytes": bytes, "files": files}})).await;
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        // The operator creates (here: finds Ready with an older digest) the Image before the save ends.
        create_image(&ns, "tuned", true, "arm64").await;
        set_status::<NodeSave>(&ns, &name, serde_json::json!({
            "phase": "Succeeded",
            "baseImage": {"name": "rpi-debian", "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222"},
            "result": {"reference": "registry.lab/x/tuned:latest", "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333",
                "layerDigest": "sha256:4444444444444444444444444444444444444444444444444444444444444444", "layerSize": 2_097_152},
            "changes": {"added": 40, "modified": 10, "deleted": 2, "bytes": 5_242_880},
            "duration": "7s",
        }))
        .await;
        name
    });
    // "Saved" only once the Image shows the saved digest Ready: a node can boot it from then on.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("the save's state").is_none(),
        "the save was reported before its Image showed the saved digest"
    );
    rt.block_on(set_status::<Image>(
        &ns,
        "tuned",
        serde_json::json!({
            "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333"
        }),
    ));
    let out = child.wait_with_output().expect("save");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Saved rpi3-01 as tuned: sha256:3333333333333333333333333333333333333333333333333333333333333333\n"), "{stdout}");
    assert!(
        stdout.contains(
            "  changes: 40 added, 10 modified, 2 deleted (5.0MiB); layer 2.0MiB (sha256:444444444444)\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("  on top of rpi-debian@sha256:222222222222\n"),
        "{stdout}"
    );
    assert!(stderr.contains("saving rpi3-01  5.0MiB  52 files"), "{stderr}");
    assert!(stderr.contains("/s"), "a rate is shown: {stderr}");
    assert!(save_name.starts_with("rpi3-01-save-"));

    // A failed save says why and what to read.
    let child = walt.spawn(&["node", "save", "rpi3-01", "other"]);
    rt.block_on(async {
        let api: Api<NodeSave> = Api::namespaced(admin().await, &ns);
        let name = wait_for_async("a NodeSave of image other to be created", Duration::from_secs(30), async || {
            let items = api.list(&ListParams::default()).await.expect("list").items;
            items.into_iter().find(|s| s.spec.image == "other")
        })
        .await
        .unwrap()
        .metadata
        .name
        .expect("name");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        set_status::<NodeSave>(&ns, &name, serde_json::json!({"phase": "Failed", "conditions": [{"type": "Complete",
            "status": "False", "reason": "NodeUnreachable", "message": "ssh: connection refused", "lastTransitionTime": now}]}))
        .await;
    });
    let out = child.wait_with_output().expect("save");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("saving node \"rpi3-01\" as other failed (NodeUnreachable: ssh: connection refused); nothing was tagged"), "{stderr}");
}

#[test]
fn interrupted_save_deletes_what_it_created() {
    let (ns, walt) = setup("walt-int");
    let rt = runtime();
    rt.block_on(async {
        create_node(&ns, &node("rpi3-01", None)).await;
        set_status::<Node>(&ns, "rpi3-01", ready_status()).await;
    });
    let child = walt.spawn(&["node", "save", "rpi3-01", "tuned"]);
    let api_wait = |want: usize| {
        rt.block_on(async {
            let api: Api<NodeSave> = Api::namespaced(admin().await, &ns);
            wait_for_async(
                &format!("{want} NodeSave"),
                Duration::from_secs(30),
                async || match api.list(&ListParams::default()).await.expect("list").items.len() {
                    n if n == want => Poll::Ready(()),
                    n => Poll::Pending(format!("{n} NodeSave")),
                },
            )
            .await
            .unwrap();
        });
    };
    api_wait(1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = child.wait_with_output().expect("save");
    assert_eq!(out.status.code(), Some(130));
    assert!(
        text(&out.stderr).contains("Interrupted: the save"),
        "{}",
        text(&out.stderr)
    );
    api_wait(0);
}

#[test]
fn image_build_refuses_an_existing_image_and_ctrl_c_deletes_the_build() {
    use walt_crds::ImageBuild;
    let (ns, walt) = setup("walt-build");
    let rt = runtime();
    rt.block_on(create_image(&ns, "app", true, "amd64"));
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").expect("write");
    let context = dir.path().display().to_string();
    let builds = |want: usize| {
        rt.block_on(async {
            let api: Api<ImageBuild> = Api::namespaced(admin().await, &ns);
            wait_for_async(
                &format!("{want} ImageBuild"),
                Duration::from_secs(30),
                async || match api.list(&ListParams::default()).await.expect("list").items {
                    items if items.len() == want => Poll::Ready(items),
                    items => Poll::Pending(format!("{} ImageBuild", items.len())),
                },
            )
            .await
            .unwrap()
        })
    };
    let err = walt.fails(&["image", "build", "--from-dir", &context, "app"]);
    assert!(
        err.contains("image app exists: add --overwrite to replace it"),
        "{err}"
    );
    builds(0);
    // No operator here: the build waits for its pod until Ctrl-C, which deletes it.
    let child = walt.spawn(&[
        "image",
        "build",
        "--from-dir",
        &context,
        "--build-arg",
        "A=1",
        "fresh",
    ]);
    let created = builds(1);
    let spec = &created[0].spec;
    assert_eq!(
        (spec.image.as_str(), spec.build_args[0].name.as_str()),
        ("fresh", "A")
    );
    assert_eq!(spec.source.context, walt_crds::ContextSource::Upload);
    assert!(
        created[0]
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("fresh-")),
        "named after the image"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = child.wait_with_output().expect("build");
    assert_eq!(out.status.code(), Some(130));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("was deleted and its pod stopped; no tag moved"),
        "{stderr}"
    );
    builds(0);
}

#[test]
fn rbac_refusals_name_the_permission() {
    let (ns, _) = setup("walt-rbac");
    let cluster = cluster();
    let alice = Walt {
        kubeconfig: cluster
            .user_kubeconfig("alice", &["walt-users", "team-alice"])
            .expect("alice"),
        namespace: ns.clone(),
    };
    let err = alice.fails(&["node", "ls"]);
    assert!(
        err.contains(&format!(
            "forbidden: you may not list nodes.walt.dev in namespace \"{ns}\""
        )),
        "{err}"
    );
    assert!(
        err.contains("User \"alice\" cannot list resource \"nodes\""),
        "the API server's words: {err}"
    );
    assert!(
        err.contains(&format!("kubectl auth can-i list nodes.walt.dev -n {ns}")),
        "{err}"
    );

    // Alice may look at nodes, not open shells.
    let role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "walt-viewer", "namespace": ns},
        "rules": [{"apiGroups": ["walt.dev"], "resources": ["nodes", "images"], "verbs": ["get", "list", "watch"]}],
    });
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "alice-viewer", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "walt-viewer"},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}],
    });
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("rbac.json");
    std::fs::write(
        &file,
        serde_json::to_string(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [role, binding]}),
        )
        .expect("json"),
    )
    .expect("write");
    cluster
        .kubectl_output(&["apply", "-f", file.to_str().expect("utf8")])
        .expect("apply rbac");
    let rt = runtime();
    rt.block_on(async {
        create_node(&ns, &node("rpi3-01", None)).await;
        set_status::<Node>(&ns, "rpi3-01", ready_status()).await;
    });
    Wait::new(
        "the Role to apply (alice may list nodes)",
        Duration::from_secs(20),
    )
    .every(Duration::from_millis(300))
    .until(|| {
        let out = alice.run(&["node", "ls"]);
        if out.status.success() {
            Poll::Ready(())
        } else {
            Poll::Pending(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    })
    .unwrap();
    assert!(alice.ok(&["node", "ls"]).contains("rpi3-01"));
    let err = alice.fails(&["node", "shell", "rpi3-01"]);
    assert!(
        err.contains(&format!(
            "forbidden: you may not create shellsessions.walt.dev in namespace \"{ns}\""
        )),
        "{err}"
    );
    let err = alice.fails(&["node", "save", "rpi3-01", "tuned"]);
    assert!(
        err.contains("forbidden: you may not create nodesaves.walt.dev"),
        "{err}"
    );
    // Nothing was left behind by the refused attempts.
    rt.block_on(async {
        let api: Api<ShellSession> = Api::namespaced(admin().await, &ns);
        assert!(
            api.list(&ListParams::default())
                .await
                .expect("list")
                .items
                .is_empty()
        );
    });
}

#[test]
fn completion_lists_names_from_the_cluster() {
    let (ns, walt) = setup("walt-comp");
    let rt = runtime();
    rt.block_on(async {
        create_node(&ns, &node("rpi3-01", None)).await;
        create_node(&ns, &node("rpi3-02", None)).await;
        create_image(&ns, "rpi-debian", true, "arm64").await;
        create_image(&ns, "rpi-debian.v2", true, "arm64").await;
    });
    let complete = |words: &[&str]| {
        let mut args = vec!["__complete"];
        args.extend_from_slice(words);
        let out = Command::new(env!("CARGO_BIN_EXE_kubectl-walt"))
            .args(&args)
            .env("KUBECONFIG", &walt.kubeconfig)
            .output()
            .expect("complete");
        text(&out.stdout)
    };
    assert_eq!(
        complete(&["-n", &ns, "node", "shell", "rpi"]),
        "rpi3-01\nrpi3-02\n:4\n"
    );
    assert_eq!(
        complete(&["node", "run", "--namespace", &ns, "rpi3-01,"]),
        "rpi3-01,rpi3-02\n:4\n"
    );
    assert_eq!(
        complete(&["-n", &ns, "image", "shell", ""]),
        "rpi-debian\nrpi-debian:v2\n:4\n"
    );
    assert!(complete(&["node", "ls", "-n", "walt-comp"]).contains(&ns));
}

/// Waits for the plugin's ShellSession in `ns` and returns it.
async fn wait_session(ns: &str) -> ShellSession {
    let api: Api<ShellSession> = Api::namespaced(admin().await, ns);
    wait_for_async(
        "a ShellSession to be created",
        Duration::from_secs(30),
        async || api.list(&ListParams::default()).await.expect("list").items.pop(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn sessions_left(ns: &str) -> usize {
    let api: Api<ShellSession> = Api::namespaced(admin().await, ns);
    api.list(&ListParams::default()).await.expect("list").items.len()
}

#[test]
fn image_shell_requests_and_cleanup() {
    let (ns, walt) = setup("walt-ishell");
    let rt = runtime();
    rt.block_on(async {
        create_image(&ns, "rpi-debian", true, "arm64").await;
        create_image(&ns, "big", true, "amd64").await;
        set_status::<Image>(&ns, "big", serde_json::json!({"layers": 130})).await;
    });
    let err = walt.fails(&["image", "shell", "big"]);
    assert!(
        err.contains("image big has 130 layers: an image shell needs fewer than 128; squash it first"),
        "{err}"
    );

    // Ctrl-C while the pod starts: the session is discarded and deleted.
    let child = walt.spawn(&["image", "shell", "rpi-debian", "--mode", "basic"]);
    let session = rt.block_on(wait_session(&ns));
    assert_eq!(session.spec.image.as_deref(), Some("rpi-debian"));
    assert_eq!(session.spec.mode, walt_crds::ShellMode::Basic);
    assert!(
        session
            .metadata
            .name
            .expect("name")
            .starts_with("rpi-debian-shell-")
    );
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let out = child.wait_with_output().expect("shell");
    assert_eq!(out.status.code(), Some(130));
    assert!(
        text(&out.stderr).contains("Aborted: the changes were discarded."),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(rt.block_on(sessions_left(&ns)), 0);

    // A session the operator fails: its reason is shown, nothing is left behind.
    let child = walt.spawn(&["image", "shell", "rpi-debian"]);
    rt.block_on(async {
        let session = wait_session(&ns).await;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        set_status::<ShellSession>(
            &ns,
            &session.metadata.name.expect("name"),
            serde_json::json!({"phase": "Failed",
            "conditions": [{"type": "Complete", "status": "False", "reason": "PullFailed",
                "message": "manifest unknown in the lab registry", "lastTransitionTime": now}]}),
        )
        .await;
    });
    let out = child.wait_with_output().expect("shell");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ended (Failed): manifest unknown in the lab registry (PullFailed)"),
        "{stderr}"
    );
    assert_eq!(rt.block_on(sessions_left(&ns)), 0);
}
