//! `exec`: runs a command configured on the node, with the job's payload on its stdin.
//!
//! This is how jobs written in any language run on exactly. The command comes from the node's
//! configuration, never from the job: a client that may submit jobs must not be able to run
//! arbitrary programs on the nodes. The job chooses only the kind (hence which configured
//! command) and the bytes on stdin.
//!
//! A node may run an attempt only while its lease is valid (DESIGN.md, invariant 4), so no
//! process started for an attempt may outlive it, even if the node itself is killed or frozen
//! and so cannot stop anything. The handler therefore does not start the command itself: it
//! starts an exec guard (`exactly-exec-guard`, [`guard`]) in a process group of its own, tells it
//! over a pipe ([`protocol`]) what to run, the lease deadline and every extension of it, and a
//! cancel (timeout, self-fencing, drain). The guard runs the command, kills its whole process
//! tree (every descendant, whatever it forked) when the command exits, on cancel, when the
//! deadline passes without an extension and when the pipe closes (the node died), and reports
//! the outcome. [`guard`]'s docs state the guarantee and what escapes it.
//!
//! Output is captured through bounded tail buffers in the guard: a command that prints gigabytes
//! costs `output-bytes-max` bytes per stream.

pub mod guard;
mod locate;
pub mod protocol;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::locate::{candidates as guard_candidates, locate_guard, GuardNotFound};
use self::protocol::{
    End, FromGuard, NotStarted, ProtocolError, Report, Start, StopReason, ToGuard,
};
use crate::{Handler, HandlerOutcome, JobContext, SpecError};

/// Bytes of captured output per stream that a spec may ask for, at most.
pub const OUTPUT_BYTES_MAX_CEILING: usize = 1024 * 1024;

/// Default of [`ExecSpec::kill_grace`] (DESIGN.md's timing defaults).
pub const KILL_GRACE_DEFAULT: Duration = Duration::from_secs(1);

/// Default of [`ExecSpec::output_bytes_max`]; matches the result size the state machine keeps.
pub const OUTPUT_BYTES_MAX_DEFAULT: usize = 4096;

/// How long we wait for a guard whose report stream ended without a report to exit, before we
/// clean up after it anyway.
const GUARD_EXIT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a restarting node waits for the guards of its previous life to finish killing their
/// trees ([`kill_leftover_groups`]). They got EOF when that life died and kill within their
/// kill grace; only a stuck guard makes this run out.
const LEFTOVER_GUARD_WAIT_MAX: Duration = Duration::from_secs(10);

/// Between two looks at whether leftover guards are gone.
const LEFTOVER_GUARD_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A command that a node runs for one job kind: `[exec.<kind>]` in the node's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExecSpec {
    /// The program: an absolute path, or a name looked up in the node's `PATH`.
    pub command: String,
    /// Arguments passed to the program, after its name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables set for the program. Names starting with `EXACTLY_` are reserved for the
    /// variables that describe the attempt.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables of the node's own environment passed on to the program, by name (default:
    /// `PATH` only). Nothing else of the node's environment reaches it: the program sees these,
    /// `env` and the attempt's `EXACTLY_*` variables, so a secret in the node's environment
    /// does not leak into every job.
    #[serde(default = "inherit_env_default")]
    pub inherit_env: Vec<String>,
    /// The program's working directory: an absolute path (default `/`). The node refuses its
    /// own data directory or anything inside it.
    #[serde(default = "workdir_default")]
    pub workdir: std::path::PathBuf,
    /// Exit codes (1..=255) meaning "retrying will not help" (e.g. bad input). Any other
    /// non-zero code is a retryable failure, and so is death by a signal, whatever is listed
    /// here (a signal is not an exit code; but a shell whose child was killed exits 128 + the
    /// signal number, which *is* one).
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
    /// After SIGTERM on cancellation, how long the process group may take to exit before it is
    /// sent SIGKILL. The node checks it against its lease timing (invariant 4).
    #[serde(default = "kill_grace_default", with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Bytes kept from the end of stdout (the job's result) and, separately, of stderr (quoted
    /// in the error of a failed attempt); earlier output is discarded as it arrives.
    #[serde(default = "output_bytes_max_default")]
    pub output_bytes_max: usize,
}

fn inherit_env_default() -> Vec<String> {
    vec!["PATH".to_string()]
}

fn workdir_default() -> std::path::PathBuf {
    std::path::PathBuf::from("/")
}

fn kill_grace_default() -> Duration {
    KILL_GRACE_DEFAULT
}

fn output_bytes_max_default() -> usize {
    OUTPUT_BYTES_MAX_DEFAULT
}

/// A value in an [`ExecSpec`] that cannot work (the crate's [`SpecError`], kept under its
/// original name).
pub type ExecSpecError = SpecError;

