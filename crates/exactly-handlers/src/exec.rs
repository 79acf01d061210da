//! `exec`: runs a command configured on the node, with the job's payload on its stdin.
//!
//! This is how jobs written in any language run on exactly. The command comes from the node's
//! configuration, never from the job: a client that may submit jobs must not be able to run
//! arbitrary programs on the nodes. The job chooses only the kind (hence which configured
//! command) and the bytes on stdin.
//!
//! A node may run an attempt only while its lease is valid (DESIGN.md, invariant 4), so no
//! process started for an attempt may outlive it. The child therefore runs in its own process
//! group, and the whole group, grandchildren included, is signalled: SIGTERM when the
//! cancellation token fires (timeout, self-fencing, drain), SIGKILL after `kill-grace`, SIGKILL
//! as soon as the command exits (leftover background processes), and SIGKILL if the handler's
//! future is dropped.
//!
//! Output is captured through bounded tail buffers: a command that prints gigabytes costs
//! `output-bytes-max` bytes per stream.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FusedFuture, FutureExt};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::tail::TailBuffer;
use crate::{Handler, HandlerOutcome, JobContext, SpecError};

/// Bytes of captured output per stream that a spec may ask for, at most.
pub const OUTPUT_BYTES_MAX_CEILING: usize = 1024 * 1024;

/// Default of [`ExecSpec::kill_grace`] (DESIGN.md's timing defaults).
pub const KILL_GRACE_DEFAULT: Duration = Duration::from_secs(1);

/// Default of [`ExecSpec::output_bytes_max`]; matches the result size the state machine keeps.
pub const OUTPUT_BYTES_MAX_DEFAULT: usize = 4096;

/// Bytes read from a pipe at once.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// How often we look for surviving group members during the kill grace, once the direct child
/// has exited (they are not our children, so we cannot wait for them).
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long we keep reading the pipes after the process group is gone. Only a process that left
/// the group (`setsid`) and kept our pipes open can make this run out; we then give up on the
/// rest of its output rather than wait for it.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long we wait to reap the direct child after SIGKILL. Only a process stuck in the kernel
/// (uninterruptible sleep) survives that long; tokio reaps it later in the background.
const REAP_TIMEOUT: Duration = Duration::from_secs(1);

/// A command that a node runs for one job kind: `[exec.<kind>]` in the node's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExecSpec {
    /// The program: an absolute path, or a name looked up in the node's `PATH`.
    pub command: String,
    /// Arguments passed to the program, after its name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to the node's environment for the program. Names starting with
    /// `EXACTLY_` are reserved for the variables that describe the attempt.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
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
        Ok(())
    }
}

/// Runs an [`ExecSpec`]'s command for each job of its kind.
///
/// Exit 0 succeeds with the tail of stdout as the result. A non-zero exit fails with the code
/// and the tail of stderr, permanently if the code is one of `permanent-exit-codes`, retryably
/// otherwise. Death by a signal (whatever `permanent-exit-codes` lists), cancellation and
/// transient spawn errors are retryable; a program that cannot be found or executed fails
/// permanently.
#[derive(Clone, Debug)]
pub struct ExecHandler {
    spec: Arc<ExecSpec>,
    /// Where each running command's process group leaves a marker file, so that a restarted
    /// node can kill what its previous life left running ([`kill_leftover_groups`]).
    group_dir: Option<Arc<PathBuf>>,
}

impl ExecHandler {
    /// A handler for `spec`, taken as it is: call [`ExecSpec::validate`] first (as
    /// [`crate::Registry::register_exec`] does).
    pub fn new(spec: ExecSpec) -> Self {
        Self {
            spec: Arc::new(spec),
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
}

impl Handler for ExecHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        run(Arc::clone(&self.spec), self.group_dir.clone(), ctx, cancel).boxed()
    }
}

/// How the supervised child ended.
enum Ended {
    Exited(ExitStatus),
    WaitFailed(io::Error),
    Cancelled,
}

