//! Helpers shared by the real-process tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Makes sure `exactly-exec-guard` sits next to `exactlyd` in the target directory, where
/// `exactlyd` looks for it, and returns its path. The guard is another package's binary
/// (exactly-handlers), so `cargo test -p exactly-node` alone does not build it (`cargo test
/// --workspace` does, since exactly-handlers has integration tests): when it is missing, this
/// runs `cargo build -p exactly-handlers --bin exactly-exec-guard`. (Rebuilding on every run
/// would not do: that build resolves features differently from `cargo test`, so the two would
/// keep rebuilding each other's dependencies. A guard of another protocol version is refused
/// by the node with a clear error.)
pub fn exec_guard_binary() -> PathBuf {
    static GUARD: OnceLock<PathBuf> = OnceLock::new();
    GUARD
        .get_or_init(|| {
            let exactlyd = Path::new(env!("CARGO_BIN_EXE_exactlyd"));
            let guard = exactlyd.parent().unwrap().join("exactly-exec-guard");
            if !guard.exists() {
                eprintln!(
                    "{} missing: cargo build -p exactly-handlers --bin exactly-exec-guard",
                    guard.display()
                );
                // target/<dir>/exactlyd: `debug` is the dev profile's directory, any other
                // directory is named after its profile.
                let profile = match exactlyd.parent().and_then(Path::file_name) {
                    Some(dir) if dir != "debug" => dir.to_string_lossy().into_owned(),
                    _ => "dev".to_string(),
                };
                let status = Command::new(env!("CARGO"))
                    .args([
                        "build",
                        "-p",
                        "exactly-handlers",
                        "--bin",
                        "exactly-exec-guard",
                    ])
                    .args(["--profile", &profile])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .status()
                    .expect("run cargo build -p exactly-handlers --bin exactly-exec-guard");
                assert!(status.success(), "cargo build of the exec guard: {status}");
            }
            assert!(guard.exists(), "no exec guard at {}", guard.display());
            guard
        })
        .clone()
}

/// A free loopback port for a test node, from 2000–9999: below the kernel's ephemeral range
/// (32768–60999 by default), where no outgoing connection ever gets a port, and below the
/// ranges of the in-process harness (10000–19999) and the container test (20000–31999). With
/// port 0 a port the test picked could be handed to another test's connection before the node
/// bound it, or while a node the test restarts was down (CI saw a node of
/// `sigterm_drains_and_a_stopped_cluster_comes_back_whole` refuse connections on its API
/// port). Each call takes the next candidate that binds, from a start that differs per
/// process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 2_000;
    const SPAN: u16 = 8_000;
    static NEXT: OnceLock<AtomicU16> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        AtomicU16::new((u64::from(std::process::id()) ^ nanos) as u16)
    });
    for _ in 0..SPAN {
        let port = FIRST + next.fetch_add(1, Ordering::SeqCst) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}
