//! Session lifetimes shared by the ShellSession controller and the gateway: the duration syntax of
//! `ttl`/`idleTimeout`, and the activity record the gateway writes (`status.lastActivity`, status
//! a tenant cannot write; the old `walt.dev/last-activity` annotation, which they could, is ignored).

use std::time::Duration;

/// Field manager of the gateway's writes of `status.lastActivity` (server-side apply): the
/// controller's own status writes leave that field to it.
pub const GATEWAY_FIELD_MANAGER: &str = "walt-gateway";

/// The lab's ceilings on session lifetimes (`--max-session-ttl`, `--max-session-idle-timeout`): the
/// chart's admission policy refuses a longer request; the operator clamps one that got past it (a
/// cluster without the policy, a session created before the ceiling was lowered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest `ttl`.
    pub max_ttl: Duration,
    /// Longest `idleTimeout`.
    pub max_idle_timeout: Duration,
}

/// A requested duration under its ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounded {
    /// What the session gets: the request, or the ceiling when the request is longer.
    pub value: Duration,
    /// What the session asked for.
    pub requested: Duration,
}

impl Bounded {
    /// `requested`, at most `ceiling` (pure).
    pub fn new(requested: Duration, ceiling: Duration) -> Self {
        Self {
            value: requested.min(ceiling),
            requested,
        }
    }

    /// Whether the request was over the ceiling.
    pub fn is_clamped(&self) -> bool {
        self.value < self.requested
    }

    /// What a condition says when the request was over the ceiling (pure): the field, the request,
    /// the ceiling and the flag that sets it.
    pub fn note(&self, field: &str, flag: &str) -> Option<String> {
        self.is_clamped().then(|| {
            format!(
                "{field} {} is over the lab's ceiling {} ({flag}): the session gets the ceiling",
                walt_crds::format_duration(self.requested),
                walt_crds::format_duration(self.value)
            )
        })
    }
}

/// How often a running node shell checks again that its node may still be reached (the lab may
/// take its Device back, or lend it elsewhere): the session then ends `Failed` saying why, and the
/// gateway, which checks on its own as often, closes its connections.
pub const ACCESS_RECHECK: Duration = Duration::from_secs(15);

/// How often a session's activity is written at most.
pub const ACTIVITY_PUBLISH_INTERVAL: Duration = Duration::from_secs(15);

/// Parses a session duration as Go writes it (`90s`, `30m`, `1h30m`, `1.5h`,
/// `500ms`), the form the API accepts for `ttl` and `idleTimeout` (pure).
pub fn session_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || format!("`{text}` is not a duration: write e.g. 90s, 30m, 8h or 1h30m");
    let mut rest = text;
    let mut total = 0.0_f64;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, after) = rest.split_at(number_end);
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let unit_end = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += value * seconds;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_over_the_ceiling_gets_the_ceiling_and_says_so() {
        let hour = Duration::from_hours(1);
        let asked = Bounded::new(Duration::from_hours(24), Duration::from_hours(12));
        assert_eq!(asked.value, Duration::from_hours(12));
        assert!(asked.is_clamped());
        let note = asked.note("spec.ttl", "--max-session-ttl").expect("a note");
        assert!(
            note.contains("24h0m0s is over the lab's ceiling 12h0m0s"),
            "{note}"
        );
        let within = Bounded::new(hour, hour);
        assert_eq!((within.value, within.is_clamped()), (hour, false));
        assert_eq!(within.note("spec.ttl", "--max-session-ttl"), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(session_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(session_duration("1h30m"), Ok(Duration::from_mins(90)));
        assert_eq!(session_duration("1.5h"), Ok(Duration::from_mins(90)));
        assert_eq!(session_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(session_duration("0"), Ok(Duration::ZERO));
        assert!(session_duration("").is_err());
        assert!(session_duration("10").is_err());
        assert!(session_duration("5y").unwrap_err().contains("not a duration"));
    }
}
