//! openraft's own storage test suite, run against the sled-backed [`LogStore`] and
//! [`StateMachine`]. Each case gets a fresh store in its own temporary directory.

use std::sync::Arc;

use exactly_store::{LogStore, NoopObserver, StateMachine, Store, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use tempfile::TempDir;

/// Opens a fresh store in a new temporary directory; the directory is the suite's guard and is
/// removed when the case ends.
struct FreshStore;

fn setup_error(e: &(dyn std::error::Error + 'static)) -> StorageError<u64> {
    let e = openraft::AnyError::from_dyn(e, None);
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, e).into()
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for FreshStore {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| setup_error(&e))?;
        let store = Store::open(dir.path()).map_err(|e| setup_error(&e))?;
        let sm = store
            .state_machine(Arc::new(NoopObserver))
            .map_err(|e| setup_error(&e))?;
        Ok((dir, store.log_store(), sm))
    }
}

/// Every case of openraft 0.9.25's storage suite passes: log reads, purge, truncate, vote,
/// committed, membership bookkeeping, apply and snapshot transfer.
#[test]
fn openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(FreshStore)?;
    Ok(())
}
