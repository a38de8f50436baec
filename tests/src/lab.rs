//! `cargo xtask lab up|down`: a complete walt lab on this machine, in one command.
//!
//! `up`: the cluster of the current kubeconfig when it answers, else the harness's single-node cluster
//! (`cargo xtask cluster up --tier cluster`); the walt image (built here, no Docker engine) and an image of
//! Debian's Distribution registry pushed where the cluster's node pulls from; the chart installed with its
//! defaults (the embedded registry, reached by pods at its Service name, on the harness's cluster too);
//! demo OS images for amd64 and arm64 made from Debian's busybox-static, pushed into the lab registry;
//! Image objects for them and one virtual node. Every step first checks whether its result is
//! already there, so a second run is fast and changes nothing. `down` removes all of it (and the harness
//! cluster when `up` started it).

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::deploy::{self, cache_dir, chart_dir, run};
use crate::image_build::{self, Arch, BuildOptions, Entry};
use crate::registry_auth::{self, Challenge, RegistryAuth, ServiceUrl, SkopeoSide};
use crate::wait::{Poll, Wait};

/// Helm release and namespaces of the lab.
pub const RELEASE: &str = "walt";
/// Namespace of the walt installation.
pub const SYSTEM_NAMESPACE: &str = "walt-system";
/// Namespace of the lab's images and nodes (a tenant's working set).
pub const LAB_NAMESPACE: &str = "lab";
/// Field manager of the objects the lab applies.
const FIELD_MANAGER: &str = "walt-lab";

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool or file step failed.
    #[error(transparent)]
    Deploy(#[from] deploy::Error),
    /// The image build failed.
    #[error(transparent)]
    Image(#[from] image_build::Error),
    /// No cluster could be had.
    #[error("no cluster: {0}")]
    Cluster(String),
    /// Authenticating to the lab registry failed.
    #[error(transparent)]
    Auth(#[from] registry_auth::Error),
    /// A step failed.
    #[error("{0}")]
    Step(String),
}

/// Options of `cargo xtask lab up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpOptions {
    /// Registry (host:port) the cluster's node pulls the walt images from. Default: the harness cluster's
    /// node registry; needed when the current kubeconfig's cluster is used.
    #[arg(long, value_name = "HOST:PORT")]
    pub image_registry: Option<String>,
    /// Start the harness's cluster even when the current kubeconfig's cluster answers.
    #[arg(long)]
    pub own_cluster: bool,
    /// Build the walt image for amd64 and arm64 (default: this machine's architecture only, faster).
    #[arg(long)]
    pub all_arches: bool,
    /// Cargo profile of the walt image's binaries: `release` (optimized, what is published) or
    /// `dist-check` (unoptimized, built in a fraction of the time; for trying a change quickly).
    #[arg(long, default_value = "release")]
    pub profile: String,
}

/// What `up` recorded for `down` and for the next `up`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Kubeconfig of the lab's cluster.
    kubeconfig: Option<PathBuf>,
    /// `up` started the harness cluster (so `down` stops it).
    started_cluster: bool,
    /// Registry the node pulls from.
    image_registry: Option<String>,
    /// Hash of the chart files and values of the installed release.
    release_hash: Option<String>,
}

fn state_dir() -> PathBuf {
    cache_dir().join("lab")
}

fn state_path() -> PathBuf {
    state_dir().join("state.json")
}

fn load_state() -> State {
    std::fs::read(state_path())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_state(state: &State) -> Result<(), Error> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::Step(format!("creating {}: {e}", dir.display())))?;
    let text = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Step(format!("serializing the lab state: {e}")))?;
    std::fs::write(state_path(), text)
        .map_err(|e| Error::Step(format!("writing {}: {e}", state_path().display())))
}

/// kubectl (and helm) bound to one kubeconfig.
#[derive(Debug, Clone)]
pub struct Kube {
    /// The kubeconfig file.
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl Kube {
    /// Binds kubectl to `kubeconfig`.
    pub fn new(kubeconfig: PathBuf) -> Result<Self, Error> {
        Ok(Kube {
            kubeconfig,
            kubectl: deploy::kubectl()?,
        })
    }

    /// A kubectl command.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// `kubectl walt -n <namespace> <args>` with this kubeconfig (the plugin built from this workspace,
    /// [`crate::operator::plugin_binary`]).
    pub fn walt(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new(crate::operator::plugin_binary());
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["-n", namespace])
            .args(args);
        command
    }

    /// A helm command.
    pub fn helm(&self) -> Result<Command, Error> {
        let mut command = Command::new(deploy::helm()?);
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(command)
    }

