//! The binary as users run it, without a cluster: `--help` on every command, the help topics,
//! completion scripts (bash runs the real script), and the error for an unreachable cluster.

use std::process::{Command, Output};

use clap::CommandFactory;
use kubectl_walt::cli::Cli;

fn walt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-walt"))
        .args(args)
        // No cluster: completion lookups and API commands must fail cleanly.
        .env("KUBECONFIG", "/nonexistent/walt-test-kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run kubectl-walt")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every command path, e.g. `node shell`.
fn command_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            out.push(path.clone());
            walk(sub, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &[], &mut out);
    out
}

#[test]
fn every_command_has_help_with_examples() {
    let paths = command_paths();
    assert!(paths.len() >= 26, "only {} commands", paths.len());
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = walt(&args);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(stdout.contains("Usage: kubectl walt"), "{args:?}:\n{stdout}");
        let leaf = !matches!(path.as_slice(), [one] if one == "node" || one == "image" || one == "help");
        if leaf && path[0] != "help" {
            assert!(
                stdout.contains("Examples:"),
                "{args:?} has no examples:\n{stdout}"
            );
            assert!(
                stdout.contains("kubectl walt ") || stdout.contains("kubectl-walt "),
                "{args:?}"
            );
        }
        assert!(stdout.contains("--namespace"), "{args:?} lacks the global flags");
    }
}

