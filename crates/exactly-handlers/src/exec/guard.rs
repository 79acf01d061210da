//! The exec guard (`exactly-exec-guard`): a small process between a node and each `exec`
//! command, so that a job's processes die with its node's lease, whatever they fork and even
//! when the node is killed or frozen.
//!
//! The node starts one guard per attempt, in a process group of the guard's own (a
//! `kill -STOP -<node's group>` does not freeze it), and talks to it over its stdin and stdout
//! ([`super::protocol`]). The guard makes itself a *child subreaper*, so every process the
//! command starts and orphans (double forks, daemons, `setsid` children) is re-parented to the
//! guard instead of init: the guard's descendants are exactly the attempt's processes. It runs
//! the command in a process group of its own, with `PR_SET_PDEATHSIG` set to SIGKILL relative to
//! the guard, the payload on its stdin and the attempt's `EXACTLY_*` variables (plus
//! `EXACTLY_GUARD_PID`, this guard's pid), and keeps bounded tails of its stdout and stderr.
//!
//! # The guarantee
//! Every descendant of the guard receives SIGTERM, then SIGKILL `kill-grace` later, as soon as
//! - the node's end of the control pipe closes: the node died, however (SIGKILL, crash, OOM);
//! - the node's lease deadline passes without an extension: the node is frozen (SIGSTOP), hung
//!   or fenced. The deadline is absolute `CLOCK_MONOTONIC` time ([`crate::monotonic_ms`]),
//!   one clock for every process on the machine, so the guard needs nothing from the node to
//!   enforce it: SIGTERM at the deadline, SIGKILL at deadline + `kill-grace`;
//! - the node cancels the attempt (timeout, self-fencing, drain, a client's cancel).
//!
//! When the command exits, whatever it left running gets SIGKILL at once. SIGKILL rounds repeat
//! (a process may fork between the scan of `/proc` and the signal) until the guard has no
//! child left, which for a subreaper means no descendant left; only then does it report. These
//! decisions are [`policy::Policy`]'s, a pure state machine over the time and the events.
//!
//! # What escapes it
//! - Processes that are not descendants of the guard: work handed to another daemon
//!   (`systemd-run`, `at`, cron, a container engine, `ssh localhost`, D-Bus activation).
//! - A descendant that changed its credentials (a setuid program, when the node does not run as
//!   root) refuses our signals; after [`policy::KILL_GIVE_UP_MS`] of SIGKILL rounds the guard
//!   reports it as a survivor and exits, and it lives on under init. A process stuck in the
//!   kernel (uninterruptible sleep) already has SIGKILL pending: it never runs user code again.
//! - Nothing runs while everything is stopped: a SIGSTOP of the whole machine, cgroup or VM (or
//!   of the guard itself) suspends enforcement. On waking the guard compares the clock with the
//!   deadline and kills at once (SIGKILL without further grace if the grace has passed too).
//!   `CLOCK_MONOTONIC` does not count time the machine spends *suspended*; a suspend breaks the
//!   node's clock-rate assumption (DESIGN.md, invariant 4) for the guard and the node alike.
//! - If the guard itself is killed (an operator's SIGKILL, the OOM killer), the kernel SIGKILLs
//!   the command (`PR_SET_PDEATHSIG`); the node sees the guard's report stream end without a
//!   report, SIGKILLs the command's process group and every process whose environment carries
//!   this guard's `EXACTLY_GUARD_PID` with the attempt's node id and fencing token, and ends the
//!   attempt as a retryable failure. A descendant that both left the command's process group and
//!   rewrote its environment escapes that sweep. If the node and the guard are killed together,
//!   a restarted node kills the command's recorded process group and nothing more.
//!
//! The guard uses std threads, not an async runtime: one blocks in `waitpid` (the reaper), one
//! reads the control stream, one feeds the payload, two read the output pipes; the main thread
//! runs the policy. The main thread forks the command and lives until the guard exits, which
//! matters because `PR_SET_PDEATHSIG` fires when the *thread* that forked dies.

pub mod policy;
pub mod tree;

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use self::policy::{Event, Policy, TreeSignal};
use super::protocol::{self, End, FromGuard, NotStarted, ProtocolError, Report, Start, ToGuard};
use crate::monotonic_ms;
use crate::tail::TailBuffer;

/// The environment variable naming the guard's pid in the command's environment (the node's
/// sweep for a dead guard's processes looks for it).
pub const GUARD_PID_VAR: &str = "EXACTLY_GUARD_PID";

/// The guard binary's file name.
pub const BINARY_NAME: &str = "exactly-exec-guard";