impl ExecSpec {
    /// A spec running `command` with no arguments and the defaults for everything else.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            inherit_env: inherit_env_default(),
            workdir: workdir_default(),
            permanent_exit_codes: Vec::new(),
            kill_grace: KILL_GRACE_DEFAULT,
            output_bytes_max: OUTPUT_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks every value. The relation of `kill-grace` to the lease timing is the node's to
    /// check, since only the node knows its lease settings.
    pub fn validate(&self) -> Result<(), ExecSpecError> {
        if self.command.is_empty() {
            return Err(ExecSpecError::new(
                "command",
                &self.command,
                "must not be empty",
            ));
        }
        if self.command.contains('\0') || self.args.iter().any(|arg| arg.contains('\0')) {
            return Err(ExecSpecError::new(
                "command",
                &self.command,
                "the command and its args must not contain NUL",
            ));
        }
        if !(1..=OUTPUT_BYTES_MAX_CEILING).contains(&self.output_bytes_max) {
            return Err(ExecSpecError::new(
                "output-bytes-max",
                self.output_bytes_max,
                format!("must be 1..={OUTPUT_BYTES_MAX_CEILING}"),
            ));
        }
        // Exit 0 is always success, and an exit status holds only 8 bits: a code outside
        // 1..=255 here would be a rule that can never apply.
        if let Some(code) = self
            .permanent_exit_codes
            .iter()
            .find(|code| !(1..=255).contains(*code))
        {
            return Err(ExecSpecError::new(
                "permanent-exit-codes",
                code,
                "exit codes are 1..=255 (0 is success)",
            ));
        }
        for (name, value) in &self.env {
            let key = format!("env.{name}");
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(ExecSpecError::new(
                    key,
                    name,
                    "a variable name must be non-empty, without '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(ExecSpecError::new(key, value, "must not contain NUL"));
            }
            if name.starts_with("EXACTLY_") {
                return Err(ExecSpecError::new(
                    key,
                    name,
                    "names starting with EXACTLY_ are reserved for the attempt's own variables",
                ));
            }
        }
        if let Some(name) = self
            .inherit_env
            .iter()
            .find(|n| n.is_empty() || n.contains(['=', '\0']) || n.starts_with("EXACTLY_"))
        {
            return Err(ExecSpecError::new(
                "inherit-env",
                name,
                "a variable name must be non-empty, without '=' or NUL, and not EXACTLY_*",
            ));
        }
        let workdir = self.workdir.to_string_lossy();
        if !self.workdir.is_absolute() || workdir.contains('\0') {
            return Err(ExecSpecError::new(
                "workdir",
                workdir,
                "must be an absolute path",
            ));
        }
        Ok(())
    }
}

/// Runs an [`ExecSpec`]'s command for each job of its kind, through an exec guard.
///
/// Exit 0 succeeds with the tail of stdout as the result. A non-zero exit fails with the code
/// and the tail of stderr, permanently if the code is one of `permanent-exit-codes`, retryably
/// otherwise. Death by a signal (whatever `permanent-exit-codes` lists), cancellation, a guard
/// that died or could not start, and transient spawn errors are retryable; a program that cannot
/// be found or executed fails permanently.
#[derive(Clone, Debug)]
pub struct ExecHandler {
    spec: Arc<ExecSpec>,
    /// The `exactly-exec-guard` binary (see [`locate_guard`]).
    guard: Arc<PathBuf>,
    /// Where each running command's process group leaves a marker file, so that a restarted
    /// node can kill what its previous life left running ([`kill_leftover_groups`]).
    group_dir: Option<Arc<PathBuf>>,
}

impl ExecHandler {
    /// A handler for `spec`, taken as it is (call [`ExecSpec::validate`] first, as
    /// [`crate::Registry::register_exec`] does), running each command under the guard binary
    /// `guard`.
    pub fn new(spec: ExecSpec, guard: PathBuf) -> Self {
        Self {
            spec: Arc::new(spec),
            guard: Arc::new(guard),
            group_dir: None,
        }
    }

    /// Records each running command's process group in `dir` (see [`kill_leftover_groups`]).
    pub fn with_group_dir(mut self, dir: PathBuf) -> Self {
        self.group_dir = Some(Arc::new(dir));
        self
    }

    /// The spec this handler runs.
    pub fn spec(&self) -> &ExecSpec {
        &self.spec
    }

    /// The guard binary this handler starts.
    pub fn guard(&self) -> &Path {
        &self.guard
    }
}

impl Handler for ExecHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        run(
            Arc::clone(&self.spec),
            Arc::clone(&self.guard),
            self.group_dir.clone(),
            ctx,
            cancel,
        )
        .boxed()
    }
}

/// Why a guard's report never came.
#[derive(Debug, thiserror::Error)]
enum GuardFailed {
    #[error("ended its report stream without a report")]
    Vanished,
    #[error("sent a malformed report stream: {0}")]
    Protocol(#[from] ProtocolError),
}

async fn run(
    spec: Arc<ExecSpec>,
    guard: Arc<PathBuf>,
    group_dir: Option<Arc<PathBuf>>,
    ctx: JobContext,
    cancel: CancellationToken,
) -> HandlerOutcome {
    if cancel.is_cancelled() {
        return HandlerOutcome::cancelled();
    }
    let mut lease = ctx.lease.watch();
    let start = Start {
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: attempt_env(&spec, &ctx),
        workdir: spec.workdir.to_string_lossy().into_owned(),
        kill_grace_ms: u64::try_from(spec.kill_grace.as_millis()).unwrap_or(u64::MAX),
        output_bytes_max: u32::try_from(spec.output_bytes_max).unwrap_or(u32::MAX),
        deadline_ms: *lease.borrow_and_update(),
        payload_bytes: ctx.payload.len() as u64,
    };
    let mut command = Command::new(guard.as_path());
    command
        // Labels for `ps`, and how a restarted node recognises its previous life's guards
        // (`guard_of_node`); the guard itself reads only its stdin.
        .arg(format!("node={}", ctx.node_id))
        .arg(format!("job={}", ctx.job_id))
        .arg(format!("token={}", ctx.fencing_token))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // The guard writes nothing there unless it panics: then it lands in the node's log.
        .stderr(Stdio::inherit())
        // Its own group, set atomically at spawn: signals to the node's group (a terminal's
        // Ctrl-C, `kill -STOP -<pgid>`) do not reach it, so it can act while the node cannot.
        .process_group(0)
        // Never: killing the guard would stop it from killing the tree. Dropping our end of its
        // stdin (EOF) is how it learns that the attempt is over for us.
        .kill_on_drop(false);
    // std creates the pipes with O_CLOEXEC, so no other child of the node (another guard)
    // inherits our end of this guard's stdin: the guard sees EOF as soon as this node's end
    // closes, whoever else the node has started.
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            // A node refuses to start without a guard, so a guard missing now is being replaced
            // (an upgrade) or a transient limit (processes, memory): worth another attempt.
            return HandlerOutcome::retryable(format!(
                "cannot start the exec guard `{}`: {err}",
                guard.display()
            ));
        }
    };
    let guard_pid = child.id();
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return HandlerOutcome::retryable("the exec guard started without its pipes");
    };
    let mut attempt = Attempt {
        guard_pid,
        pgid: None,
        group_dir,
        marker: None,
        armed: true,
    };
    tracing::debug!(job_id = ctx.job_id, attempt = ctx.attempt, ?guard_pid, command = %spec.command, "exec guard started");

    let reported = {
        let control = control(stdin, start, &ctx.payload, lease, &cancel);
        let reports = read_reports(stdout, &mut attempt);
        tokio::select! {
            biased;
            reported = reports => reported,
            never = control => match never {},
        }
        // `control` is dropped here, closing the guard's stdin.
    };
    match reported {
        Ok(report) => {
            // The guard reports only once every process of the tree is gone.
            attempt.disarm();
            if !report.notes.is_empty() || report.survivors > 0 {
                tracing::warn!(
                    job_id = ctx.job_id,
                    survivors = report.survivors,
                    notes = ?report.notes,
                    "exec guard diagnostics"
                );
            }
            outcome(report, &spec)
        }
        Err(failed) => {
            if matches!(failed, GuardFailed::Protocol(_)) {
                // Not a guard we can talk to (a wrong binary, another version): stop it.
                let _ = child.start_kill();
            }
            let status = match tokio::time::timeout(GUARD_EXIT_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                Ok(Err(err)) => format!("not waited for: {err}"),
                Err(_) => "still running".to_string(),
            };
            // The kernel SIGKILLed the command when its guard died (PR_SET_PDEATHSIG). Its
            // group and anything carrying this guard's marker may live on: kill them.
            attempt.kill_group();
            let swept = guard_pid.map_or(0, |pid| sweep_dead_guard(pid, &ctx));
            tracing::error!(
                job_id = ctx.job_id,
                ?guard_pid,
                %status,
                swept,
                "exec guard {failed}: killed the command's process group and {swept} process(es) of the attempt"
            );
            HandlerOutcome::retryable(format!(
                "the exec guard {failed} ({status}); the attempt's processes were killed"
            ))
        }
    }
}

