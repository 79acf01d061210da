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