async fn run(
    spec: Arc<ExecSpec>,
    group_dir: Option<Arc<PathBuf>>,
    ctx: JobContext,
    cancel: CancellationToken,
) -> HandlerOutcome {
    if cancel.is_cancelled() {
        return HandlerOutcome::cancelled();
    }
    let mut command = Command::new(&spec.command);
    command
        .args(&spec.args)
        .envs(&spec.env)
        // Set after the spec's variables: these describe the attempt and must be accurate.
        .env("EXACTLY_JOB_ID", ctx.job_id.to_string())
        .env("EXACTLY_ATTEMPT", ctx.attempt.to_string())
        .env("EXACTLY_FENCING_TOKEN", ctx.fencing_token.to_string())
        .env("EXACTLY_IDEMPOTENCY_KEY", &ctx.idempotency_key)
        .env("EXACTLY_NODE_ID", ctx.node_id.to_string())
        .env("EXACTLY_QUEUE", &ctx.queue)
        .env("EXACTLY_KIND", &ctx.kind)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A new group whose id is the child's pid, so that one killpg reaches every process the
        // command starts, and signals sent to the node's own group (a terminal's Ctrl-C) do not.
        .process_group(0)
        // Covers only the direct child; `ProcessGroup`'s drop covers the rest of the group.
        .kill_on_drop(true);
    die_with_parent(&mut command);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return spawn_failure(&spec.command, &err),
    };
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        // Unreachable in practice: the child cannot have been reaped before we waited for it.
        return HandlerOutcome::retryable(format!(
            "`{}` started without a process id",
            spec.command
        ));
    };
    let mut group = ProcessGroup::new(
        Pid::from_raw(pid),
        group_dir.as_deref().map(|d| d.as_path()),
    );
    tracing::debug!(job_id = ctx.job_id, attempt = ctx.attempt, pid, command = %spec.command, "exec started");

    let mut stdout = TailBuffer::new(spec.output_bytes_max);
    let mut stderr = TailBuffer::new(spec.output_bytes_max);
    let ended = {
        let stdin = child.stdin.take();
        let stdout_pipe = child.stdout.take();
        let stderr_pipe = child.stderr.take();
        // Feeding stdin and reading both pipes all progress together and alongside the wait, so a
        // child blocked writing to a full pipe, or not reading its stdin, cannot deadlock us.
        let mut io = Box::pin(
            async {
                tokio::join!(
                    feed_stdin(stdin, &ctx.payload),
                    read_tail(stdout_pipe, &mut stdout),
                    read_tail(stderr_pipe, &mut stderr),
                );
            }
            .fuse(),
        );
        let ended = supervise(
            &mut child,
            &mut group,
            spec.kill_grace,
            &cancel,
            io.as_mut(),
        )
        .await;
        if !io.is_terminated()
            && tokio::time::timeout(PIPE_DRAIN_TIMEOUT, &mut io)
                .await
                .is_err()
        {
            tracing::warn!(
                job_id = ctx.job_id,
                pid,
                "exec output pipes still open after the process group ended (a process left the group?); keeping the output read so far"
            );
        }
        ended
    };

    match ended {
        Ended::Cancelled => HandlerOutcome::cancelled(),
        Ended::WaitFailed(err) => {
            HandlerOutcome::retryable(format!("waiting for `{}`: {err}", spec.command))
        }
        Ended::Exited(status) => exit_outcome(status, stdout, stderr, &spec.permanent_exit_codes),
    }
}

