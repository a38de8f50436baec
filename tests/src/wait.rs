//! Waiting for a condition: one polling loop for every test and fixture.
//!
//! [`wait_for`] (and [`wait_for_async`] for code that polls with a kube client) calls `poll`
//! until it answers, at most `timeout`, every 200 ms ([`Wait::every`] for another cadence). What
//! `poll` returns says how it went ([`IntoPoll`]):
//! - `bool`: `true` when done;
//! - `Option<T>`: `Some(value)` when done;
//! - [`Poll<T>`]: `Ready(value)`, or `Pending(what was seen)`: the last one seen is in the timeout
//!   error, so that it says why the wait did not end;
//! - `Result<_, E>` of one of those: an `Err` stops the wait at once (a terminal failure, a
//!   process that exited) with [`WaitError::Stopped`].
//!
//! A [`WaitError`] says what was waited for, for how long and what was seen last; its `Debug`
//! is its message, so a test can `.unwrap()` the result.
//!
//! ```
//! use std::time::Duration;
//! use walt_tests::wait::{Poll, wait_for};
//!
//! let mut tries = 0;
//! let value = wait_for("the third try", Duration::from_secs(5), || {
//!     tries += 1;
//!     if tries == 3 { Poll::Ready(tries) } else { Poll::Pending(format!("try {tries}")) }
//! })
//! .unwrap();
//! assert_eq!(value, 3);
//! ```

use std::convert::Infallible;
use std::fmt;
use std::time::{Duration, Instant};

/// The default time between two polls.
pub const EVERY: Duration = Duration::from_millis(200);

/// What one poll saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll<T> {
    /// The condition holds: the wait returns this value.
    Ready(T),
    /// Not yet, and what was seen instead (shown when the wait times out).
    Pending(String),
}

/// What a poll closure may return (see the [module docs](self)).
pub trait IntoPoll {
    /// What the wait returns.
    type Value;
    /// What stops the wait early.
    type Error;
    /// This answer as a poll result, or the error that stops the wait.
    fn into_poll(self) -> Result<Poll<Self::Value>, Self::Error>;
}

impl IntoPoll for bool {
    type Value = ();
    type Error = Infallible;
    fn into_poll(self) -> Result<Poll<()>, Infallible> {
        Ok(if self {
            Poll::Ready(())
        } else {
            Poll::Pending(String::new())
        })
    }
}

impl<T> IntoPoll for Option<T> {
    type Value = T;
    type Error = Infallible;
    fn into_poll(self) -> Result<Poll<T>, Infallible> {
        Ok(self.map_or_else(|| Poll::Pending(String::new()), Poll::Ready))
    }
}

impl<T> IntoPoll for Poll<T> {
    type Value = T;
    type Error = Infallible;
    fn into_poll(self) -> Result<Poll<T>, Infallible> {
        Ok(self)
    }
}

impl<P: IntoPoll<Error = Infallible>, E> IntoPoll for Result<P, E> {
    type Value = P::Value;
    type Error = E;
    fn into_poll(self) -> Result<Poll<P::Value>, E> {
        match self {
            Ok(answer) => Ok(answer.into_poll().unwrap_or_else(|never| match never {})),
            Err(error) => Err(error),
        }
    }
}

/// Why a wait ended without its value.
pub enum WaitError<E = Infallible> {
    /// The condition did not hold within the timeout.
    TimedOut {
        /// What was waited for.
        what: String,
        /// The timeout (to the millisecond).
        waited: Duration,
        /// How many times it was polled.
        polls: u32,
        /// What the last poll saw (empty when it did not say).
        last: String,
    },
    /// A poll returned an error: the wait stopped there.
    Stopped {
        /// What was waited for.
        what: String,
        /// How long it had waited (to the millisecond).
        after: Duration,
        /// The poll's error.
        error: E,
    },
}