/// The command's whole environment: the node's variables named in `inherit-env` (those it
/// has), the spec's variables, then the attempt's, which must be accurate and so come last
/// (later entries win).
fn attempt_env(spec: &ExecSpec, ctx: &JobContext) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spec
        .inherit_env
        .iter()
        .filter_map(|name| Some((name.clone(), std::env::var(name).ok()?)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("EXACTLY_JOB_ID".to_string(), ctx.job_id.to_string()),
        ("EXACTLY_ATTEMPT".to_string(), ctx.attempt.to_string()),
        (
            "EXACTLY_FENCING_TOKEN".to_string(),
            ctx.fencing_token.to_string(),
        ),
        (
            "EXACTLY_IDEMPOTENCY_KEY".to_string(),
            ctx.idempotency_key.clone(),
        ),
        ("EXACTLY_NODE_ID".to_string(), ctx.node_id.to_string()),
        ("EXACTLY_QUEUE".to_string(), ctx.queue.clone()),
        ("EXACTLY_KIND".to_string(), ctx.kind.clone()),
    ]);
    env
}

/// Tells the guard what to run, then forwards every lease extension and a cancel. Never
/// returns: our end of the pipe must stay open until the guard has reported (or this future is
/// dropped), since its closing tells the guard that the node is gone.
async fn control(
    mut stdin: ChildStdin,
    start: Start,
    payload: &[u8],
    lease: watch::Receiver<u64>,
    cancel: &CancellationToken,
) -> Infallible {
    if let Err(err) = send_control(&mut stdin, start, payload, lease, cancel).await {
        // The guard is gone (EPIPE): its report stream says the rest.
        tracing::debug!(%err, "writing to an exec guard");
    }
    std::future::pending().await
}

async fn send_control(
    stdin: &mut ChildStdin,
    start: Start,
    payload: &[u8],
    mut lease: watch::Receiver<u64>,
    cancel: &CancellationToken,
) -> Result<(), ProtocolError> {
    let mut sent_ms = start.deadline_ms;
    stdin.write_all(&protocol::PREAMBLE).await?;
    stdin
        .write_all(&protocol::encode(&ToGuard::Start(start))?)
        .await?;
    for chunk in payload.chunks(protocol::PAYLOAD_CHUNK_BYTES_MAX) {
        let frame = protocol::encode(&ToGuard::Payload(chunk.to_vec()))?;
        stdin.write_all(&frame).await?;
    }
    let mut lease_open = true;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                stdin.write_all(&protocol::encode(&ToGuard::Cancel)?).await?;
                return Ok(());
            }
            changed = lease.changed(), if lease_open => match changed {
                Ok(()) => {
                    let deadline_ms = *lease.borrow_and_update();
                    if deadline_ms > sent_ms {
                        sent_ms = deadline_ms;
                        let frame = protocol::encode(&ToGuard::Extend { deadline_ms })?;
                        stdin.write_all(&frame).await?;
                    }
                }
                // The node is shutting down: the deadline stands as it is.
                Err(_) => lease_open = false,
            },
        }
    }
}

/// Reads the guard's stream until its report, recording the command's process group as soon
/// as the guard names it.
async fn read_reports(
    mut stdout: ChildStdout,
    attempt: &mut Attempt,
) -> Result<Report, GuardFailed> {
    let mut preamble = [0u8; 4];
    match stdout.read_exact(&mut preamble).await {
        Ok(_) => protocol::check_preamble(preamble)?,
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(GuardFailed::Vanished)
        }
        Err(err) => return Err(ProtocolError::Io(err).into()),
    }
    loop {
        match read_frame(&mut stdout).await? {
            None => return Err(GuardFailed::Vanished),
            Some(FromGuard::Started { pid }) => attempt.started(pid),
            Some(FromGuard::Ended(report)) => return Ok(report),
        }
    }
}

