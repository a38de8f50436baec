//! `cargo xtask`: developer and CI tasks.
//!
//! - `cargo xtask test`: the project's single test command (fmt, clippy, Kubernetes binaries,
//!   every test tier; the committed fuzz inputs are replayed by stable `cargo test`).
//! - `cargo xtask cluster up [--tier control-plane|cluster]`, `cluster kubeconfig USER`,
//!   `cluster down`: a real Kubernetes for development (see `walt_tests::k8s`).
//! - `cargo xtask k8s-binaries`: builds (or finds) the Kubernetes binaries, prints their directory.
//! - `cargo xtask image build`, `deploy sync`, `dist`, `lab up|down`: shipping (see `walt_tests::ship`).
//! - `cargo xtask bench [--reps N] [--load] [--profile P]`: speed as users feel it on the cluster tier
//!   (the `#[ignore]`d tests of `tests/tests/bench.rs`, printing a table; see `walt_tests::bench`), or
//!   with `--load` the load figures (20 image shells and 10 node saves at once). Not part of `cargo
//!   xtask test`.
//! - `cargo xtask fuzz [--seconds N] [TARGET…]`: the coverage-guided fuzz targets of `fuzz/` (see
//!   `walt_tests::fuzz`; installs nightly Rust and cargo-fuzz with `.ci/install-deps --fuzz` when missing).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use walt_tests::k8s::{
    Cluster, ClusterOptions, DEFAULT_USERS, K8sBinaries, Running, Tier, binaries, images, node,
};
use walt_tests::process::Lifetime;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "walt developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every check and test tier (the README's test command; CI runs it).
    Test {
        /// Extra arguments passed to `cargo test` after `--workspace` (e.g. `-p walt-crds`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// A real Kubernetes for development.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Build (or find) the Kubernetes binaries and print their directory.
    K8sBinaries,
    /// Run the coverage-guided fuzz targets (fuzz/; cargo-fuzz on nightly, installed by
    /// `.ci/install-deps --fuzz` when missing), each for a bounded time from its committed seeds and
    /// regressions and the corpus it grew before; fails on any crash (the input is saved under
    /// fuzz/artifacts/TARGET/). Prints execs, execs/s, edges, features, corpus, peak RSS and seconds.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Run the fuzzers as they were last built (no toolchain check, no `cargo fuzz build`).
        #[arg(long)]
        no_build: bool,
        /// Targets to run (default: all of them, the `[[bin]]`s of fuzz/Cargo.toml).
        targets: Vec<String>,
    },
    /// Speed as users feel it, on the cluster tier (the chart's operator, a Debian image of about 250 MB):
    /// `kubectl walt image shell` cold and warm vs `kubectl run -it --rm`, `kubectl walt node shell` vs
    /// `ssh`, `kubectl walt node save` of 256 MiB vs the bare `walt-operator save` and vs WalT's way
    /// (ssh tar, podman build, podman push), side by side in one run; prints medians, ratios and the
    /// operator's peak RSS. Runs the ignored test `tests/tests/bench.rs` (not part of `test`).
    ///
    /// With `--load`: the load figures instead (issue 17): 20 image shells opened at once, each saved
    /// as a new image, then 10 virtual nodes saved at once; time to the prompt and to Ready (p50, p99,
    /// last), the operator's peak RSS and reconcile latency; every change checked in its image.
    Bench {
        /// Repetitions of each measurement (the table shows medians; not used by --load).
        #[arg(long, default_value_t = walt_tests::bench::DEFAULT_REPS)]
        reps: usize,
        /// Run the load figures (`load_of_shells_and_saves`) instead of the speed table.
        #[arg(long)]
        load: bool,
        /// Build profile of the walt image installed: release (what is shipped) or dist-check (built
        /// in a fraction of the time; its figures are not the product's).
        #[arg(long, default_value = "release")]
        profile: String,
        /// Measure only these groups of rows (repeatable): image-shell, node-shell, node-save,
        /// image-build; all by default.
        #[arg(long, value_name = "GROUP")]
        only: Vec<String>,
    },
    /// Shipping: `image build`, `deploy sync`, `dist`, `lab up|down` (see `walt_tests::ship`).
    #[command(flatten)]
    Ship(walt_tests::ship::Task),
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start (or reuse) a cluster; prints `export KUBECONFIG=PATH` last.
    Up {
        /// control-plane (etcd + API server + controllers) or cluster (plus a node).
        #[arg(long, default_value = "control-plane")]
        tier: Tier,
    },
    /// Print the path of a kubeconfig for an ordinary user (client certificate).
    Kubeconfig {
        /// User name (alice and bob are known; others get the group walt-users).
        user: String,
        /// Groups (replace the defaults).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Stop everything `cluster up` started and remove its state.
    Down,
}

