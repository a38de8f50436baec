//! Pure formatting helpers: kubectl-style tables, ages, sizes, rates, lists of resources as
//! JSON/YAML.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::cli::OutputFormat;
use crate::error::{Error, Result};

/// A kubectl-style table: upper-case headers, columns padded and separated by three spaces.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are shown as `<none>`, like kubectl).
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.headers.len(), "<none>".into());
        self.rows.push(row);
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending with a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(self.rows.iter()) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i + 1 == line.len() {
                    text.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    let _ = write!(text, "{cell}{}   ", " ".repeat(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Serializes resources for `-o json|yaml`: one object as itself, several as a kubectl `List`.
pub fn serialize_objects<T: Serialize>(objects: &[T], format: OutputFormat, single: bool) -> Result<String> {
    let value = if single && objects.len() == 1 {
        serde_json::to_value(&objects[0])
    } else {
        serde_json::to_value(objects).map(|items| {
            serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})
        })
    }
    .map_err(|e| Error::Output(e.to_string()))?;
    match format {
        OutputFormat::Json => serde_json::to_string_pretty(&value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Error::Output(e.to_string())),
        OutputFormat::Yaml => serde_saphyr::to_string(&value).map_err(|e| Error::Output(e.to_string())),
        OutputFormat::Table | OutputFormat::Wide => Err(Error::Output("not a serialization format".into())),
    }
}

/// An age like kubectl prints it: `45s`, `12m`, `3h20m`, `5d`, `2y`.
pub fn age(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => {
            let (m, r) = (s / 60, s % 60);
            if r == 0 {
                format!("{m}m")
            } else {
                format!("{m}m{r}s")
            }
        }
        600..=10_799 => format!("{}m", s / 60),
        10_800..=172_799 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if h < 8 && m != 0 {
                format!("{h}h{m}m")
            } else {
                format!("{h}h")
            }
        }
        172_800..=31_535_999 => format!("{}d", s / 86_400),
        _ => format!("{}y", s / 31_536_000),
    }
}

/// The age of a resource from its creation timestamp.
pub fn age_since(created: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    created.map_or_else(|| "<unknown>".into(), |t| age(since(t.0)))
}

/// Time elapsed since `t` (zero for times in the future: clocks differ).
pub fn since(t: k8s_openapi::jiff::Timestamp) -> Duration {
    let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t);
    Duration::from_secs(u64::try_from(elapsed.as_secs()).unwrap_or(0))
}

/// Bytes in binary units: `512B`, `1.5KiB`, `20.0MiB`, `3.2GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// A duration as a clock for ETAs: `42s`, `3m05s`, `1h02m`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// The short form of a digest: `sha256:0123456789ab`.
pub fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algo, hex)) if hex.len() > 12 => format!("{algo}:{}", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// Splits WalT-style sets `a,b,c` into names (empty items dropped, duplicates removed).
pub fn split_set(set: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !out.iter().any(|o| o == item) {
            out.push(item.to_string());
        }
    }
    out
}

/// Prefixes every line of `text` with `name: `, for `node run` output. An unfinished last line
/// is returned separately so it can be completed by the next chunk.
pub fn prefix_lines(name: &str, pending: &mut Vec<u8>, chunk: &[u8]) -> String {
    pending.extend_from_slice(chunk);
    let mut out = String::new();
    while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line[..line.len() - 1]);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let _ = writeln!(out, "{name}: {text}");
    }
    out
}

/// The rest of a prefixed stream once it ended without a final newline.
pub fn flush_prefixed(name: &str, pending: &mut Vec<u8>) -> String {
    if pending.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(pending).into_owned();
    pending.clear();
    format!("{name}: {text}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_like_kubectl() {
        let mut t = Table::new(["NAME", "PHASE", "AGE"]);
        t.row(["rpi3-01", "Ready", "5m"]);
        t.row(["vnode-long-name", "Booting", "12s"]);
        assert_eq!(
            t.render(),
            "NAME              PHASE     AGE\nrpi3-01           Ready     5m\nvnode-long-name   Booting   12s\n"
        );
    }

    #[test]
    fn missing_cells_show_none() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x"]);
        assert_eq!(t.render(), "A   B\nx   <none>\n");
    }

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(150)), "2m30s");
        assert_eq!(age(Duration::from_mins(15)), "15m");
        assert_eq!(age(Duration::from_mins(200)), "3h20m");
        assert_eq!(age(Duration::from_hours(10)), "10h");
        assert_eq!(age(Duration::from_hours(120)), "5d");
        assert_eq!(age(Duration::from_hours(19200)), "2y");
    }

    #[test]
    fn sizes_rates_and_digests() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0MiB");
        assert_eq!(clock(Duration::from_secs(185)), "3m05s");
        assert_eq!(clock(Duration::from_mins(62)), "1h02m");
        assert_eq!(short_digest("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
        assert_eq!(short_digest("weird"), "weird");
    }

    #[test]
    fn sets_split_and_dedupe() {
        assert_eq!(split_set("a, b,,a,c"), ["a", "b", "c"]);
        assert!(split_set(" , ").is_empty());
    }

    #[test]
    fn node_run_output_is_prefixed_per_line() {
        let mut pending = Vec::new();
        assert_eq!(prefix_lines("n1", &mut pending, b"hello\r\nwor"), "n1: hello\n");
        assert_eq!(prefix_lines("n1", &mut pending, b"ld\n"), "n1: world\n");
        assert_eq!(prefix_lines("n1", &mut pending, b"tail"), "");
        assert_eq!(flush_prefixed("n1", &mut pending), "n1: tail\n");
        assert_eq!(flush_prefixed("n1", &mut pending), "");
    }

    #[test]
    fn lists_serialize_as_kubectl_lists() {
        let objects = vec![serde_json::json!({"kind": "Node", "metadata": {"name": "a"}})];
        let single = serialize_objects(&objects, OutputFormat::Json, true).expect("json");
        assert!(single.contains("\"kind\": \"Node\""));
        let list = serialize_objects(&objects, OutputFormat::Yaml, false).expect("yaml");
        assert!(list.contains("kind: List"));
        assert!(list.contains("- kind: Node"));
    }
}