/// Waits for the child to exit or for cancellation, driving `io` meanwhile. Returns once every
/// member of the process group has exited or been sent SIGKILL, with `group` disarmed.
async fn supervise(
    child: &mut Child,
    group: &mut ProcessGroup,
    kill_grace: Duration,
    cancel: &CancellationToken,
    mut io: Pin<&mut impl FusedFuture<Output = ()>>,
) -> Ended {
    let exited = loop {
        tokio::select! {
            // Biased towards the exit: a command that finished as the token fired did its work,
            // and reporting it is the truth (a stale attempt's completion is refused upstream).
            biased;
            status = child.wait() => break Some(status),
            () = cancel.cancelled() => break None,
            () = io.as_mut(), if !io.is_terminated() => {}
        }
    };
    if let Some(status) = exited {
        // The command is done; whatever it left running in the background must not outlive the
        // attempt (and would hold our pipes open).
        group.kill();
        return match status {
            Ok(status) => Ended::Exited(status),
            Err(err) => Ended::WaitFailed(err),
        };
    }

    group.signal(Signal::SIGTERM);
    let deadline = Instant::now() + kill_grace;
    let mut reaped = false;
    loop {
        // The group is gone once the direct child is reaped (a zombie still counts as a member)
        // and no other member is left. A grandchild's zombie counts too until pid 1 reaps it, so
        // under an init that reaps slowly we may wait out the grace: that costs only time.
        if reaped && !group.has_members() {
            // Nothing left to kill, and the group id is free for reuse: do not signal it again.
            group.disarm();
            return Ended::Cancelled;
        }
        tokio::select! {
            biased;
            result = child.wait(), if !reaped => {
                reaped = true;
                if let Err(err) = result {
                    tracing::warn!(%err, "waiting for a cancelled exec child");
                }
            }
            // Keep reading: a child flushing output on SIGTERM must not block on a full pipe.
            () = io.as_mut(), if !io.is_terminated() => {}
            () = tokio::time::sleep_until(deadline) => break,
            () = tokio::time::sleep(GROUP_POLL_INTERVAL), if reaped => {}
        }
    }
    group.kill();
    if !reaped
        && tokio::time::timeout(REAP_TIMEOUT, child.wait())
            .await
            .is_err()
    {
        tracing::warn!(
            "exec child survived SIGKILL for {REAP_TIMEOUT:?}; leaving it to be reaped later"
        );
    }
    Ended::Cancelled
}

/// Writes the payload to the child's stdin, then closes it. A child that exits without reading
/// it all is not an error: the exit status speaks for the child.
async fn feed_stdin(stdin: Option<ChildStdin>, payload: &[u8]) {
    let Some(mut stdin) = stdin else {
        return;
    };
    match stdin.write_all(payload).await {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
        Err(err) => tracing::debug!(%err, "writing the payload to an exec child's stdin"),
    }
    // Dropping `stdin` closes it, so the child sees end of input.
}

/// Reads a pipe to its end, keeping its tail.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, tail: &mut TailBuffer) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => tail.push(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::debug!(%err, "reading an exec child's output");
                return;
            }
        }
    }
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
    stdout: TailBuffer,
    stderr: TailBuffer,
    permanent_exit_codes: &[i32],
) -> HandlerOutcome {
    if status.success() {
        return HandlerOutcome::Succeeded(stdout.into_vec());
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
    let truncated = stderr.truncated();
    let stderr = stderr.into_vec();
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    let error = match (stderr.is_empty(), truncated) {
        (true, _) => what,
        (false, false) => format!("{what}: {stderr}"),
        (false, true) => format!("{what}: …{stderr}"),
    };
    HandlerOutcome::Failed { error, retryable }
}

/// The child's process group, killed with SIGKILL when this is dropped while armed, so that
/// dropping the handler's future leaves no process of the attempt running.
struct ProcessGroup {
    pgid: Pid,
    armed: bool,
    /// The marker file naming this group for [`kill_leftover_groups`], removed on drop.
    marker: Option<PathBuf>,
}

impl ProcessGroup {
    fn new(pgid: Pid, group_dir: Option<&Path>) -> Self {
        let marker = group_dir.and_then(|dir| {
            let path = dir.join(pgid.as_raw().to_string());
            match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, b"")) {
                Ok(()) => Some(path),
                Err(err) => {
                    tracing::warn!(%err, path = %path.display(), "cannot record an exec process group");
                    None
                }
            }
        });
        Self {
            pgid,
            armed: true,
            marker,
        }
    }

    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            // ESRCH: every member has already exited.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => {
                tracing::warn!(pgid = %self.pgid, %signal, %err, "signalling an exec process group")
            }
        }
    }

    /// Sends SIGKILL to every member and disarms the guard. Called while the direct child is
    /// unreaped, while other members remain, or moments after the child was reaped: the group id
    /// is the child's pid, and pids are allocated cyclically, so it cannot yet name an unrelated
    /// group.
    fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.disarm();
    }

    /// Stops the guard from killing the group when dropped.
    fn disarm(&mut self) {
        self.armed = false;
    }

    fn has_members(&self) -> bool {
        // EPERM means a member exists that we may not signal (it changed its credentials): wait
        // for it like any other; the grace bounds the wait.
        !matches!(killpg(self.pgid, None), Err(Errno::ESRCH))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
        if let Some(marker) = self.marker.take() {
            let _ = std::fs::remove_file(marker);
        }
    }
}

