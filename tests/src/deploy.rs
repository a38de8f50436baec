//! The Helm chart (`charts/walt`) and the kustomize base (`deploy/base`) as tests and the lab use them:
//! the helm tool (built from its Go module into the walt cache when no package offers it), rendering,
//! and the kustomize base generated from the chart's defaults (`cargo xtask deploy sync`), so both install
//! the same objects.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Helm release pinned for tests and the lab (the Go module `helm.sh/helm/v3`).
pub const HELM_VERSION: &str = "v3.22.0";
/// Kubernetes minor version of the client libraries of [`HELM_VERSION`] (its `k8s.io/client-go` is v0.37):
/// what `helm template` assumes without a cluster, as the official build sets it.
const HELM_K8S_MINOR: &str = "37";
/// Release name and namespace the kustomize base reproduces.
pub const DEFAULT_RELEASE: &str = "walt";
/// Namespace of the default installation.
pub const DEFAULT_NAMESPACE: &str = "walt-system";

/// Errors of the deploy helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool could not be started.
    #[error("running {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{command} failed ({status}):\n{stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// Go is needed to build helm and is missing.
    #[error(
        "helm is not installed and Go is missing to build it: install Go >= 1.24 (or put a helm binary in WALT_HELM)"
    )]
    NoGo,
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Output that should be YAML was not.
    #[error("parsing the YAML of {what}: {source}")]
    Yaml {
        /// Whose output.
        what: String,
        /// The cause (boxed: saphyr's errors carry the location and a snippet).
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// Objects could not be written as YAML.
    #[error("writing {what} as YAML: {source}")]
    WriteYaml {
        /// What was being written.
        what: String,
        /// The cause.
        #[source]
        source: Box<serde_saphyr::SerializeError>,
    },
    /// No kubectl found.
    #[error(
        "kubectl is missing: set WALT_KUBECTL, build the harness's binaries (`cargo xtask k8s-binaries`) or install kubectl"
    )]
    NoKubectl,
}

/// Maps an I/O error to [`Error::Io`] with what was being done and the file.
pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { action, path, source }
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Cargo's target directory for this workspace: `CARGO_TARGET_DIR` when set (and not empty), else
/// `target/` in the repository (where `cargo build` puts what the tests and tasks then run).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| repo_root().join("target"), PathBuf::from)
}

/// The walt cache (`WALT_CACHE`, else `$XDG_CACHE_HOME/walt`, else `~/.cache/walt`): tools built once
/// (the harness's, shared).
pub fn cache_dir() -> PathBuf {
    crate::k8s::images::cache_dir()
}

/// Runs a command, returns its stdout, or an error with its stderr.
pub fn run(command: &mut Command) -> Result<String, Error> {
    let line = format!("{command:?}");
    let output = command.output().map_err(|source| Error::Spawn {
        tool: line.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(Error::Failed {
            command: line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The Go tool: `$GO`, else on `PATH`, else `/usr/local/go/bin/go`.
pub fn go_binary() -> Option<PathBuf> {
    if let Some(go) = std::env::var_os("GO").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(go));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/local/go/bin")])
        .map(|dir| dir.join("go"))
        .find(|candidate| candidate.is_file())
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The helm binary: `WALT_HELM`, else the walt cache (built there from the Go module the first time, with
/// the version and Kubernetes defaults the official build sets).
pub fn helm() -> Result<PathBuf, Error> {
    if let Some(helm) = std::env::var_os("WALT_HELM").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(helm));
    }
    let dir = cache_dir().join("helm").join(HELM_VERSION);
    let helm = dir.join("helm");
    if helm.is_file() {
        return Ok(helm);
    }
    let go = go_binary().ok_or(Error::NoGo)?;
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    eprintln!(
        "deploy: building helm {HELM_VERSION} from its Go module into {} (a few minutes, once)",
        dir.display()
    );
    let ldflags = format!(
        "-w -s -X helm.sh/helm/v3/internal/version.version={HELM_VERSION} \
         -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={HELM_K8S_MINOR} \
         -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={HELM_K8S_MINOR}"
    );
    // Built into a temporary name and renamed, so a concurrent or interrupted build never leaves half a binary.
    let staging = tempfile::tempdir_in(&dir).map_err(io("creating a staging dir in", &dir))?;
    run(Command::new(go)
        .args(["install", "-trimpath", "-ldflags", &ldflags])
        .arg(format!("helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"))
        .env("GOBIN", staging.path())
        .env("CGO_ENABLED", "0")
        .current_dir(&dir))?;
    std::fs::rename(staging.path().join("helm"), &helm).map_err(io("installing", &helm))?;
    Ok(helm)
}

/// kubectl: `WALT_KUBECTL`, else the harness's build in the walt cache, else PATH.
pub fn kubectl() -> Result<PathBuf, Error> {
    if let Some(kubectl) = std::env::var_os("WALT_KUBECTL").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(kubectl));
    }
    let k8s = cache_dir().join("k8s");
    if let Ok(versions) = std::fs::read_dir(&k8s) {
        let mut found: Vec<PathBuf> = versions
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("bin").join("kubectl"))
            .filter(|path| path.is_file())
            .collect();
        found.sort();
        if let Some(newest) = found.pop() {
            return Ok(newest);
        }
    }
    which("kubectl").ok_or(Error::NoKubectl)
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("walt")
}

/// Splits a multi-document YAML stream into its non-empty documents.
pub fn parse_documents(text: &str, what: &str) -> Result<Vec<Value>, Error> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|source| Error::Yaml {
        what: what.to_owned(),
        source: Box::new(source),
    })?;
    Ok(docs.into_iter().filter(|doc| !doc.is_null()).collect())
}

