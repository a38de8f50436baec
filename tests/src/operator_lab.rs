//! A tenant's walt on the cluster tier, as the shell and build tests use it: the walt API, a tenant
//! namespace at Pod Security `baseline` with the node key, images pushed to the lab registry, and the
//! real operator running in the first node's network namespace (where the pods' addresses and the
//! lab registry at the node address exist), with the harness's admin kubeconfig.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::image_build::{Arch, BuildProfile};
use crate::k8s::{Cluster, ClusterOptions};
use crate::operator::{OperatorProcess, plugin_binary};
use crate::registry_auth::RegistryAuth;

/// See the module docs. Fields drop in order: the operator stops before the cluster.
#[derive(Debug)]
pub struct OperatorLab {
    /// The operator, watching [`Self::ns`].
    pub operator: OperatorProcess,
    /// Scratch files (CRDs, the node key, the operator's log).
    pub work: tempfile::TempDir,
    /// The tenant namespace.
    pub ns: String,
    /// The node registry as this machine and the nodes reach it (`127.0.0.1:PORT`).
    pub registry: String,
    /// The same registry as pods reach it (`NODE_IP:PORT`).
    pub for_pods: String,
    /// `kubectl-walt`.
    pub plugin: PathBuf,
    /// The cluster.
    pub cluster: Cluster,
}

impl OperatorLab {
    /// Starts a cluster with `options`, the walt image, the walt API, a tenant namespace named after
    /// `prefix` and `images` (name, CPU: the demo image, at `lab/<ns>/<name>:latest`), and the operator.
    /// `None` (the reason printed) when this machine cannot run the cluster tier.
    ///
    /// # Panics
    /// When a part does not start (test helper).
    pub fn start(options: ClusterOptions, prefix: &str, images: &[(&str, Arch)]) -> Option<OperatorLab> {
        if !crate::k8s::cluster_tier_runs(prefix) {
            return None;
        }
        crate::k8s::images::ensure_arm64_emulation()
            .unwrap_or_else(|e| panic!("cannot register qemu-aarch64 with binfmt_misc: {e}"));
        let cluster = Cluster::start(options).expect("start the cluster tier");
        let registry = cluster.registry().expect("node registry");
        let for_pods = cluster.registry_for_pods().expect("node registry for pods");
        let started = Instant::now();
        crate::lab::ensure_walt_image(&registry, false, BuildProfile::Check)
            .expect("build and push the walt image");
        eprintln!("walt image ready in {:.0} s", started.elapsed().as_secs_f64());
        let work = tempfile::tempdir().expect("tempdir");
        let ns = tenant(&cluster, &work, prefix);
        for (name, arch) in images {
            crate::lab::push_demo_image(
                *arch,
                &format!("{registry}/lab/{ns}/{name}:latest"),
                &RegistryAuth::Anonymous,
            )
            .expect("push a demo image");
        }
        let operator = start_operator(&cluster, &work, &ns, &registry, &for_pods);
        Some(OperatorLab {
            operator,
            work,
            ns,
            registry,
            for_pods,
            plugin: plugin_binary(),
            cluster,
        })
    }

    /// `kubectl walt -n NS ARGS` as the admin.
    pub fn walt(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.plugin);
        command
            .args(["-n", &self.ns])
            .args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig());
        command
    }
}

/// `kubectl ARGS` as the admin; its output.
///
/// # Panics
/// When kubectl fails (test helper).
pub fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl_output(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

/// The walt API and a tenant namespace at Pod Security `baseline` (walt's pods run in its runtime
/// namespace `walt-run-<ns>`) with the node key Secret; its name.
fn tenant(cluster: &Cluster, work: &tempfile::TempDir, prefix: &str) -> String {
    let crds = work.path().join("crds.yaml");
    std::fs::write(&crds, walt_crds::crds_yaml()).expect("write CRDs");
    kubectl(
        cluster,
        &["apply", "--server-side", "-f", &crds.display().to_string()],
    );
    kubectl(
        cluster,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/shellsessions.walt.dev",
            "crd/imagebuilds.walt.dev",
            "crd/images.walt.dev",
        ],
    );
    let ns = cluster.create_namespace(prefix).expect("namespace");
    kubectl(
        cluster,
        &[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=baseline",
        ],
    );
    let key = crate::sshnode::keygen(work.path(), "node_key");
    cluster
        .create_node_key_secret(&ns, &key)
        .unwrap_or_else(|error| panic!("the node key Secret in {ns}: {error}"));
    ns
}

/// `walt-operator run` for the tenant `ns`, in the first node's network namespace, with the lab
/// registry over plain HTTP, the walt image as the shell image and privileged runtime pods.
fn start_operator(
    cluster: &Cluster,
    work: &tempfile::TempDir,
    ns: &str,
    registry: &str,
    for_pods: &str,
) -> OperatorProcess {
    let netns = cluster.node_netns().expect("node network namespace");
    // The shell pods' layer cache on the cluster node, as in the chart (a hostPath): a session's
    // changes outlive its pod there (the eviction step of the shells test); under this lab's work dir.
    let shell_cache = format!("hostPath:{}", work.path().join("shell-cache").display());
    let args: Vec<String> = [
        "--namespace",
        ns,
        "--watch-namespace",
        ns,
        "--leader-election",
        "false",
        "--lab-registry",
        &format!("{for_pods}/lab"),
        "--registry-plain-http",
        "true",
        "--node-key-secret",
        "walt-node-key",
        "--shell-image",
        &format!("{registry}/walt/operator:lab"),
        "--user-namespaces",
        "never",
        "--shell-cache",
        &shell_cache,
        "--catalog-namespace",
        "walt-catalog-none",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let operator = OperatorProcess::start(
        &cluster.kubeconfig(),
        Some(netns),
        &args,
        &work.path().join("operator.log"),
    )
    .expect("start walt-operator");
    operator.wait_started(Duration::from_mins(1));
    operator
}
