//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer with the
//! address sanitizer, on the nightly toolchain that `.ci/install-deps --fuzz` installs), each run for a
//! bounded time from its committed seeds (`fuzz/seeds/TARGET`), the crashes found before
//! (`fuzz/regressions/TARGET`) and the corpus it grew on this machine (`fuzz/corpus/TARGET`, not committed).
//!
//! Each target's body is a plain function of a product crate (`walt_operator::fuzzing`,
//! `walt_crds::fuzzing`, `kubectl_walt::fuzzing`); stable `cargo test` replays the committed inputs
//! through them, so CI needs no nightly toolchain. This is the long run.
//!
//! The fuzzer runs as an unprivileged user (uid [`FUZZ_UID`], through `setpriv`) when started as root:
//! the layer target writes files, links, modes and xattrs, and a bug it finds must not reach the host.
//! A crash (panic, failed invariant, sanitizer report, out of memory, timeout) fails the run; libFuzzer
//! saves the input under `fuzz/artifacts/TARGET/`, and the log of every run is `fuzz/logs/TARGET.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The user the fuzzer runs as when started as root (`nobody`).
pub const FUZZ_UID: u32 = 65534;

/// The fuzz crate (its own workspace, outside the main one).
pub fn fuzz_dir() -> PathBuf {
    crate::deploy::repo_root().join("fuzz")
}

/// Whether the nightly cargo must not inherit `key`: `cargo xtask` runs under cargo, which sets variables
/// (its own `CARGO*`, `RUSTUP_TOOLCHAIN`, `RUSTC`, `LD_LIBRARY_PATH`…) that would make the fuzz build
/// differ from a plain `cargo fuzz build` in a shell (pure).
pub fn dropped_env(key: &str) -> bool {
    (key.starts_with("CARGO") && key != "CARGO_HOME")
        || key.starts_with("RUSTC")
        || key.starts_with("RUSTDOC")
        || matches!(
            key,
            "RUSTUP_TOOLCHAIN" | "RUSTFLAGS" | "LD_LIBRARY_PATH" | "OUT_DIR"
        )
}

/// `rustup run nightly cargo …` (cargo-fuzz needs nightly; the workspace builds on stable), in the
/// environment a shell would give it.
fn nightly_cargo(args: &[&str]) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]).args(args);
    for (key, _) in std::env::vars() {
        if dropped_env(&key) {
            command.env_remove(key);
        }
    }
    command.current_dir(crate::deploy::repo_root());
    command
}

/// The targets a fuzz crate manifest declares: the names of its `[[bin]]` sections, in order (pure).
pub fn targets_in_manifest(manifest: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if in_bin
            && let Some(value) = line.strip_prefix("name")
            && let Some(value) = value.trim_start().strip_prefix('=')
        {
            targets.push(value.trim().trim_matches('"').to_string());
        }
    }
    targets
}

/// The targets of `fuzz/Cargo.toml`.
pub fn targets() -> Result<Vec<String>, String> {
    let path = fuzz_dir().join("Cargo.toml");
    let manifest = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(targets_in_manifest(&manifest))
}

/// The targets to run: all when none are asked for, else the ones asked (each must exist; pure).
pub fn choose(all: &[String], wanted: &[String]) -> Result<Vec<String>, String> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    match wanted.iter().find(|t| !all.contains(t)) {
        Some(unknown) => Err(format!(
            "no fuzz target {unknown:?}; the targets are: {}",
            all.join(", ")
        )),
        None => Ok(wanted.to_vec()),
    }
}