impl<E> WaitError<E> {
    /// The poll's error when one stopped the wait, else `timed_out(self's message)`: for callers
    /// that return their own error type.
    pub fn or_timed_out(self, timed_out: impl FnOnce(String) -> E) -> E
    where
        E: fmt::Display,
    {
        match self {
            WaitError::Stopped { error, .. } => error,
            WaitError::TimedOut { .. } => timed_out(self.to_string()),
        }
    }
}

impl<E: fmt::Display> fmt::Display for WaitError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut {
                what,
                waited,
                polls,
                last,
            } => {
                write!(f, "timed out after {waited:?} waiting for {what} ({polls} polls)")?;
                if !last.is_empty() {
                    write!(f, "; last seen: {last}")?;
                }
                Ok(())
            }
            WaitError::Stopped { what, after, error } => {
                write!(f, "stopped waiting for {what} after {after:?}: {error}")
            }
        }
    }
}

/// Its message, so that `.unwrap()` and `.expect()` show it as it reads.
impl<E: fmt::Display> fmt::Debug for WaitError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<E: fmt::Display> std::error::Error for WaitError<E> {}

/// A wait: what for, how long, how often (builder for [`wait_for`] with another cadence).
#[derive(Debug, Clone)]
pub struct Wait<'a> {
    what: &'a str,
    timeout: Duration,
    every: Duration,
}

impl<'a> Wait<'a> {
    /// A wait for `what` (a phrase: "the Image to be Ready"), at most `timeout`, polling every 200 ms.
    pub fn new(what: &'a str, timeout: Duration) -> Self {
        Wait {
            what,
            timeout,
            every: EVERY,
        }
    }

    /// Polls every `every` instead.
    #[must_use]
    pub fn every(self, every: Duration) -> Self {
        Wait { every, ..self }
    }

    /// Calls `poll` until it is ready (its value), stops it (its error) or `timeout` passes. It
    /// is always polled once, and once more at the timeout.
    pub fn until<P: IntoPoll>(&self, mut poll: impl FnMut() -> P) -> Result<P::Value, WaitError<P::Error>> {
        let mut clock = Clock::start(self);
        loop {
            match clock.seen(poll().into_poll()) {
                Step::Done(result) => return result,
                Step::Sleep(pause) => std::thread::sleep(pause),
            }
        }
    }

    /// [`Wait::until`] for an async poll (sleeping with tokio).
    pub async fn until_async<P: IntoPoll>(
        &self,
        mut poll: impl AsyncFnMut() -> P,
    ) -> Result<P::Value, WaitError<P::Error>> {
        let mut clock = Clock::start(self);
        loop {
            match clock.seen(poll().await.into_poll()) {
                Step::Done(result) => return result,
                Step::Sleep(pause) => tokio::time::sleep(pause).await,
            }
        }
    }
}

/// Waits for `what` at most `timeout`, polling every 200 ms: see the [module docs](self).
pub fn wait_for<P: IntoPoll>(
    what: &str,
    timeout: Duration,
    poll: impl FnMut() -> P,
) -> Result<P::Value, WaitError<P::Error>> {
    Wait::new(what, timeout).until(poll)
}

/// [`wait_for`] with an async poll (`async || …`), sleeping with tokio.
pub async fn wait_for_async<P: IntoPoll>(
    what: &str,
    timeout: Duration,
    poll: impl AsyncFnMut() -> P,
) -> Result<P::Value, WaitError<P::Error>> {
    Wait::new(what, timeout).until_async(poll).await
}

/// The loop's bookkeeping, shared by the sync and the async wait.
struct Clock<'w> {
    wait: &'w Wait<'w>,
    start: Instant,
    polls: u32,
}

enum Step<T, E> {
    Done(Result<T, WaitError<E>>),
    Sleep(Duration),
}

impl<'w> Clock<'w> {
    fn start(wait: &'w Wait<'w>) -> Self {
        Clock {
            wait,
            start: Instant::now(),
            polls: 0,
        }
    }

