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

/// The kubelet built for another CPU (`GOARCH` name, e.g. `arm64`), for a cluster node that is
/// that CPU's ([`super::SecondNode`]); it runs here through qemu-user (binfmt_misc). Built from the
/// same pinned module as the others with `go build` (the Go build cache makes later calls quick),
/// cached under `${WALT_CACHE:-~/.cache/walt}/k8s/<version>/linux-<arch>/kubelet`.
pub fn kubelet_for(architecture: &str) -> Result<PathBuf, Error> {
    let out = super::images::cache_dir()
        .join("k8s")
        .join(PINNED_VERSION)
        .join(format!("linux-{architecture}"));
    let kubelet = out.join("kubelet");
    if is_executable(&kubelet) {
        return Ok(kubelet);
    }
    eprintln!("walt-tests: building the kubelet {PINNED_VERSION} for {architecture} (once; minutes)");
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&out).map_err(|e| Error::Binaries(format!("create {}: {e}", out.display())))?;
    let partial = out.join(format!("kubelet.{}", std::process::id()));
    let output = Command::new("go")
        .args(["build", "-trimpath", "-ldflags", &version_ldflags(), "-o"])
        .arg(&partial)
        .arg("k8s.io/kubernetes/cmd/kubelet")
        .current_dir(build_script().parent().unwrap_or(Path::new(".")))
        .env("PATH", go_path())
        .env("CGO_ENABLED", "0")
        .env("GOOS", "linux")
        .env("GOARCH", architecture)
        .output()
        .map_err(|e| Error::Binaries(format!("cannot run go build (install Go >= 1.24): {e}")))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "go build of the kubelet for {architecture} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::rename(&partial, &kubelet)
        .map_err(|e| Error::Binaries(format!("move {} into place: {e}", partial.display())))?;
    eprintln!(
        "walt-tests: kubelet for {architecture} built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(kubelet)
}

/// The version stamps Kubernetes' own build sets (as `tests/k8s/build.sh` does), so that the node
/// reports the real release.
fn version_ldflags() -> String {
    let minor = PINNED_VERSION.split('.').nth(1).unwrap_or_default();
    let stamps = ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"].map(|package| {
        format!(
            "-X {package}.gitVersion={PINNED_VERSION} -X {package}.gitMajor=1 -X {package}.gitMinor={minor} \
             -X {package}.gitTreeState=clean -X {package}.buildDate=1970-01-01T00:00:00Z"
        )
    });
    format!("-s -w {}", stamps.join(" "))
}

/// `PATH` with Go's usual install directory at the end (as `tests/k8s/build.sh` has it).
fn go_path() -> std::ffi::OsString {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    path.push(":/usr/local/go/bin");
    path
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
