//! The guard's process tree: every process whose chain of parents leads to the guard.
//!
//! The guard is a child subreaper, so a descendant whose parent dies is re-parented to the guard
//! rather than to init: the tree holds every process the command ever started (double forks,
//! `setsid`, daemons) that is still alive. Linux's `/proc` is the only place that lists it.

use std::collections::{HashMap, HashSet};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

/// Whether the calling process has any child, living or zombie, without reaping one.
/// No child means no descendant at all (the guard being a subreaper), so this spares a `/proc`
/// scan in the common case of a command that left nothing behind.
pub fn has_children() -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(waitid(Id::All, flags), Err(Errno::ECHILD))
}

/// The parent of every process in `/proc` (pid → ppid). Processes that vanish while we read
/// are skipped.
pub fn parents() -> HashMap<i32, i32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_ppid)
        {
            out.insert(pid, ppid);
        }
    }
    out
}

/// The ppid field of a `/proc/<pid>/stat` line. The command name is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted after the last `)`: state, then ppid.
pub fn parse_ppid(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every descendant of `root` in `parents` (children first, then theirs, …).
pub fn descendants(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            // A pid cannot be its own ancestor, but reads of /proc at different moments (a pid
            // reused meanwhile) could make it look so: visit each pid once.
            if seen.insert(child) {
                out.push(child);
                next.push(child);
            }
        }
    }
    out
}

/// What one round of signals reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Processes signalled.
    pub signalled: u32,
    /// Processes that refused the signal (EPERM: they changed their credentials).
    pub refused: u32,
}

/// Sends `signal` to every descendant of the calling process. A SIGTERM is followed by SIGCONT,
/// so a stopped process can act on it (SIGKILL needs no such help).
///
/// A pid read from `/proc` could in principle name another process by the time it is signalled,
/// if ours exited, was reaped and its pid was reused in between; pids are allocated cyclically
/// up to `pid_max` (4,194,304 on 64-bit Linux), so that takes a wrap-around within microseconds.
pub fn signal_all(signal: Signal) -> Round {
    let mut round = Round::default();
    if !has_children() {
        return round;
    }
    let me = std::process::id() as i32;
    for pid in descendants(me, &parents()) {
        let pid = Pid::from_raw(pid);
        match kill(pid, signal) {
            Ok(()) => round.signalled += 1,
            // Exited (and reaped) since the scan.
            Err(Errno::ESRCH) => {}
            Err(_) => round.refused += 1,
        }
        if signal == Signal::SIGTERM {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }
    round
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ppid is found after a command name holding spaces and parentheses.
    #[test]
    fn ppid_is_parsed_after_the_command_name() {
        assert_eq!(parse_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("42 (a b) c) (d) R 9 1 1"), Some(9));
        assert_eq!(parse_ppid("garbage"), None);
    }

    /// Descendants are found through any depth, and nothing else is.
    #[test]
    fn descendants_follow_the_parent_chain() {
        let parents: HashMap<i32, i32> = [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (21, 20)]
            .into_iter()
            .collect();
        let mut d = descendants(10, &parents);
        d.sort();
        assert_eq!(d, [11, 12, 13]);
        assert!(descendants(12, &parents).is_empty());
    }
}
