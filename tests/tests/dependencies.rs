//! The dependency policy (`deny.toml`): the crates it denies are not in `Cargo.lock` (always checked, no
//! tool needed), and `cargo deny` agrees with the whole policy (licenses, bans, duplicates, sources) when
//! cargo-deny is installed (`.ci/install-deps --with-cargo-deny`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn repo_file(name: &str) -> PathBuf {
    walt_tests::deploy::repo_root().join(name)
}

/// The names in `deny.toml`'s `[bans] deny` list (one `{ crate = "NAME", … }` per line).
fn denied_crates() -> Vec<String> {
    let path = repo_file("deny.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("{ crate = \""))
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Every package name in `Cargo.lock`.
fn locked_crates() -> BTreeSet<String> {
    let path = repo_file("Cargo.lock");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|line| line.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"').map(str::to_owned))
        .collect()
}

#[test]
fn no_denied_crate_is_locked() {
    let denied = denied_crates();
    for expected in [
        "openssl-sys",
        "native-tls",
        "aws-lc-rs",
        "aws-lc-sys",
        "serde_yaml",
    ] {
        assert!(
            denied.iter().any(|name| name == expected),
            "deny.toml no longer denies {expected}: {denied:?}"
        );
    }
    let locked = locked_crates();
    assert!(
        locked.contains("ring") && locked.contains("rustls"),
        "Cargo.lock not read: {locked:?}"
    );
    let present: Vec<&String> = denied.iter().filter(|name| locked.contains(*name)).collect();
    assert!(
        present.is_empty(),
        "Cargo.lock has crates deny.toml denies: {present:?} (`cargo tree -i NAME` shows who brings each)"
    );
}

#[test]
fn cargo_deny_accepts_the_workspace_when_installed() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let installed = Command::new(&cargo)
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !installed {
        eprintln!("SKIPPED: cargo-deny is not installed (.ci/install-deps --with-cargo-deny installs it)");
        return;
    }
    let output = Command::new(&cargo)
        .args(["deny", "--offline", "check", "bans", "licenses", "sources"])
        .current_dir(walt_tests::deploy::repo_root())
        .output()
        .expect("run cargo deny");
    assert!(
        output.status.success(),
        "cargo deny check failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
