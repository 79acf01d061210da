//! The control protocol between a node's `exec` handler and its exec guard
//! (`exactly-exec-guard`, see [`super::guard`]).
//!
//! The node writes to the guard's stdin; the guard writes to its stdout. Each direction starts
//! with a 4-byte preamble ([`PREAMBLE`]: `EXG` and the protocol version), then carries frames: a
//! little-endian `u32` body length and a postcard-encoded body. Bodies are bounded
//! ([`FRAME_BYTES_MAX`]), decoded without trailing bytes, and checked ([`Start::validate`])
//! before the guard acts on them: a guard is a small process, but it runs whatever the node
//! tells it to, so it trusts only well-formed input.
//!
//! Node → guard: one [`ToGuard::Start`], the payload in [`ToGuard::Payload`] chunks (exactly
//! `Start::payload_bytes` bytes in all), then any number of [`ToGuard::Extend`] and at most one
//! [`ToGuard::Cancel`]. The end of this stream (EOF) means the node is gone.
//!
//! Guard → node: [`FromGuard::Started`] once the command runs, then one [`FromGuard::Ended`].
//! A stream that ends without `Ended` means the guard itself died.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The protocol version; a guard refuses a stream of another version, and so does the node.
pub const VERSION: u8 = 2;

/// The first bytes of each direction's stream.
pub const PREAMBLE: [u8; 4] = [b'E', b'X', b'G', VERSION];

/// Bytes of one frame's body, at most. A report carries two output tails of up to
/// `exec::OUTPUT_BYTES_MAX_CEILING` bytes each, plus a little.
pub const FRAME_BYTES_MAX: usize = 2 * super::OUTPUT_BYTES_MAX_CEILING + 64 * 1024;

/// Bytes of payload per [`ToGuard::Payload`] frame, at most.
pub const PAYLOAD_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Bytes of one job's payload, at most (exactly-core's `PAYLOAD_BYTES_CEILING`: no node
/// accepts a larger payload).
pub const PAYLOAD_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Arguments of a command, at most.
pub const ARGS_MAX: usize = 4096;

/// Environment variables set for a command, at most.
pub const ENV_VARS_MAX: usize = 4096;

/// The longest kill grace a guard accepts, in milliseconds (the node's own bound,
/// `lease.kill-grace`, is far smaller).
pub const KILL_GRACE_MS_MAX: u64 = 60 * 60 * 1000;

/// Notes (guard diagnostics) in one report, at most.
pub const NOTES_MAX: usize = 16;

/// Node → guard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToGuard {
    /// What to run; always the first frame.
    Start(Start),
    /// A chunk of the payload (the command's stdin).
    Payload(Vec<u8>),
    /// The node's lease now ends at `deadline_ms` ([`crate::monotonic_ms`]); it never moves back.
    Extend { deadline_ms: u64 },
    /// Stop the command (timeout, fencing, drain, a client's cancel).
    Cancel,
}

/// The command to run and the attempt's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub command: String,
    pub args: Vec<String>,
    /// The command's whole environment (the guard's own is not passed on), in order: later
    /// entries win.
    pub env: Vec<(String, String)>,
    /// The command's working directory (absolute).
    pub workdir: String,
    /// SIGTERM, then SIGKILL this much later.
    pub kill_grace_ms: u64,
    /// Bytes kept from the end of stdout and, separately, of stderr.
    pub output_bytes_max: u32,
    /// The node's lease deadline when the attempt starts ([`crate::monotonic_ms`];
    /// `u64::MAX`: none).
    pub deadline_ms: u64,
    /// Bytes of payload that follow in [`ToGuard::Payload`] frames.
    pub payload_bytes: u64,
}

impl Start {
    /// Checks every bound and what `execve` could not take (NUL bytes, `=` in names).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |why: String| Err(ProtocolError::Invalid(why));
        if self.command.is_empty() || self.command.contains('\0') {
            return invalid(format!("command {:?}: empty or with NUL", self.command));
        }
        if self.args.len() > ARGS_MAX {
            return invalid(format!("{} args, at most {ARGS_MAX}", self.args.len()));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return invalid("an argument contains NUL".to_string());
        }
        if self.env.len() > ENV_VARS_MAX {
            return invalid(format!(
                "{} env vars, at most {ENV_VARS_MAX}",
                self.env.len()
            ));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return invalid(format!("env var {name:?}: bad name or NUL in value"));
            }
        }
        if !self.workdir.starts_with('/') || self.workdir.contains('\0') {
            return invalid(format!("workdir {:?}: not an absolute path", self.workdir));
        }
        if self.kill_grace_ms > KILL_GRACE_MS_MAX {
            return invalid(format!(
                "kill grace {} ms, at most {KILL_GRACE_MS_MAX}",
                self.kill_grace_ms
            ));
        }
        let output_max = super::OUTPUT_BYTES_MAX_CEILING;
        if self.output_bytes_max == 0 || self.output_bytes_max as usize > output_max {
            return invalid(format!(
                "output bytes {}, must be 1..={output_max}",
                self.output_bytes_max
            ));
        }
        if self.payload_bytes > PAYLOAD_BYTES_MAX {
            return invalid(format!(
                "payload of {} bytes, at most {PAYLOAD_BYTES_MAX}",
                self.payload_bytes
            ));
        }
        Ok(())
    }
}

