//! `cargo xtask bench`: speed as users feel it (issue 20), measured side by side in one run on the
//! cluster tier by `tests/tests/bench.rs`. This module holds what the benchmark computes and prints
//! (medians, ratios, the table: pure, unit-tested) and the few measurements every row shares: the time
//! until a shell on a terminal answers, and the peak resident memory of processes.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pty::Pty;

/// Environment variable: how many times each measurement is repeated (default [`DEFAULT_REPS`]).
pub const REPS_ENV: &str = "WALT_BENCH_REPS";
/// Environment variable: the build profile of the walt image the benchmarks install (`release`, the
/// default and what is shipped, or `dist-check`, built in a fraction of the time, for a quick look).
pub const PROFILE_ENV: &str = "WALT_BENCH_PROFILE";
/// Repetitions when [`REPS_ENV`] is not set.
pub const DEFAULT_REPS: usize = 3;
/// Environment variable: which groups of rows to measure (comma-separated [`GROUPS`]; all when unset).
pub const ONLY_ENV: &str = "WALT_BENCH_ONLY";
/// The groups of rows of the speed table, as `cargo xtask bench --only` names them.
pub const GROUPS: [&str; 4] = ["image-shell", "node-shell", "node-save", "image-build"];

/// The groups of rows asked for in `value` (of [`ONLY_ENV`]): all [`GROUPS`] when unset or empty; an
/// unknown name is an error naming the known ones.
pub fn groups_from(value: Option<&str>) -> Result<Vec<&'static str>, String> {
    let asked: Vec<&str> = value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if asked.is_empty() {
        return Ok(GROUPS.to_vec());
    }
    asked
        .into_iter()
        .map(|name| {
            GROUPS
                .iter()
                .copied()
                .find(|group| *group == name)
                .ok_or_else(|| {
                    format!(
                        "{ONLY_ENV}: no group of rows is called {name:?}: choose among {}",
                        GROUPS.join(", ")
                    )
                })
        })
        .collect()
}

/// The number of repetitions asked for in `value` (of [`REPS_ENV`]): a positive integer, else the
/// default; an unreadable value is an error naming it.
pub fn reps_from(value: Option<&str>) -> Result<usize, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_REPS),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{REPS_ENV}={text:?} is not a positive number of repetitions (e.g. {REPS_ENV}=5)"
            )),
        },
    }
}

/// The median of `samples` (the mean of the two middle ones for an even count); None when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    })
}

/// The `q` quantile (0 < q <= 1) of `samples` by nearest rank (the smallest sample with at least
/// `q` of them at or below it); None when empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: ceil(q·n), at least 1. Sample counts here are small (tens), exact in f64.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The cumulative buckets `(le, count)` of the Prometheus histogram `name` for `kind` in a
/// `/metrics` text (`name_bucket{kind="…",le="…"} count`), in the order printed (increasing `le`).
pub fn histogram_buckets(metrics: &str, name: &str, kind: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let kind_label = format!("kind=\"{kind}\"");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter(|rest| {
            rest.split('}')
                .next()
                .is_some_and(|labels| labels.split(',').any(|l| l == kind_label))
        })
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            let le = labels
                .split(',')
                .find_map(|label| label.strip_prefix("le=\""))?
                .trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations a histogram gained between two scrapes (`before`, `after`:
/// [`histogram_buckets`] of each), as the upper bound of the bucket it falls in (what a histogram can
/// say); None when nothing was observed in between.
pub fn histogram_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let gained = |le: f64, count: u64| {
        let earlier = before
            .iter()
            .find(|(b, _)| (*b - le).abs() < f64::EPSILON || (b.is_infinite() && le.is_infinite()))
            .map_or(0, |(_, c)| *c);
        count.saturating_sub(earlier)
    };
    let total = after.last().map(|(le, count)| gained(*le, *count))?;
    if total == 0 {
        return None;
    }
    // The smallest bucket holding at least q of the new observations.
    #[allow(clippy::cast_precision_loss)]
    let wanted = q * total as f64;
    #[allow(clippy::cast_precision_loss)]
    after
        .iter()
        .find(|(le, count)| gained(*le, *count) as f64 >= wanted)
        .map(|(le, _)| *le)
}

/// How a [`histogram_quantile`] reads (pure): `≤B s` for a bucket's upper bound `B`, `> L s` when it
/// fell in the `+Inf` bucket (`L` the largest finite bound of `buckets`), `-` when nothing was observed.
pub fn quantile_text(quantile: Option<f64>, buckets: &[(f64, u64)]) -> String {
    match quantile {
        None => "-".to_owned(),
        Some(bound) if bound.is_infinite() => {
            let largest = buckets
                .iter()
                .map(|(le, _)| *le)
                .filter(|le| le.is_finite())
                .fold(0.0_f64, f64::max);
            format!("> {largest}s")
        }
        Some(bound) => format!("≤{bound}s"),
    }
}

/// One row of the table: walt's way and the reference way of doing the same thing.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What is measured, e.g. `image shell, cold`.
    pub what: String,
    /// What walt's time is compared with, e.g. `kubectl run -it --rm`.
    pub reference: String,
    /// walt's times, in seconds, one per repetition.
    pub ours: Vec<f64>,
    /// The reference's times, in seconds, one per repetition.
    pub theirs: Vec<f64>,
    /// Peak resident memory of the operator during walt's runs (KiB), where the operator does the work.
    pub operator_rss_kib: Option<u64>,
    /// Peak resident memory of the reference program (KiB), where it is one process measured here.
    pub reference_rss_kib: Option<u64>,
    /// The goal from the issue: walt's median at most this many times the reference's.
    pub goal: Option<f64>,
    /// The compressed size (bytes, the sum of its layers) of walt's result and of the reference's,
    /// where the row makes an image.
    pub result_bytes: Option<(u64, u64)>,
}

