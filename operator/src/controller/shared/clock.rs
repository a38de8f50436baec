//! The API server's clock, as the operator reads it.
//!
//! Session lifetimes compare times the API server stamped (`creationTimestamp`) with "now". When the
//! operator's host clock is minutes off the API server's, a `ttl` of 5 minutes would end a session at
//! once (operator ahead) or late (behind), and the idle timer likewise. So the operator measures the
//! offset from the `Date` header of an API server answer (at start, then every minute) and takes its
//! "now" for these decisions, and the times it writes into sessions' status, on the API server's
//! clock. The `Date` header has a resolution of one second: offsets within [`RESOLUTION`] are taken as
//! none, so two replicas on synchronized hosts never disagree by a jitter.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use tokio_util::sync::CancellationToken;

/// Offsets smaller than this are not corrected (the `Date` header counts whole seconds).
pub const RESOLUTION: Duration = Duration::from_secs(2);
/// How often the offset is measured again.
pub const INTERVAL: Duration = Duration::from_mins(1);

/// Why the API server's clock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The request failed.
    #[error("asking the API server for its time (GET /version): {0}")]
    Request(#[from] kube::Error),
    /// The answer had no usable `Date` header.
    #[error("the API server's answer to GET /version has no usable Date header: {0}")]
    Date(String),
}

/// The operator's view of the API server's clock: the local clock plus a measured offset.
#[derive(Debug, Default)]
pub struct ApiClock {
    offset_ms: AtomicI64,
}

impl ApiClock {
    /// Now, on the API server's clock.
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.offset())
            .unwrap_or_else(|_| Timestamp::now())
    }

    /// The API server's clock minus the local one (zero until measured, or within [`RESOLUTION`]).
    pub fn offset(&self) -> SignedDuration {
        SignedDuration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// A time of the API server's clock on the local clock (what `SystemTime::now()` compares with).
    pub fn to_local(&self, api_time: SystemTime) -> SystemTime {
        let offset = self.offset();
        let magnitude = offset.unsigned_abs();
        if offset.is_negative() {
            api_time.checked_add(magnitude).unwrap_or(api_time)
        } else {
            api_time.checked_sub(magnitude).unwrap_or(api_time)
        }
    }

    fn set(&self, offset: SignedDuration) {
        let millis = i64::try_from(offset.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.store(millis, Ordering::Relaxed);
    }
}

/// The offset of the API server's clock (pure): its `Date` header (`Sun, 06 Dec 2026 06:40:00 GMT`)
/// minus the midpoint of when the request was sent and its answer received on the local clock; zero
/// within [`RESOLUTION`].
pub fn offset_from(date: &str, sent: Timestamp, received: Timestamp) -> Result<SignedDuration, ClockError> {
    let server = k8s_openapi::jiff::fmt::rfc2822::parse(date)
        .map_err(|error| ClockError::Date(format!("{date:?}: {error}")))?
        .timestamp();
    let half_trip = received.duration_since(sent) / 2;
    let local = sent.checked_add(half_trip).unwrap_or(sent);
    // The header truncates to the second: its time is on average half a second before the real one.
    let offset = server.duration_since(local) + SignedDuration::from_millis(500);
    Ok(if offset.unsigned_abs() < RESOLUTION {
        SignedDuration::ZERO
    } else {
        offset
    })
}

/// Measures the offset once (`GET /version`, a cheap request every API server answers).
pub async fn measure(client: &Client) -> Result<SignedDuration, ClockError> {
    let request = http::Request::get("/version")
        .body(kube::client::Body::empty())
        .map_err(|error| ClockError::Date(format!("building the request: {error}")))?;
    let sent = Timestamp::now();
    let response = client.send(request).await?;
    let received = Timestamp::now();
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| ClockError::Date("no Date header".into()))?;
    offset_from(date, sent, received)
}

/// Measures once and records the result, saying when the clocks differ (or stop differing).
pub async fn update(client: &Client, clock: &ApiClock) {
    match measure(client).await {
        Ok(offset) => {
            let before = clock.offset();
            clock.set(offset);
            if offset != before {
                if offset.is_zero() {
                    tracing::info!("the operator's clock agrees with the API server's again");
                } else {
                    tracing::warn!(
                        offset_seconds = offset.as_secs(),
                        "the API server's clock is {} s {} the operator's: session lifetimes follow the API server's clock",
                        offset.as_secs().abs(),
                        if offset.is_negative() {
                            "behind"
                        } else {
                            "ahead of"
                        }
                    );
                }
            }
        }
        Err(error) => tracing::debug!(%error, "cannot read the API server's clock; keeping the last offset"),
    }
}

/// Measures the offset every [`INTERVAL`] until `shutdown`.
pub async fn track(client: Client, clock: std::sync::Arc<ApiClock>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => update(&client, &clock).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("a timestamp")
    }

    #[test]
    fn an_api_server_minutes_ahead_or_behind_is_measured_to_the_second() {
        let sent = at("2026-12-06T06:40:00.000Z");
        let received = at("2026-12-06T06:40:00.200Z");
        let ahead = offset_from("Sun, 06 Dec 2026 06:50:00 GMT", sent, received).expect("a date");
        assert_eq!(ahead.as_secs(), 600);
        let behind = offset_from("Sun, 06 Dec 2026 06:30:00 GMT", sent, received).expect("a date");
        assert_eq!(behind.as_secs(), -599);
    }

    #[test]
    fn offsets_within_the_headers_resolution_are_none() {
        let sent = at("2026-12-06T06:40:00.900Z");
        let received = at("2026-12-06T06:40:01.100Z");
        for date in [
            "Sun, 06 Dec 2026 06:40:00 GMT",
            "Sun, 06 Dec 2026 06:40:01 GMT",
            "Sun, 06 Dec 2026 06:40:02 GMT",
        ] {
            assert_eq!(
                offset_from(date, sent, received).expect("a date"),
                SignedDuration::ZERO,
                "{date}"
            );
        }
    }

    #[test]
    fn a_missing_or_garbled_date_says_what_it_got() {
        let now = Timestamp::now();
        let error = offset_from("yesterday", now, now).expect_err("not a date");
        assert!(error.to_string().contains("\"yesterday\""), "{error}");
    }

    #[test]
    fn times_convert_between_the_two_clocks() {
        let clock = ApiClock::default();
        clock.set(SignedDuration::from_secs(600));
        let api = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(
            clock.to_local(api),
            SystemTime::UNIX_EPOCH + Duration::from_secs(9_400)
        );
        let local_now = Timestamp::now();
        let api_now = clock.now();
        let ahead = api_now.duration_since(local_now).as_secs();
        assert!((599..=601).contains(&ahead), "{ahead}");
        clock.set(SignedDuration::from_secs(-600));
        assert_eq!(
            clock.to_local(api),
            SystemTime::UNIX_EPOCH + Duration::from_secs(10_600)
        );
    }
}
