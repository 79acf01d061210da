//! What the node's log shows of openraft: its warnings and errors at most once a minute per
//! place in its code (`OPENRAFT_REPEAT_EVERY`), and at INFO. openraft logs routine events as
//! WARN or ERROR — a stale message ignored after a leader change, every failed RPC to a peer
//! that is down, every read-index confirmation that missed a peer — so a failover or a stopped
//! peer used to fill the log with dozens of lines a second, ERROR among them, that an operator
//! learns to ignore. The first of each kind still shows (a peer down is worth one line), as
//! INFO with `openraft_level=warn|error` (lower case: `grep ERROR` finds only what the node
//! itself calls an error); the repeats do not. What an operator must act on is
//! logged by the node itself at ERROR: the Raft core stopping (`server.rs`), a removal, a
//! storage failure. openraft's INFO and DEBUG events (`RUST_LOG=openraft=debug`) are not held
//! back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How often the same openraft warning or error (the same line of its code) is shown.
pub const OPENRAFT_REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The throttle's memory: when each openraft callsite was last shown.
#[derive(Debug, Default)]
pub struct OpenraftThrottle {
    /// By callsite, `file:line`.
    shown: Mutex<HashMap<String, Instant>>,
}

impl OpenraftThrottle {
    /// Whether an event of `meta` at `now` is shown: everything but openraft's warnings and
    /// errors is; one of those is shown if its callsite was not shown in the last
    /// [`OPENRAFT_REPEAT_EVERY`].
    pub fn admit(&self, meta: &Metadata<'_>, now: Instant) -> bool {
        self.admit_at(
            meta.target(),
            *meta.level(),
            meta.is_event(),
            (meta.file().unwrap_or(""), meta.line().unwrap_or(0)),
            now,
        )
    }

    fn admit_at(
        &self,
        target: &str,
        level: Level,
        event: bool,
        callsite: (&str, u32),
        now: Instant,
    ) -> bool {
        if !is_throttled(target, level, event) {
            return true;
        }
        let key = format!("{}:{}", callsite.0, callsite.1);
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        match shown.get(&key) {
            Some(&at) if now.saturating_duration_since(at) < OPENRAFT_REPEAT_EVERY => false,
            _ => {
                shown.insert(key, now);
                true
            }
        }
    }
}

/// Whether events of this kind are throttled: openraft's warnings and errors.
fn is_throttled(target: &str, level: Level, event: bool) -> bool {
    event
        && (level == Level::WARN || level == Level::ERROR)
        && (target == "openraft" || target.starts_with("openraft::"))
}

fn throttled_callsite(meta: &Metadata<'_>) -> bool {
    is_throttled(meta.target(), *meta.level(), meta.is_event())
}

/// The log line format: tracing's default, except that openraft's warnings and errors (those
/// [`OpenraftThrottle`] admits) are written at INFO, with their own level, in lower case, as
/// the field `openraft_level` (see the module's comment).
pub struct NodeFormat {
    inner: Format<Full, SystemTime>,
}