/// What one run did, from libFuzzer's log.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// The target's name.
    pub target: String,
    /// Executions of the target (the last `#N` libFuzzer printed).
    pub runs: u64,
    /// Wall time of the run in seconds (measured around it).
    pub seconds: u64,
    /// Covered edges (`cov:`) at the end.
    pub edges: u64,
    /// Covered features (`ft:`: edges, edge counters, value profiles) at the end.
    pub features: u64,
    /// The corpus size at the end (`corp:`, inputs kept in memory).
    pub corpus: u64,
    /// Peak resident memory of the fuzzer in MiB (`stat::peak_rss_mb`).
    pub peak_rss_mb: u64,
    /// `None` when it ended cleanly; else what went wrong and where the input is.
    pub failure: Option<String>,
}

impl Figures {
    /// Executions per second over the whole run.
    pub fn execs_per_second(&self) -> u64 {
        self.runs / self.seconds.max(1)
    }
}

/// The number after `key` in `line` (`cov: 123` → 123).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Reads the figures out of a libFuzzer log (pure; `seconds` is measured by the caller).
pub fn parse_log(target: &str, log: &str) -> Figures {
    let mut figures = Figures {
        target: target.to_string(),
        ..Figures::default()
    };
    let mut reason = None;
    let mut artifact = None;
    for line in log.lines() {
        if line.starts_with('#') && line.contains("cov: ") {
            figures.runs = number_after(line, "#").unwrap_or(figures.runs);
            figures.edges = number_after(line, "cov: ").unwrap_or(figures.edges);
            figures.features = number_after(line, "ft: ").unwrap_or(figures.features);
            figures.corpus = number_after(line, "corp: ").unwrap_or(figures.corpus);
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            figures.runs = number_after(rest, "").unwrap_or(figures.runs);
        }
        if let Some(units) = line.strip_prefix("stat::number_of_executed_units:") {
            figures.runs = number_after(units, "").unwrap_or(figures.runs);
        }
        if let Some(rss) = line.strip_prefix("stat::peak_rss_mb:") {
            figures.peak_rss_mb = number_after(rss, "").unwrap_or_default();
        }
        let is_reason = line.contains("panicked at")
            || line.contains("ERROR: libFuzzer:")
            || line.contains("ERROR: AddressSanitizer");
        if is_reason && reason.is_none() {
            reason = Some(line.trim().to_string());
        }
        if let Some(at) = line.find("Test unit written to ")
            && artifact.is_none()
        {
            artifact = Some(line[at + "Test unit written to ".len()..].trim().to_string());
        }
    }
    figures.failure = match (reason, artifact) {
        (None, None) => None,
        (reason, artifact) => Some(format!(
            "{} (input: {})",
            reason.unwrap_or_else(|| "crash".into()),
            artifact.unwrap_or_else(|| "not saved".into())
        )),
    };
    figures
}

/// Creates `path` and, when the fuzzer runs unprivileged, hands it to [`FUZZ_UID`] (it writes there).
fn writable_dir(path: &Path, drop_privileges: bool) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    if drop_privileges {
        std::os::unix::fs::chown(path, Some(FUZZ_UID), Some(FUZZ_UID))
            .map_err(|e| format!("handing {} to uid {FUZZ_UID}: {e}", path.display()))?;
    }
    Ok(())
}

/// Builds every target once (release, debug assertions, address sanitizer).
pub fn build() -> Result<(), String> {
    let dir = fuzz_dir();
    let status = nightly_cargo(&["fuzz", "build", "--fuzz-dir", &dir.to_string_lossy()])
        .status()
        .map_err(|e| format!("cannot run cargo fuzz build: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo fuzz build failed ({status})"))
    }
}

/// The built fuzzer of `target` (cargo-fuzz builds for the host triple).
fn binary(target: &str) -> PathBuf {
    fuzz_dir()
        .join("target")
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("release")
        .join(target)
}

/// libFuzzer's options for one bounded run.
fn fuzzer_options(seconds: u64, artifacts: &Path) -> Vec<String> {
    vec![
        format!("-max_total_time={seconds}"),
        format!("-artifact_prefix={}/", artifacts.display()),
        "-max_len=262144".into(),
        "-rss_limit_mb=2048".into(),
        "-timeout=20".into(),
        "-print_final_stats=1".into(),
    ]
}