/// `helm template` of the chart (CRDs included) with the default release name and namespace plus `args`.
pub fn render_chart(args: &[&str]) -> Result<Vec<Value>, Error> {
    let helm = helm()?;
    let out = run(Command::new(helm)
        .args(["template", DEFAULT_RELEASE])
        .arg(chart_dir())
        .args(["--namespace", DEFAULT_NAMESPACE, "--include-crds"])
        .args(args))?;
    parse_documents(&out, "helm template")
}

/// `kubectl kustomize DIR`.
pub fn kustomize(dir: &Path) -> Result<Vec<Value>, Error> {
    let out = run(Command::new(kubectl()?).arg("kustomize").arg(dir))?;
    parse_documents(&out, &format!("kubectl kustomize {}", dir.display()))
}

/// Kind, namespace and name of an object.
pub fn object_id(doc: &Value) -> (String, String, String) {
    let text = |value: Option<&Value>| value.and_then(Value::as_str).unwrap_or_default().to_owned();
    let metadata = doc.get("metadata");
    let kind = text(doc.get("kind"));
    // kubectl's kustomize does not know these kinds are cluster-scoped and stamps the base's
    // namespace on them; the API server drops a namespace on a cluster-scoped object, so what is
    // created is the same.
    let namespace = if CLUSTER_SCOPED_UNKNOWN_TO_KUSTOMIZE.contains(&kind.as_str()) {
        String::new()
    } else {
        text(metadata.and_then(|m| m.get("namespace")))
    };
    (kind, namespace, text(metadata.and_then(|m| m.get("name"))))
}

/// Cluster-scoped kinds the kustomize of kubectl takes for namespaced ones.
const CLUSTER_SCOPED_UNKNOWN_TO_KUSTOMIZE: &[&str] =
    &["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];

/// The set of (kind, namespace, name) of a rendering.
pub fn object_ids(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter().map(object_id).collect()
}

/// Labels that only make sense for a Helm release.
const HELM_ONLY_LABELS: &[&str] = &["helm.sh/chart", "app.kubernetes.io/managed-by"];

fn strip_helm_labels(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "labels"
                    && let Value::Object(labels) = child
                {
                    for label in HELM_ONLY_LABELS {
                        labels.remove(*label);
                    }
                }
                strip_helm_labels(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_helm_labels),
        _ => {}
    }
}

/// Where the generated kustomize base lives.
pub fn base_dir() -> PathBuf {
    repo_root().join("deploy").join("base")
}

/// The three kustomize files generated from the chart: `walt.yaml` (every object but CRDs and Secrets:
/// no secret is kept in git, the operator creates the missing ones, so the base renders from git alone),
/// `crds.yaml`, and `kustomization.yaml`.
#[derive(Debug, PartialEq, Eq)]
pub struct GeneratedBase {
    /// Contents of `walt.yaml`.
    pub objects: String,
    /// Contents of `crds.yaml`.
    pub crds: String,
    /// Contents of `kustomization.yaml`.
    pub kustomization: String,
}

const GENERATED_HEADER: &str = "# Generated from charts/walt (default values) by `cargo xtask deploy sync`: edit the chart, then run it.\n";

fn to_yaml_stream(docs: &[Value]) -> Result<String, Error> {
    let mut out = String::from(GENERATED_HEADER);
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(doc).map_err(|source| Error::WriteYaml {
            what: "the base".into(),
            source: Box::new(source),
        })?);
    }
    Ok(out)
}

/// Builds the kustomize base from a rendering of the chart's defaults.
pub fn generate_base(chart: &[Value]) -> Result<GeneratedBase, Error> {
    let mut objects = Vec::new();
    let mut crds = Vec::new();
    let mut secrets = Vec::new();
    for doc in chart {
        let mut doc = doc.clone();
        strip_helm_labels(&mut doc);
        let (kind, _, name) = object_id(&doc);
        match kind.as_str() {
            "CustomResourceDefinition" => crds.push(doc),
            "Secret" => secrets.push(name),
            _ => {
                // kustomize's `namespace:` sets it; the base stays relocatable.
                if let Some(Value::Object(metadata)) = doc.get_mut("metadata") {
                    metadata.remove("namespace");
                }
                objects.push(doc);
            }
        }
    }
    let mut kustomization = String::from(GENERATED_HEADER);
    let _ = write!(
        kustomization,
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {DEFAULT_NAMESPACE}\nresources:\n"
    );
    if !crds.is_empty() {
        kustomization.push_str("  - crds.yaml\n");
    }
    kustomization.push_str("  - walt.yaml\n");
    if !secrets.is_empty() {
        let _ = write!(
            kustomization,
            "# No Secret is kept in git: the operator creates those it is told to use when they are missing,\n\
             # never changing existing ones: {}.\n\
             # To provide them yourself (sealed-secrets, external-secrets), see the README's GitOps section.\n",
            secrets.join(", ")
        );
    }
    Ok(GeneratedBase {
        objects: to_yaml_stream(&objects)?,
        crds: if crds.is_empty() {
            String::new()
        } else {
            to_yaml_stream(&crds)?
        },
        kustomization,
    })
}

