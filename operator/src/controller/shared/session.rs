//! Session lifetimes shared by the ShellSession controller and the gateway: the duration syntax of
//! `ttl`/`idleTimeout`, and the activity annotation the gateway writes.

use std::time::Duration;

/// Annotation of a ShellSession: when bytes last went through its gateway
/// connections (RFC 3339), written by the replica that serves them.
pub const ACTIVITY_ANNOTATION: &str = "walt.dev/last-activity";

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
