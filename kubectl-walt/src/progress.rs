//! Progress bars for `node save` and `image clone`, drawn from the resource's status.
//!
//! The drawing is a pure function of the samples seen so far, so it is unit-tested; the caller
//! only decides where the line goes (a terminal gets `\r` redraws, a pipe gets one line per
//! change).

use std::collections::VecDeque;
use std::time::Duration;

use crate::format::{bytes, clock};

/// One observation of the work done, taken from a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Time since the start of the operation.
    pub at: Duration,
    /// Bytes done.
    pub bytes: u64,
    /// Files done (0 when the status does not count files).
    pub files: u64,
}

/// Rate and ETA estimation over a sliding window, plus the drawing.
#[derive(Debug, Clone)]
pub struct Progress {
    label: String,
    total_bytes: Option<u64>,
    window: VecDeque<Sample>,
    last: Option<Sample>,
}

/// How far back the rate looks: long enough to smooth status updates that come every few
/// seconds, short enough to follow a change of speed.
const WINDOW: Duration = Duration::from_secs(20);
const BAR_WIDTH: usize = 24;

impl Progress {
    /// A progress line titled `label` (e.g. "saving rpi3-01"), with a known total if any.
    pub fn new(label: impl Into<String>, total_bytes: Option<u64>) -> Self {
        Progress {
            label: label.into(),
            total_bytes,
            window: VecDeque::new(),
            last: None,
        }
    }

    /// Sets or updates the total once the status reports it.
    pub fn set_total(&mut self, total: Option<u64>) {
        if total.is_some() {
            self.total_bytes = total;
        }
    }

    /// Records a sample; returns whether it changed anything worth redrawing.
    pub fn observe(&mut self, sample: Sample) -> bool {
        let changed = self
            .last
            .is_none_or(|l| l.bytes != sample.bytes || l.files != sample.files);
        self.window.push_back(sample);
        while self
            .window
            .front()
            .is_some_and(|first| sample.at.saturating_sub(first.at) > WINDOW && self.window.len() > 2)
        {
            self.window.pop_front();
        }
        self.last = Some(sample);
        changed
    }

    /// Bytes per second over the window, once two samples are far enough apart.
    pub fn rate(&self) -> Option<f64> {
        let first = self.window.front()?;
        let last = self.window.back()?;
        let span = last.at.checked_sub(first.at)?.as_secs_f64();
        if span < 0.5 {
            return None;
        }
        Some(last.bytes.saturating_sub(first.bytes) as f64 / span)
    }

    /// Time left, when the total and a non-zero rate are known.
    pub fn eta(&self) -> Option<Duration> {
        let total = self.total_bytes?;
        let done = self.last?.bytes;
        let rate = self.rate()?;
        if rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate))
    }

    /// The progress line (no newline).
    pub fn render(&self) -> String {
        let last = self.last.unwrap_or(Sample {
            at: Duration::ZERO,
            bytes: 0,
            files: 0,
        });
        let mut parts = vec![self.label.clone()];
        if let Some(total) = self.total_bytes.filter(|t| *t > 0) {
            let fraction = (last.bytes as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (fraction * BAR_WIDTH as f64).round() as usize;
            parts.push(format!(
                "[{}{}] {:>3}%",
                "#".repeat(filled),
                "-".repeat(BAR_WIDTH - filled),
                (fraction * 100.0).floor() as u64
            ));
            parts.push(format!("{}/{}", bytes(last.bytes), bytes(total)));
        } else {
            parts.push(bytes(last.bytes));
        }
        if last.files > 0 {
            parts.push(format!("{} files", last.files));
        }
        match self.rate() {
            Some(rate) => parts.push(format!("{}/s", bytes(rate as u64))),
            None => parts.push("-/s".into()),
        }
        match self.eta() {
            Some(eta) => parts.push(format!("ETA {}", clock(eta))),
            None => parts.push(format!("elapsed {}", clock(last.at))),
        }
        parts.join("  ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, bytes: u64, files: u64) -> Sample {
        Sample {
            at: Duration::from_secs(secs),
            bytes,
            files,
        }
    }

    #[test]
    fn bar_rate_and_eta_with_a_total() {
        let mut p = Progress::new("cloning rpi-debian", Some(100 * 1024 * 1024));
        assert!(p.observe(at(0, 0, 0)));
        assert!(p.observe(at(10, 50 * 1024 * 1024, 0)));
        assert_eq!(p.rate(), Some(5.0 * 1024.0 * 1024.0));
        assert_eq!(p.eta(), Some(Duration::from_secs(10)));
        assert_eq!(
            p.render(),
            "cloning rpi-debian  [############------------]  50%  50.0MiB/100.0MiB  5.0MiB/s  ETA 10s"
        );
    }

    #[test]
    fn without_a_total_shows_bytes_files_rate_and_elapsed() {
        let mut p = Progress::new("saving rpi3-01", None);
        p.observe(at(0, 0, 0));
        p.observe(at(4, 2048, 12));
        assert_eq!(p.render(), "saving rpi3-01  2.0KiB  12 files  512B/s  elapsed 4s");
        assert!(!p.observe(at(5, 2048, 12)), "no change, no redraw");
    }

    #[test]
    fn rate_follows_the_recent_window() {
        let mut p = Progress::new("x", None);
        p.observe(at(0, 0, 0));
        p.observe(at(100, 100, 0)); // slow start: 1 B/s
        p.observe(at(110, 100 + 10_000, 0)); // then 1000 B/s
        let rate = p.rate().expect("rate");
        assert!((rate - 1000.0).abs() < 1.0, "rate {rate}");
    }

    #[test]
    fn no_rate_from_a_single_sample() {
        let mut p = Progress::new("x", Some(10));
        p.observe(at(3, 1, 0));
        assert_eq!(p.rate(), None);
        assert!(p.render().ends_with("-/s  elapsed 3s"));
    }
}