/// How long the guard keeps reading the output pipes once no descendant is left. Only a process
/// outside the tree holding them (it escaped, see the module docs) makes this run out.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read from an output pipe at once.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// Payloads up to this size are written to the command's stdin by the main thread: a pipe holds
/// at least `PIPE_BUF` (4096) bytes, so such a write to the fresh, empty pipe never blocks, and
/// the common small payload costs no thread.
const PAYLOAD_INLINE_BYTES_MAX: usize = 4096;

/// Stack of each of the guard's threads: they hold little on the stack (buffers are on the heap),
/// and a small stack keeps the guard's footprint small.
const THREAD_STACK_BYTES: usize = 64 * 1024;

/// What the guard's threads tell the main thread.
enum Msg {
    Event(Event),
    /// The command was reaped and ended so.
    CommandEnded(End),
    /// A diagnostic for the report.
    Note(String),
}

/// Runs the guard on this process's stdin and stdout; returns the process exit code (0 once a
/// report was written, 1 if the node's stream was unusable before any command ran, 2 if the
/// report could not be written).
pub fn main() -> i32 {
    // Our own process group (the node spawns us in one already; this covers a guard started
    // any other way). EPERM if we lead a session: then we are alone in our group anyway.
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let subreaper = nix::sys::prctl::set_child_subreaper(true);

    let mut control = io::stdin();
    let setup = read_setup(&mut control);
    // Our own handle on fd 1, unbuffered: each frame is one write (std's `Stdout` is
    // line-buffered and would split a frame at every newline byte).
    let Ok(mut out) = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
    else {
        return 2;
    };
    if out.write_all(&protocol::PREAMBLE).is_err() {
        return 2;
    }
    let (start, payload) = match setup {
        Ok(Some(setup)) => setup,
        // The node went away before it said what to run: nothing was started.
        Ok(None) => return 1,
        Err(err) => {
            let end = End::NotStarted(NotStarted::Protocol(err.to_string()));
            return report(&mut out, not_started(end));
        }
    };
    if let Err(err) = subreaper {
        let why = format!("PR_SET_CHILD_SUBREAPER failed ({err}): orphans could escape");
        return report(
            &mut out,
            not_started(End::NotStarted(NotStarted::Setup(why))),
        );
    }
    let policy = Policy::new(start.deadline_ms, start.kill_grace_ms);
    if !policy.may_start(monotonic_ms()) {
        return report(
            &mut out,
            not_started(End::NotStarted(NotStarted::LeaseLapsed)),
        );
    }
    let outcome = run(&start, payload, policy, control, &mut out);
    report(&mut out, outcome)
}

/// Starts the command and supervises its tree until the policy is done; the report to send.
fn run(
    start: &Start,
    payload: Vec<u8>,
    mut policy: Policy,
    control: io::Stdin,
    out: &mut impl Write,
) -> Report {
    let mut command = std::process::Command::new(&start.command);
    command
        .args(&start.args)
        // Only what the node chose (`inherit-env`, `env`, the attempt's variables): nothing of
        // the node's own environment, which the guard inherited, reaches the command.
        .env_clear()
        .envs(start.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&start.workdir)
        .env(GUARD_PID_VAR, std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of the command's own, so the node can still SIGKILL it (and what stayed in it)
        // should this guard die, and a signal to our group does not reach it.
        .process_group(0);
    die_with_guard(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return not_started(End::NotStarted(NotStarted::Spawn {
                os_error: err.raw_os_error(),
                message: err.to_string(),
            }));
        }
    };
    let command_pid = Pid::from_raw(child.id() as i32);
    // Nothing can be done if the node is gone; the command is then stopped by the EOF below.
    let _ = protocol::write_frame(
        out,
        &FromGuard::Started {
            pid: command_pid.as_raw(),
        },
    );

    let (tx, rx) = mpsc::channel();
    let stdout_tail = Arc::new(Mutex::new(TailBuffer::new(start.output_bytes_max as usize)));
    let stderr_tail = Arc::new(Mutex::new(TailBuffer::new(start.output_bytes_max as usize)));
    let (drained_tx, drained_rx) = mpsc::channel();
    spawn_thread("reaper", {
        let tx = tx.clone();
        move || reap(command_pid, tx)
    });
    spawn_thread("control", {
        let tx = tx.clone();
        move || read_control(control, tx)
    });
    let stdin = child.stdin.take();
    if payload.len() <= PAYLOAD_INLINE_BYTES_MAX {
        feed(stdin, &payload);
    } else {
        spawn_thread("stdin", move || feed(stdin, &payload));
    }
    for (pipe, tail) in [
        (child.stdout.take().map(Pipe::Out), stdout_tail.clone()),
        (child.stderr.take().map(Pipe::Err), stderr_tail.clone()),
    ] {
        let drained = drained_tx.clone();
        spawn_thread("output", move || {
            drain(pipe, &tail);
            let _ = drained.send(());
        });
    }
    // `child` is never waited for through std: the reaper reaps every child with waitpid(-1).
    drop(child);

    let (ended, mut notes) = supervise(&mut policy, &rx);
    // Once no descendant is left, nothing in the tree holds the pipes: both end promptly.
    let drain_by = std::time::Instant::now() + PIPE_DRAIN_TIMEOUT;
    for _ in 0..2 {
        let left = drain_by.saturating_duration_since(std::time::Instant::now());
        if drained_rx.recv_timeout(left).is_err() {
            notes
                .push("output pipes still open after the tree ended; keeping what was read".into());
            break;
        }
    }
    let survivors = if policy.gave_up() {
        tree::descendants(std::process::id() as i32, &tree::parents()).len() as u32
    } else {
        0
    };
    let take = |tail: &Arc<Mutex<TailBuffer>>| {
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        let truncated = tail.truncated();
        (
            std::mem::replace(&mut *tail, TailBuffer::new(0)).into_vec(),
            truncated,
        )
    };
    let (stdout, stdout_truncated) = take(&stdout_tail);
    let (stderr, stderr_truncated) = take(&stderr_tail);
    notes.truncate(protocol::NOTES_MAX);
    Report {
        end: ended.unwrap_or(End::Unreaped),
        stopped: policy.stopped(),
        stdout,
        stdout_truncated,
        stderr,
        stderr_truncated,
        survivors,
        notes,
    }
}