impl NodeFormat {
    pub fn new(ansi: bool) -> NodeFormat {
        NodeFormat {
            inner: Format::default().with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for NodeFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        if !throttled_callsite(meta) {
            return self.inner.format_event(ctx, writer, event);
        }
        SystemTime.format_time(&mut writer)?;
        write!(
            writer,
            "  INFO {}: openraft_level={} ",
            meta.target(),
            meta.level().as_str().to_ascii_lowercase()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The node's log subscriber: `filter` (from `RUST_LOG`, or the node's default), colour only on
/// a terminal, and openraft's repeated warnings and errors throttled ([`OpenraftThrottle`]).
///
/// `filter` is the subscriber's global filter, not a per-layer one: a callsite it disables is
/// then `never` for good and costs nothing. As a per-layer filter, openraft's and h2's debug
/// spans (every poll of the Raft core is instrumented) were still created, entered and closed
/// in the registry and checked per layer: ~4 % of the leader's CPU at 2,000 submits/s.
pub fn init(filter: tracing_subscriber::EnvFilter) {
    use tracing_subscriber::filter::DynFilterFn;
    use tracing_subscriber::prelude::*;
    let throttle = OpenraftThrottle::default();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Only openraft's warnings and errors are decided per event; every other callsite is
    // `always` here, so that the environment filter alone decides it once per callsite. (With
    // `sometimes` everywhere, every disabled trace and debug callsite of h2, tonic and openraft
    // was evaluated again on each hit: measured, the one-job data path lost a third of its
    // speed.)
    let throttled = DynFilterFn::new(move |meta, _cx| throttle.admit(meta, Instant::now()))
        .with_callsite_filter(|meta| {
            if throttled_callsite(meta) {
                tracing::subscriber::Interest::sometimes()
            } else {
                tracing::subscriber::Interest::always()
            }
        });
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(DefaultFields::new())
                .event_format(NodeFormat::new(ansi))
                .with_ansi(ansi)
                .with_filter(throttled),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for reading back what the format wrote.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// openraft's errors and warnings are written at INFO with their own level as a field; the
    /// node's own errors stay ERROR.
    #[test]
    fn openraft_errors_are_written_at_info() {
        let buffer = Buffer::default();
        let make = {
            let buffer = buffer.clone();
            move || buffer.clone()
        };
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(DefaultFields::new())
            .event_format(NodeFormat::new(false))
            .with_writer(make)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "openraft::core::raft_core", target = 1, "while requesting vote");
            tracing::warn!(target: "openraft::replication", "backoff mode");
            tracing::error!(target: "exactly_node::server", "the Raft core stopped");
            tracing::info!(target: "openraft::core", "elected");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].ends_with(
                "  INFO openraft::core::raft_core: openraft_level=error while requesting vote target=1"
            ),
            "{text}"
        );
        assert!(
            lines[1].ends_with("  INFO openraft::replication: openraft_level=warn backoff mode"),
            "{text}"
        );
        assert!(
            lines[2].contains("ERROR exactly_node::server: the Raft core stopped"),
            "{text}"
        );
        assert!(lines[3].contains(" INFO openraft::core: elected"), "{text}");
        assert!(!text.contains("openraft_level=info"), "{text}");
    }

    /// openraft's warnings and errors show once a minute per callsite; other callsites,
    /// levels and crates are not held back.
    #[test]
    fn openraft_repeats_show_once_a_minute_per_callsite() {
        let t = OpenraftThrottle::default();
        let now = Instant::now();
        let site = ("src/core/raft_core.rs", 1553);
        let other = ("src/replication/mod.rs", 258);
        let admit = |target, level, site, at| t.admit_at(target, level, true, site, at);
        assert!(admit("openraft::core::raft_core", Level::WARN, site, now));
        assert!(!admit(
            "openraft::core::raft_core",
            Level::WARN,
            site,
            now + Duration::from_secs(1)
        ));
        assert!(admit(
            "openraft::replication",
            Level::ERROR,
            other,
            now + Duration::from_secs(1)
        ));
        assert!(!admit(
            "openraft::core::raft_core",
            Level::WARN,
            site,
            now + OPENRAFT_REPEAT_EVERY - Duration::from_millis(1)
        ));
        assert!(admit(
            "openraft::core::raft_core",
            Level::WARN,
            site,
            now + OPENRAFT_REPEAT_EVERY
        ));
        // Not throttled: openraft below WARN, other crates (ours), spans.
        for _ in 0..3 {
            assert!(admit("openraft::core::raft_core", Level::INFO, site, now));
            assert!(admit("exactly_node::membership", Level::WARN, site, now));
            assert!(admit("openraftish", Level::ERROR, site, now));
            assert!(t.admit_at("openraft::core", Level::WARN, false, site, now));
        }
    }
}
