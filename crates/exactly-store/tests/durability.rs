//! The durability seam: what a durability point reports, what a power cut does to appends in
//! flight, and what [`lose_unsynced_writes`] leaves in the data directory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_core::{Command, NewJob, Request};
use exactly_store::raft_types::log_id;
use exactly_store::raft_types::{Entry, EntryPayload, LogId, Vote};
use exactly_store::{
    lose_unsynced_writes, DurabilityHook, DurableImage, NoopObserver, Store, StoreOptions,
    TableStorage,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{RaftLogReader, RaftSnapshotBuilder};

#[derive(Default)]
struct DiskState {
    off: bool,
    image: Option<DurableImage>,
    acked: Option<LogId>,
    vote: Option<Vote>,
    completed: u64,
}

/// A disk whose power a test can cut; remembers the newest completed image and the latest
/// acknowledgements.
#[derive(Default)]
struct Disk(Mutex<DiskState>);

impl Disk {
    fn cut(&self) -> DiskState {
        let mut s = self.0.lock().unwrap();
        s.off = true;
        DiskState {
            off: true,
            image: s.image.clone(),
            acked: s.acked,
            vote: s.vote,
            completed: s.completed,
        }
    }

    fn image(&self) -> Option<DurableImage> {
        self.0.lock().unwrap().image.clone()
    }
}

impl DurabilityHook for Disk {
    fn powered(&self) -> bool {
        !self.0.lock().unwrap().off
    }
    fn completed(&self, image: DurableImage) -> bool {
        let mut s = self.0.lock().unwrap();
        if s.off {
            return false;
        }
        s.completed += 1;
        if s.image.as_ref().is_none_or(|i| i.seq < image.seq) {
            s.image = Some(image);
        }
        true
    }
    fn append_acknowledged(&self, last: LogId) {
        let mut s = self.0.lock().unwrap();
        // Acknowledged entries must be covered by a completed image, unless the store lies.
        s.acked = s.acked.max(Some(last));
    }
    fn vote_saved(&self, vote: Vote) {
        self.0.lock().unwrap().vote = Some(vote);
    }
}

fn options(disk: &Arc<Disk>, delay: Duration, early: bool) -> StoreOptions {
    StoreOptions {
        durability_hook: Some(disk.clone()),
        append_sync_delay: delay,
        acknowledge_before_sync: early,
        table: TableStorage::Memory,
    }
}

fn submit(index: u64, payload: &[u8]) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Request::at(
            1_000 * index,
            Command::Submit(vec![NewJob {
                queue: "q".to_string(),
                kind: "noop".to_string(),
                payload: payload.to_vec(),
                max_attempts: 3,
                ..NewJob::default()
            }]),
        )),
    }
}

fn submits(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|i| submit(i, format!("job{i}").as_bytes()))
        .collect()
}

async fn indexes(store: &Store) -> anyhow::Result<Vec<u64>> {
    let entries = store.log_store().try_get_log_entries(0..).await?;
    Ok(entries.iter().map(|e| e.log_id.index).collect())
}

/// Every durability point reports an image that covers what was acknowledged: after appends,
/// a vote and a committed id, the newest image names the last entry, the vote and the
/// committed id, and the hook heard of every append callback and the vote.
#[tokio::test]
async fn images_cover_every_acknowledgement() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    let store = Store::open_with(dir.path(), options(&disk, Duration::from_millis(5), false))?;
    let opened = disk.image().expect("opening passes a durability point");
    assert_eq!(opened.log_last, None);
    let mut log = store.log_store();
    log.blocking_append(submits(1..=3)).await?;
    assert_eq!(disk.image().and_then(|i| i.log_last), Some(log_id(1, 1, 3)));
    log.save_committed(Some(log_id(1, 1, 2))).await?;
    log.save_vote(&Vote::new(2, 1)).await?;
    let image = disk.image().expect("an image");
    assert!(image.seq > opened.seq);
    assert_eq!(image.log_last, Some(log_id(1, 1, 3)));
    assert_eq!(image.vote, Some(Vote::new(2, 1)));
    assert_eq!(image.committed, Some(log_id(1, 1, 2)));
    let state = disk.cut();
    assert_eq!(state.acked, Some(log_id(1, 1, 3)));
    assert_eq!(state.vote, Some(Vote::new(2, 1)));
    Ok(())
}

