//! The machine check: every program the sources run is one `.ci/install-deps` provides (its `TOOLS` list,
//! each installed by a package it names), so a tool added to a test without adding it there fails here, on
//! the machine where it was added, not on the next fresh one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use walt_tests::deploy::repo_root;
use walt_tests::machine;

/// Programs the harness builds or finds itself (not Debian packages): the Kubernetes binaries and helm
/// (built from their Go modules into the walt cache), and walt's own binaries.
const BUILT_BY_THE_HARNESS: &[&str] = &["kubectl", "helm", "walt-operator", "kubectl-walt"];

/// The `TOOLS=( … )` list of `.ci/install-deps`.
fn script_tools() -> BTreeSet<String> {
    let script = std::fs::read_to_string(machine::install_script()).expect("read .ci/install-deps");
    let start = script
        .find("\nTOOLS=(")
        .expect(".ci/install-deps has a TOOLS=( … ) list");
    let rest = &script[start + "\nTOOLS=(".len()..];
    let end = rest.find(')').expect("TOOLS list is closed");
    rest[..end].split_whitespace().map(str::to_owned).collect()
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every literal program name the sources start: `Command::new("…")`, `require_tool("…"`, `which("…")`.
fn programs_in_sources() -> BTreeSet<(String, String)> {
    let mut files = Vec::new();
    rust_sources(&repo_root(), &mut files);
    let mut found = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for marker in ["Command::new(\"", "require_tool(\"", "which(\""] {
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                let Some(end) = rest.find('"') else { continue };
                let program = rest[..end].rsplit('/').next().unwrap_or_default().to_owned();
                // Only program names (this file's own docs quote the patterns with `…`).
                let is_name = !program.is_empty()
                    && program
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
                if !is_name {
                    continue;
                }
                let shown = file
                    .strip_prefix(repo_root())
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                found.insert((program, shown));
            }
        }
    }
    found
}

#[test]
fn every_program_the_sources_run_is_provided_by_install_deps() {
    let tools = script_tools();
    let unlisted: Vec<String> = programs_in_sources()
        .into_iter()
        .filter(|(program, _)| !tools.contains(program) && !BUILT_BY_THE_HARNESS.contains(&program.as_str()))
        .map(|(program, file)| format!("{program} (run in {file})"))
        .collect();
    assert!(
        unlisted.is_empty(),
        "these programs are run by the sources but .ci/install-deps does not provide them: {}\n\
         add each to its TOOLS list and its Debian package to `packages`",
        unlisted.join(", ")
    );
}

#[test]
fn this_machine_has_everything_install_deps_provides() {
    let missing = machine::missing().expect("run .ci/install-deps --check");
    assert!(
        missing.is_empty(),
        ".ci/install-deps --check finds this machine incomplete (CI runs .ci/install-deps first):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_check_finds_a_missing_program() {
    // The check must be able to fail: a TOOLS entry that no package provides is reported.
    let script = std::fs::read_to_string(machine::install_script()).expect("read .ci/install-deps");
    let altered = script.replacen("TOOLS=(", "TOOLS=(walt-no-such-program ", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("install-deps");
    std::fs::write(&path, altered).expect("write altered script");
    let output = std::process::Command::new("bash")
        .arg(&path)
        .arg("--check")
        .output()
        .expect("run the altered script");
    assert!(!output.status.success(), "--check passed with a missing program");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("missing program: walt-no-such-program"),
        "--check did not name the missing program: {said}"
    );
}