/// Runs `target` for `seconds` (it must be built), its log in `fuzz/logs/TARGET.log`.
pub fn run(target: &str, seconds: u64) -> Result<Figures, String> {
    let dir = fuzz_dir();
    let drop_privileges = nix::unistd::geteuid().is_root();
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("logs");
    writable_dir(&corpus, drop_privileges)?;
    writable_dir(&artifacts, drop_privileges)?;
    writable_dir(&logs, false)?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut command = if drop_privileges {
        let mut setpriv = Command::new("setpriv");
        setpriv
            .arg(format!("--reuid={FUZZ_UID}"))
            .arg(format!("--regid={FUZZ_UID}"))
            .args(["--clear-groups", "--"])
            .arg(binary(target));
        setpriv
    } else {
        Command::new(binary(target))
    };
    // New inputs go to the first directory; seeds and regressions are only read.
    command.arg(&corpus).arg(dir.join("seeds").join(target));
    let regressions = dir.join("regressions").join(target);
    if regressions.is_dir() {
        command.arg(&regressions);
    }
    command.args(fuzzer_options(seconds, &artifacts));
    let started = Instant::now();
    let status = command
        .current_dir(&dir)
        .env("TMPDIR", std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| format!("cannot run the fuzzer {}: {e}", binary(target).display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut figures = parse_log(target, &text);
    figures.seconds = started.elapsed().as_secs();
    if !status.success() && figures.failure.is_none() {
        figures.failure = Some(format!(
            "the fuzzer failed ({status}); see {}",
            log_path.display()
        ));
    }
    Ok(figures)
}

/// The header of the figures table.
pub fn header() -> String {
    format!(
        "fuzz: {:<18} {:>10} {:>8} {:>6} {:>7} {:>6} {:>6} {:>6}",
        "target", "execs", "execs/s", "edges", "ft", "corp", "rss_mb", "secs"
    )
}

/// One row of the figures table.
pub fn row(f: &Figures) -> String {
    format!(
        "fuzz: {:<18} {:>10} {:>8} {:>6} {:>7} {:>6} {:>6} {:>6} {}",
        f.target,
        f.runs,
        f.execs_per_second(),
        f.edges,
        f.features,
        f.corpus,
        f.peak_rss_mb,
        f.seconds,
        f.failure.as_deref().unwrap_or("ok")
    )
}

/// Runs `wanted` (all when empty) for `seconds` each and prints a table; fails when one crashed.
/// `build` false runs the fuzzers as they were last built (each must be there).
pub fn run_all(seconds: u64, wanted: &[String], build_first: bool) -> Result<Vec<Figures>, String> {
    let chosen = choose(&targets()?, wanted)?;
    if build_first {
        crate::machine::ensure_fuzz()?;
        build()?;
    }
    if let Some(missing) = chosen.iter().find(|t| !binary(t).is_file()) {
        return Err(format!(
            "the fuzzer of {missing} is not built ({}): run cargo xtask fuzz without --no-build",
            binary(missing).display()
        ));
    }
    let mut results = Vec::new();
    for target in &chosen {
        eprintln!("fuzz: {target} for {seconds} s (log: fuzz/logs/{target}.log)");
        let figures = run(target, seconds)?;
        eprintln!("{}", row(&figures));
        results.push(figures);
    }
    eprintln!("\n{}", header());
    for figures in &results {
        eprintln!("{}", row(figures));
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|f| f.failure.as_ref().map(|why| format!("{}: {why}", f.target)))
        .collect();
    if failed.is_empty() {
        Ok(results)
    } else {
        Err(format!("fuzzing found problems:\n  {}", failed.join("\n  ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_come_from_the_libfuzzer_log() {
        let log = "INFO: seed corpus: files: 6\n\
                   #2\tINITED cov: 10 ft: 11 corp: 3/1Kb exec/s: 0 rss: 40Mb\n\
                   #4096\tpulse  cov: 1200 ft: 3400 corp: 120/20Kb lim: 4096 exec/s: 2048 rss: 60Mb\n\
                   #123456\tDONE   cov: 1250 ft: 3500 corp: 125/21Kb lim: 4096 exec/s: 2023 rss: 61Mb\n\
                   Done 123456 runs in 61 second(s)\n\
                   stat::number_of_executed_units: 123457\n\
                   stat::peak_rss_mb: 61\n";
        let mut f = parse_log("squash", log);
        f.seconds = 61;
        assert_eq!(
            (f.runs, f.edges, f.features, f.corpus, f.peak_rss_mb),
            (123_457, 1250, 3500, 125, 61)
        );
        assert_eq!(f.execs_per_second(), 2023);
        assert!(f.failure.is_none());
        let crash = "#300\tNEW    cov: 50 ft: 60 corp: 4/1Kb\n\
                     thread '<unnamed>' panicked at operator/src/fuzzing.rs:10:5:\n\
                     ==1== ERROR: libFuzzer: deadly signal\n\
                     artifact_prefix='a/'; Test unit written to a/crash-1\n";
        let f = parse_log("x", crash);
        assert_eq!(
            f.failure.as_deref(),
            Some("thread '<unnamed>' panicked at operator/src/fuzzing.rs:10:5: (input: a/crash-1)")
        );
        assert_eq!(f.runs, 300);
    }

    #[test]
    fn the_fuzz_build_gets_a_shell_environment() {
        for dropped in [
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_TARGET_DIR",
            "RUSTC_WRAPPER",
            "RUSTUP_TOOLCHAIN",
        ] {
            assert!(dropped_env(dropped), "{dropped}");
        }
        for kept in [
            "CARGO_HOME",
            "RUSTUP_HOME",
            "PATH",
            "HOME",
            "SSL_CERT_FILE",
            "RUST_BACKTRACE",
        ] {
            assert!(!dropped_env(kept), "{kept}");
        }
    }

    #[test]
    fn targets_are_the_bin_sections_of_the_manifest() {
        let manifest = "[package]\nname = \"walt-fuzz\"\n\n[[bin]]\nname = \"squash\"\npath = \"x.rs\"\n\
                        [[bin]]\nname=\"dialogue\"\n[profile.release]\ndebug = 1\n";
        assert_eq!(targets_in_manifest(manifest), ["squash", "dialogue"]);
        let all = targets_in_manifest(manifest);
        assert_eq!(choose(&all, &[]).expect("all"), all);
        assert_eq!(choose(&all, &["dialogue".into()]).expect("one"), ["dialogue"]);
        let error = choose(&all, &["sqash".into()]).expect_err("unknown");
        assert_eq!(
            error,
            "no fuzz target \"sqash\"; the targets are: squash, dialogue"
        );
    }

    /// Every target of `fuzz/Cargo.toml` has its source and committed seeds; no seed or regression
    /// directory belongs to no target.
    #[test]
    fn every_target_has_a_source_and_seeds() {
        let dir = fuzz_dir();
        let targets = targets().expect("fuzz/Cargo.toml");
        assert_eq!(targets.len(), 8, "{targets:?}");
        for target in &targets {
            assert!(
                dir.join("fuzz_targets").join(format!("{target}.rs")).is_file(),
                "fuzz/fuzz_targets/{target}.rs"
            );
            let seeds = std::fs::read_dir(dir.join("seeds").join(target)).map_or(0, Iterator::count);
            assert!(seeds > 0, "no seeds in fuzz/seeds/{target}");
        }
        for kind in ["seeds", "regressions"] {
            for entry in std::fs::read_dir(dir.join(kind)).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(targets.contains(&name), "fuzz/{kind}/{name} is no target's");
            }
        }
    }
}