impl Row {
    /// walt's median over the reference's, when both were measured.
    pub fn ratio(&self) -> Option<f64> {
        let ours = median(&self.ours)?;
        let theirs = median(&self.theirs)?;
        (theirs > 0.0).then(|| ours / theirs)
    }

    /// Whether the row meets its goal (None without a goal or a ratio).
    pub fn meets_goal(&self) -> Option<bool> {
        Some(self.ratio()? <= self.goal?)
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s"))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "-".to_owned(), |k| format!("{:.1} MiB", kib_to_mib(k)))
}

/// KiB (as `/proc` and GNU time count) in MiB.
#[allow(clippy::cast_precision_loss)] // memory sizes of processes: far below 2^52 KiB
pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The table `cargo xtask bench` prints: one line per row with both medians, the ratio, the goal and
/// the peak memory; then every sample, so a noisy run shows as such.
pub fn render(rows: &[Row], reps: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>9}  {:<32} {:>9} {:>7} {:>12} {:>13} {:>13}",
        "walt", "median", "reference", "median", "ratio", "goal", "operator RSS", "reference RSS"
    );
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|row| !row.ours.is_empty() || !row.theirs.is_empty())
        .collect();
    for row in &rows {
        let goal = match (row.goal, row.meets_goal()) {
            (Some(goal), Some(true)) => format!("<={goal:.1}x ok"),
            (Some(goal), Some(false)) => format!("<={goal:.1}x MISS"),
            (Some(goal), None) => format!("<={goal:.1}x"),
            (None, _) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<34} {:>9}  {:<32} {:>9} {:>7} {:>12} {:>13} {:>13}",
            row.what,
            seconds(median(&row.ours)),
            row.reference,
            seconds(median(&row.theirs)),
            row.ratio().map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            goal,
            mib(row.operator_rss_kib),
            mib(row.reference_rss_kib),
        );
    }
    let _ = writeln!(out, "samples ({reps} repetitions, seconds):");
    for row in &rows {
        let list = |samples: &[f64]| {
            samples
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "  {}: walt [{}] vs {} [{}]",
            row.what,
            list(&row.ours),
            row.reference,
            list(&row.theirs)
        );
    }
    let sized: Vec<&&Row> = rows.iter().filter(|row| row.result_bytes.is_some()).collect();
    if !sized.is_empty() {
        let _ = writeln!(out, "result sizes (compressed layers, bytes):");
    }
    for row in sized {
        if let Some((ours, theirs)) = row.result_bytes {
            #[allow(clippy::cast_precision_loss)] // image sizes: far below 2^52 bytes
            let ratio = if theirs > 0 {
                format!("{:.3}x", ours as f64 / theirs as f64)
            } else {
                "-".to_owned()
            };
            let _ = writeln!(
                out,
                "  {}: walt {ours} vs {} {theirs} ({ratio})",
                row.what, row.reference
            );
        }
    }
    out
}

