//! Where the Kubernetes binaries come from.
//!
//! In order: `WALT_K8S_BIN` (a directory with prebuilt etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl and coredns), `KUBEBUILDER_ASSETS` (the envtest
//! convention: etcd, kube-apiserver, kubectl; the others are used when present), else the pinned
//! build `tests/k8s/build.sh`, cached under `${WALT_CACHE:-~/.cache/walt}/k8s/<version>/bin`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::Error;

/// Environment variable naming a directory of prebuilt Kubernetes binaries.
pub const WALT_K8S_BIN: &str = "WALT_K8S_BIN";
/// The envtest convention: a directory with at least etcd, kube-apiserver and kubectl.
pub const KUBEBUILDER_ASSETS: &str = "KUBEBUILDER_ASSETS";

/// The Kubernetes release the build script pins (see `tests/k8s/go.mod`).
pub const PINNED_VERSION: &str = "v1.34.4";

/// Paths of the binaries the harness runs.
#[derive(Debug, Clone)]
pub struct K8sBinaries {
    /// The directory they were found in.
    pub dir: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
    /// kube-controller-manager (absent in a bare envtest asset directory).
    pub kube_controller_manager: Option<PathBuf>,
    /// kube-scheduler (absent in a bare envtest asset directory).
    pub kube_scheduler: Option<PathBuf>,
    /// kubelet (needed by the cluster tier only).
    pub kubelet: Option<PathBuf>,
    /// kube-proxy (needed by the cluster tier only).
    pub kube_proxy: Option<PathBuf>,
    /// CoreDNS, the cluster DNS (needed by the cluster tier only; built from its own Go module).
    pub coredns: Option<PathBuf>,
}

impl K8sBinaries {
    /// Uses the binaries in `dir`; etcd, kube-apiserver and kubectl must be there.
    pub fn in_dir(dir: &Path, origin: &str) -> Result<K8sBinaries, Error> {
        let required = |name: &str| -> Result<PathBuf, Error> {
            let path = dir.join(name);
            if is_executable(&path) {
                Ok(path)
            } else {
                Err(Error::Binaries(format!(
                    "{origin}: {} is missing or not executable; point {origin} to a directory with \
                     etcd, kube-apiserver and kubectl, or unset it to build them (tests/k8s/build.sh)",
                    path.display()
                )))
            }
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| is_executable(p));
        Ok(K8sBinaries {
            dir: dir.to_path_buf(),
            etcd: required("etcd")?,
            kube_apiserver: required("kube-apiserver")?,
            kubectl: required("kubectl")?,
            kube_controller_manager: optional("kube-controller-manager"),
            kube_scheduler: optional("kube-scheduler"),
            kubelet: optional("kubelet"),
            kube_proxy: optional("kube-proxy"),
            coredns: optional("coredns"),
        })
    }

    /// Finds the binaries (environment first), building them if needed. Cached per process.
    pub fn ensure() -> Result<K8sBinaries, Error> {
        static FOUND: OnceLock<Result<K8sBinaries, String>> = OnceLock::new();
        FOUND
            .get_or_init(|| Self::resolve().map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Binaries)
    }

    fn resolve() -> Result<K8sBinaries, Error> {
        for var in [WALT_K8S_BIN, KUBEBUILDER_ASSETS] {
            if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                return Self::in_dir(Path::new(&dir), var);
            }
        }
        let dir = build()?;
        Self::in_dir(&dir, "tests/k8s/build.sh")
    }
}

/// The build script in this repository.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh")
}

/// Runs `tests/k8s/build.sh` (a no-op when the cache is up to date) and returns the bin directory.
/// Its progress goes to our stderr.
pub fn build() -> Result<PathBuf, Error> {
    let script = build_script();
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Binaries(format!("cannot run {}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed ({}); see the messages above. Install Go >= 1.24 or set {WALT_K8S_BIN} to \
             prebuilt binaries",
            script.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err(Error::Binaries(format!(
            "{} printed no bin directory",
            script.display()
        )));
    }
    Ok(PathBuf::from(dir))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