/// Reads the checked-in base (what `generate_base` wrote).
pub fn read_base(dir: &Path) -> Result<GeneratedBase, Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && name == "crds.yaml" => {
                Ok(String::new())
            }
            Err(source) => Err(Error::Io {
                action: "reading",
                path,
                source,
            }),
        }
    };
    Ok(GeneratedBase {
        objects: read("walt.yaml")?,
        crds: read("crds.yaml")?,
        kustomization: read("kustomization.yaml")?,
    })
}

/// Regenerates `deploy/base` from the chart (`cargo xtask deploy sync`).
pub fn sync_base() -> Result<(), Error> {
    let base = generate_base(&render_chart(&[])?)?;
    let dir = base_dir();
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        if text.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::Io {
                    action: "removing",
                    path,
                    source,
                }),
            }
        } else {
            std::fs::write(&path, text).map_err(io("writing", &path))
        }
    };
    write("walt.yaml", &base.objects)?;
    write("crds.yaml", &base.crds)?;
    write("kustomization.yaml", &base.kustomization)?;
    eprintln!("deploy: wrote {}", dir.display());
    Ok(())
}

/// Copies a directory tree (regular files and directories).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(to).map_err(io("creating", to))?;
    for entry in std::fs::read_dir(from).map_err(io("listing", from))? {
        let entry = entry.map_err(io("listing", from))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(io("copying to", &target))?;
        }
    }
    Ok(())
}

/// The repository as a clean clone has it: the tracked files of HEAD (plus the uncommitted changes of
/// tracked files, through `git stash create`, which changes nothing), exported with `git archive` into a
/// temporary directory. Untracked and git-ignored files (generated secrets…) cannot help what renders there.
pub fn clean_checkout() -> Result<tempfile::TempDir, Error> {
    let root = repo_root();
    let git = |args: &[&str]| run(Command::new("git").arg("-C").arg(&root).args(args));
    let stash = git(&["stash", "create"])?;
    let tree = match stash.trim() {
        "" => "HEAD".to_owned(),
        commit => commit.to_owned(),
    };
    let dir = tempfile::tempdir().map_err(io("creating a temporary dir in", &std::env::temp_dir()))?;
    let archive = dir.path().join("head.tar");
    run(Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["archive", "--format=tar", "-o"])
        .arg(&archive)
        .args([tree.as_str(), "--"]))?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path()))?;
    std::fs::remove_file(&archive).map_err(io("removing", &archive))?;
    Ok(dir)
}

/// Every directory under `deploy` holding a `kustomization.yaml` (the base and each overlay), sorted.
pub fn kustomizations(deploy: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    let mut pending = vec![deploy.to_owned()];
    while let Some(dir) = pending.pop() {
        if dir.join("kustomization.yaml").is_file() {
            found.push(dir.clone());
        }
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let path = entry.map_err(io("listing", &dir))?.path();
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_keeps_strings_that_go_yaml_would_retype_as_strings() {
        // kubectl and kustomize read YAML 1.1 (Go): these must come out quoted, and read back unchanged.
        let retyped = [
            "on", "off", "y", "n", "yes", "No", "true", "null", "~", "0755", "5000", "1.0", "1e3", "0x1f",
            "12:30", "",
        ];
        let mut data = serde_json::Map::new();
        for (i, text) in retyped.iter().enumerate() {
            data.insert(format!("k{i}"), Value::from(*text));
        }
        data.insert("script".into(), Value::from("line one\n  line two: x\n"));
        data.insert("port".into(), Value::from(5000));
        let doc = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "data": data});
        let text = to_yaml_stream(std::slice::from_ref(&doc)).expect("YAML");
        for (i, value) in retyped.iter().enumerate() {
            let line = text
                .lines()
                .find(|line| line.trim_start().starts_with(&format!("k{i}:")))
                .unwrap_or_else(|| panic!("k{i} missing:\n{text}"));
            let written = line.split_once(':').map(|(_, v)| v.trim()).unwrap_or_default();
            assert!(
                written.starts_with('"') || written.starts_with('\''),
                "{value:?} written unquoted: {line}"
            );
        }
        assert!(text.contains("port: 5000"), "{text}");
        assert_eq!(parse_documents(&text, "the base").expect("parses"), [doc]);
    }
}
