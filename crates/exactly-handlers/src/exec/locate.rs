//! Finding the `exactly-exec-guard` binary a node starts for each `exec` attempt.
//!
//! A node that runs `exec` kinds must find its guard at start-up, not at its first job: an
//! `exec` kind without a guard could not keep the promise that its processes die with the lease.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::guard::BINARY_NAME;

/// No usable guard binary was found; `looked` lists every path tried, in order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no executable `{BINARY_NAME}` found (looked at {})", display_paths(.looked))]
pub struct GuardNotFound {
    pub looked: Vec<PathBuf>,
}

fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// Where to look, in order: the configured path alone if there is one; otherwise
/// `exactly-exec-guard` next to the running executable `exe`, then in its parent directory
/// (test binaries run from `target/<profile>/deps/`, the guard is built into
/// `target/<profile>/`), then in each directory of `path_var` (`PATH`).
pub fn candidates(
    configured: Option<&Path>,
    exe: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Vec<PathBuf> {
    if let Some(path) = configured {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        out.push(dir.join(BINARY_NAME));
        if let Some(up) = dir.parent() {
            out.push(up.join(BINARY_NAME));
        }
    }
    if let Some(path_var) = path_var {
        out.extend(
            std::env::split_paths(path_var)
                .filter(|dir| !dir.as_os_str().is_empty())
                .map(|dir| dir.join(BINARY_NAME)),
        );
    }
    out
}

/// The first of `candidates` for which `usable` holds.
pub fn first_usable(
    candidates: Vec<PathBuf>,
    usable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, GuardNotFound> {
    match candidates.iter().find(|p| usable(p)) {
        Some(found) => Ok(found.clone()),
        None => Err(GuardNotFound { looked: candidates }),
    }
}

/// Finds the guard: `configured` (a node's `exec-guard`) if set, else the default places (see
/// [`candidates`]) for this process.
pub fn locate_guard(configured: Option<&Path>) -> Result<PathBuf, GuardNotFound> {
    let exe = std::env::current_exe().ok();
    let path_var = std::env::var_os("PATH");
    first_usable(
        candidates(configured, exe.as_deref(), path_var.as_deref()),
        is_executable_file,
    )
}

/// A regular file (after symlinks) with an execute bit.
fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured path is the only candidate; otherwise next to the executable, its parent
    /// directory, then PATH, in that order.
    #[test]
    fn candidates_are_in_order() {
        let exe = Path::new("/opt/x/target/debug/deps/test-123");
        assert_eq!(
            candidates(Some(Path::new("/usr/lib/g")), Some(exe), None),
            [PathBuf::from("/usr/lib/g")]
        );
        assert_eq!(
            candidates(None, Some(exe), Some("/usr/bin::/bin".as_ref())),
            [
                "/opt/x/target/debug/deps/exactly-exec-guard",
                "/opt/x/target/debug/exactly-exec-guard",
                "/usr/bin/exactly-exec-guard",
                "/bin/exactly-exec-guard",
            ]
            .map(PathBuf::from)
        );
    }

    /// The first usable candidate wins; none usable is an error listing every place looked at.
    #[test]
    fn first_usable_candidate_wins() {
        let c = vec![
            PathBuf::from("/a"),
            PathBuf::from("/b"),
            PathBuf::from("/c"),
        ];
        assert_eq!(
            first_usable(c.clone(), |p| p != Path::new("/a")),
            Ok(PathBuf::from("/b"))
        );
        let err = first_usable(c.clone(), |_| false).unwrap_err();
        assert_eq!(err.looked, c);
        assert_eq!(
            err.to_string(),
            "no executable `exactly-exec-guard` found (looked at /a, /b, /c)"
        );
        // A directory or a file without an execute bit is not a guard.
        assert!(!is_executable_file(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(BINARY_NAME);
        std::fs::write(&file, b"").unwrap();
        assert!(!is_executable_file(&file));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(is_executable_file(&file));
    }
}