/// An append held by a slow disk when the power goes off fails (its callback reports an
/// error, nothing is acknowledged), and losing unsynced writes removes its entries, which the
/// store had written, while the acknowledged ones stay.
#[tokio::test]
async fn a_power_cut_during_a_slow_append_fails_it_and_drops_its_entries() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    {
        let store = Store::open_with(
            dir.path(),
            options(&disk, Duration::from_millis(300), false),
        )?;
        let mut log = store.log_store();
        log.blocking_append(submits(1..=4)).await?;
        let held = {
            let mut log = log.clone();
            tokio::spawn(async move { log.blocking_append(submits(5..=9)).await })
        };
        // The entries are written (readable) while the append waits for its fsync.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(indexes(&store).await?, (1..=9).collect::<Vec<_>>());
        let state = disk.cut();
        assert!(held.await?.is_err(), "the held append must fail");
        assert_eq!(state.acked, Some(log_id(1, 1, 4)));
        assert_eq!(disk.0.lock().unwrap().acked, Some(log_id(1, 1, 4)));
        // Every later durability point fails too.
        assert!(log.save_vote(&Vote::new(5, 1)).await.is_err());
    }
    let image = disk.image().expect("an image");
    assert_eq!(image.log_last, Some(log_id(1, 1, 4)));
    let lost = lose_unsynced_writes(dir.path(), &image)?;
    assert_eq!(lost.log_entries, 5, "{lost}");
    assert_eq!(lost.log_last_found, Some(log_id(1, 1, 9)));
    let store = Store::open(dir.path())?;
    assert_eq!(indexes(&store).await?, vec![1, 2, 3, 4]);
    assert_eq!(store.log_store().read_vote().await?, None);
    Ok(())
}

/// The deliberately wrong store acknowledges entries without making them durable: a power cut
/// after the callback finds acknowledged entries beyond the last durable image, and losing
/// unsynced writes removes them; a durability point of another operation (here a vote) covers
/// what was written before it.
#[tokio::test]
async fn acknowledging_before_sync_loses_acknowledged_entries() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    {
        let store = Store::open_with(dir.path(), options(&disk, Duration::ZERO, true))?;
        let mut log = store.log_store();
        log.save_vote(&Vote::new(1, 1)).await?;
        log.blocking_append(submits(1..=3)).await?;
        assert_eq!(disk.image().and_then(|i| i.log_last), None);
        log.save_vote(&Vote::new(2, 1)).await?;
        assert_eq!(disk.image().and_then(|i| i.log_last), Some(log_id(1, 1, 3)));
        log.blocking_append(submits(4..=6)).await?;
        let state = disk.cut();
        assert_eq!(state.acked, Some(log_id(1, 1, 6)));
        let image = state.image.expect("an image");
        assert!(
            image.log_last < state.acked,
            "{image} covers the acknowledged entries"
        );
    }
    let image = disk.image().expect("an image");
    let lost = lose_unsynced_writes(dir.path(), &image)?;
    assert_eq!(lost.log_entries, 3, "{lost}");
    let store = Store::open(dir.path())?;
    assert_eq!(indexes(&store).await?, vec![1, 2, 3]);
    assert_eq!(store.log_store().read_vote().await?, Some(Vote::new(2, 1)));
    Ok(())
}

/// Losing unsynced writes puts back the durable vote and committed id, and resets payloads to
/// the snapshot's: a job submitted after the snapshot has no payload until its entry is applied
/// again, and then has it back.
#[tokio::test]
async fn vote_committed_and_payloads_go_back_to_the_durable_state() -> anyhow::Result<()> {
    back_to_the_durable_state(TableStorage::Memory).await
}

/// The same with the job table on disk: its state goes back to the snapshot's too.
#[tokio::test]
async fn with_the_table_on_disk_the_state_goes_back_to_the_durable_state() -> anyhow::Result<()> {
    back_to_the_durable_state(TableStorage::Disk).await
}

async fn back_to_the_durable_state(table: TableStorage) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    let image = {
        let store = Store::open_with(
            dir.path(),
            StoreOptions {
                table,
                ..options(&disk, Duration::ZERO, false)
            },
        )?;
        let mut log = store.log_store();
        let mut sm = store.state_machine(Arc::new(NoopObserver))?;
        log.blocking_append(submits(1..=3)).await?;
        log.save_vote(&Vote::new(3, 1)).await?;
        log.save_committed(Some(log_id(1, 1, 2))).await?;
        sm.apply_entries(submits(1..=2)).await?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        sm.apply_entries(submits(3..=3)).await?;
        assert_eq!(store.payload(3)?, Some(b"job3".to_vec()));
        let image = disk.image().expect("an image");
        assert_eq!(image.committed, Some(log_id(1, 1, 2)));
        // Not durable by themselves: lost with the power.
        log.save_committed(Some(log_id(1, 1, 3))).await?;
        disk.cut();
        image
    };
    let lost = lose_unsynced_writes(dir.path(), &image)?;
    assert_eq!(lost.log_entries, 0, "{lost}");
    assert_eq!(lost.committed_found, Some(Some(log_id(1, 1, 3))), "{lost}");
    assert_eq!((lost.payloads_found, lost.payloads_kept), (3, 2), "{lost}");
    let reopen = StoreOptions {
        table,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path(), reopen)?;
    let mut log = store.log_store();
    assert_eq!(log.read_vote().await?, Some(Vote::new(3, 1)));
    assert_eq!(log.read_committed().await?, Some(log_id(1, 1, 2)));
    assert_eq!(store.payload(3)?, None);
    let mut sm = store.state_machine(Arc::new(NoopObserver))?;
    assert_eq!(sm.last_applied(), Some(log_id(1, 1, 2)));
    sm.apply_entries(submits(3..=3)).await?;
    assert_eq!(store.payload(3)?, Some(b"job3".to_vec()));
    assert_eq!(store.payload(1)?, Some(b"job1".to_vec()));
    Ok(())
}
