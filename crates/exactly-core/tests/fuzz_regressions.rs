//! Inputs that the `apply` fuzz target (crates/exactly-fuzz) once broke, replayed exactly as
//! the target reads them: a sequence of postcard-encoded `Request`s applied at indexes 1, 2, …,
//! with every invariant checked after each. Add a crash file to
//! `crates/exactly-fuzz/regressions/apply/` when the fuzzer finds one.

use exactly_core::{JobTable, Request};

#[test]
fn inputs_the_fuzzer_once_broke_keep_every_invariant() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../exactly-fuzz/regressions/apply");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
    for file in files {
        let data = std::fs::read(&file).expect("readable");
        let mut table = JobTable::new();
        let mut rest = &data[..];
        let mut index = 0u64;
        while let Ok((request, tail)) = postcard::take_from_bytes::<Request>(rest) {
            index += 1;
            let _ = table.apply(index, request);
            if let Err(broken) = table.check_invariants() {
                panic!("{}: entry {index}: {broken}", file.display());
            }
            if tail.len() == rest.len() {
                break;
            }
            rest = tail;
        }
        assert!(index > 0, "{}: no request decoded", file.display());
    }
}
