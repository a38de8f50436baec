//! The independent checkers of the chart's monitoring objects: the Prometheus Operator's own CRDs
//! (from its Go module, so the real API server validates a ServiceMonitor and a PrometheusRule as a
//! cluster with the Prometheus Operator would) and Debian's `promtool` (which parses every alert
//! expression as Prometheus does). Also the metric names those objects read, to compare with what
//! the operator serves.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use crate::images::{Arch, cache_dir, debian_deb};
use crate::{FixtureError, require_tool, run, run_stdout};

/// The Prometheus Operator release whose CRDs the chart's objects are checked against.
pub const PROMETHEUS_OPERATOR_VERSION: &str = "v0.86.1";

/// The ServiceMonitor and PrometheusRule CRDs of [`PROMETHEUS_OPERATOR_VERSION`] (`go mod download`
/// of the operator's module, which ships them under `example/prometheus-operator-crd/`).
///
/// # Errors
/// When Go is missing or the module cannot be downloaded.
pub fn prometheus_operator_crds() -> Result<Vec<PathBuf>, FixtureError> {
    let go = crate::deploy::go_binary().ok_or_else(|| FixtureError::MissingTool {
        tool: "go".into(),
        package: "golang (or Go in /usr/local/go, see .ci/install-deps)".into(),
    })?;
    let module = format!("github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR_VERSION}");
    let out = run_stdout(Command::new(go).args(["mod", "download", "-json", &module]))?;
    let info: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| FixtureError::Failed(format!("go mod download -json {module} printed no JSON: {e}")))?;
    let dir = info["Dir"]
        .as_str()
        .ok_or_else(|| FixtureError::Failed(format!("go mod download {module}: no Dir in {out}")))?;
    let crds = ["servicemonitors", "prometheusrules"].map(|plural| {
        PathBuf::from(dir).join(format!(
            "example/prometheus-operator-crd/monitoring.coreos.com_{plural}.yaml"
        ))
    });
    match crds.iter().find(|path| !path.is_file()) {
        Some(missing) => Err(FixtureError::Failed(format!(
            "{module} has no {}: the CRDs moved in that release",
            missing.display()
        ))),
        None => Ok(crds.to_vec()),
    }
}

/// Debian's `promtool` (package `prometheus`, downloaded once and unpacked in the walt cache, never
/// installed: the package would also install a Prometheus server).
///
/// # Errors
/// When the package cannot be downloaded or unpacked.
pub fn promtool() -> Result<PathBuf, FixtureError> {
    let root = cache_dir().join("prometheus");
    let tool = root.join("usr/bin/promtool");
    if tool.is_file() {
        return Ok(tool);
    }
    require_tool("dpkg-deb", "dpkg")?;
    let deb = debian_deb("prometheus", Arch::Amd64)?;
    // Unpack beside, then rename: a test running at the same time never sees half a tree.
    let staging = tempfile::Builder::new()
        .prefix(".prometheus-")
        .tempdir_in(cache_dir())
        .map_err(|e| FixtureError::io("creating a staging dir in the walt cache", e))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(staging.path()))?;
    match std::fs::rename(staging.keep(), &root) {
        Ok(()) => {}
        Err(_) if tool.is_file() => {}
        Err(e) => return Err(FixtureError::io(&format!("placing {}", root.display()), e)),
    }
    Ok(tool)
}

/// The `walt_…` metric names an expression reads (`walt_objects{kind="Node"}` → `walt_objects`).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("walt_") {
        let preceded_by_word = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_the_walt_series_an_expression_reads() {
        let names = metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(walt_reconcile_duration_seconds_bucket[5m]))) \
             + max(walt_objects{kind=\"Node\"}) + my_walt_other",
        );
        let expected: BTreeSet<String> = ["walt_objects", "walt_reconcile_duration_seconds_bucket"]
            .map(str::to_owned)
            .into();
        assert_eq!(names, expected);
    }
}