    fn seen<T, E>(&mut self, answer: Result<Poll<T>, E>) -> Step<T, E> {
        self.polls += 1;
        let elapsed = self.start.elapsed();
        match answer {
            Ok(Poll::Ready(value)) => Step::Done(Ok(value)),
            Err(error) => Step::Done(Err(WaitError::Stopped {
                what: self.wait.what.to_owned(),
                after: to_the_millisecond(elapsed),
                error,
            })),
            Ok(Poll::Pending(last)) if elapsed >= self.wait.timeout => Step::Done(Err(WaitError::TimedOut {
                what: self.wait.what.to_owned(),
                waited: to_the_millisecond(self.wait.timeout),
                polls: self.polls,
                last,
            })),
            // The last poll is at the timeout, not a whole pause after it.
            Ok(Poll::Pending(_)) => {
                Step::Sleep(self.wait.every.min(self.wait.timeout.saturating_sub(elapsed)))
            }
        }
    }
}

/// `duration` without its sub-millisecond part (a timeout computed from a deadline reads "87.234s").
fn to_the_millisecond(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut polls = 0;
        let value = Wait::new("the third poll", Duration::from_secs(10))
            .every(Duration::from_millis(1))
            .until(|| {
                polls += 1;
                (polls == 3).then_some(polls * 10)
            })
            .unwrap();
        assert_eq!((value, polls), (30, 3));
        assert!(wait_for("a true bool", Duration::ZERO, || true).is_ok());
    }

    #[test]
    fn times_out_saying_what_how_long_and_what_was_seen_last() {
        let start = Instant::now();
        let mut polls = 0;
        let error = Wait::new("the Image to be Ready", Duration::from_millis(100))
            .every(Duration::from_millis(30))
            .until(|| {
                polls += 1;
                Poll::<()>::Pending(format!("phase Pending ({polls})"))
            })
            .unwrap_err();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "timed out after 100ms waiting for the Image to be Ready ({polls} polls); last seen: phase Pending ({polls})"
            )
        );
        assert!(polls >= 2, "polled at the start and at the timeout: {polls}");
        assert_eq!(format!("{error:?}"), error.to_string(), "Debug is the message");
        let silent = wait_for("nothing", Duration::ZERO, || None::<()>).unwrap_err();
        assert_eq!(
            silent.to_string(),
            "timed out after 0ns waiting for nothing (1 polls)"
        );
    }

    #[test]
    fn an_error_stops_the_wait_at_once() {
        let mut polls = 0;
        let error = wait_for("the save to succeed", Duration::from_mins(10), || {
            polls += 1;
            if polls < 2 {
                Ok(Poll::<()>::Pending("Running".into()))
            } else {
                Err("the save failed: NodeUnreachable")
            }
        })
        .unwrap_err();
        assert_eq!(polls, 2);
        let WaitError::Stopped {
            after, error: why, ..
        } = &error
        else {
            panic!("{error}")
        };
        assert_eq!(*why, "the save failed: NodeUnreachable");
        assert!(*after < Duration::from_secs(5));
        assert!(
            error
                .to_string()
                .starts_with("stopped waiting for the save to succeed after "),
            "{error}"
        );
        assert_eq!(
            error.or_timed_out(|_| "timed out"),
            "the save failed: NodeUnreachable"
        );
        let timed_out = wait_for("x", Duration::ZERO, || Ok::<_, String>(false)).unwrap_err();
        assert_eq!(
            timed_out.or_timed_out(|message| format!("mine: {message}")),
            "mine: timed out after 0ns waiting for x (1 polls)"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_async_wait_polls_an_async_closure() {
        let mut polls = 0;
        let value = wait_for_async("the second poll", Duration::from_secs(10), async || {
            tokio::task::yield_now().await;
            polls += 1;
            (polls == 2).then_some("ready")
        })
        .await
        .unwrap();
        assert_eq!((value, polls), ("ready", 2));
        let error = Wait::new("never", Duration::from_millis(300))
            .every(Duration::from_millis(100))
            .until_async(async || false)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("timed out after 300ms waiting for never ("),
            "{error}"
        );
    }
}
