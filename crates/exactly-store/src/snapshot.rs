//! The snapshot formats: the snapshot *data* openraft ships between nodes, and the snapshot
//! *file* that keeps the current snapshot in the data directory.
//!
//! **Deviation from the first design:** the current snapshot lives in a file
//! (`<dir>/snapshot/current`), not in a sled tree. sled keeps every value it has read or written
//! in its page cache and writes values above ~128 KiB as separate, never-fsynced blob files, so
//! a snapshot of a large job table held in sled would stay in memory and need the blob fsync
//! dance on every build. A file written to a temporary name, fsynced and renamed over the old
//! one is atomic, costs no memory at rest, and is read only when openraft asks for it.
//!
//! Snapshot data (what [`openraft::Snapshot::snapshot`] carries):
//! `[FORMAT][postcard(SnapshotBody)]`, where the body is the job table and the payloads of
//! its pending and running jobs. Last applied log id and membership travel in the
//! [`SnapshotMeta`], as openraft expects.
//!
//! Snapshot file: `[FORMAT][u32 BE meta length][encoded meta][snapshot data]`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use exactly_core::{JobId, JobTable};
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode, FORMAT};
use crate::error::{Error, Result};

/// Metadata of a snapshot in exactly's type configuration.
pub type Meta = SnapshotMeta<u64, BasicNode>;

/// Bytes of encoded snapshot metadata, at most (it is a log id and a membership config; a
/// larger length in a file header is corruption, not a reason to allocate).
const META_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The name of the current snapshot file inside the snapshot directory.
const CURRENT: &str = "current";
/// The name a new snapshot file is written under before it is renamed over [`CURRENT`].
const CURRENT_TMP: &str = "current.tmp";

/// What snapshot data holds, for decoding.
#[derive(Deserialize)]
pub(crate) struct SnapshotBody {
    pub(crate) table: JobTable,
    /// Payloads of the table's pending and running jobs, by job id.
    pub(crate) payloads: Vec<(JobId, Vec<u8>)>,
}

/// What snapshot data holds, for encoding without cloning the table again.
#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    table: &'a JobTable,
    payloads: &'a [(JobId, Vec<u8>)],
}

/// Encodes snapshot data.
pub(crate) fn encode_body(table: &JobTable, payloads: &[(JobId, Vec<u8>)]) -> Result<Vec<u8>> {
    encode("snapshot data", &SnapshotBodyRef { table, payloads })
}

/// Decodes snapshot data, checking the table's own invariants: a snapshot comes from disk or
/// from another node, and a table with broken indexes must be refused, not installed.
pub(crate) fn decode_body(data: &[u8]) -> Result<SnapshotBody> {
    let mut body: SnapshotBody = decode("snapshot data", data)?;
    body.table.rebuild_derived();
    body.table
        .check_invariants()
        .map_err(|e| Error::corrupt("snapshot data", e))?;
    Ok(body)
}

/// Checks a snapshot received from a peer completely (metadata consistent, data decodes, the
/// table's invariants hold) without changing anything. The node calls it before it hands the
/// snapshot to openraft, because openraft purges the log up to the snapshot's last log id
/// before the state machine sees the data: a snapshot refused only at install would stop the
/// Raft core and leave a data directory that cannot start again.
pub fn check(meta: &Meta, data: &[u8]) -> Result<()> {
    if meta.last_log_id.is_none() {
        return Err(Error::corrupt(
            "snapshot metadata",
            "a snapshot without a last log id",
        ));
    }
    if meta.last_membership.log_id() > &meta.last_log_id {
        return Err(Error::corrupt(
            "snapshot metadata",
            format!(
                "membership at {:?} is after the last log id {:?}",
                meta.last_membership.log_id(),
                meta.last_log_id
            ),
        ));
    }
    decode_body(data).map(|_| ())
}

/// The snapshot directory's path.
pub(crate) fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshot")
}

/// Writes the current snapshot durably: to a temporary file, fsync, rename over the current
/// file, fsync the directory. A crash at any point leaves either the old or the new snapshot.
pub(crate) fn write(dir: &Path, meta: &Meta, data: &[u8]) -> Result<()> {
    let meta_bytes = encode("snapshot metadata", meta)?;
    let meta_len = u32::try_from(meta_bytes.len()).map_err(|_| Error::Encode {
        what: "snapshot metadata",
        detail: format!("{} bytes do not fit the u32 length", meta_bytes.len()),
    })?;
    let tmp = dir.join(CURRENT_TMP);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("creating the snapshot file", e))?;
    let write_all = |f: &mut File| -> std::io::Result<()> {
        f.write_all(&[FORMAT])?;
        f.write_all(&meta_len.to_be_bytes())?;
        f.write_all(&meta_bytes)?;
        f.write_all(data)?;
        f.sync_all()
    };
    write_all(&mut f).map_err(|e| Error::io("writing the snapshot file", e))?;
    drop(f);
    fs::rename(&tmp, dir.join(CURRENT)).map_err(|e| Error::io("renaming the snapshot file", e))?;
    sync_dir(dir, "fsyncing the snapshot directory")
}