/// Guard → node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromGuard {
    /// The command runs as `pid`, leading its own process group (`pgid == pid`).
    Started { pid: i32 },
    /// Everything the guard started is gone (or, see [`Report::survivors`], could not be
    /// killed); the last frame.
    Ended(Report),
}

/// How an attempt's command ended, as the guard saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub end: End,
    /// Set when the guard stopped the command (rather than the command ending on its own).
    pub stopped: Option<StopReason>,
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr: Vec<u8>,
    pub stderr_truncated: bool,
    /// Processes of the attempt still alive when the guard gave up on them (they changed
    /// their credentials, so SIGKILL was refused, or are stuck in the kernel).
    pub survivors: u32,
    /// The guard's diagnostics, for the node's log (at most [`NOTES_MAX`]).
    pub notes: Vec<String>,
}

/// The command's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// It exited with this code.
    Exited { code: i32 },
    /// A signal killed it.
    Signaled { signal: i32 },
    /// It never ran.
    NotStarted(NotStarted),
    /// It was not reaped before the guard gave up (stuck in the kernel after SIGKILL).
    Unreaped,
}

/// Why a command never ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotStarted {
    /// `spawn` failed with this OS error (`errno`, if there was one) and message.
    Spawn {
        os_error: Option<i32>,
        message: String,
    },
    /// The lease deadline had passed before the command could start.
    LeaseLapsed,
    /// The guard cannot enforce its guarantee here (e.g. `PR_SET_CHILD_SUBREAPER` failed).
    Setup(String),
    /// The node's stream was malformed.
    Protocol(String),
}

/// Why the guard stopped a command that was still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The node sent [`ToGuard::Cancel`].
    Cancelled,
    /// The lease deadline passed without an extension (the node is frozen, hung or fenced).
    LeaseExpired,
    /// The node's end of the control stream closed (the node died).
    NodeGone,
    /// The node's stream became malformed.
    ProtocolError,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cancelled => "cancelled",
            Self::LeaseExpired => "the node's lease deadline passed without an extension",
            Self::NodeGone => "the node's control stream closed",
            Self::ProtocolError => "the node's control stream was malformed",
        })
    }
}

/// Why a stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("not an exec guard stream (preamble {0:?})")]
    Preamble([u8; 4]),
    #[error("protocol version {0}, this side speaks {VERSION}")]
    Version(u8),
    #[error("frame of {bytes} bytes, at most {FRAME_BYTES_MAX}")]
    FrameTooLarge { bytes: usize },
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("{0} trailing bytes after a frame's body")]
    Trailing(usize),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// A frame ready to write: length prefix and body.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = postcard::to_stdvec(message)?;
    check_len(body.len())?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Refuses a body longer than [`FRAME_BYTES_MAX`] before anything is allocated for it.
pub fn check_len(bytes: usize) -> Result<usize, ProtocolError> {
    if bytes > FRAME_BYTES_MAX {
        return Err(ProtocolError::FrameTooLarge { bytes });
    }
    Ok(bytes)
}

/// Decodes one frame's body, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    let (message, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Trailing(rest.len()));
    }
    Ok(message)
}

/// Checks a stream's preamble.
pub fn check_preamble(bytes: [u8; 4]) -> Result<(), ProtocolError> {
    if bytes[..3] != PREAMBLE[..3] {
        return Err(ProtocolError::Preamble(bytes));
    }
    if bytes[3] != VERSION {
        return Err(ProtocolError::Version(bytes[3]));
    }
    Ok(())
}

/// Reads and checks the preamble (blocking; the guard's side).
pub fn read_preamble(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut bytes = [0u8; 4];
    r.read_exact(&mut bytes).map_err(eof_is_truncation)?;
    check_preamble(bytes)
}

