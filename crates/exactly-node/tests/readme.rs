//! README's examples, run as written. The blocks README marks with `<!-- README test: run -->`
//! run in order, as one bash script with `set -euo pipefail`, in an empty directory, against a
//! cluster started by README's own first command (`scripts/cluster.sh`, on free ports and the
//! debug binaries), which is then stopped the way README says (SIGTERM, as Ctrl-C).
//!
//! The CLI binary is found next to `exactlyd` (`cargo test --workspace` builds both).

#[allow(dead_code)] // the exec guard's helper is for the other process tests
mod common;

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The marker line before a README block this test runs.
const MARKER: &str = "<!-- README test: run -->";
/// How long the cluster may take to start (debug binaries on a busy 2-core machine).
const START_LIMIT: Duration = Duration::from_secs(120);
/// How long README's examples may take together (two short benches among them).
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// How long the stopped cluster may take to drain and exit (the script's own limit is 40 s).
const STOP_LIMIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `sh` blocks after a [`MARKER`] line, in README order.
fn marked_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim() != MARKER {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "a README test marker must be followed by a ```sh fence"
        );
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            block.push_str(line);
            block.push('\n');
        }
        blocks.push(block);
    }
    blocks
}

/// A child in its own process group (the cluster script and the nodes it starts, or the example
/// script and what it runs), killed as a group if the test ends early.
struct Group {
    child: Child,
}

impl Group {
    fn spawn(command: &mut Command) -> Group {
        let child = command.process_group(0).spawn().expect("spawn");
        Group { child }
    }

    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), signal);
    }

    /// Waits up to `limit` for the child to exit.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn read(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

#[test]
fn readme_examples_run_as_written() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("README.md");
    let blocks = marked_blocks(&readme);
    assert!(
        blocks.len() >= 2,
        "README marks {} blocks for this test; expected the first steps and the CLI reference",
        blocks.len()
    );

    let exactlyd = PathBuf::from(env!("CARGO_BIN_EXE_exactlyd"));
    let bin = exactlyd.parent().unwrap().to_path_buf();
    assert!(
        bin.join("exactly").exists(),
        "the CLI is not built next to exactlyd ({}): run `cargo build -p exactly-cli` first \
         (`cargo test --workspace` builds it)",
        bin.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..6).map(|_| common::free_port()).collect();
    let endpoints = ports[..3]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");

    // README's first command, on this test's ports and data directory.
    let cluster_out = dir.path().join("cluster.out");
    let mut cluster = Group::spawn(
        Command::new("bash")
            .arg(repo().join("scripts/cluster.sh"))
            .env("EXACTLY_CLUSTER_BIN", &bin)
            .env("EXACTLY_CLUSTER_DATA", dir.path().join("data"))
            .env(
                "EXACTLY_CLUSTER_PORTS",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .stdin(Stdio::null())
            .stdout(fs::File::create(&cluster_out).unwrap())
            .stderr(Stdio::from(
                fs::File::options().append(true).open(&cluster_out).unwrap(),
            )),
    );
    let started = Instant::now();
    loop {
        let out = read(&cluster_out);
        if out.contains("3 nodes running and ready") {
            assert!(
                out.contains(&format!("gRPC API:  127.0.0.1:{}", ports[0])),
                "the banner names the API: {out}"
            );
            break;
        }
        if let Ok(Some(status)) = cluster.child.try_wait() {
            panic!("scripts/cluster.sh exited ({status}) before the cluster was ready:\n{out}");
        }
        assert!(
            started.elapsed() < START_LIMIT,
            "the cluster was not ready within {START_LIMIT:?}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The examples, as one script, in an empty directory where `exactly` is on PATH and
    // `target/debug/exactly` (what the first steps use) exists.
    let work = dir.path().join("work");
    let path_dir = dir.path().join("bin");
    fs::create_dir_all(work.join("target/debug")).unwrap();
    fs::create_dir_all(&path_dir).unwrap();
    std::os::unix::fs::symlink(bin.join("exactly"), work.join("target/debug/exactly")).unwrap();
    std::os::unix::fs::symlink(bin.join("exactly"), path_dir.join("exactly")).unwrap();
    let script = format!(
        "set -euo pipefail\n\
         trap 'echo \"README example failed (exit $?): $BASH_COMMAND\" >&2' ERR\n{}",
        blocks.join("\n")
    );
    fs::write(dir.path().join("examples.sh"), &script).unwrap();
    let (out_path, err_path) = (
        dir.path().join("examples.out"),
        dir.path().join("examples.err"),
    );
    let path = format!(
        "{}:{}",
        path_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut examples = Group::spawn(
        Command::new("bash")
            .arg(dir.path().join("examples.sh"))
            .current_dir(&work)
            .env("PATH", path)
            .env("EXACTLY_ENDPOINTS", &endpoints)
            .env_remove("EXACTLY_TOKEN")
            .env_remove("EXACTLY_CA")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap()),
    );
    let status = examples.wait(RUN_LIMIT);
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(
        status.is_some_and(|s| s.success()),
        "README's examples did not all succeed within {RUN_LIMIT:?} ({status:?})\n\
         --- stdout\n{out}\n--- stderr\n{err}\n--- cluster\n{}",
        read(&cluster_out)
    );
    // What the examples printed is what README says they print.
    // `queue list` runs when the mail queue holds only finished jobs (its dead letter was
    // purged): it is listed all the same.
    assert!(
        out.lines().any(|l| l.starts_with("QUEUE ")) && out.lines().any(|l| l.starts_with("mail ")),
        "queue list shows the mail queue:\n{out}"
    );
    assert!(
        out.contains("queue        mail\nstate        paused\n"),
        "queue configure paused the mail queue:\n{out}"
    );
    assert!(
        fs::metadata(work.join("payload.bin")).is_ok_and(|m| m.len() == "permanent".len() as u64),
        "get --payload wrote the dead letter's payload"
    );

    // Ctrl-C: the nodes drain and stop, and the script says so.
    cluster.signal(Signal::SIGINT);
    let status = cluster.wait(STOP_LIMIT);
    let out = read(&cluster_out);
    assert!(
        status.is_some() && out.contains("exactly: stopped in"),
        "scripts/cluster.sh did not stop within {STOP_LIMIT:?} of Ctrl-C ({status:?}):\n{out}"
    );
}
