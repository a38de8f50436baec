//! Waiting on the cluster from a terminal: Ctrl-C and termination signals turn into
//! [`Error::Interrupted`] (so callers clean up what they created), and progress lines redraw in
//! place on a terminal or print sparingly into a pipe.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Error, Result};

/// Runs `work`, or returns [`Error::Interrupted`] on Ctrl-C (SIGINT), SIGTERM or SIGHUP.
pub async fn interruptible<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    let interrupted = async {
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { term.as_mut()?.recv().await } => {}
            Some(()) = async { hup.as_mut()?.recv().await } => {}
        }
    };
    tokio::select! {
        result = work => result,
        () = interrupted => Err(Error::Interrupted),
    }
}

/// A status line on stderr.
#[derive(Debug)]
pub struct LiveLine {
    terminal: bool,
    latest: String,
    printed: String,
    last_print: Option<Instant>,
}

/// How often a pipe gets a new progress line.
const PIPE_INTERVAL: Duration = Duration::from_secs(2);

impl LiveLine {
    /// A line on stderr.
    pub fn stderr() -> LiveLine {
        LiveLine {
            terminal: std::io::stderr().is_terminal(),
            latest: String::new(),
            printed: String::new(),
            last_print: None,
        }
    }

    /// Shows `text` (redrawn in place on a terminal; in a pipe, a new line at most every 2s).
    pub fn show(&mut self, text: &str) {
        text.clone_into(&mut self.latest);
        if text == self.printed {
            return;
        }
        if !self.terminal && self.last_print.is_some_and(|t| t.elapsed() < PIPE_INTERVAL) {
            return;
        }
        self.print();
    }

    fn print(&mut self) {
        let mut err = std::io::stderr();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{}", self.latest);
        } else {
            let _ = writeln!(err, "{}", self.latest);
        }
        let _ = err.flush();
        self.printed.clone_from(&self.latest);
        self.last_print = Some(Instant::now());
    }

    /// Ends the line (a newline on a terminal; in a pipe, the latest state if not printed yet),
    /// so the next output starts clean.
    pub fn finish(&mut self) {
        if !self.latest.is_empty() && self.latest != self.printed {
            self.print();
        }
        if self.terminal && !self.printed.is_empty() {
            let _ = writeln!(std::io::stderr());
        }
        self.latest.clear();
        self.printed.clear();
        self.last_print = None;
    }
}