/// Where `cargo xtask cluster up` keeps its cluster (`WALT_CLUSTER_DIR`, default in the cache).
fn cluster_dir() -> PathBuf {
    std::env::var_os("WALT_CLUSTER_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| images::cache_dir().join("cluster"), PathBuf::from)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every task that builds images, starts a cluster or runs tests first makes sure the machine is set up.
    let needs_machine = match &cli.task {
        Task::Test { .. }
        | Task::Bench { .. }
        | Task::Cluster {
            action: ClusterAction::Up { .. },
        } => true,
        Task::Ship(task) => task.needs_machine(),
        _ => false,
    };
    if needs_machine && let Err(message) = walt_tests::machine::ensure() {
        eprintln!("cargo xtask: {message}");
        return ExitCode::FAILURE;
    }
    let result = match cli.task {
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Bench {
            reps,
            load,
            profile,
            only,
        } => bench(reps, load, &profile, &only.join(",")),
        Task::Cluster { action } => match action {
            ClusterAction::Up { tier } => cluster_up(tier),
            ClusterAction::Kubeconfig { user, groups } => cluster_kubeconfig(&user, &groups),
            ClusterAction::Down => cluster_down(),
        },
        Task::Fuzz {
            seconds,
            no_build,
            targets,
        } => walt_tests::fuzz::run_all(seconds, &targets, !no_build).map(|_| ()),
        Task::K8sBinaries => K8sBinaries::ensure()
            .map(|b| println!("{}", b.dir.display()))
            .map_err(|e| e.to_string()),
        Task::Ship(task) => task.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cargo xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn cluster_up(tier: Tier) -> Result<(), String> {
    let dir = cluster_dir();
    if let Some(running) = Running::load(&dir).map_err(|e| e.to_string())? {
        let dead = running.dead();
        let wanted = running.state.tier == tier || tier == Tier::ControlPlane;
        if dead.is_empty() && wanted {
            eprintln!(
                "cluster: reusing the {} tier running from {}",
                running.state.tier,
                dir.display()
            );
            println!("export KUBECONFIG={}", running.kubeconfig().display());
            return Ok(());
        }
        if dead.is_empty() {
            eprintln!("cluster: replacing the running {} tier", running.state.tier);
        } else {
            eprintln!("cluster: restarting, these stopped: {}", dead.join(", "));
        }
        running.down().map_err(|e| e.to_string())?;
    } else if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("remove stale {}: {e}", dir.display()))?;
    }
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        tier,
        dir: Some(dir),
        lifetime: Lifetime::Detached,
        ready_timeout: Duration::from_mins(5),
        second_node: None,
    })
    .map_err(|e| e.to_string())?;
    if let Some(registry) = cluster.registry() {
        eprintln!("cluster: node registry (host and node): {registry}");
    }
    for (user, groups) in DEFAULT_USERS {
        let path = cluster.user_kubeconfig(user, groups).map_err(|e| e.to_string())?;
        eprintln!(
            "cluster: kubeconfig for {user} ({}): {}",
            groups.join(", "),
            path.display()
        );
    }
    let kubeconfig = cluster.kubeconfig();
    let dir = cluster.detach();
    eprintln!(
        "cluster: ready in {:.1} s; state and logs in {}; stop with `cargo xtask cluster down`",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    println!("export KUBECONFIG={}", kubeconfig.display());
    Ok(())
}

