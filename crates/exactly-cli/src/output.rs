//! Plain text layout (aligned key/value blocks and tables) and the small value formatters shared by
//! the commands. Everything here returns strings, so the layout is tested without a terminal.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use exactly_client::JobState;

/// A table with a header row and left-aligned columns separated by two spaces.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let cell =
            |row: &[String], i: usize| row.get(i).map(String::as_str).unwrap_or("").to_string();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate().take(columns) {
                let text = cell(row, i);
                line.push_str(&text);
                if i + 1 < columns {
                    let pad = width - text.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A table printed in pages as they arrive (`list --all`): the header once, columns as wide as
/// the widest cell seen so far. A later page with wider cells widens its own columns only.
#[derive(Debug)]
pub struct PagedTable {
    headers: Vec<&'static str>,
    widths: Vec<usize>,
    header_done: bool,
}

impl PagedTable {
    /// A paged table with these column headers.
    pub fn new(headers: &[&'static str]) -> PagedTable {
        PagedTable {
            headers: headers.to_vec(),
            widths: headers.iter().map(|h| h.chars().count()).collect(),
            header_done: false,
        }
    }

    /// The text of one page: the header line first if none was printed yet, then the rows. An
    /// empty page prints nothing, not even the header.
    pub fn page(&mut self, rows: &[Vec<String>]) -> String {
        if rows.is_empty() {
            return String::new();
        }
        for row in rows {
            for (i, width) in self.widths.iter_mut().enumerate() {
                let cell = row.get(i).map_or(0, |c| c.chars().count());
                *width = (*width).max(cell);
            }
        }
        let mut out = String::new();
        if !self.header_done {
            self.header_done = true;
            let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
            out.push_str(&self.line(&header));
        }
        for row in rows {
            out.push_str(&self.line(row));
        }
        out
    }

    fn line(&self, row: &[String]) -> String {
        let columns = self.widths.len();
        let mut line = String::new();
        for (i, width) in self.widths.iter().enumerate() {
            let text = row.get(i).map(String::as_str).unwrap_or("");
            line.push_str(text);
            if i + 1 < columns {
                let pad = width.saturating_sub(text.chars().count()) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        let mut line = line.trim_end().to_string();
        line.push('\n');
        line
    }
}

/// Key/value lines with the values aligned one column past the longest key. A value spanning
/// several lines keeps its continuation lines aligned under the first.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        for (n, line) in value.split('\n').enumerate() {
            let label = if n == 0 { *key } else { "" };
            let text = format!("{label:width$}  {line}");
            out.push_str(text.trim_end());
            out.push('\n');
        }
    }
    out
}

/// A Unix time in milliseconds as RFC 3339 UTC with milliseconds; `-` for 0 (not set).
pub fn time_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The lower-case name of a job state as the wire carries it; unknown values (a newer server)
/// print as `unknown(N)`.
pub fn state_name(raw: i32) -> String {
    match JobState::try_from(raw) {
        Ok(JobState::Unspecified) => "unspecified".into(),
        Ok(JobState::Pending) => "pending".into(),
        Ok(JobState::Running) => "running".into(),
        Ok(JobState::Succeeded) => "succeeded".into(),
        Ok(JobState::Dead) => "dead".into(),
        Ok(JobState::Cancelled) => "cancelled".into(),
        Err(_) => format!("unknown({raw})"),
    }
}

/// How a job's result bytes are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Valid UTF-8, shown as text.
    Utf8,
    /// Anything else, shown as lower-case hex.
    Hex,
}

/// Result bytes as text when they are valid UTF-8, else as hex.
pub fn bytes_text(bytes: &[u8]) -> (Encoding, String) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Encoding::Utf8, text.to_string()),
        Err(_) => (Encoding::Hex, hex(bytes)),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A duration in milliseconds as humantime writes it (`1s`, `1m 30s`, `500ms`).
pub fn duration_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// A rate limit as `JOBS/PERIOD` (`10/1s`), the form `queue configure --rate` takes.
pub fn rate_text(jobs: u32, period_ms: u64) -> String {
    format!("{jobs}/{}", duration_ms(period_ms).replace(' ', ""))
}

/// The first `max` characters of a one-line rendering of `text`, with `…` if cut.
pub fn clip(text: &str, max: usize) -> String {
    let flat = text.replace('\n', " ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `-` for an empty string, the string otherwise.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

/// Milliseconds with three decimals from microseconds: `1234` becomes `1.234 ms`.
pub fn micros_as_ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1_000, us % 1_000)
}

/// Writes text to standard output. A closed pipe (`exactly status | head -1`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    emit_bytes(text.as_bytes())
}

/// Writes `bytes` to stdout as they are (a payload); a closed pipe is not an error.
pub fn emit_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Writes one value as pretty JSON and a newline to standard output.
pub fn emit_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    emit(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns are as wide as their widest cell, separated by two spaces, with no trailing spaces.
    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["ID", "ADDR", "LEADER"]);
        table.row(vec!["1".into(), "127.0.0.1:7101".into(), String::new()]);
        table.row(vec!["10".into(), "h:1".into(), "*".into()]);
        assert_eq!(
            table.render(),
            "ID  ADDR            LEADER\n\
             1   127.0.0.1:7101\n\
             10  h:1             *\n"
        );
    }

    /// Keys are padded to the longest one; continuation lines align under the first value line.
    #[test]
    fn key_values_align() {
        let text = key_values(&[("a", "1".into()), ("longer", "x\ny".into())]);
        assert_eq!(text, "a       1\nlonger  x\n        y\n");
    }

    /// Zero means "not set"; other times print as RFC 3339 UTC with milliseconds.
    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    /// Valid UTF-8 results print as text, anything else as hex.
    #[test]
    fn result_bytes_are_text_or_hex() {
        assert_eq!(bytes_text(b"ok"), (Encoding::Utf8, "ok".to_string()));
        assert_eq!(
            bytes_text(&[0xff, 0x00, 0x1a]),
            (Encoding::Hex, "ff001a".to_string())
        );
    }

    /// Known states print in lower case; values from a newer server do not crash the CLI.
    #[test]
    fn state_names_are_lowercase() {
        assert_eq!(state_name(JobState::Succeeded as i32), "succeeded");
        assert_eq!(state_name(99), "unknown(99)");
    }

    /// A paged table prints its header once and widens columns for wider later cells.
    #[test]
    fn paged_table_prints_header_once() {
        let mut table = PagedTable::new(&["ID", "STATE"]);
        assert_eq!(table.page(&[]), "", "no header before the first row");
        let first = table.page(&[vec!["1".into(), "dead".into()]]);
        let second = table.page(&[vec!["1000".into(), "pending".into()]]);
        assert_eq!(first, "ID  STATE\n1   dead\n");
        assert_eq!(second, "1000  pending\n");
        assert_eq!(table.page(&[]), "");
    }

    /// Rates print as JOBS/PERIOD without spaces; long text is clipped with an ellipsis.
    #[test]
    fn rates_and_clipping() {
        assert_eq!(rate_text(10, 1_000), "10/1s");
        assert_eq!(rate_text(5, 90_000), "5/1m30s");
        assert_eq!(duration_ms(1_500), "1s 500ms");
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("exit status 1\nstderr", 8), "exit st…");
    }

    /// Microseconds print as milliseconds with three decimals.
    #[test]
    fn micros_print_as_millis() {
        assert_eq!(micros_as_ms(1_234), "1.234 ms");
        assert_eq!(micros_as_ms(7), "0.007 ms");
    }
}