/// What a shell is asked to print to show it answers: typed, the terminal echoes the command line,
/// which does not contain [`ANSWER`]; only the shell's arithmetic does.
pub const QUESTION: &str = "echo READY-$((40+2))\n";
/// What the shell prints for [`QUESTION`].
pub const ANSWER: &str = "READY-42";

/// How often [`QUESTION`] is typed again while no answer came: the first typed line may be lost
/// (a client that attaches late, a shell that flushes its terminal when it starts), so it is typed
/// every 100 ms for 10 s, then every second (a cold pull takes longer; the PTY's input buffer, 4 KiB,
/// must not fill up within the limit).
pub fn retype_interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_secs(10) {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    }
}

/// Starts `command` on a terminal, types [`QUESTION`] until the shell prints [`ANSWER`] and returns
/// the time from the start to that answer, with the terminal (for the caller to end the session).
pub fn time_to_answer(command: &Command, limit: Duration) -> Result<(Duration, Pty), String> {
    let started = Instant::now();
    let pty = Pty::spawn(command);
    let mut next_type = started;
    loop {
        let now = Instant::now();
        if pty.text().contains(ANSWER) {
            return Ok((now - started, pty));
        }
        if now - started > limit {
            return Err(format!(
                "no answer to {QUESTION:?} within {limit:?} from {command:?}; the terminal showed:\n{}",
                pty.text()
            ));
        }
        if now >= next_type {
            pty.send(QUESTION);
            next_type = now + retype_interval(now - started);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `VmHWM` (peak resident set, KiB) of process `pid`, from `/proc/PID/status`.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_hwm(&status)
}

/// The `VmHWM:` value (KiB) of a `/proc/PID/status` text.
pub fn vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

/// Resets the peak resident set of `pid` to its current one (`echo 5 > /proc/PID/clear_refs`).
pub fn reset_peak_rss(pid: u32) -> Result<(), String> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("resetting the peak RSS of process {pid}: {e}"))
}

/// The processes whose command line is `<…/>program first_arg …` and whose cgroup path contains
/// `cgroup_part` (the cluster tier puts its pods under `/<node netns name>/`, so processes of other
/// clusters on the machine are not counted).
pub fn processes(program: &str, first_arg: &str, cgroup_part: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let proc = Path::new("/proc").join(pid.to_string());
            let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
            let is_program = args
                .next()
                .is_some_and(|arg0| Path::new(arg0.as_ref()).file_name().is_some_and(|n| n == program));
            is_program
                && args.next().is_some_and(|arg1| arg1 == first_arg)
                && std::fs::read_to_string(proc.join("cgroup")).is_ok_and(|c| c.contains(cgroup_part))
        })
        .collect()
}

