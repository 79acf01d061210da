//! Persisted formats. Every value written by this crate starts with a format version byte, so a
//! later release can read old data or refuse it with a clear error instead of misreading it.
//!
//! - Structured values (log entries, vote, log ids, node id, incarnation, snapshot metadata and
//!   the snapshot body) are `[FORMAT][postcard]`. postcard round-trips every openraft 0.10
//!   type we store (the openraft storage suite checks it: openraft's types use no
//!   `skip_serializing_if`, `flatten` or untagged enums outside its compat module).
//! - Payloads are `[FORMAT][raw bytes]`: they are opaque, and skipping serde keeps them cheap.
//! - Keys that are indexes or job ids are big-endian `u64`, so sled's byte order is numeric order.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The version of every persisted value. postcard is not self-describing, so any change to a
/// stored type is a new version:
/// - 1: the first.
/// - 2: `NodeEntry::renewed_index` and `Command::Expire(Expiry)` (an expiry names the renewal it
///   counted from). Data of version 1 is refused ("unknown format version 1"): there is no
///   migration before the formats are versioned per type (issue 14).
/// - 3: `Command::Audited`, `Response::Refused` and the audit trail in `JobTable`. Data of
///   versions 1 and 2 is refused the same way.
/// - 4: `Command::IssueToken`, `RevokeToken` and `Joined`, `Response::TokenChanged`, new
///   rejections, and the issued tokens in `JobTable`. Data of versions 1 to 3 is refused.
pub(crate) const FORMAT: u8 = 4;

/// Encodes `value` as `[FORMAT][postcard]`.
pub(crate) fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>> {
    postcard::to_extend(value, vec![FORMAT]).map_err(|e| Error::Encode {
        what,
        detail: e.to_string(),
    })
}

/// Returns the body of a versioned value, refusing unknown versions.
pub(crate) fn versioned_body<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8]> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => Ok(body),
        Some((version, _)) => Err(Error::corrupt(
            what,
            format!("unknown format version {version}"),
        )),
        None => Err(Error::corrupt(what, "empty value")),
    }
}