/// Asks the kernel to SIGKILL the command when the node process dies (SIGKILL of `exactlyd`
/// runs none of our cleanup). This reaches the direct child only; [`kill_leftover_groups`]
/// kills the rest of a group when the node starts again.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2) and
    // getppid(2), both async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other(
                    "the node exited while starting the command",
                ));
            }
            Ok(())
        });
    }
}

/// Kills the process groups that a previous life of this node left running, as recorded in
/// `dir` by [`ExecHandler::with_group_dir`]. Call it at start-up, before the node registers a
/// new incarnation: a restarted node must not let its previous life's commands go on running
/// (or calling downstreams) while their jobs are reassigned. A group is killed only if one of
/// its processes still carries `EXACTLY_NODE_ID=<node_id>` in its environment, so a recycled
/// process-group id of an unrelated program is left alone. Returns how many groups it killed.
pub fn kill_leftover_groups(dir: &Path, node_id: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let marker = format!("EXACTLY_NODE_ID={node_id}");
    let mut killed = 0;
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
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// Whether a live process in group `pgid` has `marker` in its environment (Linux /proc).
fn group_carries(pgid: i32, marker: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let group = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<i32>().ok());
        if group != Some(pgid) {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|v| v == marker.as_bytes()) {
                return true;
            }
        }
    }
    false
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

    async fn run_spec(spec: ExecSpec, payload: &[u8]) -> HandlerOutcome {
        ExecHandler::new(spec)
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
        let handler = ExecHandler::new(spec).with_group_dir(groups.clone());
        let run = handler.run(context("exec-test", b""), CancellationToken::new());
        // Drive it until the grandchild exists, then leak it: no drop guard runs, like SIGKILL.
        let mut run = Box::pin(run);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&pids).map_or(true, |s| s.trim().is_empty()) {
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

    /// The payload reaches the command's stdin and stdout becomes the result.
    #[tokio::test]
    async fn payload_reaches_stdin() {
        let outcome = run_spec(ExecSpec::new("cat"), b"hello, exactly").await;
        assert_eq!(
            outcome,
            HandlerOutcome::Succeeded(b"hello, exactly".to_vec())
        );
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
        let run =
            tokio::spawn(ExecHandler::new(spec).run(context("exec-test", b""), cancel.clone()));
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
        let run =
            tokio::spawn(ExecHandler::new(spec).run(context("exec-test", b""), cancel.clone()));

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
        let run =
            tokio::spawn(ExecHandler::new(spec).run(context("exec-test", b""), cancel.clone()));

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
        let run =
            tokio::spawn(ExecHandler::new(spec).run(context("exec-test", b""), cancel.clone()));

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
        let run = ExecHandler::new(spec).run(context("exec-test", b""), CancellationToken::new());
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
        let outcome = ExecHandler::new(sh(&format!("echo $$ > '{}'", path.display())))
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