/// The I/O loop around the policy: carries out its steps, feeds it events and the clock, until
/// it is done. Returns how the command ended (if it was reaped) and the diagnostics.
fn supervise(policy: &mut Policy, rx: &Receiver<Msg>) -> (Option<End>, Vec<String>) {
    let mut ended = None;
    let mut notes = Vec::new();
    let mut refused_noted = false;
    let mut step = policy.tick(monotonic_ms());
    loop {
        if let Some(signal) = step.signal {
            let round = tree::signal_all(match signal {
                TreeSignal::Term => Signal::SIGTERM,
                TreeSignal::Kill => Signal::SIGKILL,
            });
            if round.refused > 0 && !refused_noted {
                refused_noted = true;
                notes.push(format!(
                    "{} process(es) refused {signal:?} (changed credentials?)",
                    round.refused
                ));
            }
        }
        if step.done {
            return (ended, notes);
        }
        let msg = match step.wake_at_ms {
            // Whole milliseconds from a truncated reading: we wake at or after the wake time.
            Some(at) => {
                let wait = Duration::from_millis(at.saturating_sub(monotonic_ms()));
                rx.recv_timeout(wait)
            }
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let now = monotonic_ms();
        step = match msg {
            Ok(Msg::Event(event)) => policy.on(now, event),
            Ok(Msg::CommandEnded(end)) => {
                ended = Some(end);
                policy.on(now, Event::CommandExited)
            }
            Ok(Msg::Note(note)) => {
                notes.push(note);
                policy.tick(now)
            }
            Err(RecvTimeoutError::Timeout) => policy.tick(now),
            // Every thread is gone: the reaper's TreeEmpty came before its end, so this is only
            // reached through a bug; time still decides.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(policy::KILL_ROUND_INTERVAL_MS));
                policy.tick(now)
            }
        };
    }
}

/// Reads the preamble, the Start frame and the payload. `Ok(None)`: the stream ended first.
fn read_setup(r: &mut impl Read) -> Result<Option<(Start, Vec<u8>)>, ProtocolError> {
    match protocol::read_preamble(r) {
        Err(ProtocolError::Truncated) => return Ok(None),
        other => other?,
    }
    let start = match protocol::read_frame::<ToGuard>(r)? {
        None => return Ok(None),
        Some(ToGuard::Start(start)) => start,
        Some(other) => {
            return Err(ProtocolError::Invalid(format!(
                "expected Start first, got {other:?}"
            )))
        }
    };
    start.validate()?;
    let mut payload = Vec::new();
    while (payload.len() as u64) < start.payload_bytes {
        match protocol::read_frame::<ToGuard>(r)? {
            None => return Ok(None),
            Some(ToGuard::Payload(chunk))
                if !chunk.is_empty()
                    && chunk.len() <= protocol::PAYLOAD_CHUNK_BYTES_MAX
                    && (payload.len() + chunk.len()) as u64 <= start.payload_bytes =>
            {
                payload.extend_from_slice(&chunk);
            }
            Some(other) => {
                return Err(ProtocolError::Invalid(format!(
                    "expected {} more payload bytes, got {}",
                    start.payload_bytes - payload.len() as u64,
                    describe(&other)
                )))
            }
        }
    }
    Ok(Some((start, payload)))
}

