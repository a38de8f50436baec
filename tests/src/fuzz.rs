//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `operator/fuzz` (cargo-fuzz, libFuzzer, on the
//! nightly toolchain), each run for a bounded time from its committed seeds (`operator/fuzz/seeds/TARGET`)
//! plus the corpus it grew before (`operator/fuzz/corpus/TARGET`, not committed).
//!
//! A crash (panic, failed invariant, sanitizer report, out of memory, timeout) fails the run; libFuzzer
//! saves the input under `operator/fuzz/artifacts/TARGET/`, and the log of every run is in
//! `operator/fuzz/logs/TARGET.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The fuzz crate (its own workspace, outside the main one).
pub fn fuzz_dir() -> PathBuf {
    crate::deploy::repo_root().join("operator/fuzz")
}

/// `rustup run nightly cargo …` (cargo-fuzz needs nightly; the workspace builds on stable).
fn nightly_cargo(args: &[&str]) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]).args(args);
    // cargo-fuzz finds its binaries in its own target dir.
    command
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS");
    command.current_dir(crate::deploy::repo_root());
    command
}

/// Whether the fuzz toolchain is here (a nightly toolchain with cargo-fuzz); the reason when not.
pub fn available() -> Result<(), String> {
    let output = nightly_cargo(&["fuzz", "--version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run rustup: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "no nightly toolchain with cargo-fuzz (`.ci/install-deps` installs them): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The targets of the fuzz crate (`cargo fuzz list`).
pub fn targets() -> Result<Vec<String>, String> {
    let dir = fuzz_dir();
    let output = nightly_cargo(&["fuzz", "list", "--fuzz-dir", &dir.to_string_lossy()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo fuzz list: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// What one run did, from libFuzzer's log.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub target: String,
    /// Executions (`Done N runs`).
    pub runs: u64,
    /// Wall time of the run in seconds (`in S second(s)`).
    pub seconds: u64,
    /// Covered edges (`cov:`) and features (`ft:`) at the end, and the corpus size (`corp:`).
    pub edges: u64,
    pub features: u64,
    pub corpus: u64,
    /// `None` when it ended cleanly; else what went wrong and where the input is.
    pub failure: Option<String>,
}

impl Figures {
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

/// Reads the figures out of a libFuzzer log (pure).
pub fn parse_log(target: &str, log: &str) -> Figures {
    let mut figures = Figures {
        target: target.to_string(),
        ..Figures::default()
    };
    for line in log.lines() {
        if line.starts_with('#') && line.contains("cov: ") {
            figures.edges = number_after(line, "cov: ").unwrap_or(figures.edges);
            figures.features = number_after(line, "ft: ").unwrap_or(figures.features);
            figures.corpus = number_after(line, "corp: ").unwrap_or(figures.corpus);
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            figures.runs = number_after(rest, "").unwrap_or_default();
            figures.seconds = number_after(rest, " in ").unwrap_or_default();
        }
        if line.contains("Test unit written to ") && figures.failure.is_none() {
            figures.failure = Some(line.trim().to_string());
        }
    }
    figures
}

fn ensure_dir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
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

/// Runs `target` for `seconds`, its log in `operator/fuzz/logs/TARGET.log`.
pub fn run(target: &str, seconds: u64) -> Result<Figures, String> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let logs = dir.join("logs");
    ensure_dir(&corpus)?;
    ensure_dir(&seeds)?;
    ensure_dir(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let max_time = format!("-max_total_time={seconds}");
    let status = nightly_cargo(&[
        "fuzz",
        "run",
        "--fuzz-dir",
        &dir.to_string_lossy(),
        target,
        &corpus.to_string_lossy(),
        &seeds.to_string_lossy(),
        "--",
        &max_time,
        "-max_len=262144",
        "-rss_limit_mb=2048",
        "-timeout=20",
        "-print_final_stats=1",
    ])
    .stdin(Stdio::null())
    .stdout(log)
    .stderr(log_err)
    .status()
    .map_err(|e| format!("cannot run cargo fuzz run: {e}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut figures = parse_log(target, &text);
    if !status.success() && figures.failure.is_none() {
        figures.failure = Some(format!(
            "cargo fuzz run failed ({status}); see {}",
            log_path.display()
        ));
    }
    Ok(figures)
}

/// Runs `targets` (all when empty) for `seconds` each and prints a table; fails when one crashed.
pub fn run_all(seconds: u64, targets_wanted: &[String]) -> Result<Vec<Figures>, String> {
    available()?;
    let all = targets()?;
    let chosen: Vec<String> = if targets_wanted.is_empty() {
        all
    } else {
        for t in targets_wanted {
            if !all.contains(t) {
                return Err(format!(
                    "no fuzz target {t:?}; the targets are: {}",
                    all.join(", ")
                ));
            }
        }
        targets_wanted.to_vec()
    };
    build()?;
    let mut results = Vec::new();
    for target in &chosen {
        eprintln!("fuzz: {target} for {seconds} s");
        let figures = run(target, seconds)?;
        eprintln!("{}", row(&figures));
        results.push(figures);
    }
    eprintln!(
        "\nfuzz: {:<18} {:>10} {:>8} {:>7} {:>7} {:>6} {:>6}",
        "target", "execs", "execs/s", "edges", "ft", "corp", "secs"
    );
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

fn row(f: &Figures) -> String {
    format!(
        "fuzz: {:<18} {:>10} {:>8} {:>7} {:>7} {:>6} {:>6} {}",
        f.target,
        f.runs,
        f.execs_per_second(),
        f.edges,
        f.features,
        f.corpus,
        f.seconds,
        f.failure.as_deref().unwrap_or("ok")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_come_from_the_libfuzzer_log() {
        let log = "INFO: seed corpus: files: 6\n\
                   #2\tINITED cov: 10 ft: 11 corp: 3/1Kb exec/s: 0 rss: 40Mb\n\
                   #4096\tpulse  cov: 1200 ft: 3400 corp: 120/20Kb lim: 4096 exec/s: 2048 rss: 60Mb\n\
                   Done 123456 runs in 61 second(s)\n";
        let f = parse_log("squash", log);
        assert_eq!(
            (f.runs, f.seconds, f.edges, f.features, f.corpus),
            (123_456, 61, 1200, 3400, 120)
        );
        assert_eq!(f.execs_per_second(), 2023);
        assert!(f.failure.is_none());
        let crash =
            "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='a/'; Test unit written to a/crash-1\n";
        assert_eq!(
            parse_log("x", crash).failure.as_deref(),
            Some("artifact_prefix='a/'; Test unit written to a/crash-1")
        );
    }
}