/// Reads one frame (blocking; the guard's side). `Ok(None)` at a clean end of the stream.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>, ProtocolError> {
    let mut len = [0u8; 4];
    // A clean end comes only between frames: read the first byte on its own.
    loop {
        match r.read(&mut len[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    r.read_exact(&mut len[1..]).map_err(eof_is_truncation)?;
    let len = check_len(u32::from_le_bytes(len) as usize)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(eof_is_truncation)?;
    decode(&body).map(Some)
}

/// Writes one frame (blocking; the guard's side).
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), ProtocolError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

fn eof_is_truncation(err: io::Error) -> ProtocolError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Truncated
    } else {
        err.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Start {
        Start {
            command: "/bin/sh".to_string(),
            args: vec!["-c".to_string(), "true".to_string()],
            env: vec![("EXACTLY_JOB_ID".to_string(), "7".to_string())],
            workdir: "/".to_string(),
            kill_grace_ms: 1000,
            output_bytes_max: 4096,
            deadline_ms: u64::MAX,
            payload_bytes: 3,
        }
    }

    /// Every message survives a round trip through a stream; the stream ends cleanly.
    #[test]
    fn frames_round_trip() {
        let sent = vec![
            ToGuard::Start(start()),
            ToGuard::Payload(b"abc".to_vec()),
            ToGuard::Extend { deadline_ms: 42 },
            ToGuard::Cancel,
        ];
        let mut stream = PREAMBLE.to_vec();
        for m in &sent {
            stream.extend(encode(m).unwrap());
        }
        let mut r = stream.as_slice();
        read_preamble(&mut r).unwrap();
        let mut got = Vec::new();
        while let Some(m) = read_frame::<ToGuard>(&mut r).unwrap() {
            got.push(m);
        }
        assert_eq!(got, sent);

        let report = FromGuard::Ended(Report {
            end: End::NotStarted(NotStarted::Spawn {
                os_error: Some(2),
                message: "No such file".to_string(),
            }),
            stopped: Some(StopReason::LeaseExpired),
            stdout: b"out".to_vec(),
            stdout_truncated: true,
            stderr: Vec::new(),
            stderr_truncated: false,
            survivors: 1,
            notes: vec!["n".to_string()],
        });
        let frame = encode(&report).unwrap();
        assert_eq!(
            read_frame::<FromGuard>(&mut frame.as_slice()).unwrap(),
            Some(report)
        );
    }

    /// A wrong preamble or version, an oversized or cut frame, garbage and trailing bytes are
    /// errors, never a message.
    #[test]
    fn malformed_streams_are_refused() {
        assert!(matches!(
            read_preamble(&mut &b"HTTP"[..]),
            Err(ProtocolError::Preamble(_))
        ));
        assert!(matches!(
            read_preamble(&mut &[b'E', b'X', b'G', 9][..]),
            Err(ProtocolError::Version(9))
        ));
        assert!(matches!(
            read_preamble(&mut &b"EX"[..]),
            Err(ProtocolError::Truncated)
        ));

        let huge = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame::<ToGuard>(&mut &huge[..]),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let frame = encode(&ToGuard::Cancel).unwrap();
        assert!(matches!(
            read_frame::<ToGuard>(&mut &frame[..frame.len() - 1]),
            Err(ProtocolError::Truncated)
        ));
        assert!(matches!(
            read_frame::<ToGuard>(&mut &[5u8, 0][..]),
            Err(ProtocolError::Truncated)
        ));
        let garbage = [3u8, 0, 0, 0, 200, 201, 202];
        assert!(matches!(
            read_frame::<ToGuard>(&mut &garbage[..]),
            Err(ProtocolError::Decode(_))
        ));
        let mut trailing = postcard::to_stdvec(&ToGuard::Cancel).unwrap();
        trailing.push(0);
        let mut framed = (trailing.len() as u32).to_le_bytes().to_vec();
        framed.extend(trailing);
        assert!(matches!(
            read_frame::<ToGuard>(&mut framed.as_slice()),
            Err(ProtocolError::Trailing(1))
        ));
    }

    /// `Start::validate` refuses what execve cannot take and what exceeds a bound.
    #[test]
    fn start_is_validated() {
        start().validate().unwrap();
        let cases: [fn(&mut Start); 13] = [
            |s| s.workdir = "tmp".to_string(),
            |s| s.workdir = "/tmp\0".to_string(),
            |s| s.command.clear(),
            |s| s.command.push('\0'),
            |s| s.args.push("a\0b".to_string()),
            |s| s.args = vec![String::new(); ARGS_MAX + 1],
            |s| s.env.push(("A=B".to_string(), String::new())),
            |s| s.env.push((String::new(), String::new())),
            |s| s.env.push(("A".to_string(), "\0".to_string())),
            |s| s.kill_grace_ms = KILL_GRACE_MS_MAX + 1,
            |s| s.output_bytes_max = 0,
            |s| s.output_bytes_max = super::super::OUTPUT_BYTES_MAX_CEILING as u32 + 1,
            |s| s.payload_bytes = PAYLOAD_BYTES_MAX + 1,
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut s = start();
            case(&mut s);
            assert!(
                matches!(s.validate(), Err(ProtocolError::Invalid(_))),
                "case {i}: {s:?}"
            );
        }
    }
}