fn cluster_kubeconfig(user: &str, groups: &[String]) -> Result<(), String> {
    let dir = cluster_dir();
    let running = Running::load(&dir).map_err(|e| e.to_string())?.ok_or_else(|| {
        format!(
            "no cluster in {}: run `cargo xtask cluster up` first",
            dir.display()
        )
    })?;
    let default_groups: Vec<&str> = DEFAULT_USERS
        .iter()
        .find(|(name, _)| *name == user)
        .map_or_else(|| vec!["walt-users"], |(_, g)| g.to_vec());
    let groups: Vec<&str> = if groups.is_empty() {
        default_groups
    } else {
        groups.iter().map(String::as_str).collect()
    };
    let path = running
        .user_kubeconfig(user, &groups)
        .map_err(|e| e.to_string())?;
    println!("{}", path.display());
    Ok(())
}

fn cluster_down() -> Result<(), String> {
    let dir = cluster_dir();
    match Running::load(&dir).map_err(|e| e.to_string())? {
        Some(running) => {
            running.down().map_err(|e| e.to_string())?;
            eprintln!("cluster: stopped, {} removed", dir.display());
        }
        None => eprintln!("cluster: nothing runs ({} has no state)", dir.display()),
    }
    Ok(())
}

/// `cargo xtask bench`: the Kubernetes binaries, then the ignored benchmark test with the cluster tier on.
fn bench(reps: usize, load: bool, profile: &str, only: &str) -> Result<(), String> {
    if reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    walt_tests::bench::groups_from(Some(only))
        .map_err(|e| e.replace(walt_tests::bench::ONLY_ENV, "--only"))?;
    walt_tests::image_build::BuildProfile::parse(profile).map_err(|e| e.to_string())?;
    let test = if load {
        "load_of_shells_and_saves"
    } else {
        "user_felt_speed"
    };
    let k8s = K8sBinaries::ensure().map_err(|e| e.to_string())?;
    if k8s.kubelet.is_none() {
        return Err(format!(
            "the benchmark needs the cluster tier, but {} has no kubelet",
            k8s.dir.display()
        ));
    }
    node::check_available().map_err(|e| format!("the benchmark needs the cluster tier: {e}"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "test",
            "-p",
            "walt-tests",
            "--test",
            "bench",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1", "--exact", test])
        .env(binaries::WALT_K8S_BIN, &k8s.dir)
        .env("WALT_CLUSTER_TIER", "run")
        .env(walt_tests::bench::REPS_ENV, reps.to_string())
        .env(walt_tests::bench::PROFILE_ENV, profile)
        .env(walt_tests::bench::ONLY_ENV, only)
        .status()
        .map_err(|e| format!("running cargo test: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the benchmark failed ({status}); see its output above"))
    }
}

/// One stage of `cargo xtask test`: its name, what happened, how long it took.
struct Stage {
    name: String,
    outcome: String,
    elapsed: Duration,
}

fn banner(index: usize, total: usize, name: &str) {
    eprintln!("\n==> [{index}/{total}] {name}");
}

fn run_stage(stages: &mut Vec<Stage>, total: usize, name: &str, command: &mut Command) -> bool {
    banner(stages.len() + 1, total, name);
    let started = Instant::now();
    let status = command.status();
    let elapsed = started.elapsed();
    let (ok, outcome) = match status {
        Ok(s) if s.success() => (true, "ok".to_string()),
        Ok(s) => (false, format!("FAILED ({s})")),
        Err(e) => (false, format!("FAILED (cannot run: {e})")),
    };
    eprintln!("<== {name}: {outcome} in {}", human(elapsed));
    stages.push(Stage {
        name: name.to_string(),
        outcome,
        elapsed,
    });
    ok
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn summary(stages: &[Stage], started: Instant) {
    eprintln!("\n==> summary");
    for stage in stages {
        eprintln!(
            "    {:<44} {:<28} {:>9}",
            stage.name,
            stage.outcome,
            human(stage.elapsed)
        );
    }
    eprintln!("    {:<44} {:<28} {:>9}", "total", "", human(started.elapsed()));
}

fn test(cargo_test_args: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let total = 5;
    let mut stages = Vec::new();
    let mut ok = run_stage(
        &mut stages,
        total,
        "cargo fmt --all -- --check",
        Command::new(&cargo).args(["fmt", "--all", "--", "--check"]),
    );
    ok &= run_stage(
        &mut stages,
        total,
        "cargo clippy --workspace --all-targets",
        Command::new(&cargo).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    );

    // Kubernetes binaries: prebuilt (WALT_K8S_BIN, KUBEBUILDER_ASSETS) or the pinned build.
    banner(stages.len() + 1, total, "Kubernetes binaries");
    let stage_start = Instant::now();
    let k8s = K8sBinaries::ensure();
    // The arm64 kubelet of the two-node test's second node (`SecondNode`), built here rather than
    // inside that test; without it (no Go here) only that test fails, saying why.
    if k8s.is_ok()
        && let Err(error) = binaries::kubelet_for(walt_tests::k8s::images::Arch::Arm64.oci_name())
    {
        eprintln!("the arm64 kubelet could not be built: {error}");
    }
    let outcome = match &k8s {
        Ok(b) => format!("ok ({})", b.dir.display()),
        Err(e) => {
            eprintln!("{e}");
            "FAILED".to_string()
        }
    };
    eprintln!(
        "<== Kubernetes binaries: {outcome} in {}",
        human(stage_start.elapsed())
    );
    stages.push(Stage {
        name: format!("Kubernetes binaries {}", binaries::PINNED_VERSION),
        outcome: if k8s.is_ok() { "ok".into() } else { "FAILED".into() },
        elapsed: stage_start.elapsed(),
    });

    // The cluster tier runs when the machine can run it; its tests read WALT_CLUSTER_TIER.
    banner(stages.len() + 1, total, "cluster tier availability");
    let stage_start = Instant::now();
    // Only a machine that cannot run it skips it; a missing package makes its tests fail.
    let availability = match (&k8s, node::check_available()) {
        (Ok(b), Ok(())) if b.kubelet.is_none() => Err(format!("no kubelet in {}", b.dir.display())),
        (_, Err(e @ walt_tests::k8s::Error::Unavailable(_))) => Err(e.to_string()),
        _ => Ok(()),
    };
    let tier_env = match &availability {
        Ok(()) => {
            eprintln!("<== cluster tier: will run");
            "run".to_string()
        }
        Err(reason) => {
            eprintln!("<== cluster tier: SKIPPED: {reason}");
            format!("skip: {reason}")
        }
    };
    stages.push(Stage {
        name: "cluster tier".into(),
        outcome: if availability.is_ok() {
            "runs".into()
        } else {
            "SKIPPED (see above)".into()
        },
        elapsed: stage_start.elapsed(),
    });

    let mut command = Command::new(&cargo);
    command
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_test_args)
        .env("WALT_CLUSTER_TIER", &tier_env);
    // `cargo test --workspace` builds both product binaries before it runs a test (the operator's and
    // the plugin's own tests need them): tests of other packages use those instead of each running a
    // `cargo build -p …` whose different feature set would compile the dependencies again.
    // Only for the whole workspace: `cargo xtask test -p walt-tests` builds neither, and a file left by
    // an older build would be tested instead.
    let target = walt_tests::deploy::target_dir();
    let whole_workspace = cargo_test_args
        .iter()
        .all(|arg| arg != "-p" && !arg.starts_with("--package"));
    for (env, binary) in [
        ("WALT_OPERATOR_BIN", "walt-operator"),
        ("KUBECTL_WALT_BIN", "kubectl-walt"),
    ] {
        if whole_workspace && std::env::var_os(env).is_none() {
            command.env(env, target.join("debug").join(binary));
        }
    }
    if let Ok(b) = &k8s {
        command.env(binaries::WALT_K8S_BIN, &b.dir);
    }
    ok &= k8s.is_ok();
    ok &= run_stage(&mut stages, total, "cargo test --workspace", &mut command);
    summary(&stages, started);
    if ok {
        Ok(())
    } else {
        Err("some stages failed (see the summary above)".into())
    }
}