/// Reads the current snapshot, if there is one.
pub(crate) fn read(dir: &Path) -> Result<Option<(Meta, Vec<u8>)>> {
    let mut f = match File::open(dir.join(CURRENT)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("opening the snapshot file", e)),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::io("reading the snapshot file", e))?;
    let (meta, data_start) = split_file(&bytes)?;
    bytes.drain(..data_start);
    Ok(Some((meta, bytes)))
}

/// Reads only the current snapshot's metadata (not its data), if there is one.
pub(crate) fn read_meta(dir: &Path) -> Result<Option<Meta>> {
    const WHAT: &str = "snapshot file";
    let f = match File::open(dir.join(CURRENT)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("opening the snapshot file", e)),
    };
    let mut f = std::io::BufReader::new(f);
    let mut header = [0u8; 5];
    f.read_exact(&mut header)
        .map_err(|e| Error::corrupt(WHAT, format!("reading the header: {e}")))?;
    let meta_len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if meta_len > META_BYTES_MAX {
        return Err(Error::corrupt(
            WHAT,
            format!("metadata length {meta_len} exceeds {META_BYTES_MAX}"),
        ));
    }
    let mut bytes = header.to_vec();
    bytes.resize(5 + meta_len, 0);
    f.read_exact(&mut bytes[5..])
        .map_err(|e| Error::corrupt(WHAT, format!("reading the metadata: {e}")))?;
    split_file(&bytes).map(|(meta, _)| Some(meta))
}

/// Decodes the framing of a snapshot file: returns the metadata and where the data starts.
fn split_file(bytes: &[u8]) -> Result<(Meta, usize)> {
    const WHAT: &str = "snapshot file";
    match bytes.first() {
        Some(&FORMAT) => {}
        Some(v) => return Err(Error::corrupt(WHAT, format!("unknown format version {v}"))),
        None => return Err(Error::corrupt(WHAT, "empty file")),
    }
    let len_bytes: [u8; 4] = bytes
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::corrupt(WHAT, "truncated header"))?;
    let meta_end = 5usize.saturating_add(u32::from_be_bytes(len_bytes) as usize);
    let meta_bytes = bytes
        .get(5..meta_end)
        .ok_or_else(|| Error::corrupt(WHAT, "truncated metadata"))?;
    let meta: Meta = decode("snapshot metadata", meta_bytes)?;
    Ok((meta, meta_end))
}

/// Removes a temporary snapshot file left by a crash during [`write`].
pub(crate) fn remove_leftovers(dir: &Path) -> Result<()> {
    match fs::remove_file(dir.join(CURRENT_TMP)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing a temporary snapshot file", e)),
    }
}

/// The size of the current snapshot file in bytes (0 if there is none).
pub(crate) fn size(dir: &Path) -> Result<u64> {
    match fs::metadata(dir.join(CURRENT)) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io("reading the snapshot file's size", e)),
    }
}

/// fsyncs a directory so that the names created or renamed in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path, context: &'static str) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(context, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot file round-trips its metadata and data, and a damaged header is corruption.
    #[test]
    fn snapshot_file_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let meta = Meta {
            last_log_id: Some(openraft::testing::log_id(3, 1, 42)),
            last_membership: Default::default(),
            snapshot_id: "s-1".to_string(),
        };
        let data = encode_body(&JobTable::new(), &[(1, vec![1, 2, 3])]).unwrap();
        write(dir.path(), &meta, &data).unwrap();
        let (back_meta, back_data) = read(dir.path()).unwrap().unwrap();
        assert_eq!(back_meta, meta);
        assert_eq!(read_meta(dir.path()).unwrap(), Some(meta.clone()));
        assert_eq!(back_data, data);
        let body = decode_body(&back_data).unwrap();
        assert_eq!(body.table, JobTable::new());
        assert_eq!(body.payloads, vec![(1, vec![1, 2, 3])]);

        fs::write(dir.path().join(CURRENT), [FORMAT, 0, 0, 9]).unwrap();
        assert!(read(dir.path()).unwrap_err().is_corruption());
        assert!(read_meta(dir.path()).unwrap_err().is_corruption());
    }
}