/// [`protocol::read_frame`] over an async pipe.
async fn read_frame(stdout: &mut ChildStdout) -> Result<Option<FromGuard>, ProtocolError> {
    let mut len = [0u8; 4];
    if stdout.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    stdout
        .read_exact(&mut len[1..])
        .await
        .map_err(|_| ProtocolError::Truncated)?;
    let len = protocol::check_len(u32::from_le_bytes(len) as usize)?;
    let mut body = vec![0u8; len];
    stdout
        .read_exact(&mut body)
        .await
        .map_err(|_| ProtocolError::Truncated)?;
    protocol::decode(&body).map(Some)
}

/// The handler's outcome for a guard's report.
fn outcome(report: Report, spec: &ExecSpec) -> HandlerOutcome {
    match report.stopped {
        // The token fired before the command ended: whatever it exited with, the attempt was
        // cancelled (a command that finished first is reported as it ended).
        Some(StopReason::Cancelled) => return HandlerOutcome::cancelled(),
        Some(reason) => {
            return HandlerOutcome::retryable(format!("stopped by the exec guard: {reason}"))
        }
        None => {}
    }
    let status = match report.end {
        End::Exited { code } => ExitStatus::from_raw((code & 0xff) << 8),
        End::Signaled { signal } => ExitStatus::from_raw(signal & 0x7f),
        End::NotStarted(NotStarted::Spawn { os_error, message }) => {
            let err =
                os_error.map_or_else(|| io::Error::other(message), io::Error::from_raw_os_error);
            return spawn_failure(&spec.command, &err);
        }
        End::NotStarted(NotStarted::LeaseLapsed) => {
            return HandlerOutcome::retryable(
                "the node's lease had lapsed before the command could start",
            )
        }
        End::NotStarted(NotStarted::Setup(why)) => {
            return HandlerOutcome::retryable(format!(
                "the exec guard cannot supervise here: {why}"
            ))
        }
        End::NotStarted(NotStarted::Protocol(why)) => {
            return HandlerOutcome::retryable(format!(
                "the exec guard refused the node's stream: {why}"
            ))
        }
        End::Unreaped => {
            return HandlerOutcome::retryable(format!(
                "`{}` did not exit after SIGKILL (stuck in the kernel?)",
                spec.command
            ))
        }
    };
    exit_outcome(
        status,
        report.stdout,
        report.stderr,
        report.stderr_truncated,
        &spec.permanent_exit_codes,
    )
}

fn spawn_failure(command: &str, err: &io::Error) -> HandlerOutcome {
    let error = format!("cannot start `{command}`: {err}");
    match err.kind() {
        // The node's configuration or file system is wrong: every attempt would fail the same way.
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
            HandlerOutcome::permanent(error)
        }
        _ if err.raw_os_error() == Some(Errno::ENOEXEC as i32) => HandlerOutcome::permanent(error),
        // Out of processes, memory or file descriptors: may pass, and another node may do better.
        _ => HandlerOutcome::retryable(error),
    }
}

fn exit_outcome(
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stderr_truncated: bool,
    permanent_exit_codes: &[i32],
) -> HandlerOutcome {
    if status.success() {
        return HandlerOutcome::Succeeded(stdout);
    }
    let (what, retryable) = if let Some(code) = status.code() {
        (
            format!("exit code {code}"),
            !permanent_exit_codes.contains(&code),
        )
    } else if let Some(signal) = status.signal() {
        let name = Signal::try_from(signal).map_or("unknown signal", Signal::as_str);
        // Killed from outside (the OOM killer, an operator): nothing says the job is at fault.
        (format!("killed by signal {signal} ({name})"), true)
    } else {
        (format!("ended with {status}"), true)
    };
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    let error = match (stderr.is_empty(), stderr_truncated) {
        (true, _) => what,
        (false, false) => format!("{what}: {stderr}"),
        (false, true) => format!("{what}: …{stderr}"),
    };
    HandlerOutcome::Failed { error, retryable }
}

/// One running attempt as the node sees it: its guard, and the command's process group once the
/// guard has named it. Dropped while armed (the executor gave up waiting after the kill grace),
/// it SIGKILLs the command's group at once, and our end of the guard's stdin closes with the
/// handler's future, so the guard kills whatever else is left.
struct Attempt {
    guard_pid: Option<u32>,
    pgid: Option<Pid>,
    group_dir: Option<Arc<PathBuf>>,
    /// The marker file naming this group for [`kill_leftover_groups`], removed on drop.
    marker: Option<PathBuf>,
    armed: bool,
}

impl Attempt {
    /// The command runs as `pid`, leading its own group.
    fn started(&mut self, pid: i32) {
        let pgid = Pid::from_raw(pid);
        self.pgid = Some(pgid);
        let Some(dir) = self.group_dir.as_deref() else {
            return;
        };
        let path = dir.join(pgid.as_raw().to_string());
        // The guard's pid lets a restarted node wait for it to finish killing the tree.
        let content = self
            .guard_pid
            .map_or_else(String::new, |g| format!("guard {g}\n"));
        match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, content)) {
            Ok(()) => self.marker = Some(path),
            Err(err) => {
                tracing::warn!(%err, path = %path.display(), "cannot record an exec process group")
            }
        }
    }

    /// SIGKILLs the command's group (if the guard named it) and disarms. The guard has not
    /// reported, so it has not reaped the command; either the group still has members, or the
    /// group id was freed moments ago and pids are allocated cyclically, so it cannot yet name
    /// an unrelated group.
    fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid {
            match killpg(pgid, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(err) => tracing::warn!(%pgid, %err, "killing an exec process group"),
            }
        }
        self.disarm();
    }

    /// The guard reported: everything is gone, nothing to kill on drop.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.armed {
            self.kill_group();
        }
        if let Some(marker) = self.marker.take() {
            let _ = std::fs::remove_file(marker);
        }
    }
}