/// The peak RSS figure of GNU time's `-f 'peak-rss-kib %M'` line in `stderr`.
pub fn time_peak_rss_kib(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|line| line.trim().strip_prefix("peak-rss-kib "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let samples = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&samples, 0.5), Some(3.0));
        assert_eq!(quantile(&samples, 0.99), Some(5.0));
        assert_eq!(quantile(&samples, 0.2), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn reconcile_latency_quantiles_come_from_the_buckets_gained_between_two_scrapes() {
        let scrape = |fast: u64, slow: u64, other: u64| {
            format!(
                "# TYPE walt_reconcile_duration_seconds histogram\n\
                 walt_reconcile_duration_seconds_bucket{{kind=\"Image\",le=\"0.005\"}} {other}\n\
                 walt_reconcile_duration_seconds_bucket{{kind=\"ShellSession\",le=\"0.005\"}} 0\n\
                 walt_reconcile_duration_seconds_bucket{{kind=\"ShellSession\",le=\"0.01\"}} {fast}\n\
                 walt_reconcile_duration_seconds_bucket{{kind=\"ShellSession\",le=\"2.56\"}} {}\n\
                 walt_reconcile_duration_seconds_bucket{{kind=\"ShellSession\",le=\"+Inf\"}} {}\n\
                 walt_reconcile_duration_seconds_sum{{kind=\"ShellSession\"}} 1.0\n",
                fast + slow,
                fast + slow
            )
        };
        let name = "walt_reconcile_duration_seconds";
        let before = histogram_buckets(&scrape(10, 0, 7), name, "ShellSession");
        assert_eq!(before.len(), 4, "{before:?}");
        assert_eq!(
            histogram_buckets(&scrape(10, 0, 7), name, "Image"),
            vec![(0.005, 7)]
        );
        // 98 fast and 2 slow reconciles since `before`: p50 is fast, p99 slow.
        let after = histogram_buckets(&scrape(108, 2, 9), name, "ShellSession");
        assert_eq!(histogram_quantile(&before, &after, 0.5), Some(0.01));
        assert_eq!(histogram_quantile(&before, &after, 0.99), Some(2.56));
        assert_eq!(
            histogram_quantile(&after, &after, 0.5),
            None,
            "nothing new observed"
        );
    }

    #[test]
    fn a_quantile_past_the_largest_bucket_says_so() {
        let buckets = [(0.5, 1), (40.96, 2), (f64::INFINITY, 3)];
        assert_eq!(quantile_text(Some(f64::INFINITY), &buckets), "> 40.96s");
        assert_eq!(quantile_text(Some(0.5), &buckets), "≤0.5s");
        assert_eq!(quantile_text(None, &buckets), "-");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn ratio_and_goal() {
        let row = Row {
            what: "image shell, warm".into(),
            reference: "kubectl run -it --rm".into(),
            ours: vec![1.0, 1.2, 5.0],
            theirs: vec![1.0, 0.9, 1.1],
            goal: Some(1.0),
            ..Row::default()
        };
        let ratio = row.ratio().expect("both measured");
        assert!((ratio - 1.2).abs() < 1e-9, "{ratio}");
        assert_eq!(row.meets_goal(), Some(false));
        let unmeasured = Row {
            theirs: Vec::new(),
            ..row.clone()
        };
        assert_eq!(unmeasured.ratio(), None);
        assert_eq!(unmeasured.meets_goal(), None);
        let table = render(&[row, unmeasured], 3);
        assert!(table.contains("1.20x"), "{table}");
        assert!(table.contains("<=1.0x MISS"), "{table}");
        assert!(
            table.contains("walt [1.00 1.20 5.00] vs kubectl run -it --rm [1.00 0.90 1.10]"),
            "{table}"
        );
        assert!(!table.contains("result sizes"), "no row made an image:\n{table}");
    }

    #[test]
    fn rows_that_make_images_show_both_sizes() {
        let row = Row {
            what: "image build amd64, cold".into(),
            reference: "buildah bud --layers + push".into(),
            ours: vec![10.0],
            theirs: vec![20.0],
            result_bytes: Some((122_700_320, 122_578_243)),
            ..Row::default()
        };
        let table = render(&[row], 1);
        assert!(
            table.contains(
                "result sizes (compressed layers, bytes):\n  image build amd64, cold: walt 122700320 vs \
                 buildah bud --layers + push 122578243 (1.001x)"
            ),
            "{table}"
        );
    }

    #[test]
    fn groups_of_rows_from_the_environment() {
        assert_eq!(groups_from(None), Ok(GROUPS.to_vec()));
        assert_eq!(groups_from(Some(" ")), Ok(GROUPS.to_vec()));
        assert_eq!(
            groups_from(Some("image-shell, node-save")),
            Ok(vec!["image-shell", "node-save"])
        );
        let error = groups_from(Some("shells")).expect_err("not a group");
        assert!(
            error.contains("\"shells\"") && error.contains("image-shell, node-shell"),
            "{error}"
        );
    }

    #[test]
    fn repetitions_from_the_environment() {
        assert_eq!(reps_from(None), Ok(DEFAULT_REPS));
        assert_eq!(reps_from(Some("5")), Ok(5));
        let error = reps_from(Some("zero")).expect_err("not a number");
        assert!(error.contains("WALT_BENCH_REPS=\"zero\""), "{error}");
        assert!(reps_from(Some("0")).is_err());
    }

    #[test]
    fn typing_slows_down_after_ten_seconds() {
        assert_eq!(
            retype_interval(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(retype_interval(Duration::from_secs(30)), Duration::from_secs(1));
        // 10 s at 100 ms then 50 s at 1 s: 150 lines stay below the 4 KiB input buffer.
        assert!(150 * QUESTION.len() < 4096);
    }

    #[test]
    fn peak_rss_from_proc_and_time() {
        assert_eq!(
            vm_hwm("Name:\tx\nVmPeak:\t 9 kB\nVmHWM:\t   51234 kB\n"),
            Some(51234)
        );
        assert_eq!(vm_hwm("Name:\tx\n"), None);
        assert_eq!(time_peak_rss_kib("saved\npeak-rss-kib 53120\n"), Some(53120));
        let own = peak_rss_kib(std::process::id()).expect("this process has a VmHWM");
        assert!(own > 0);
    }
}