/// Decodes a value written by [`encode`]. Trailing bytes are corruption, not ignored.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let body = versioned_body(what, bytes)?;
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| Error::corrupt(what, e))?;
    if !rest.is_empty() {
        return Err(Error::corrupt(
            what,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(value)
}

/// Frames raw bytes as `[FORMAT][bytes]`.
pub(crate) fn encode_raw(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(FORMAT);
    out.extend_from_slice(bytes);
    out
}

/// The key of a log index or a job id.
pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a key written by [`u64_key`].
pub(crate) fn key_u64(what: &'static str, key: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::corrupt(what, format!("key of {} bytes, expected 8", key.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value round-trips, and a wrong version, an empty value and trailing bytes are refused.
    #[test]
    fn versioned_values_round_trip_and_refuse_garbage() {
        let bytes = encode("test", &(7u64, "x".to_string())).unwrap();
        assert_eq!(bytes[0], FORMAT);
        let back: (u64, String) = decode("test", &bytes).unwrap();
        assert_eq!(back, (7, "x".to_string()));

        for version in [1, 99] {
            // 1: written before `NodeEntry::renewed_index`; refused, never misread.
            let mut wrong = bytes.clone();
            wrong[0] = version;
            let err = decode::<(u64, String)>("test", &wrong).unwrap_err();
            assert!(err.is_corruption());
            assert!(err
                .to_string()
                .contains(&format!("unknown format version {version}")));
        }
        assert!(decode::<u64>("test", &[]).unwrap_err().is_corruption());
        let mut long = bytes;
        long.push(0);
        assert!(decode::<(u64, String)>("test", &long)
            .unwrap_err()
            .is_corruption());
        assert_eq!(key_u64("k", &u64_key(42)).unwrap(), 42);
        assert!(key_u64("k", &[1, 2]).is_err());
    }
}

/// Golden files: the bytes this release writes, kept under `tests/fixtures/` and read by every
/// later build, so that a change to a stored type cannot slip in without a new format version
/// and a reader for the old one. `EXACTLY_WRITE_GOLDEN=1 cargo test -p exactly-store golden`
/// writes them again (only when the format version changes).
#[cfg(test)]
pub(crate) mod golden {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use exactly_core::access::{Scope, TokenGrant};
    use exactly_core::cron::MissedTickPolicy;
    use exactly_core::schedule::{Fire, OverlapPolicy, ScheduleSpec};
    use exactly_core::{
        Assignment, Audited, Backoff, Command, Completion, DeadFilter, DrainNode, Expiry, JoinNote,
        LeaveReason, NewJob, NodeLease, NodeRegistration, Outcome, QueuePatch, RateLimit, Renewal,
        Request, Retention,
    };

    /// `tests/fixtures/<name>`, compared with `bytes` (written first under
    /// `EXACTLY_WRITE_GOLDEN=1`).
    pub(crate) fn golden(name: &str, bytes: &[u8]) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        if std::env::var_os("EXACTLY_WRITE_GOLDEN").is_some() {
            std::fs::write(&path, bytes).unwrap();
        }
        std::fs::read(&path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()))
    }

    fn job(kind: &str) -> NewJob {
        NewJob {
            queue: "mail".into(),
            kind: kind.into(),
            payload: b"{\"to\":\"a@example.com\"}".to_vec(),
            priority: -3,
            max_attempts: 5,
            timeout_ms: 30_000,
            run_at_ms: 1_767_225_660_000,
            idempotency_key: Some("order-42".into()),
            ordering_key: Some("customer-7".into()),
            labels: BTreeMap::from([("tenant".into(), "acme".into())]),
            backoff: Backoff {
                base_ms: 500,
                max_ms: 60_000,
            },
        }
    }

    fn lease() -> NodeLease {
        NodeLease {
            node: 2,
            incarnation: 3,
        }
    }

    fn filter() -> DeadFilter {
        DeadFilter {
            ids: vec![7, 9],
            queue: Some("mail".into()),
            kind: Some("send".into()),
            max: 100,
            all: false,
        }
    }

    /// Which variant a command is. Exhaustive on purpose: a new variant does not compile until
    /// it is listed here, and [`every_command`] must then carry it.
    fn variant(command: &Command) -> u8 {
        match command {
            Command::Submit(_) => 0,
            Command::Assign(_) => 1,
            Command::Complete(_) => 2,
            Command::Renew(_) => 3,
            Command::Expire(_) => 4,
            Command::RegisterNode(_) => 5,
            Command::Cancel(_) => 6,
            Command::Redrive(_) => 7,
            Command::PurgeDead(_) => 8,
            Command::ConfigureQueue { .. } => 9,
            Command::Retain(_) => 10,
            Command::AddSchedule(_) => 11,
            Command::RemoveSchedule(_) => 12,
            Command::PauseSchedule { .. } => 13,
            Command::FireSchedules(_) => 14,
            Command::Drain(_) => 15,
            Command::NodeLeft(_) => 16,
            Command::SubmitGroups(_) => 17,
            Command::SubmitAssign { .. } => 18,
            Command::Batch(_) => 19,
            Command::Audited(_) => 20,
            Command::IssueToken(_) => 21,
            Command::RevokeToken(_) => 22,
            Command::Joined(_) => 23,
        }
    }

    const VARIANTS: u8 = 24;

    /// One log entry of every command, with every field set.
    pub(crate) fn every_command() -> Vec<Request> {
        let commands = vec![
            Command::Submit(vec![job("send"), NewJob::default()]),
            Command::Assign(vec![Assignment {
                job: 7,
                node: 2,
                incarnation: 3,
            }]),
            Command::Complete(vec![
                Completion {
                    job: 7,
                    token: 11,
                    outcome: Outcome::Succeeded {
                        result: b"ok".to_vec(),
                    },
                },
                Completion {
                    job: 8,
                    token: 12,
                    outcome: Outcome::Failed {
                        error: "smtp 451".into(),
                        retryable: true,
                    },
                },
                Completion {
                    job: 9,
                    token: 13,
                    outcome: Outcome::Abandoned {
                        reason: "node 2 is stopping".into(),
                    },
                },
            ]),
            Command::Renew(Renewal {
                lease: lease(),
                applied: 40,
            }),
            Command::Expire(Expiry {
                lease: lease(),
                renewed_index: 38,
            }),
            Command::RegisterNode(NodeRegistration {
                node: 2,
                incarnation: 3,
                slots: 16,
                addr: "10.0.0.2:7000".into(),
                applied: 37,
            }),
            Command::Cancel(vec![7, 8]),
            Command::Redrive(filter()),
            Command::PurgeDead(DeadFilter {
                all: true,
                max: 10,
                ..DeadFilter::default()
            }),
            Command::ConfigureQueue {
                queue: "mail".into(),
                patch: QueuePatch {
                    concurrency_max: Some(4),
                    rate: Some(Some(RateLimit {
                        jobs: 10,
                        period_ms: 1000,
                    })),
                    paused: Some(true),
                },
            },
            Command::Retain(Retention {
                finished_before_ms: 1_767_000_000_000,
                dead_before_ms: 1_766_000_000_000,
                keys_before_ms: 1_765_000_000_000,
                max: 4096,
            }),
            Command::AddSchedule(ScheduleSpec {
                name: "nightly".into(),
                cron: "0 3 * * *".into(),
                tz: "Europe/Berlin".into(),
                job: job("report"),
                overlap: OverlapPolicy::Skip,
                missed: MissedTickPolicy::RunOnce,
                replace: true,
            }),
            Command::RemoveSchedule("nightly".into()),
            Command::PauseSchedule {
                name: "nightly".into(),
                paused: true,
            },
            Command::FireSchedules(vec![Fire {
                name: "nightly".into(),
                tick_ms: 1_767_236_400_000,
            }]),
            Command::Drain(DrainNode {
                node: 2,
                deadline_after_ms: 30_000,
                reason: LeaveReason::Removed,
            }),
            Command::NodeLeft(2),
            Command::SubmitGroups(vec![vec![job("send")], vec![job("sms"), job("push")]]),
            Command::SubmitAssign {
                groups: vec![vec![job("send")]],
                excluded: BTreeSet::from([3, 4]),
            },
            Command::Batch(vec![Command::NodeLeft(5), Command::Cancel(vec![1])]),
            Command::Audited(Box::new(Audited {
                by: "ops".into(),
                command: Command::Cancel(vec![3]),
            })),
            Command::IssueToken(TokenGrant {
                name: "ci".into(),
                sha256: [0xab; 32],
                scopes: vec![
                    Scope::Submit(Some("mail".into())),
                    Scope::Submit(None),
                    Scope::Read,
                    Scope::Operate,
                    Scope::Admin,
                ],
                expires_at_ms: Some(1_800_000_000_000),
            }),
            Command::RevokeToken("ci".into()),
            Command::Joined(JoinNote {
                node: 6,
                addr: "10.0.0.6:7001".into(),
                voter: true,
                new_member: false,
            }),
        ];
        commands
            .into_iter()
            .enumerate()
            .map(|(i, command)| Request {
                now_ms: 1_767_225_600_000 + i as u64,
                entropy: 0x5eed_0000 + i as u64,
                command,
            })
            .collect()
    }

    /// Log entries of every command as this release writes them: the bytes are the golden
    /// file's, and the golden file reads back as the same entries.
    #[test]
    fn golden_log_entries_read_and_write_as_this_format() {
        let entries = every_command();
        let covered: BTreeSet<u8> = entries.iter().map(|r| variant(&r.command)).collect();
        assert_eq!(
            covered,
            (0..VARIANTS).collect(),
            "every command has an entry"
        );
        let bytes = super::encode("golden log entries", &entries).unwrap();
        let golden = golden("entries-format4.bin", &bytes);
        let read: Vec<Request> = super::decode("golden log entries", &golden).unwrap();
        assert_eq!(read, entries, "the golden file reads as these entries");
        assert!(
            bytes == golden,
            "this build encodes log entries differently from format {}: a stored type changed. \
             Bump `FORMAT`, keep reading the old one, and write new golden files.",
            super::FORMAT
        );
    }
}