    /// Whether the API server answers `/readyz`.
    pub fn reachable(&self) -> bool {
        self.kubectl()
            .args(["--request-timeout=5s", "get", "--raw", "/readyz"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Applies YAML (server-side, idempotent).
    pub fn apply(&self, yaml: &str) -> Result<String, Error> {
        let mut child = self
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager",
                FIELD_MANAGER,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Step(format!("running kubectl apply: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(yaml.as_bytes())
                .map_err(|e| Error::Step(format!("writing to kubectl apply: {e}")))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| Error::Step(format!("kubectl apply: {e}")))?;
        if !output.status.success() {
            return Err(Error::Step(format!(
                "kubectl apply failed:\n{}\n--- the YAML ---\n{yaml}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn current_kubeconfig() -> Option<PathBuf> {
    if let Some(value) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let first = std::env::split_paths(&value).next()?;
        return first.is_file().then_some(first);
    }
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".kube").join("config");
    path.is_file().then_some(path)
}

/// The harness's cluster tier, started (or reused) through `cargo xtask cluster up --tier cluster`;
/// returns its kubeconfig and the node's registry.
fn harness_cluster() -> Result<(PathBuf, String), Error> {
    let exe =
        std::env::current_exe().map_err(|e| Error::Cluster(format!("finding the xtask binary: {e}")))?;
    eprintln!("lab: starting the harness's single-node cluster (cargo xtask cluster up --tier cluster)");
    let output = Command::new(exe)
        .args(["cluster", "up", "--tier", "cluster"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Cluster(format!("running cargo xtask cluster up: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Cluster(format!(
            "cargo xtask cluster up --tier cluster failed ({}):\n{stdout}",
            output.status
        )));
    }
    let kubeconfig = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("export KUBECONFIG="))
        .next_back()
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::Cluster(format!(
                "cargo xtask cluster up printed no `export KUBECONFIG=…` line:\n{stdout}"
            ))
        })?;
    let registry = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("# registry: "))
        .next_back()
        .map(str::to_owned)
        .or_else(|| harness_registry_from_state(&kubeconfig))
        .ok_or_else(|| {
            Error::Cluster("the harness cluster did not say where its node registry is (pass --image-registry HOST:PORT)".into())
        })?;
    Ok((kubeconfig, registry))
}

/// The node registry recorded in the harness's state file next to its kubeconfig.
fn harness_registry_from_state(kubeconfig: &Path) -> Option<String> {
    let dir = kubeconfig.parent()?;
    for candidate in [dir.join("state.json"), dir.parent()?.join("state.json")] {
        let Ok(text) = std::fs::read_to_string(&candidate) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if let Some(registry) = value.get("registry").and_then(serde_json::Value::as_str) {
            return Some(registry.to_owned());
        }
    }
    None
}

/// A temporary directory in the walt cache (same filesystem as the cache, removed when dropped).
fn scratch() -> Result<tempfile::TempDir, Error> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| Error::Step(format!("creating {}: {e}", cache.display())))?;
    tempfile::tempdir_in(&cache)
        .map_err(|e| Error::Step(format!("creating a temporary dir in {}: {e}", cache.display())))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Digest of what `reference` points to in a registry, or None when it is not there.
pub fn remote_digest(reference: &str, auth: &RegistryAuth) -> Option<String> {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    command.args(auth.skopeo_arg(SkopeoSide::Only));
    let output = command.arg(format!("docker://{reference}")).output().ok()?;
    output
        .status
        .success()
        .then(|| format!("sha256:{}", sha256_hex(&output.stdout)))
}

/// Builds the walt image and pushes it as `REGISTRY/walt/operator:lab` unless the registry already has
/// that exact index; returns the index digest.
pub fn ensure_walt_image(
    registry: &str,
    all_arches: bool,
    profile: image_build::BuildProfile,
) -> Result<String, Error> {
    let reference = format!("{registry}/walt/operator:lab");
    let arches = if all_arches {
        Arch::ALL.to_vec()
    } else {
        vec![Arch::host()]
    };
    let layout = scratch()?;
    let built = image_build::build(&BuildOptions {
        arches,
        layout_dir: layout.path().join("layout"),
        tag: "lab".into(),
        profile,
    })?;
    if remote_digest(&reference, &RegistryAuth::Anonymous).as_deref() == Some(built.index_digest.as_str()) {
        eprintln!("lab: {reference} is up to date ({})", built.index_digest);
    } else {
        eprintln!("lab: pushing {reference}");
        image_build::push(&built, &reference, true)?;
    }
    Ok(built.index_digest)
}

/// An image of Debian's Distribution registry (`docker-registry`, linked against glibc only), for the
/// chart's embedded registry in a cluster without internet access: `REGISTRY/walt/registry:lab`.
pub fn ensure_registry_image(registry: &str) -> Result<(), Error> {
    let reference = format!("{registry}/walt/registry:lab");
    let binary = Path::new("/usr/bin/docker-registry");
    let libc_dir = Path::new("/lib/x86_64-linux-gnu");
    if !binary.is_file() || !libc_dir.join("libc.so.6").is_file() || Arch::host() != Arch::Amd64 {
        return Err(Error::Step(
            "the lab's registry image is made from Debian's docker-registry on amd64: apt-get install docker-registry".into(),
        ));
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| Error::Step(format!("reading {}: {e}", path.display())))
    };
    let entries = vec![
        Entry::dir("etc", 0o755),
        Entry::dir("etc/docker", 0o755),
        Entry::dir("etc/docker/registry", 0o755),
        Entry::dir("lib", 0o755),
        Entry::dir("lib/x86_64-linux-gnu", 0o755),
        Entry::dir("lib64", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/bin", 0o755),
        Entry::dir("var", 0o755),
        Entry::dir("var/lib", 0o755),
        Entry::dir("var/lib/registry", 0o777),
        Entry::file("usr/bin/registry", 0o755, read(binary)?),
        Entry::file(
            "lib/x86_64-linux-gnu/libc.so.6",
            0o755,
            read(&libc_dir.join("libc.so.6"))?,
        ),
        Entry::file(
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            0o755,
            read(&libc_dir.join("ld-linux-x86-64.so.2"))?,
        ),
        Entry::symlink(
            "lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        Entry::file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/:/sbin/nologin\nregistry:x:65532:65532::/:/sbin/nologin\n".to_vec(),
        ),
        Entry::file("etc/nsswitch.conf", 0o644, b"hosts: files dns\n".to_vec()),
    ];
    let layout_dir = scratch()?;
    let layout = layout_dir.path().join("layout");
    let labels = titled("Distribution registry (Debian docker-registry), walt lab");
    let digest = write_registry_image(&layout, entries, &labels)?;
    push_unless_there(&layout, &digest, &reference)
}

/// An image config's labels: its title.
fn titled(title: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("org.opencontainers.image.title".into(), title.into());
    labels
}

/// Pushes the image `lab` of `layout` (manifest `digest`) to `reference` unless the registry has it
/// there already.
fn push_unless_there(layout: &Path, digest: &str, reference: &str) -> Result<(), Error> {
    if remote_digest(reference, &RegistryAuth::Anonymous)
        .is_some_and(|remote| manifest_matches(layout, &remote, digest))
    {
        eprintln!("lab: {reference} is up to date");
        Ok(())
    } else {
        eprintln!("lab: pushing {reference}");
        Ok(image_build::push_layout(
            layout,
            "lab",
            reference,
            true,
            &RegistryAuth::Anonymous,
        )?)
    }
}

/// Builds the image of VM node pods (the chart's `vmNodes.image`) and pushes it as
/// `REGISTRY/walt/vm-node:lab` unless the registry has it already: the static `walt-operator`
/// (built with `profile`) and the host's Debian `qemu-system-x86_64` and `qemu-system-aarch64` (with
/// U-Boot) with what they load at run time ([`crate::netboot::vm_node_image_files`]); no Docker, like
/// the walt image. Returns the reference.
pub fn ensure_vm_node_image(registry: &str, profile: image_build::BuildProfile) -> Result<String, Error> {
    let reference = format!("{registry}/walt/vm-node:lab");
    if Arch::host() != Arch::Amd64 {
        return Err(Error::Step(
            "the VM node image is made from the host's qemu-system-x86_64 on amd64".into(),
        ));
    }
    let operator = image_build::build_binary(Arch::Amd64, profile)?;
    let entries = crate::netboot::vm_node_image_files(&operator)
        .map_err(|e| Error::Step(format!("collecting the VM node image's files: {e}")))?;
    let layout_dir = scratch()?;
    let layout = layout_dir.path().join("layout");
    let digest = image_build::write_simple_image(
        &layout,
        "lab",
        Arch::Amd64,
        entries,
        &titled(
            "walt VM node (walt-operator vm + Debian qemu-system-x86, qemu-system-arm, U-Boot), walt lab",
        ),
        &["/usr/bin/walt-operator"],
        &[],
    )?;
    push_unless_there(&layout, &digest, &reference)?;
    Ok(reference)
}

fn write_registry_image(
    layout: &Path,
    entries: Vec<Entry>,
    labels: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, Error> {
    // The chart passes the config path as the only argument, like the official image's entrypoint.
    Ok(image_build::write_simple_image(
        layout,
        "lab",
        Arch::Amd64,
        entries,
        labels,
        &["/usr/bin/registry", "serve"],
        &["/etc/docker/registry/config.yml"],
    )?)
}

/// `skopeo inspect --raw` digests the manifest list when pushed as an index of one; accept either.
fn manifest_matches(layout: &Path, remote: &str, manifest: &str) -> bool {
    if remote == manifest {
        return true;
    }
    std::fs::read(layout.join("index.json"))
        .is_ok_and(|bytes| format!("sha256:{}", sha256_hex(&bytes)) == remote)
}

/// The values the lab (and the journey test) install the chart with: the walt image and the embedded
/// registry's image from `registry` (where the cluster's node pulls from), otherwise the chart's defaults.
pub fn lab_values(registry: &str, persistence: bool) -> String {
    format!(
        "image:\n  repository: {registry}/walt/operator\n  tag: lab\n  pullPolicy: Always\n{}\
         operator:\n  logLevel: info,walt_operator=debug\n",
        embedded_registry_values(registry, persistence)
    )
}

/// Installs walt for a test or a benchmark on the harness's cluster tier, as a user of any cluster
/// does: the walt image (built with `profile`) and the embedded registry's image pushed to
/// `node_registry` (where the node pulls from), `helm install` of the chart with [`lab_values`], then
/// waits until the binfmt DaemonSet and the embedded registry roll out. No `--wait`: a part that does
/// not become ready is named, with the cluster's pods. The operator's own readiness is the caller's to
/// check (the journey reports it rather than failing).
pub fn install_release(
    kube: &Kube,
    node_registry: &str,
    profile: image_build::BuildProfile,
) -> Result<(), Error> {
    install_release_with(kube, node_registry, profile, "")
}

/// [`install_release`] with `extra_values` (chart values YAML, e.g. `bootService:`) on top of
/// [`lab_values`] (a second `-f`: Helm merges it over the first).
pub fn install_release_with(
    kube: &Kube,
    node_registry: &str,
    profile: image_build::BuildProfile,
    extra_values: &str,
) -> Result<(), Error> {
    let started = Instant::now();
    ensure_walt_image(node_registry, false, profile)?;
    ensure_registry_image(node_registry)?;
    eprintln!(
        "lab: images built and pushed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let values_dir = scratch()?;
    let values = values_dir.path().join("values.yaml");
    std::fs::write(
        &values,
        lab_values(node_registry, has_default_storage_class(kube)),
    )
    .map_err(|e| Error::Step(format!("writing {}: {e}", values.display())))?;
    let extra = values_dir.path().join("extra-values.yaml");
    std::fs::write(&extra, extra_values)
        .map_err(|e| Error::Step(format!("writing {}: {e}", extra.display())))?;
    run(kube
        .helm()?
        .args(["install", RELEASE])
        .arg(chart_dir())
        .args(["-n", SYSTEM_NAMESPACE, "--create-namespace", "-f"])
        .arg(&values)
        .arg("-f")
        .arg(&extra))?;
    for workload in ["daemonset/walt-binfmt", "deployment/walt-registry"] {
        if let Err(error) = run(kube.kubectl().args([
            "rollout",
            "status",
            workload,
            "-n",
            SYSTEM_NAMESPACE,
            "--timeout=300s",
        ])) {
            let pods = run(kube.kubectl().args(["get", "pods", "-A", "-o", "wide"])).unwrap_or_default();
            return Err(Error::Step(format!(
                "{workload} did not become ready: {error}\n{pods}"
            )));
        }
    }
    Ok(())
}

/// Hash of every chart file plus the values: the release is up to date when it matches.
fn release_hash(values: &str, image_digest: &str) -> Result<String, Error> {
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    collect_files(&chart_dir(), &mut files)?;
    files.sort();
    for file in files {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update(
            std::fs::read(&file).map_err(|e| Error::Step(format!("reading {}: {e}", file.display())))?,
        );
    }
    hasher.update(values.as_bytes());
    hasher.update(image_digest.as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::Step(format!("listing {}: {e}", dir.display())))?;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether the cluster has a default StorageClass (else the registry keeps its data in an emptyDir).
pub fn has_default_storage_class(kube: &Kube) -> bool {
    run(kube.kubectl().args(["get", "storageclass", "-o", "json"]))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|list| list.get("items").and_then(serde_json::Value::as_array).cloned())
        .is_some_and(|items| {
            items.iter().any(|item| {
                item.pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class")
                    .and_then(serde_json::Value::as_str)
                    == Some("true")
            })
        })
}

/// Installs or upgrades the chart unless the same chart and values are already deployed.
fn ensure_release(kube: &Kube, state: &mut State, registry: &str, image_digest: &str) -> Result<(), Error> {
    let values = lab_values(registry, has_default_storage_class(kube));
    let hash = release_hash(&values, image_digest)?;
    let deployed = run(kube
        .helm()?
        .args(["status", RELEASE, "-n", SYSTEM_NAMESPACE, "-o", "json"]))
    .ok()
    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
    .and_then(|status| {
        status
            .pointer("/info/status")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    });
    if deployed.as_deref() == Some("deployed") && state.release_hash.as_deref() == Some(hash.as_str()) {
        eprintln!("lab: release {RELEASE} is up to date");
        return Ok(());
    }
    let values_path = state_dir().join("values.yaml");
    std::fs::create_dir_all(state_dir())
        .map_err(|e| Error::Step(format!("creating {}: {e}", state_dir().display())))?;
    std::fs::write(&values_path, &values)
        .map_err(|e| Error::Step(format!("writing {}: {e}", values_path.display())))?;
    eprintln!("lab: helm upgrade --install {RELEASE} charts/walt -n {SYSTEM_NAMESPACE}");
    run(kube
        .helm()?
        .args(["upgrade", "--install", RELEASE])
        .arg(chart_dir())
        .args([
            "-n",
            SYSTEM_NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "10m",
            "-f",
        ])
        .arg(&values_path))?;
    state.release_hash = Some(hash);
    save_state(state)
}

/// A `kubectl port-forward` to a Service, stopped (by PID) when dropped.
pub struct PortForward {
    child: Child,
    /// Local `127.0.0.1:PORT`.
    pub address: String,
}

impl PortForward {
    /// Forwards a free local port to `service`'s `port` in `namespace`.
    pub fn start(kube: &Kube, namespace: &str, service: &str, port: u16) -> Result<Self, Error> {
        let mut child = kube
            .kubectl()
            .args([
                "port-forward",
                "-n",
                namespace,
                &format!("svc/{service}"),
                &format!(":{port}"),
            ])
            .args(["--address", "127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Step(format!("running kubectl port-forward: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Step("kubectl port-forward: no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        // "Forwarding from 127.0.0.1:40123 -> 5000"
        let address = line
            .strip_prefix("Forwarding from ")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        let Some(address) = address else {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            return Err(Error::Step(format!(
                "kubectl port-forward to svc/{service} failed: {line}{output}"
            )));
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(PortForward { child, address })
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `username:password` of the lab registry from the generated Secret.
pub fn registry_creds(kube: &Kube) -> Result<String, Error> {
    let read = |key: &str| -> Result<String, Error> {
        let out = run(kube.kubectl().args([
            "get",
            "secret",
            "-n",
            SYSTEM_NAMESPACE,
            &format!("{RELEASE}-registry-credentials"),
            "-o",
            &format!("jsonpath={{.data.{key}}}"),
        ]))?;
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(out.trim())
            .map_err(|e| Error::Step(format!("decoding the registry {key}: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    Ok(format!("{}:{}", read("username")?, read("password")?))
}

/// A demo OS image: Debian's busybox-static for `arch`, with WalT's labels.
pub fn demo_entries(arch: Arch) -> Result<Vec<Entry>, Error> {
    let deb = busybox_deb(arch)?;
    let unpacked = scratch()?;
    let dir = unpacked.path();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir))?;
    let busybox = std::fs::read(dir.join("bin").join("busybox"))
        .map_err(|e| Error::Step(format!("reading busybox from {}: {e}", deb.display())))?;
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::dir("sbin", 0o755),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/bin", 0o755),
        Entry::dir("usr/sbin", 0o755),
        Entry::dir("etc", 0o755),
        Entry::dir("root", 0o700),
        Entry::dir("tmp", 0o1777),
        Entry::dir("proc", 0o555),
        Entry::dir("sys", 0o555),
        Entry::dir("dev", 0o755),
        Entry::dir("run", 0o755),
        Entry::dir("persist", 0o755),
        Entry::file("bin/busybox", 0o755, busybox),
        Entry::file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
        Entry::file("etc/group", 0o644, b"root:x:0:\n".to_vec()),
        Entry::file(
            "etc/hostname",
            0o644,
            format!("walt-demo-{}\n", arch.name()).into_bytes(),
        ),
        Entry::file(
            "etc/motd",
            0o644,
            format!(
                "walt demo image ({}), made from Debian's busybox-static.\n",
                arch.name()
            )
            .into_bytes(),
        ),
        Entry::file(
            "etc/inittab",
            0o644,
            b"::sysinit:/bin/touch /run/uptime-ready\n::respawn:/bin/sleep 3600\n".to_vec(),
        ),
    ];
    for applet in [
        "sh", "ash", "ls", "cat", "echo", "mkdir", "rm", "rmdir", "mv", "cp", "ln", "touch", "uname", "vi",
        "ps", "sleep", "grep", "sed", "find", "du", "df", "head", "tail", "wc", "id", "hostname", "date",
        "sync", "chmod", "chown", "stat", "tar", "true", "false", "test", "env", "clear", "less", "more",
    ] {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    for applet in ["init", "halt", "poweroff", "reboot"] {
        entries.push(Entry::symlink(&format!("sbin/{applet}"), "../bin/busybox"));
    }
    Ok(entries)
}

/// Debian's busybox-static package for `arch`, downloaded once into the walt cache.
pub fn busybox_deb(arch: Arch) -> Result<PathBuf, Error> {
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| Error::Step(format!("creating {}: {e}", debs.display())))?;
    let find = || {
        std::fs::read_dir(&debs).ok().and_then(|entries| {
            entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.starts_with("busybox-static_") && name.ends_with(&format!("_{}.deb", arch.name()))
            })
        })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    run(Command::new("apt-get")
        .args(["download", &format!("busybox-static:{}", arch.name())])
        .current_dir(&debs))?;
    find().ok_or_else(|| {
        Error::Step(format!(
            "apt-get download busybox-static:{} left no .deb in {}",
            arch.name(),
            debs.display()
        ))
    })
}

/// Where the lab keeps a demo image, as the operator sees it (in-cluster registry).
pub fn demo_reference(cluster_registry: &str, arch: Arch) -> String {
    format!(
        "{cluster_registry}/walt/{LAB_NAMESPACE}/demo-{}:latest",
        arch.name()
    )
}

/// Pushes the demo image of `arch` to `reference` (a registry reached from here), unless it is there.
pub fn push_demo_image(arch: Arch, reference: &str, auth: &RegistryAuth) -> Result<(), Error> {
    let layout_dir = scratch()?;
    let layout = layout_dir.path().join("layout");
    let mut labels = serde_json::Map::new();
    let models = match arch {
        Arch::Amd64 => "pc-x86-64",
        Arch::Arm64 => "rpi-3-b-plus,rpi-4-b",
    };
    labels.insert("walt.node.models".into(), models.into());
    labels.insert(
        "walt.image.preferred-name".into(),
        format!("demo-{}", arch.name()).into(),
    );
    labels.insert("walt.server.minversion".into(), "4".into());
    let digest = image_build::write_simple_image(
        &layout,
        "latest",
        arch,
        demo_entries(arch)?,
        &labels,
        &[],
        &["/bin/sh"],
    )?;
    match remote_digest(reference, auth) {
        Some(remote) if manifest_matches(&layout, &remote, &digest) => {
            eprintln!("lab: {reference} is up to date");
        }
        _ => {
            eprintln!("lab: pushing {reference}");
            image_build::push_layout(&layout, "latest", reference, true, auth)?;
        }
    }
    Ok(())
}

/// Builds and pushes the demo images into the lab registry through a port-forward, when missing.
fn ensure_demo_images(kube: &Kube) -> Result<(), Error> {
    let registry = LabRegistry::open(kube)?;
    for arch in Arch::ALL {
        let reference = demo_reference(registry.address(), arch);
        push_demo_image(arch, &reference, &registry.auth(&reference)?)?;
    }
    Ok(())
}

/// The lab's walt objects: the tenant namespace (Pod Security `baseline`, enforced: walt runs its
/// shell and virtual node pods in the operator's runtime namespace `walt-run-lab`, never there), two
/// Images and one virtual Node.
pub fn lab_objects(cluster_registry: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {LAB_NAMESPACE}\n  labels:\n    \
         pod-security.kubernetes.io/enforce: baseline\n"
    );
    for arch in Arch::ALL {
        let _ = write!(
            yaml,
            "---\napiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata:\n  name: demo-{arch}\n  namespace: {LAB_NAMESPACE}\nspec:\n  reference: {reference}\n",
            arch = arch.name(),
            reference = demo_reference(cluster_registry, arch),
        );
    }
    let _ = write!(
        yaml,
        "---\napiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata:\n  name: vnode1\n  namespace: {LAB_NAMESPACE}\nspec:\n  model: pc-x86-64\n  image: demo-amd64\n  bootMode: volatile\n  virtual:\n    architecture: amd64\n    memory: 256Mi\n    cpu: \"1\"\n"
    );
    yaml
}

/// `HOST:PORT` of the lab registry as pods (the operator, shells, nodes) reach it: the embedded
/// registry's Service name (cluster DNS), as on any cluster.
pub fn lab_registry_for_pods() -> String {
    format!("{RELEASE}-registry.{SYSTEM_NAMESPACE}.svc:5000")
}

/// The chart values of the embedded registry: its image from `image_registry`, and a volume only when
/// the cluster can provide one (`persistence`).
fn embedded_registry_values(image_registry: &str, persistence: bool) -> String {
    format!(
        "registry:\n  embedded:\n    image:\n      repository: {image_registry}/walt/registry\n      tag: lab\n      pullPolicy: Always\n    persistence:\n      enabled: {persistence}\n"
    )
}

/// The lab registry as this machine reaches it: a port-forward to the embedded registry's Service, and
/// what skopeo needs to authenticate there. With the chart's default token authentication the
/// registry's token realm is a cluster Service name this machine cannot resolve, so a second
/// port-forward reaches the token issuer's Service and the lab asks it for a token per repository
/// with the lab credential (see [`crate::registry_auth`]).
pub struct LabRegistry {
    registry: PortForward,
    login: Login,
}

/// How the lab registry wants to be authenticated to.
enum Login {
    Anonymous,
    Basic(String),
    Token {
        /// The port-forward to the token issuer's Service.
        issuer: PortForward,
        /// The realm, as the registry named it.
        realm: ServiceUrl,
        /// The `service` tokens are for.
        service: String,
        /// The lab credential, `user:password`.
        credential: String,
    },
}

impl LabRegistry {
    /// Opens the port-forwards and learns how the registry authenticates (its answer to `GET /v2/`).
    pub fn open(kube: &Kube) -> Result<Self, Error> {
        let service = format!("{RELEASE}-registry");
        let registry = PortForward::start(kube, SYSTEM_NAMESPACE, &service, 5000)?;
        let answer = registry_auth::http_get(&registry.address, "/v2/", None).map_err(|error| {
            Error::Step(format!(
                "the lab registry (svc/{service} -n {SYSTEM_NAMESPACE}, through a port-forward) does not \
                 answer: {error}; see its pod: kubectl -n {SYSTEM_NAMESPACE} get pods"
            ))
        })?;
        let login = match registry_auth::challenge(answer.status, answer.www_authenticate.as_deref())? {
            Challenge::Open => Login::Anonymous,
            Challenge::Basic => Login::Basic(registry_creds(kube)?),
            Challenge::Bearer { realm, service } => {
                let realm = ServiceUrl::parse(&realm)?;
                let issuer = PortForward::start(kube, &realm.namespace, &realm.name, realm.port)?;
                Login::Token {
                    issuer,
                    realm,
                    service,
                    credential: registry_creds(kube)?,
                }
            }
        };
        Ok(LabRegistry { registry, login })
    }

    /// `127.0.0.1:PORT` of the registry's port-forward.
    pub fn address(&self) -> &str {
        &self.registry.address
    }

    /// How skopeo authenticates to pull and push `reference` (with token authentication: a token
    /// for that repository, fresh from the issuer, so valid for the issuer's token lifetime).
    pub fn auth(&self, reference: &str) -> Result<RegistryAuth, Error> {
        match &self.login {
            Login::Anonymous => Ok(RegistryAuth::Anonymous),
            Login::Basic(credential) => Ok(RegistryAuth::Basic(credential.clone())),
            Login::Token {
                issuer,
                realm,
                service,
                credential,
            } => fetch_token(
                issuer,
                realm,
                service,
                credential,
                registry_auth::repository_of(reference),
            )
            .map(RegistryAuth::Bearer),
        }
    }

    /// Independent checker of what walt pushed: `skopeo copy` of `reference` (a reference at
    /// [`LabRegistry::address`]) into an OCI layout under `dir`, then `umoci unpack --rootless`;
    /// the unpacked root filesystem (whiteouts applied, so a deleted file is absent).
    pub fn unpack(&self, reference: &str, dir: &Path) -> Result<PathBuf, Error> {
        let layout = dir.join("oci");
        let auth = self.auth(reference)?;
        run(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .args(auth.skopeo_arg(SkopeoSide::Source))
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:checked", layout.display())))?;
        let bundle = dir.join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:checked", layout.display()))
            .arg(&bundle))?;
        Ok(bundle.join("rootfs"))
    }
}

/// Asks the token issuer (through `issuer`'s port-forward) for pull and push on `repository`.
fn fetch_token(
    issuer: &PortForward,
    realm: &ServiceUrl,
    service: &str,
    credential: &str,
    repository: &str,
) -> Result<String, Error> {
    use base64::Engine as _;
    let what = format!(
        "the lab registry's token issuer (svc/{} -n {}, through a port-forward)",
        realm.name, realm.namespace
    );
    let path = registry_auth::token_path(&realm.path, service, repository);
    let basic = base64::engine::general_purpose::STANDARD.encode(credential);
    let answer = registry_auth::http_get(&issuer.address, &path, Some(&format!("Basic {basic}"))).map_err(
        |error| {
            Error::Step(format!(
                "{what} does not answer: {error}; the operator serves it: kubectl -n {ns} get pods; \
                 kubectl -n {ns} logs deployment/{RELEASE}-operator",
                ns = realm.namespace
            ))
        },
    )?;
    match answer.status {
        200 => registry_auth::token_of(&answer.body)
            .map_err(|problem| Error::Step(format!("{what} gave no token for {repository}: {problem}"))),
        401 | 403 => Err(Error::Step(format!(
            "{what} refused the lab credential of Secret {SYSTEM_NAMESPACE}/{RELEASE}-registry-credentials \
             ({}: {}); the operator reads that Secret when it starts: kubectl -n {SYSTEM_NAMESPACE} \
             rollout restart deployment/{RELEASE}-operator",
            answer.status,
            answer.body.trim()
        ))),
        status => Err(Error::Step(format!(
            "{what} answered {status} for a token of {repository}: {}",
            answer.body.trim()
        ))),
    }
}

/// `cargo xtask lab up`.
pub fn up(options: &UpOptions) -> Result<(), Error> {
    let started = Instant::now();
    let mut state = load_state();
    // 1. The cluster.
    let (kube, image_registry) = match (current_kubeconfig(), options.own_cluster) {
        (Some(kubeconfig), false) if Kube::new(kubeconfig.clone())?.reachable() => {
            eprintln!(
                "lab: using the current kubeconfig's cluster ({})",
                kubeconfig.display()
            );
            let registry = options.image_registry.clone().or_else(|| state.image_registry.clone()).ok_or_else(|| {
                Error::Cluster(format!(
                    "the cluster of {} answers, but walt's images must be pushed where its nodes pull from: pass \
                     --image-registry HOST:PORT (or --own-cluster for the harness's cluster)",
                    kubeconfig.display()
                ))
            })?;
            (Kube::new(kubeconfig)?, registry)
        }
        _ => {
            let (kubeconfig, registry) = harness_cluster()?;
            state.started_cluster = true;
            (
                Kube::new(kubeconfig)?,
                options.image_registry.clone().unwrap_or(registry),
            )
        }
    };
    state.kubeconfig = Some(kube.kubeconfig.clone());
    state.image_registry = Some(image_registry.clone());
    save_state(&state)?;
    // 2. Images the node pulls: walt, and the registry.
    let profile = image_build::BuildProfile::parse(&options.profile)?;
    let image_digest = ensure_walt_image(&image_registry, options.all_arches, profile)?;
    ensure_registry_image(&image_registry)?;
    // 3. The chart.
    ensure_release(&kube, &mut state, &image_registry, &image_digest)?;
    // 4. Demo images in the lab registry, Images and a virtual node.
    ensure_demo_images(&kube)?;
    let applied = kube.apply(&lab_objects(&lab_registry_for_pods()))?;
    for line in applied.lines() {
        eprintln!("lab: {line}");
    }
    wait_node_ready(&kube, "vnode1", Duration::from_mins(3));
    let bin = install_client_tools(&kube.kubectl)?;
    println!(
        "\nwalt lab is up ({:.0} s). Try (kubectl and kubectl-walt are in {bin}):\n\
         \x20 export KUBECONFIG={kubeconfig}\n\
         \x20 export PATH={bin}:$PATH\n\
         \x20 kubectl get walt -n {LAB_NAMESPACE}\n\
         \x20 kubectl walt -n {LAB_NAMESPACE} image shell demo-arm64      # an arm64 shell, emulated\n\
         \x20 kubectl walt -n {LAB_NAMESPACE} node shell vnode1\n\
         \x20 kubectl walt -n {LAB_NAMESPACE} node save vnode1 my-image\n\
         Remove it all: cargo xtask lab down",
        started.elapsed().as_secs_f64(),
        kubeconfig = kube.kubeconfig.display(),
        bin = bin.display(),
    );
    Ok(())
}

/// Builds `kubectl-walt` and links it and the lab's kubectl into one directory (in the walt cache) that the
/// printed `export PATH=…` line puts first, so `kubectl walt …` works in the user's shell as printed.
fn install_client_tools(kubectl: &Path) -> Result<PathBuf, Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("lab: building kubectl-walt (cargo build -p kubectl-walt)");
    run(Command::new(cargo).current_dir(deploy::repo_root()).args([
        "build",
        "--quiet",
        "-p",
        "kubectl-walt",
    ]))?;
    let plugin = deploy::target_dir().join("debug").join("kubectl-walt");
    let bin = cache_dir().join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| Error::Step(format!("creating {}: {e}", bin.display())))?;
    for (name, to) in [("kubectl", kubectl), ("kubectl-walt", plugin.as_path())] {
        let link = bin.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(to, &link)
            .map_err(|e| Error::Step(format!("linking {} to {}: {e}", link.display(), to.display())))?;
    }
    Ok(bin)
}

fn wait_node_ready(kube: &Kube, node: &str, timeout: Duration) {
    let ready = Wait::new(&format!("virtual node {node} to be Ready"), timeout)
        .every(Duration::from_secs(2))
        .until(|| {
            let phase = run(kube.kubectl().args([
                "get",
                "nodes.walt.dev",
                node,
                "-n",
                LAB_NAMESPACE,
                "-o",
                "jsonpath={.status.phase}",
            ]))
            .unwrap_or_default();
            if phase == "Ready" {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("phase {phase:?}"))
            }
        });
    match ready {
        Ok(()) => eprintln!("lab: virtual node {node} is Ready"),
        Err(e) => eprintln!(
            "lab: {e}; it may still become Ready: see kubectl describe nodes.walt.dev {node} -n {LAB_NAMESPACE}"
        ),
    }
}

/// `cargo xtask lab down`.
pub fn down() -> Result<(), Error> {
    let state = load_state();
    let Some(kubeconfig) = state.kubeconfig.clone() else {
        eprintln!(
            "lab: nothing to remove (no lab state in {})",
            state_dir().display()
        );
        return Ok(());
    };
    let kube = Kube::new(kubeconfig)?;
    if kube.reachable() {
        // The lab's namespace, then its runtime namespace (the operator never deletes one; its
        // finalizers have emptied it once the lab's objects are gone).
        let runtime = walt_crds::runtime_namespace(LAB_NAMESPACE);
        for namespace in [LAB_NAMESPACE, runtime.as_str()] {
            let _ = run(kube.kubectl().args([
                "delete",
                "namespace",
                namespace,
                "--ignore-not-found",
                "--wait",
                "--timeout=120s",
            ]));
        }
        let status = run(kube.helm()?.args(["status", RELEASE, "-n", SYSTEM_NAMESPACE]));
        if status.is_ok() {
            run(kube.helm()?.args([
                "uninstall",
                RELEASE,
                "-n",
                SYSTEM_NAMESPACE,
                "--wait",
                "--timeout",
                "5m",
            ]))?;
        }
        // Helm never deletes the CRDs of a chart's crds/ directory (their objects would go with them): the
        // lab made them, so it removes them.
        let crds = chart_dir().join("crds");
        if crds.is_dir() {
            let _ = run(kube
                .kubectl()
                .args(["delete", "--ignore-not-found", "-f"])
                .arg(&crds));
        }
        let _ = run(kube.kubectl().args([
            "delete",
            "namespace",
            SYSTEM_NAMESPACE,
            "--ignore-not-found",
            "--wait",
            "--timeout=120s",
        ]));
    }
    if state.started_cluster {
        let exe =
            std::env::current_exe().map_err(|e| Error::Cluster(format!("finding the xtask binary: {e}")))?;
        let status = Command::new(exe)
            .args(["cluster", "down"])
            .status()
            .map_err(|e| Error::Cluster(format!("running cargo xtask cluster down: {e}")))?;
        if !status.success() {
            return Err(Error::Cluster(format!(
                "cargo xtask cluster down failed ({status})"
            )));
        }
    }
    let _ = std::fs::remove_dir_all(state_dir());
    eprintln!("lab: removed");
    Ok(())
}