#[test]
fn root_help_and_version() {
    let out = walt(&["--help"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("The WalT testbed workflows on Kubernetes"));
    for group in ["node", "image", "help", "completion"] {
        assert!(
            stdout.contains(&format!("  {group}")),
            "{group} missing:\n{stdout}"
        );
    }
    assert!(!stdout.contains("__complete"), "the completion engine is hidden");
    let version = walt(&["--version"]);
    assert!(text(&version.stdout).starts_with("kubectl-walt "));
}

#[test]
fn usage_errors_exit_2_and_say_what_is_wrong() {
    let out = walt(&["node", "run", "rpi3-01"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("<CMD>"), "{}", text(&out.stderr));
    let out = walt(&["image", "ls", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("possible values: table, wide, json, yaml"));
}

#[test]
fn help_topics() {
    let list = walt(&["help", "list"]);
    assert!(list.status.success());
    let stdout = text(&list.stdout);
    for topic in [
        "shells",
        "node-save",
        "boot-modes",
        "images",
        "image-build",
        "virtual-nodes",
        "troubleshooting",
    ] {
        assert!(stdout.contains(topic), "{topic} missing");
        let show = walt(&["help", "show", topic]);
        assert!(show.status.success(), "{topic}");
        assert!(text(&show.stdout).len() > 300, "{topic} is too short");
    }
    let shells = text(&walt(&["help", "show", "shells"]).stdout);
    assert!(shells.contains("changes outside /persist will be lost on next node reboot"));
    assert!(shells.contains("save as a new image, or press Enter to overwrite IMAGE"));
    let missing = walt(&["help", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no help topic \"nope\"; the topics are: shells, node-save"));
}

#[test]
fn image_build_refuses_bad_input_before_any_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let context = dir.path().display().to_string();
    let no_dockerfile = walt(&["image", "build", "--from-dir", &context, "app"]);
    assert_eq!(no_dockerfile.status.code(), Some(1));
    let stderr = text(&no_dockerfile.stderr);
    assert!(
        stderr.contains("has no Dockerfile (nor Containerfile): name yours with --file"),
        "{stderr}"
    );
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").expect("write");
    for (args, expect) in [
        (
            vec!["--file", "../Dockerfile"],
            "must be a path inside the build context",
        ),
        (vec!["--build-arg", "NOVALUE"], "expected NAME=VALUE"),
        (vec!["--platform", "arm64"], "write OS/ARCH[/VARIANT]"),
    ] {
        let mut all = vec!["image", "build", "--from-dir", &context];
        all.extend(args);
        all.push("app");
        let out = walt(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        assert!(
            text(&out.stderr).contains(expect),
            "{all:?}: {}",
            text(&out.stderr)
        );
    }
    let bad_name = walt(&["image", "build", "--from-dir", &context, "Bad_Name"]);
    assert_eq!(bad_name.status.code(), Some(1));
    // Valid input goes on to the cluster (absent here).
    let valid = walt(&["image", "build", "--from-dir", &context, "app"]);
    assert!(
        text(&valid.stderr).contains("cannot connect to the cluster"),
        "{}",
        text(&valid.stderr)
    );
    // One source: a directory or a git URL; --ref and --sub-dir only with a URL.
    let both = walt(&[
        "image",
        "build",
        "--from-dir",
        &context,
        "--from-url",
        "https://x/y.git",
        "app",
    ]);
    assert_eq!(both.status.code(), Some(2));
    let stray_ref = walt(&["image", "build", "--from-dir", &context, "--ref", "v1", "app"]);
    assert_eq!(stray_ref.status.code(), Some(1));
    assert!(
        text(&stray_ref.stderr).contains("--ref and --sub-dir go with --from-url"),
        "{}",
        text(&stray_ref.stderr)
    );
}

#[test]
fn no_cluster_is_a_clear_error() {
    let out = walt(&["node", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot connect to the cluster:"),
        "{stderr}"
    );
    assert!(stderr.contains("KUBECONFIG or --kubeconfig"), "{stderr}");
}

#[test]
fn bad_image_names_are_refused_before_any_request() {
    let out = walt(&["image", "cp", "Bad_Name:/etc/x", "./x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid image name \"Bad_Name\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn completion_engine_speaks_cobra() {
    let out = walt(&["__complete", "node", "sh"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "show\tShow one node: its image, state, conditions and recent events\nshell\tOpen a root shell on a node, through the walt SSH gateway\n:4\n"
    );
    let values = walt(&["__complete", "image", "ls", "-o", ""]);
    assert!(text(&values.stdout).starts_with("table\tAligned columns\nwide\t"));
    // No cluster reachable: no names, and no hang.
    let names = walt(&["__complete", "node", "shell", ""]);
    assert_eq!(text(&names.stdout), ":4\n");
}

#[test]
fn completion_scripts() {
    for (shell, marker) in [
        ("bash", "complete -F _kubectl_walt_complete kubectl-walt"),
        ("zsh", "#compdef kubectl-walt"),
        ("fish", "complete -c kubectl-walt"),
        ("kubectl", "exec kubectl-walt __complete \"$@\""),
    ] {
        let out = walt(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(text(&out.stdout).contains(marker), "{shell}");
    }
    let script = text(&walt(&["completion", "bash"]).stdout);
    let check = Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(check.status.success(), "bash -n: {}", text(&check.stderr));
}

/// Runs the real bash completion function on a command line and returns COMPREPLY.
fn bash_complete(line: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tmp");
    // The scripts call `kubectl-walt` from PATH.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-walt"));
    let script = text(&walt(&["completion", "bash"]).stdout);
    let driver = format!(
        "{script}\nCOMP_LINE={line:?}; COMP_POINT=${{#COMP_LINE}}; COMP_WORDBREAKS=$' \\t\\n\"\\'><=;|&(:'\n_kubectl_walt_complete\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    );
    let path = format!(
        "{}:{}",
        bin.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&driver)
        .env("PATH", path)
        .env("KUBECONFIG", dir.path().join("none"))
        .output()
        .expect("bash");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    assert_eq!(bash_complete("kubectl-walt im"), ["image"]);
    assert_eq!(
        bash_complete("kubectl-walt node re"),
        ["reboot", "release", "remove"]
    );
    assert_eq!(bash_complete("kubectl-walt image ls -o y"), ["yaml"]);
    assert!(bash_complete("kubectl-walt node ls --").contains(&"--output".to_string()));
}