/// After a guard died without reporting: SIGKILLs every process whose environment names this
/// guard (`EXACTLY_GUARD_PID`, inherited by everything the command started) together with the
/// attempt's node id and fencing token, so a recycled pid cannot make an unrelated process
/// match. Returns how many it signalled.
fn sweep_dead_guard(guard_pid: u32, ctx: &JobContext) -> usize {
    let markers = [
        format!("{}={guard_pid}", guard::GUARD_PID_VAR),
        format!("EXACTLY_NODE_ID={}", ctx.node_id),
        format!("EXACTLY_FENCING_TOKEN={}", ctx.fencing_token),
    ];
    let mut swept = 0;
    for pid in proc_pids() {
        if environ_has(pid, &markers) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// Every pid in `/proc`.
fn proc_pids() -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// Whether `pid`'s environment holds every one of `markers` (`NAME=value`).
fn environ_has(pid: i32, markers: &[String]) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    markers
        .iter()
        .all(|m| env.split(|&b| b == 0).any(|v| v == m.as_bytes()))
}

/// Kills the process groups that a previous life of this node left running, as recorded in
/// `dir` by [`ExecHandler::with_group_dir`], then waits (at most 10 s) for that life's exec
/// guards to finish killing the rest of their trees (they got EOF when it died). Call it at
/// start-up, before the node registers a new incarnation: a restarted node must not let its
/// previous life's commands go on running (or calling downstreams) while their jobs are
/// reassigned. A group is killed only if one of its processes still carries
/// `EXACTLY_NODE_ID=<node_id>` in its environment, and a guard is waited for only if its
/// arguments name this node, so a recycled id of an unrelated program is left alone. Returns how
/// many groups it killed.
pub fn kill_leftover_groups(dir: &Path, node_id: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let marker = format!("EXACTLY_NODE_ID={node_id}");
    let mut killed = 0;
    let mut guards = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pgid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if group_carries(pgid, &marker) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            killed += 1;
        }
        let guard = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.strip_prefix("guard ")?.trim().parse::<i32>().ok());
        guards.extend(guard.filter(|&pid| guard_of_node(pid, node_id)));
        let _ = std::fs::remove_file(&path);
    }
    let until = std::time::Instant::now() + LEFTOVER_GUARD_WAIT_MAX;
    while guards.iter().any(|&pid| guard_of_node(pid, node_id)) {
        if std::time::Instant::now() >= until {
            tracing::warn!(
                ?guards,
                "exec guards of the previous run still alive; going on"
            );
            break;
        }
        std::thread::sleep(LEFTOVER_GUARD_POLL_INTERVAL);
    }
    killed
}

/// Whether `pid` is a live exec guard started by node `node_id` (its first argument says so).
fn guard_of_node(pid: i32, node_id: u64) -> bool {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    });
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let label = format!("node={node_id}");
    alive && cmdline.split(|&b| b == 0).nth(1) == Some(label.as_bytes())
}

