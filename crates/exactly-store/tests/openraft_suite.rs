//! openraft's own storage test suite, run against the sled-backed [`LogStore`] and
//! [`StateMachine`]. Each case gets a fresh store in its own temporary directory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_store::raft_types::{LogId, StorageError, Vote};
use exactly_store::{
    DurabilityHook, DurableImage, LogStore, NoopObserver, StateMachine, Store, StoreOptions,
    TableStorage, TypeConfig,
};
use openraft::testing::log::{StoreBuilder, Suite};
use tempfile::TempDir;

/// Opens a fresh store in a new temporary directory, its job table kept as given; the
/// directory is the suite's guard and is removed when the case ends.
struct FreshStore(TableStorage);

fn setup_error(e: &(dyn std::error::Error + 'static)) -> StorageError {
    use openraft::type_config::TypeConfigExt;
    StorageError::write(TypeConfig::err_from_string(e))
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for FreshStore {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| setup_error(&e))?;
        let options = StoreOptions {
            table: self.0,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), options).map_err(|e| setup_error(&e))?;
        let sm = store
            .state_machine(Arc::new(NoopObserver))
            .map_err(|e| setup_error(&e))?;
        Ok((dir, store.log_store(), sm))
    }
}

/// Every case of openraft 0.10's storage suite passes: log reads, purge, truncate, vote,
/// committed, membership bookkeeping, apply and snapshot transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(FreshStore(TableStorage::Memory)).await?;
    Ok(())
}

/// The same with the job table's records on disk (`table-storage = "disk"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_with_the_table_on_disk() -> anyhow::Result<()> {
    Suite::test_all(FreshStore(TableStorage::Disk)).await?;
    Ok(())
}

/// Checks openraft's durability contract at the seam: every append callback and every
/// `save_vote` return is covered by the newest completed durability point.
#[derive(Default)]
struct ContractCheck {
    newest: Mutex<Option<DurableImage>>,
}

impl DurabilityHook for ContractCheck {
    fn powered(&self) -> bool {
        true
    }
    fn completed(&self, image: DurableImage) -> bool {
        let mut newest = self.newest.lock().unwrap();
        if newest.as_ref().is_none_or(|n| n.seq < image.seq) {
            *newest = Some(image);
        }
        true
    }
    fn append_acknowledged(&self, last: LogId) {
        let newest = self.newest.lock().unwrap();
        let durable = newest.as_ref().and_then(|n| n.log_last);
        assert!(
            durable >= Some(last),
            "entries up to {last} acknowledged, durable only {durable:?}"
        );
    }
    fn vote_saved(&self, vote: Vote) {
        let newest = self.newest.lock().unwrap();
        let durable = newest.as_ref().and_then(|n| n.vote);
        assert!(
            durable >= Some(vote),
            "vote {vote} returned, durable only {durable:?}"
        );
    }
}

/// Like [`FreshStore`], on a slow disk (each append's fsync held 1 ms) with the contract check.
struct SlowDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SlowDisk {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| setup_error(&e))?;
        let options = StoreOptions {
            durability_hook: Some(Arc::new(ContractCheck::default())),
            append_sync_delay: Duration::from_millis(1),
            acknowledge_before_sync: false,
            table: TableStorage::Memory,
        };
        let store = Store::open_with(dir.path(), options).map_err(|e| setup_error(&e))?;
        let sm = store
            .state_machine(Arc::new(NoopObserver))
            .map_err(|e| setup_error(&e))?;
        Ok((dir, store.log_store(), sm))
    }
}

/// The whole suite passes with the test seam on (a slow disk and a hook), and no append
/// callback or vote is acknowledged before a durability point covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_on_a_slow_disk() -> anyhow::Result<()> {
    Suite::test_all(SlowDisk).await?;
    Ok(())
}