fn describe(m: &ToGuard) -> String {
    match m {
        ToGuard::Payload(chunk) => format!("a payload chunk of {} bytes", chunk.len()),
        other => format!("{other:?}"),
    }
}

fn not_started(end: End) -> Report {
    Report {
        end,
        stopped: None,
        stdout: Vec::new(),
        stdout_truncated: false,
        stderr: Vec::new(),
        stderr_truncated: false,
        survivors: 0,
        notes: Vec::new(),
    }
}

fn report(out: &mut impl Write, report: Report) -> i32 {
    match protocol::write_frame(out, &FromGuard::Ended(report)) {
        Ok(()) => 0,
        // The node is gone; there is nobody to tell.
        Err(_) => 2,
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    // A guard that cannot start a thread cannot supervise: better to die now, which the node
    // sees (and which SIGKILLs the command through PR_SET_PDEATHSIG), than to run unguarded.
    std::thread::Builder::new()
        .name(format!("guard-{name}"))
        .stack_size(THREAD_STACK_BYTES)
        .spawn(f)
        .expect("start a guard thread");
}

/// Reaps every child: the command (whose end is reported) and the orphans re-parented to us.
/// `ECHILD` means no child, hence no descendant, is left.
fn reap(command: Pid, tx: Sender<Msg>) {
    loop {
        let end = match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => End::Exited { code },
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => End::Signaled {
                signal: signal as i32,
            },
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                let _ = tx.send(Msg::Event(Event::TreeEmpty));
                return;
            }
            Err(err) => {
                let _ = tx.send(Msg::Note(format!("waitpid: {err}")));
                std::thread::sleep(Duration::from_millis(policy::KILL_ROUND_INTERVAL_MS));
                continue;
            }
        };
        let _ = tx.send(Msg::CommandEnded(end));
    }
}

/// Forwards the node's extensions and cancel, then its end (EOF: the node is gone).
fn read_control(mut control: io::Stdin, tx: Sender<Msg>) {
    loop {
        let event = match protocol::read_frame::<ToGuard>(&mut control) {
            Ok(Some(ToGuard::Extend { deadline_ms })) => Event::Extend { deadline_ms },
            Ok(Some(ToGuard::Cancel)) => Event::Cancel,
            Ok(None) => Event::ControlClosed,
            Ok(Some(other)) => {
                let note = format!("unexpected control frame: {}", describe(&other));
                let _ = tx.send(Msg::Note(note));
                Event::ProtocolError
            }
            Err(err) => {
                let _ = tx.send(Msg::Note(format!("control stream: {err}")));
                Event::ProtocolError
            }
        };
        let last = matches!(event, Event::ControlClosed | Event::ProtocolError);
        if tx.send(Msg::Event(event)).is_err() || last {
            return;
        }
    }
}

/// Writes the payload to the command's stdin, then closes it. A command that exits without
/// reading it all is not an error: its exit status speaks for it.
fn feed(stdin: Option<ChildStdin>, payload: &[u8]) {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(payload);
    }
}

enum Pipe {
    Out(ChildStdout),
    Err(ChildStderr),
}

/// Reads an output pipe to its end, keeping its tail.
fn drain(pipe: Option<Pipe>, tail: &Mutex<TailBuffer>) {
    let mut pipe: Box<dyn Read> = match pipe {
        Some(Pipe::Out(p)) => Box::new(p),
        Some(Pipe::Err(p)) => Box::new(p),
        None => return,
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Asks the kernel to SIGKILL the command when the guard dies (a guard killed with SIGKILL runs
/// none of its cleanup); see the module docs for what happens to the rest of the tree then.
#[allow(unsafe_code)]
fn die_with_guard(command: &mut std::process::Command) {
    let guard = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2) and
    // getppid(2), both async-signal-safe; it allocates nothing (an errno converts to an
    // `io::Error` without allocating) and takes no locks. The guard forks the command before it
    // starts any other thread, so no lock can be held by a thread that does not exist in the
    // child.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The guard may have died between fork and prctl: then no signal will come.
            if nix::unistd::getppid() != guard {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
}
