//! The machine's dependencies: `.ci/install-deps` is the one place that sets up a bare Debian 12 machine
//! (packages, Rust musl targets, binfmt_misc). `cargo xtask test` and `cargo xtask lab up` call
//! [`ensure`] first, so a newcomer needs no third command; `tests/machine.rs` checks that every program the
//! sources run is one the script provides.

use std::path::PathBuf;
use std::process::Command;

use crate::deploy::repo_root;

/// The install script.
pub fn install_script() -> PathBuf {
    repo_root().join(".ci").join("install-deps")
}

/// What `.ci/install-deps --check` says is missing (empty when the machine is ready).
pub fn missing() -> Result<Vec<String>, String> {
    missing_of(&[])
}

/// What `.ci/install-deps --check EXTRA…` says is missing (`--fuzz`: the fuzz toolchain too).
fn missing_of(extra: &[&str]) -> Result<Vec<String>, String> {
    let script = install_script();
    let output = Command::new(&script)
        .arg("--check")
        .args(extra)
        .output()
        .map_err(|e| format!("running {} --check: {e}", script.display()))?;
    if output.status.success() {
        return Ok(Vec::new());
    }
    let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect();
    Ok(if lines.is_empty() {
        vec![format!("{} --check failed ({})", script.display(), output.status)]
    } else {
        lines
    })
}

/// Makes sure the machine has what walt's build, tests and lab need: runs `.ci/install-deps` when its
/// check finds something missing, and says so.
pub fn ensure() -> Result<(), String> {
    ensure_with(&[])
}

/// [`ensure`], the fuzz toolchain included (`.ci/install-deps --fuzz`: nightly Rust and cargo-fuzz), for
/// `cargo xtask fuzz` only.
pub fn ensure_fuzz() -> Result<(), String> {
    ensure_with(&["--fuzz"])
}

fn ensure_with(extra: &[&str]) -> Result<(), String> {
    let missing = missing_of(extra)?;
    if missing.is_empty() {
        return Ok(());
    }
    let script = install_script();
    eprintln!("cargo xtask: this machine is not set up yet:");
    for line in &missing {
        eprintln!("    {line}");
    }
    eprintln!(
        "cargo xtask: running {} {} (once; it is idempotent)",
        script.display(),
        extra.join(" ")
    );
    let status = Command::new(&script)
        .args(extra)
        .status()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({status}): the machine lacks what is listed above (run it as root on Debian 12)",
            script.display()
        ))
    }
}