/// Whether a live process in group `pgid` has `marker` in its environment (Linux /proc).
fn group_carries(pgid: i32, marker: &str) -> bool {
    let marker = [marker.to_string()];
    proc_pids().into_iter().any(|pid| {
        let group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // Fields after the command name (which may contain spaces) start after the
                // last ')'.
                stat.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(2)?
                    .parse::<i32>()
                    .ok()
            });
        group == Some(pgid) && environ_has(pid, &marker)
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant as StdInstant;

    use nix::sys::signal::kill;

    use super::*;
    use crate::test_support::context;

    /// A spec running `script` with `/bin/sh -c`, with a short kill grace.
    fn sh(script: &str) -> ExecSpec {
        ExecSpec {
            args: vec!["-c".to_string(), script.to_string()],
            kill_grace: Duration::from_millis(300),
            ..ExecSpec::new("/bin/sh")
        }
    }

    /// The guard binary `cargo test -p exactly-handlers` builds next to the test binaries.
    fn test_guard() -> PathBuf {
        locate_guard(None).unwrap_or_else(|err| {
            panic!("{err}: run `cargo build -p exactly-handlers --bin exactly-exec-guard` first")
        })
    }

    fn handler(spec: ExecSpec) -> ExecHandler {
        ExecHandler::new(spec, test_guard())
    }

    async fn run_spec(spec: ExecSpec, payload: &[u8]) -> HandlerOutcome {
        handler(spec)
            .run(context("exec-test", payload), CancellationToken::new())
            .await
    }

    fn failure(outcome: HandlerOutcome) -> (String, bool) {
        match outcome {
            HandlerOutcome::Failed { error, retryable } => (error, retryable),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Waits (up to 10 s) for a script to write a pid to `path`.
    async fn read_pid(path: &Path) -> Pid {
        let deadline = StdInstant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if text.ends_with('\n') {
                    return Pid::from_raw(text.trim().parse().expect("a pid"));
                }
            }
            assert!(
                StdInstant::now() < deadline,
                "no pid written to {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether `pid` is still running. A zombie counts as dead: it runs nothing and only waits
    /// for its new parent (pid 1 or a subreaper, which in a container may never reap it).
    fn running(pid: Pid) -> bool {
        match kill(pid, None) {
            Err(Errno::ESRCH) => false,
            _ => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // The state follows the parenthesised command name.
                Ok(stat) => !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
                Err(_) => false,
            },
        }
    }

    /// Asserts that `pid` stops running within a generous 5 s (the kill is asynchronous).
    async fn assert_gone(pid: Pid) {
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while running(pid) {
            assert!(StdInstant::now() < deadline, "process {pid} still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pidfile(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("pid")
    }

    /// A command whose node "crashed" (its handler future leaked, so no cleanup ran) is
    /// recorded in the group directory; `kill_leftover_groups` kills it and its grandchild at
    /// the next start, and leaves alone a recorded group that is not this node's.
    #[tokio::test]
    async fn leftover_groups_of_a_previous_life_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let groups = dir.path().join("groups");
        let pids = pidfile(&dir);
        let spec = sh(&format!("sleep 30 & echo $! > {}; wait", pids.display()));
        let handler = handler(spec).with_group_dir(groups.clone());
        let run = handler.run(context("exec-test", b""), CancellationToken::new());
        // Drive it until the grandchild exists, then leak it: no drop guard runs, like SIGKILL.
        let mut run = Box::pin(run);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        // The grandchild may write its pid before the handler has read the guard's report of
        // the start and recorded the group: wait for both.
        let recorded = || std::fs::read_dir(&groups).map_or(0, |d| d.count());
        while std::fs::read_to_string(&pids).map_or(true, |s| s.trim().is_empty())
            || recorded() == 0
        {
            assert!(StdInstant::now() < deadline, "command did not start");
            let _ = tokio::time::timeout(Duration::from_millis(10), &mut run).await;
        }
        let grandchild = Pid::from_raw(
            std::fs::read_to_string(&pids)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        );
        std::mem::forget(run);
        assert_eq!(std::fs::read_dir(&groups).unwrap().count(), 1);
        // Another node's id: nothing is killed.
        assert_eq!(kill_leftover_groups(&groups, 99), 0);
        assert!(running(grandchild));
        // The marker was consumed; record it again as the previous life would have left it.
        let child_group = nix::unistd::getpgid(Some(grandchild)).unwrap();
        std::fs::write(groups.join(child_group.as_raw().to_string()), b"").unwrap();
        assert_eq!(kill_leftover_groups(&groups, 3), 1);
        assert_gone(grandchild).await;
        assert_eq!(std::fs::read_dir(&groups).unwrap().count(), 0);
    }

    /// A previous life's guard (its handler leaked, as when the node is SIGKILLed) is waited
    /// for: `kill_leftover_groups` kills the command's group, the guard then kills the rest of
    /// its tree (a `setsid` child outside the group, ignoring SIGTERM) and exits, and only then
    /// does the call return; a guard of another node is not waited for.
    #[tokio::test]
    async fn leftover_guards_are_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let groups = dir.path().join("groups");
        let pids = pidfile(&dir);
        let spec = sh(&format!(
            "setsid sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 30' & wait",
            pids.display()
        ));
        let run = handler(spec)
            .with_group_dir(groups.clone())
            .run(context("exec-test", b""), CancellationToken::new());
        // Drive it until the worker and the group's marker exist, then leak it: no drop guard
        // runs and the guard's control pipe stays open, like a node killed with SIGKILL.
        let mut run = Box::pin(run);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        let marked = || std::fs::read_dir(&groups).is_ok_and(|d| d.count() == 1);
        while std::fs::read_to_string(&pids).map_or(true, |s| !s.ends_with('\n')) || !marked() {
            assert!(StdInstant::now() < deadline, "command did not start");
            let _ = tokio::time::timeout(Duration::from_millis(10), &mut run).await;
        }
        let worker = read_pid(&pids).await;
        std::mem::forget(run);
        let marker = std::fs::read_dir(&groups)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let text = std::fs::read_to_string(&marker).unwrap();
        assert!(text.starts_with("guard "), "marker: {text:?}");
        assert_eq!(kill_leftover_groups(&groups, 99), 0);
        assert!(running(worker), "another node's leftovers were touched");
        // The marker was consumed; put it back as the previous life left it.
        std::fs::write(&marker, &text).unwrap();
        assert_eq!(kill_leftover_groups(&groups, 3), 1);
        assert!(
            !running(worker),
            "the setsid worker outlived kill_leftover_groups"
        );
    }

    /// The payload reaches the command's stdin and stdout becomes the result.
    #[tokio::test]
    async fn payload_reaches_stdin() {
        let outcome = run_spec(ExecSpec::new("cat"), b"hello, exactly").await;
        assert_eq!(
            outcome,
            HandlerOutcome::Succeeded(b"hello, exactly".to_vec())
        );
    }

    /// The node's own environment does not reach the command, except the variables
    /// `inherit-env` names (`PATH` by default); it runs in `workdir` (`/` by default).
    #[tokio::test]
    async fn only_inherited_variables_reach_the_command_in_its_workdir() {
        // cargo sets it for every test process: a variable the node has and does not pass on.
        let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo");
        let script =
            "printf '%s|%s|%s' \"${PATH:+path}\" \"${CARGO_MANIFEST_DIR:-unset}\" \"$(pwd)\"";
        assert_eq!(
            run_spec(sh(script), b"").await,
            HandlerOutcome::Succeeded(b"path|unset|/".to_vec())
        );
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().canonicalize().unwrap();
        let spec = ExecSpec {
            inherit_env: vec!["CARGO_MANIFEST_DIR".to_string()],
            workdir: workdir.clone(),
            ..sh(script)
        };
        // Without PATH passed on, sh sets its own default one.
        assert_eq!(
            run_spec(spec, b"").await,
            HandlerOutcome::Succeeded(
                format!("path|{manifest}|{}", workdir.display()).into_bytes()
            )
        );
    }

    /// `inherit-env` names variables, and `workdir` is absolute.
    #[test]
    fn inherit_env_and_workdir_are_validated() {
        for (spec, key) in [
            (
                ExecSpec {
                    inherit_env: vec!["A=B".to_string()],
                    ..sh("true")
                },
                "inherit-env",
            ),
            (
                ExecSpec {
                    inherit_env: vec!["EXACTLY_NODE_ID".to_string()],
                    ..sh("true")
                },
                "inherit-env",
            ),
            (
                ExecSpec {
                    workdir: "relative".into(),
                    ..sh("true")
                },
                "workdir",
            ),
        ] {
            let err = spec.validate().unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    /// The attempt's variables (fencing token included) and the spec's env are set.
    #[tokio::test]
    async fn environment_describes_the_attempt() {
        let mut spec = sh(
            "printf '%s|' \"$EXACTLY_JOB_ID\" \"$EXACTLY_ATTEMPT\" \"$EXACTLY_FENCING_TOKEN\" \
             \"$EXACTLY_NODE_ID\" \"$EXACTLY_QUEUE\" \"$EXACTLY_KIND\" \"$GREETING\"",
        );
        spec.env.insert("GREETING".to_string(), "hi".to_string());
        let outcome = run_spec(spec, b"").await;
        assert_eq!(
            outcome,
            HandlerOutcome::Succeeded(b"7|1|42|3|default|exec-test|hi|".to_vec())
        );
        let outcome = run_spec(sh("printf %s \"$EXACTLY_IDEMPOTENCY_KEY\""), b"").await;
        assert_eq!(
            outcome,
            HandlerOutcome::Succeeded(b"exactly-job-7".to_vec())
        );
    }

    /// Exit 0 succeeds, exit 3 is retryable with stderr quoted, a listed code is permanent, and
    /// an unlisted code of the same spec stays retryable.
    #[tokio::test]
    async fn exit_codes_are_mapped() {
        assert_eq!(
            run_spec(sh("echo done"), b"").await,
            HandlerOutcome::Succeeded(b"done\n".to_vec())
        );

        let (error, retryable) = failure(run_spec(sh("echo boom >&2; exit 3"), b"").await);
        assert!(retryable);
        assert_eq!(error, "exit code 3: boom");

        let mut spec = sh("exit 42");
        spec.permanent_exit_codes = vec![2, 42];
        let (error, retryable) = failure(run_spec(spec, b"").await);
        assert!(!retryable);
        assert_eq!(error, "exit code 42");

        let mut spec = sh("exit 43");
        spec.permanent_exit_codes = vec![2, 42];
        let (error, retryable) = failure(run_spec(spec, b"").await);
        assert!(retryable);
        assert_eq!(error, "exit code 43");

        // Exit 0 succeeds even when 0 would be listed (validation refuses such a list).
        let mut spec = sh("exit 0");
        spec.permanent_exit_codes = vec![0];
        assert_eq!(
            run_spec(spec, b"").await,
            HandlerOutcome::Succeeded(Vec::new())
        );
    }

    /// A command killed by a signal is a retryable failure naming the signal, even when the
    /// signal's number and the shell convention 128 + signal are listed as permanent codes.
    #[tokio::test]
    async fn death_by_signal_is_retryable() {
        let (error, retryable) = failure(run_spec(sh("kill -KILL $$"), b"").await);
        assert!(retryable);
        assert!(error.contains("SIGKILL"), "error: {error}");

        let mut spec = sh("kill -TERM $$");
        spec.permanent_exit_codes = vec![15, 143];
        let (error, retryable) = failure(run_spec(spec, b"").await);
        assert!(retryable);
        assert!(error.contains("SIGTERM"), "error: {error}");
    }

    /// A cancelled command (the executor's timeout fires the token) is retryable, whatever
    /// code the command would have exited with.
    #[tokio::test]
    async fn cancelled_command_is_retryable() {
        let mut spec = sh("sleep 30; exit 2");
        spec.permanent_exit_codes = vec![2];
        let cancel = CancellationToken::new();
        let run = tokio::spawn(handler(spec).run(context("exec-test", b""), cancel.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        let outcome = run.await.expect("handler task");
        assert_eq!(outcome, HandlerOutcome::cancelled());
        assert!(matches!(
            outcome,
            HandlerOutcome::Failed {
                retryable: true,
                ..
            }
        ));
    }

    /// A command printing a megabyte to each stream leaves only the last bytes of each.
    #[tokio::test]
    async fn output_is_kept_as_a_bounded_tail() {
        let mut spec = sh("head -c 1000000 /dev/zero | tr '\\0' x; printf END");
        spec.output_bytes_max = 16;
        let HandlerOutcome::Succeeded(result) = run_spec(spec, b"").await else {
            panic!("expected success");
        };
        assert_eq!(result, b"xxxxxxxxxxxxxEND");

        let mut spec = sh("head -c 1000000 /dev/zero | tr '\\0' y >&2; echo TAIL >&2; exit 1");
        spec.output_bytes_max = 16;
        let (error, _) = failure(run_spec(spec, b"").await);
        assert_eq!(error, "exit code 1: …yyyyyyyyyyyTAIL");
    }

    /// A command that never reads its stdin, given more than a pipe holds, still succeeds.
    #[tokio::test]
    async fn child_ignoring_stdin_works() {
        let payload = vec![b'p'; 1024 * 1024];
        let outcome = run_spec(sh("sleep 0.1; echo ok"), &payload).await;
        assert_eq!(outcome, HandlerOutcome::Succeeded(b"ok\n".to_vec()));
        let outcome = run_spec(sh("exit 0"), &payload).await;
        assert_eq!(outcome, HandlerOutcome::Succeeded(Vec::new()));
    }

    /// Background processes a command leaves behind are killed when it exits.
    #[tokio::test]
    async fn leftover_background_processes_are_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let script = format!("sleep 30 & echo $! > '{}'; echo started", path.display());
        let outcome = run_spec(sh(&script), b"").await;
        assert_eq!(outcome, HandlerOutcome::Succeeded(b"started\n".to_vec()));
        assert_gone(read_pid(&path).await).await;
    }

    /// Cancellation SIGTERMs the whole group, so a grandchild obeying SIGTERM is gone too.
    #[tokio::test]
    async fn cancellation_kills_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let mut spec = sh(&format!("sleep 30 & echo $! > '{}'; wait", path.display()));
        // We stop waiting once the group is gone, but a zombie grandchild still counts as a
        // member until pid 1 reaps it, which some containers' init does slowly or never: the
        // grace bounds this test's duration.
        spec.kill_grace = Duration::from_secs(1);
        let cancel = CancellationToken::new();
        let run = tokio::spawn(handler(spec).run(context("exec-test", b""), cancel.clone()));

        let grandchild = read_pid(&path).await;
        assert!(running(grandchild));
        let cancelled_at = StdInstant::now();
        cancel.cancel();
        let outcome = run.await.expect("handler task");
        assert_eq!(outcome, HandlerOutcome::cancelled());
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(6),
            "took {:?}",
            cancelled_at.elapsed()
        );
        assert_gone(grandchild).await;
    }

    /// On cancellation a grandchild receives SIGTERM, not just SIGKILL, and may clean up.
    #[tokio::test]
    async fn grandchild_gets_sigterm_and_may_clean_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let cleaned = dir.path().join("cleaned");
        let script = dir.path().join("grandchild.sh");
        std::fs::write(
            &script,
            "trap 'echo cleaned > \"$1\"; exit 0' TERM\necho $$ > \"$2\"\nwhile :; do sleep 0.05; done\n",
        )
        .expect("write script");
        let mut spec = sh(&format!(
            "sh '{}' '{}' '{}' & wait",
            script.display(),
            cleaned.display(),
            path.display()
        ));
        spec.kill_grace = Duration::from_secs(1);
        let cancel = CancellationToken::new();
        let run = tokio::spawn(handler(spec).run(context("exec-test", b""), cancel.clone()));

        let grandchild = read_pid(&path).await;
        cancel.cancel();
        assert_eq!(
            run.await.expect("handler task"),
            HandlerOutcome::cancelled()
        );
        assert_gone(grandchild).await;
        let cleaned = std::fs::read_to_string(&cleaned).expect("the grandchild's SIGTERM trap ran");
        assert_eq!(cleaned, "cleaned\n");
    }

    /// A group ignoring SIGTERM is SIGKILLed once the grace has passed, and not before.
    #[tokio::test]
    async fn sigterm_ignoring_group_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let spec = sh(&format!(
            "trap '' TERM; sleep 30 & echo $! > '{}'; wait",
            path.display()
        ));
        let grace = spec.kill_grace;
        let cancel = CancellationToken::new();
        let run = tokio::spawn(handler(spec).run(context("exec-test", b""), cancel.clone()));

        let grandchild = read_pid(&path).await;
        let cancelled_at = StdInstant::now();
        cancel.cancel();
        let outcome = run.await.expect("handler task");
        let waited = cancelled_at.elapsed();
        assert_eq!(outcome, HandlerOutcome::cancelled());
        assert!(
            waited >= grace,
            "killed after {waited:?}, before the {grace:?} grace"
        );
        assert!(waited < grace + Duration::from_secs(5), "took {waited:?}");
        assert_gone(grandchild).await;
    }

    /// Dropping the handler's future kills the whole group, grandchild included.
    #[tokio::test]
    async fn dropping_the_future_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let child_path = dir.path().join("child-pid");
        let spec = sh(&format!(
            "echo $$ > '{}'; sleep 30 & echo $! > '{}'; wait",
            child_path.display(),
            path.display()
        ));
        let run = handler(spec).run(context("exec-test", b""), CancellationToken::new());
        let grandchild = tokio::select! {
            outcome = run => panic!("the command ended on its own: {outcome:?}"),
            pid = read_pid(&path) => pid,
        };
        // `run` has been dropped by the end of the select.
        let child = read_pid(&child_path).await;
        assert_gone(grandchild).await;
        assert_gone(child).await;
    }

    /// A token cancelled before the attempt starts runs nothing.
    #[tokio::test]
    async fn already_cancelled_runs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pidfile(&dir);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let outcome = handler(sh(&format!("echo $$ > '{}'", path.display())))
            .run(context("exec-test", b""), cancel)
            .await;
        assert_eq!(outcome, HandlerOutcome::cancelled());
        assert!(!path.exists());
    }

    /// A command that does not exist is a permanent failure carrying the OS error.
    #[tokio::test]
    async fn missing_command_is_permanent() {
        let (error, retryable) =
            failure(run_spec(ExecSpec::new("/nonexistent/exactly-no-such-command"), b"").await);
        assert!(!retryable);
        assert!(
            error.contains("/nonexistent/exactly-no-such-command"),
            "error: {error}"
        );
        assert!(
            error.contains("No such file or directory"),
            "error: {error}"
        );
    }

    /// A spec table parses with kebab-case keys, humane durations and defaults.
    #[test]
    fn spec_parses_from_toml() {
        let spec: ExecSpec = toml::from_str(
            r#"
            command = "/usr/bin/convert"
            args = ["-resize", "50%"]
            env = { MAGICK_THREAD_LIMIT = "1" }
            permanent-exit-codes = [2]
            kill-grace = "250ms"
            output-bytes-max = 1024
            "#,
        )
        .expect("valid spec");
        assert_eq!(spec.kill_grace, Duration::from_millis(250));
        assert_eq!(spec.output_bytes_max, 1024);
        assert_eq!(spec.permanent_exit_codes, [2]);
        assert_eq!(spec.env["MAGICK_THREAD_LIMIT"], "1");
        spec.validate().expect("valid");

        let spec: ExecSpec = toml::from_str(r#"command = "cat""#).expect("minimal spec");
        assert_eq!(spec, ExecSpec::new("cat"));
        assert!(toml::from_str::<ExecSpec>(
            r#"command = "cat"
            timeout = "1s""#
        )
        .is_err());
    }

    /// Validation names the key of an empty command, an out-of-range output limit, a reserved
    /// variable name and a permanent exit code no exit status can have.
    #[test]
    fn validation_names_the_key() {
        let key = |spec: ExecSpec| spec.validate().expect_err("invalid").key;
        assert_eq!(key(ExecSpec::new("")), "command");
        assert_eq!(
            key(ExecSpec {
                output_bytes_max: 0,
                ..ExecSpec::new("cat")
            }),
            "output-bytes-max"
        );
        let mut spec = ExecSpec::new("cat");
        spec.env
            .insert("EXACTLY_FENCING_TOKEN".to_string(), "0".to_string());
        assert_eq!(key(spec), "env.EXACTLY_FENCING_TOKEN");
        for code in [0, 256, -1] {
            let spec = ExecSpec {
                permanent_exit_codes: vec![2, code],
                ..ExecSpec::new("cat")
            };
            let err = spec.validate().expect_err("code out of range");
            assert_eq!(err.key, "permanent-exit-codes");
            assert_eq!(err.value, code.to_string());
        }
        ExecSpec {
            permanent_exit_codes: vec![1, 255],
            ..ExecSpec::new("cat")
        }
        .validate()
        .expect("1 and 255 are valid");
    }
}
