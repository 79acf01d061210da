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
//! Snapshot data (what [`openraft::Snapshot::snapshot`] carries, a file: see
//! [`crate::TypeConfig`]): `[FORMAT][postcard(SnapshotBody)]`, where the body is the job table
//! and the payloads of its pending and running jobs. Last applied log id and membership travel
//! in the [`SnapshotMeta`], as openraft expects.
//!
//! **Never one buffer of the whole snapshot**: the data is encoded straight into its file,
//! decoded straight from a file (postcard over a buffered reader), sent to a peer in chunks read
//! from the file, and received from a peer into a file. (What is still whole in memory is the
//! job table itself, the state machine's state, until issue 13.)
//!
//! On disk, in the snapshot directory:
//! - `data-<index>-<micros>-<n>`: snapshot data files, each written once and fsynced;
//! - `pointer`: `[FORMAT][u32 BE meta length][encoded meta][data file name]`, naming the current
//!   snapshot's data file; replaced atomically (temporary name, fsync, rename, fsync the
//!   directory), so a crash leaves either the old or the new snapshot;
//! - `incoming-*`: data being received from a peer; unlinked as soon as it is created, so
//!   nothing is left behind by a crash or a refusal.
//!
//! Data files the pointer does not name are left-overs of an interrupted build and are deleted
//! at start-up. A data directory of the earlier layout (one file `current` holding the header
//! and the data) is converted when the store opens.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::raft_types::SnapshotMeta;
use exactly_core::limits::PAYLOAD_BYTES_CEILING;
use exactly_core::{JobId, JobStatus, JobTable};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode, FORMAT};
use crate::error::{Error, Result};

/// Metadata of a snapshot in exactly's type configuration.
pub type Meta = SnapshotMeta;

/// Bytes of encoded snapshot metadata, at most (it is a log id and a membership config; a
/// larger length in a file header is corruption, not a reason to allocate).
const META_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The pointer to the current snapshot.
const POINTER: &str = "pointer";
/// The name a new pointer is written under before it is renamed over [`POINTER`].
const POINTER_TMP: &str = "pointer.tmp";
/// The earlier layout's single snapshot file (converted at open), and its temporary name.
const LEGACY_CURRENT: &str = "current";
const LEGACY_CURRENT_TMP: &str = "current.tmp";
/// Prefixes of data files and of (unlinked) incoming files.
const DATA_PREFIX: &str = "data-";
const INCOMING_PREFIX: &str = "incoming-";
/// Bytes of a data file name, at most (a longer name in a pointer is corruption).
const DATA_NAME_BYTES_MAX: usize = 128;
/// Buffer sizes for encoding into and decoding from a data file.
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// postcard's scratch space when decoding from a reader: it holds one string or byte string at
/// a time (a payload at most), never the whole snapshot.
const DECODE_SCRATCH_BYTES: usize = PAYLOAD_BYTES_CEILING + 64 * 1024;

/// What snapshot data holds, for decoding.
#[derive(Debug)]
pub(crate) struct SnapshotBody {
    pub(crate) table: JobTable,
    /// Payloads of the table's pending and running jobs, by job id.
    pub(crate) payloads: Vec<(JobId, Vec<u8>)>,
    /// The archived records of the table's finished jobs, encoded as the archive tree holds
    /// them, with [`Records::Keep`] (and with [`Records::Skip`] for data of the earlier format).
    pub(crate) archived: Vec<(JobId, Vec<u8>)>,
    /// The data was of the earlier format, whose table held the finished records: they were
    /// moved out of the table, and the archive tree does not have them yet.
    pub(crate) legacy: bool,
}

/// What decoding does with the archived records: keep them in the body (tests, and the earlier
/// format's records at start-up), only check them (a received snapshot before it is handed to
/// openraft; the node's own snapshot at start-up, whose records the archive tree already
/// holds), or hand each to a sink (an install, which writes them into the archive tree a few
/// at a time, so a snapshot of millions of finished jobs never sits in memory).
pub(crate) enum Records<'a> {
    #[cfg_attr(not(test), allow(dead_code))]
    Keep,
    Skip,
    Into(&'a mut dyn FnMut(JobId, Vec<u8>) -> Result<()>),
}

/// The table and payloads part of snapshot data, for decoding (the earlier format's whole
/// body).
#[derive(Deserialize)]
struct TableAndPayloads {
    table: JobTable,
    payloads: Vec<(JobId, Vec<u8>)>,
}

/// The same, for encoding without cloning the table again.
#[derive(Serialize)]
#[serde(bound = "")]
struct TableAndPayloadsRef<'a, R: exactly_core::records::Records> {
    table: &'a JobTable<R>,
    payloads: Payloads<'a>,
}

/// The payloads a snapshot carries (encoded as the list `Vec<(JobId, Vec<u8>)>` was).
pub(crate) enum Payloads<'a> {
    /// Read into memory (a build from an in-memory table).
    Collected(&'a [(JobId, Vec<u8>)]),
    /// In a tree of their own, id → payload (a build from disk: read one at a time).
    Tree(&'a sled::Tree),
}

impl Serialize for Payloads<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        match self {
            Payloads::Collected(payloads) => payloads.serialize(serializer),
            Payloads::Tree(tree) => {
                let mut seq = serializer.serialize_seq(Some(tree.len()))?;
                for entry in tree.iter() {
                    let (id, payload) = entry.map_err(S::Error::custom)?;
                    let id: [u8; 8] = id.as_ref().try_into().map_err(S::Error::custom)?;
                    seq.serialize_element(&(
                        u64::from_be_bytes(id),
                        serde_bytes::Bytes::new(&payload),
                    ))?;
                }
                seq.end()
            }
        }
    }
}

/// One finished job after the table and payloads: what the table keeps of it, and its archived
/// record (`[FORMAT][postcard(Job)]`, as the archive tree holds it), absent if retention
/// deleted it after the snapshot's point, before the build read it (the log after the
/// snapshot deletes the job again).
#[derive(Serialize)]
struct FinishedRef<'a> {
    id: JobId,
    finished_at_ms: u64,
    status: JobStatus,
    queue: &'a str,
    cancelled_token: u64,
    record: Option<&'a [u8]>,
}

#[derive(Deserialize)]
struct Finished {
    id: JobId,
    finished_at_ms: u64,
    status: JobStatus,
    queue: String,
    cancelled_token: u64,
    record: Option<Vec<u8>>,
}

/// Encodes snapshot data into `w` (buffered by the caller or not: this buffers):
/// `[FORMAT][postcard(table, payloads)][postcard(u64 n)][postcard(finished job)] * n`, the
/// finished jobs in id order with their records read from `archived` one at a time.
pub(crate) fn encode_body_to<R: exactly_core::records::Records>(
    table: &JobTable<R>,
    payloads: Payloads<'_>,
    mut archived: impl FnMut(JobId) -> Result<Option<sled::IVec>>,
    w: impl Write,
) -> Result<()> {
    let encode_err = |e: &dyn std::fmt::Display| Error::Encode {
        what: "snapshot data",
        detail: e.to_string(),
    };
    let mut w = BufWriter::with_capacity(IO_BUFFER_BYTES, w);
    w.write_all(&[FORMAT])
        .map_err(|e| Error::io("writing snapshot data", e))?;
    let mut w =
        postcard::to_io(&TableAndPayloadsRef { table, payloads }, w).map_err(|e| encode_err(&e))?;
    let count = table.finished_jobs().count() as u64;
    w = postcard::to_io(&count, w).map_err(|e| encode_err(&e))?;
    for (id, f) in table.finished_jobs() {
        let record = archived(id)?;
        let entry = FinishedRef {
            id,
            finished_at_ms: f.finished_at_ms,
            status: f.status,
            queue: &f.queue,
            cancelled_token: f.cancelled_token,
            record: record.as_deref(),
        };
        w = postcard::to_io(&entry, w).map_err(|e| encode_err(&e))?;
    }
    w.flush().map_err(|e| Error::io("writing snapshot data", e))
}

/// Encodes snapshot data into memory, with the records in `archive` (tests only; the node
/// never does).
#[cfg(test)]
pub(crate) fn encode_body(
    table: &JobTable,
    payloads: &[(JobId, Vec<u8>)],
    archive: &std::collections::BTreeMap<JobId, exactly_core::Job>,
) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    encode_body_to(
        table,
        Payloads::Collected(payloads),
        |id| {
            archive
                .get(&id)
                .map(|job| encode("archived job", job).map(sled::IVec::from))
                .transpose()
        },
        &mut data,
    )?;
    Ok(data)
}

/// Decodes snapshot data from `r`, to its end, checking the table's own invariants and each
/// archived record against what the table keeps of it: a snapshot comes from disk or from
/// another node, and a table with broken indexes must be refused, not installed. Trailing bytes
/// are corruption. Data of the earlier format (the table and payloads only, the finished
/// records inside the table) is read too, its finished records moved out of the table.
pub(crate) fn decode_body_from(r: impl Read, mut records: Records<'_>) -> Result<SnapshotBody> {
    const WHAT: &str = "snapshot data";
    let mut r = BufReader::with_capacity(IO_BUFFER_BYTES, r);
    let mut version = [0u8; 1];
    r.read_exact(&mut version)
        .map_err(|_| Error::corrupt(WHAT, "empty value"))?;
    if version[0] != FORMAT {
        return Err(Error::corrupt(
            WHAT,
            format!("unknown format version {}", version[0]),
        ));
    }
    let mut scratch = vec![0u8; DECODE_SCRATCH_BYTES];
    let (head, (mut rest, _)): (TableAndPayloads, _) =
        postcard::from_io((r, &mut scratch)).map_err(|e| Error::corrupt(WHAT, e))?;
    let TableAndPayloads {
        mut table,
        payloads,
    } = head;
    let mut probe = [0u8; 1];
    let n = read_some(&mut rest, &mut probe)?;
    let mut archived = Vec::new();
    let legacy = n == 0;
    if legacy {
        // The earlier format: the finished records are in the table.
        for job in table.archive_finished_records() {
            let bytes = encode("archived job", &job)?;
            match &mut records {
                Records::Into(sink) => sink(job.id, bytes)?,
                Records::Keep | Records::Skip => archived.push((job.id, bytes)),
            }
        }
    } else {
        let mut rest = probe.as_slice().chain(rest);
        let (count, (r, _)): (u64, _) =
            postcard::from_io((&mut rest, &mut scratch)).map_err(|e| Error::corrupt(WHAT, e))?;
        let _ = r;
        for _ in 0..count {
            let (f, _): (Finished, _) = postcard::from_io((&mut rest, &mut scratch))
                .map_err(|e| Error::corrupt(WHAT, e))?;
            table
                .restore_finished(
                    f.id,
                    f.finished_at_ms,
                    f.status,
                    &f.queue,
                    f.cancelled_token,
                )
                .map_err(|e| Error::corrupt(WHAT, e))?;
            if let Some(bytes) = f.record {
                let job: exactly_core::Job = decode("archived job", &bytes)?;
                if job.id != f.id
                    || job.status != f.status
                    || job.updated_at_ms != f.finished_at_ms
                    || job.queue != f.queue
                {
                    return Err(Error::corrupt(
                        WHAT,
                        format!("archived record of job {} disagrees with the table", f.id),
                    ));
                }
                match &mut records {
                    Records::Keep => archived.push((f.id, bytes)),
                    Records::Skip => {}
                    Records::Into(sink) => sink(f.id, bytes)?,
                }
            }
        }
        if read_some(&mut rest, &mut [0u8; 1])? != 0 {
            return Err(Error::corrupt(WHAT, "trailing bytes"));
        }
    }
    if legacy && !archived.is_empty() {
        tracing::info!(
            jobs = archived.len(),
            "snapshot of the earlier format: its finished jobs move to the archive"
        );
    }
    table.rebuild_derived();
    table
        .check_invariants()
        .map_err(|e| Error::corrupt(WHAT, e))?;
    Ok(SnapshotBody {
        table,
        payloads,
        archived,
        legacy,
    })
}

/// Reads up to `buf.len()` bytes, retrying interruptions; 0 at the end.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("reading snapshot data", e)),
        }
    }
}

/// Decodes snapshot data held in memory (see [`decode_body_from`]).
pub(crate) fn decode_body(data: &[u8], records: Records<'_>) -> Result<SnapshotBody> {
    decode_body_from(data, records)
}

/// Checks a snapshot's metadata: it has a last log id, and its membership is not after it.
fn check_meta(meta: &Meta) -> Result<()> {
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
    Ok(())
}

/// Checks a snapshot received from a peer completely (metadata consistent, data decodes, the
/// table's invariants hold) without changing anything. The node calls it before it hands the
/// snapshot to openraft, because openraft purges the log up to the snapshot's last log id
/// before the state machine sees the data: a snapshot refused only at install would stop the
/// Raft core and leave a data directory that cannot start again.
pub fn check(meta: &Meta, data: &[u8]) -> Result<()> {
    check_meta(meta)?;
    decode_body(data, Records::Skip).map(|_| ())
}

/// [`check`] for data in a file, read from its start; the file is left at its start.
pub fn check_file(meta: &Meta, file: &mut File) -> Result<()> {
    check_meta(meta)?;
    let rewind = |f: &mut File| {
        f.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("rewinding snapshot data", e))
    };
    rewind(file)?;
    decode_body_from(&mut *file, Records::Skip)?;
    rewind(file).map(|_| ())
}

/// The snapshot directory's path.
pub(crate) fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshot")
}

/// A new, unique data file name.
fn new_data_name(prefix: &str, label: u64) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{prefix}{label}-{micros}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a new data file with `write` and fsyncs it; returns its path. Not yet the current
/// snapshot: see [`point_to`].
pub(crate) fn write_data(
    dir: &Path,
    label: u64,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<PathBuf> {
    let path = dir.join(new_data_name(DATA_PREFIX, label));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("creating a snapshot data file", e))?;
    let written = write(&mut f).and_then(|()| {
        f.sync_all()
            .map_err(|e| Error::io("fsyncing a snapshot data file", e))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// A new anonymous file in the snapshot directory for data received from a peer: created and
/// unlinked at once, so it disappears with its last handle whatever happens.
pub(crate) fn incoming_file(dir: &Path) -> Result<File> {
    let path = dir.join(new_data_name(INCOMING_PREFIX, 0));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("creating a file for an incoming snapshot", e))?;
    fs::remove_file(&path).map_err(|e| Error::io("unlinking an incoming snapshot file", e))?;
    Ok(f)
}

/// Makes the data file `data` (in `dir`) the current snapshot with `meta`, atomically, and
/// fsyncs the directory. The data file must be durable already ([`write_data`]).
pub(crate) fn point_to(dir: &Path, meta: &Meta, data: &Path) -> Result<()> {
    let name = data
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| data.parent() == Some(dir) && valid_data_name(n))
        .ok_or_else(|| Error::corrupt("snapshot pointer", "not a data file of this directory"))?;
    let meta_bytes = encode("snapshot metadata", meta)?;
    let meta_len = u32::try_from(meta_bytes.len()).map_err(|_| Error::Encode {
        what: "snapshot metadata",
        detail: format!("{} bytes do not fit the u32 length", meta_bytes.len()),
    })?;
    let tmp = dir.join(POINTER_TMP);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("creating the snapshot pointer", e))?;
    let write_all = |f: &mut File| -> std::io::Result<()> {
        f.write_all(&[FORMAT])?;
        f.write_all(&meta_len.to_be_bytes())?;
        f.write_all(&meta_bytes)?;
        f.write_all(name.as_bytes())?;
        f.sync_all()
    };
    write_all(&mut f).map_err(|e| Error::io("writing the snapshot pointer", e))?;
    drop(f);
    fs::rename(&tmp, dir.join(POINTER))
        .map_err(|e| Error::io("renaming the snapshot pointer", e))?;
    sync_dir(dir, "fsyncing the snapshot directory")
}

fn valid_data_name(name: &str) -> bool {
    name.len() <= DATA_NAME_BYTES_MAX
        && name.starts_with(DATA_PREFIX)
        && name[DATA_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-')
}

/// The current snapshot's metadata and data file path, if there is one.
pub(crate) fn current(dir: &Path) -> Result<Option<(Meta, PathBuf)>> {
    const WHAT: &str = "snapshot pointer";
    let bytes = match fs::read(dir.join(POINTER)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading the snapshot pointer", e)),
    };
    let (meta, meta_end) = split_header(WHAT, &bytes)?;
    let name = std::str::from_utf8(&bytes[meta_end..])
        .ok()
        .filter(|n| valid_data_name(n))
        .ok_or_else(|| Error::corrupt(WHAT, "not a data file name"))?;
    Ok(Some((meta, dir.join(name))))
}

/// Opens the current snapshot's data file (at its start), if there is one (tests; the store
/// opens it under its lock).
#[cfg(test)]
pub(crate) fn open_current(dir: &Path) -> Result<Option<(Meta, File)>> {
    let Some((meta, path)) = current(dir)? else {
        return Ok(None);
    };
    let f = File::open(&path).map_err(|e| Error::io("opening the snapshot data file", e))?;
    Ok(Some((meta, f)))
}

/// Decodes the `[FORMAT][u32 BE length][meta]` header: returns the metadata and where it ends.
fn split_header(what: &'static str, bytes: &[u8]) -> Result<(Meta, usize)> {
    match bytes.first() {
        Some(&FORMAT) => {}
        Some(v) => return Err(Error::corrupt(what, format!("unknown format version {v}"))),
        None => return Err(Error::corrupt(what, "empty file")),
    }
    let len_bytes: [u8; 4] = bytes
        .get(1..5)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::corrupt(what, "truncated header"))?;
    let meta_len = u32::from_be_bytes(len_bytes) as usize;
    if meta_len > META_BYTES_MAX {
        return Err(Error::corrupt(
            what,
            format!("metadata length {meta_len} exceeds {META_BYTES_MAX}"),
        ));
    }
    let meta_end = 5 + meta_len;
    let meta_bytes = bytes
        .get(5..meta_end)
        .ok_or_else(|| Error::corrupt(what, "truncated metadata"))?;
    let meta: Meta = decode("snapshot metadata", meta_bytes)?;
    Ok((meta, meta_end))
}

/// Start-up: converts the earlier layout, removes a half-written pointer, and deletes data files
/// the pointer does not name (left by a build or an install that a crash interrupted).
pub(crate) fn recover(dir: &Path) -> Result<()> {
    remove_if_present(&dir.join(POINTER_TMP))?;
    remove_if_present(&dir.join(LEGACY_CURRENT_TMP))?;
    convert_legacy(dir)?;
    let keep = current(dir)?.map(|(_, path)| path);
    let entries = fs::read_dir(dir).map_err(|e| Error::io("listing the snapshot directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing the snapshot directory", e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let leftover = (name.starts_with(DATA_PREFIX) && Some(entry.path()) != keep)
            || name.starts_with(INCOMING_PREFIX);
        if leftover {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// The earlier layout kept header and data in one file, `current`: its data is copied into a
/// data file, the pointer written, and `current` removed (in that order, so a crash at any
/// point converts again or is done).
fn convert_legacy(dir: &Path) -> Result<()> {
    const WHAT: &str = "snapshot file";
    let legacy = dir.join(LEGACY_CURRENT);
    let mut f = match File::open(&legacy) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("opening the snapshot file", e)),
    };
    let mut header = [0u8; 5];
    f.read_exact(&mut header)
        .map_err(|e| Error::corrupt(WHAT, format!("reading the header: {e}")))?;
    let meta_len = (u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize)
        .min(META_BYTES_MAX + 1);
    let mut bytes = header.to_vec();
    bytes.resize(5 + meta_len, 0);
    f.read_exact(&mut bytes[5..])
        .map_err(|e| Error::corrupt(WHAT, format!("reading the metadata: {e}")))?;
    let (meta, _) = split_header(WHAT, &bytes)?;
    let label = meta.last_log_id.map_or(0, |l| l.index);
    let data = write_data(dir, label, |out| {
        std::io::copy(&mut f, out)
            .map(|_| ())
            .map_err(|e| Error::io("converting the snapshot file", e))
    })?;
    point_to(dir, &meta, &data)?;
    fs::remove_file(&legacy).map_err(|e| Error::io("removing the converted snapshot file", e))?;
    sync_dir(dir, "fsyncing the snapshot directory")?;
    tracing::info!(snapshot = %meta, "converted the snapshot file to the pointer layout");
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing a snapshot left-over", e)),
    }
}

/// Removes a data file that is no longer current (its open handles keep it readable).
pub(crate) fn remove_data(path: &Path) -> Result<()> {
    remove_if_present(path)
}

/// The size of the current snapshot (pointer and data file) in bytes (0 if there is none).
pub(crate) fn size(dir: &Path) -> Result<u64> {
    let Some((_, data)) = current(dir)? else {
        return Ok(0);
    };
    let len = |p: &Path| match fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io("reading the snapshot's size", e)),
    };
    Ok(len(&dir.join(POINTER))? + len(&data)?)
}

/// fsyncs a directory so that the names created or renamed in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path, context: &'static str) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(context, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn meta(index: u64) -> Meta {
        Meta {
            last_log_id: Some(crate::raft_types::log_id(3, 1, index)),
            last_membership: Default::default(),
        }
    }

    /// A snapshot's data file and pointer round-trip, a damaged pointer is corruption, and
    /// start-up removes data files the pointer does not name and a half-written pointer.
    #[test]
    fn pointer_and_data_round_trip_and_leftovers_go() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        assert!(current(dir).unwrap().is_none());
        assert_eq!(size(dir).unwrap(), 0);
        let data = write_data(dir, 42, |f| {
            encode_body_to(
                &JobTable::new(),
                Payloads::Collected(&[(1, vec![1, 2, 3])]),
                |_| Ok(None),
                f,
            )
        })
        .unwrap();
        point_to(dir, &meta(42), &data).unwrap();
        let (back_meta, mut f) = open_current(dir).unwrap().unwrap();
        assert_eq!(back_meta, meta(42));
        check_file(&meta(42), &mut f).unwrap();
        let body = decode_body_from(&mut f, Records::Keep).unwrap();
        assert_eq!(body.table, JobTable::new());
        assert_eq!(body.payloads, vec![(1, vec![1, 2, 3])]);
        assert!(size(dir).unwrap() > 0);

        let orphan = write_data(dir, 43, |f| {
            f.write_all(b"x").map_err(|e| Error::io("t", e))
        })
        .unwrap();
        fs::write(dir.join(POINTER_TMP), b"half").unwrap();
        recover(dir).unwrap();
        assert!(!orphan.exists() && !dir.join(POINTER_TMP).exists());
        assert!(data.exists(), "the current data file is kept");
        assert_eq!(current(dir).unwrap().unwrap().0, meta(42));

        fs::write(dir.join(POINTER), [FORMAT, 0, 0, 9]).unwrap();
        assert!(current(dir).unwrap_err().is_corruption());
        let mut pointer = vec![FORMAT];
        let meta_bytes = encode("m", &meta(1)).unwrap();
        pointer.extend((meta_bytes.len() as u32).to_be_bytes());
        pointer.extend(meta_bytes);
        pointer.extend(b"../../etc/passwd");
        fs::write(dir.join(POINTER), pointer).unwrap();
        assert!(
            current(dir).unwrap_err().is_corruption(),
            "names stay in the directory"
        );
    }

    /// A data directory of the earlier layout (header and data in one `current` file) is
    /// converted at start-up, with the same metadata and data.
    #[test]
    fn the_earlier_layout_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let data = encode_body(
            &JobTable::new(),
            &[(7, b"seven".to_vec())],
            &Default::default(),
        )
        .unwrap();
        let meta_bytes = encode("m", &meta(9)).unwrap();
        let mut legacy = vec![FORMAT];
        legacy.extend((meta_bytes.len() as u32).to_be_bytes());
        legacy.extend(meta_bytes);
        legacy.extend(&data);
        fs::write(dir.join(LEGACY_CURRENT), legacy).unwrap();
        recover(dir).unwrap();
        assert!(!dir.join(LEGACY_CURRENT).exists());
        let (back, mut f) = open_current(dir).unwrap().unwrap();
        assert_eq!(back, meta(9));
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, data);
    }

    /// Found by the snapshot fuzz target: a table claiming 2^50 idempotency keys aborted the
    /// process (the persistent map reserved room for the claim); it is refused.
    #[test]
    fn a_huge_length_claim_is_refused_not_allocated() {
        let data = [
            FORMAT, 1, 0, 0, 0, 0, 0, 0, 0, 210, 255, 255, 255, 255, 254, 255, 46,
        ];
        assert!(decode_body(&data, Records::Keep)
            .unwrap_err()
            .is_corruption());
        assert!(check(&meta(10), &data).unwrap_err().is_corruption());
    }

    /// Every input the snapshot fuzz target once broke (kept in
    /// `crates/exactly-fuzz/regressions/snapshot/`) is refused or accepted, never a panic or an
    /// abort.
    #[test]
    fn inputs_the_fuzzer_once_broke_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../exactly-fuzz/regressions/snapshot");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let _ = check(&meta(10), &data);
            seen += 1;
        }
        assert!(seen > 0, "no regression inputs in {}", dir.display());
    }

    /// Decoding from a reader refuses what decoding from bytes refuses: another version,
    /// truncation, trailing bytes; an incoming file is gone from the directory at once.
    #[test]
    fn decoding_from_a_reader_refuses_damage() {
        let data = encode_body(
            &JobTable::new(),
            &[(1, vec![9; 100_000])],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            decode_body(&data, Records::Keep).unwrap().payloads[0]
                .1
                .len(),
            100_000
        );
        let mut other = data.clone();
        other[0] = FORMAT + 1;
        assert!(decode_body(&other, Records::Keep)
            .unwrap_err()
            .is_corruption());
        // (Cut by one byte, the data of an empty table is that of the earlier format, which
        // is the same state: the cut is found when the table lists finished jobs.)
        assert!(decode_body(&data[..data.len() - 2], Records::Keep)
            .unwrap_err()
            .is_corruption());
        let mut trailing = data.clone();
        trailing.push(0);
        assert!(decode_body(&trailing, Records::Keep)
            .unwrap_err()
            .is_corruption());
        assert!(decode_body(&[], Records::Keep).unwrap_err().is_corruption());

        let dir = tempfile::tempdir().unwrap();
        let mut f = incoming_file(dir.path()).unwrap();
        f.write_all(&data).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        check_file(&meta(1), &mut f).unwrap();
    }

    /// The entries of the format-4 fixture: a node, four jobs; one succeeds, one is cancelled
    /// while running, one dies, one stays pending.
    pub(crate) fn format4_fixture_entries() -> Vec<(u64, exactly_core::Request)> {
        use exactly_core::{Assignment, Command, Completion, NewJob, NodeRegistration, Outcome};
        let job = |queue: &str, payload: &[u8], edit: &dyn Fn(&mut NewJob)| {
            let mut j = NewJob {
                queue: queue.to_string(),
                kind: "send".to_string(),
                payload: payload.to_vec(),
                max_attempts: 3,
                ..NewJob::default()
            };
            edit(&mut j);
            j
        };
        let at = |i: u64, command| (i, exactly_core::Request::at(1_000_000 + i, command));
        let assign = |job| Assignment {
            job,
            node: 1,
            incarnation: 1,
        };
        vec![
            at(
                1,
                Command::RegisterNode(NodeRegistration {
                    node: 1,
                    incarnation: 1,
                    slots: 4,
                    addr: "n1".to_string(),
                    applied: 0,
                }),
            ),
            at(
                2,
                Command::Submit(vec![
                    job("mail", b"a", &|_| {}),
                    job("mail", b"b", &|j| {
                        j.idempotency_key = Some("k2".to_string())
                    }),
                    job("report", b"c", &|j| j.max_attempts = 1),
                    job("mail", b"d", &|_| {}),
                ]),
            ),
            at(3, Command::Assign(vec![assign(1), assign(2), assign(3)])),
            at(
                4,
                Command::Complete(vec![
                    Completion {
                        job: 1,
                        token: 3,
                        outcome: Outcome::Succeeded {
                            result: b"ok".to_vec(),
                        },
                    },
                    Completion {
                        job: 3,
                        token: 3,
                        outcome: Outcome::Failed {
                            error: "no".to_string(),
                            retryable: false,
                        },
                    },
                ]),
            ),
            at(5, Command::Cancel(vec![2])),
        ]
    }

    /// Archived records by job id.
    pub(crate) type Archived = std::collections::BTreeMap<JobId, exactly_core::Job>;

    /// Applies the fixture's entries with this code: the table, its payloads and the archive
    /// its effects made.
    pub(crate) fn fixture_state() -> (JobTable, Vec<(JobId, Vec<u8>)>, Archived) {
        use exactly_core::Effect;
        let mut table = JobTable::new();
        let mut payloads = std::collections::BTreeMap::new();
        let mut archive = std::collections::BTreeMap::new();
        for (i, r) in format4_fixture_entries() {
            for e in table.apply(i, r).1 {
                match e {
                    Effect::StorePayload { job, payload } => {
                        payloads.insert(job, payload);
                    }
                    Effect::DropPayload { job } => {
                        payloads.remove(&job);
                    }
                    Effect::Archive(job) => {
                        archive.insert(job.id, *job);
                    }
                    Effect::Unarchive { job } => {
                        archive.remove(&job);
                    }
                    _ => {}
                }
            }
        }
        table.check_invariants().unwrap();
        (table, payloads.into_iter().collect(), archive)
    }

    /// Snapshot data written by the release before finished records left the table (format 4,
    /// the table and payloads only; `tests/fixtures/snapshot-format4.bin`, made from
    /// [`format4_fixture_entries`] by that release) is read: its succeeded and cancelled
    /// records move out of the table into the archive, and the result is what this release
    /// makes of the same entries.
    #[test]
    fn snapshot_data_of_the_earlier_format_is_read() {
        let data = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/snapshot-format4.bin"),
        )
        .unwrap();
        let (table, payloads, archive) = fixture_state();
        assert_eq!(archive.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        for records in [Records::Keep, Records::Skip] {
            let body = decode_body(&data, records).unwrap();
            assert!(body.legacy);
            assert!(body.table == table, "the migrated table differs");
            assert_eq!(body.payloads, payloads);
            let archived: Vec<(JobId, exactly_core::Job)> = body
                .archived
                .iter()
                .map(|(id, bytes)| (*id, decode("archived job", bytes).unwrap()))
                .collect();
            assert_eq!(archived, archive.clone().into_iter().collect::<Vec<_>>());
        }
        check(&meta(5), &data).unwrap();
    }

    /// Snapshot data as this release writes it (the table, payloads, then finished jobs with
    /// their records) is the golden file's, byte for byte, and the golden file reads back as the
    /// same state: a change to the table's or a record's encoding fails here until the format
    /// version is bumped.
    #[test]
    fn golden_snapshot_data_reads_and_writes_as_this_format() {
        let (table, payloads, archive) = fixture_state();
        let data = encode_body(&table, &payloads, &archive).unwrap();
        let golden = crate::codec::golden::golden("snapshot-format4-archive.bin", &data);
        let body = decode_body(&golden, Records::Keep).unwrap();
        assert!(!body.legacy);
        assert!(body.table == table, "the golden table differs");
        assert_eq!(body.payloads, payloads);
        assert_eq!(body.archived.len(), archive.len());
        assert!(
            data == golden,
            "this build encodes snapshot data differently from the golden file: bump the format"
        );
    }

    /// This format carries the finished jobs after the table, with their records: they come
    /// back as they were (or are only checked, with `Records::Skip`); a record deleted before
    /// the build read it is left out; a record that disagrees with the table is refused.
    #[test]
    fn finished_jobs_travel_after_the_table() {
        let (table, payloads, archive) = fixture_state();
        let data = encode_body(&table, &payloads, &archive).unwrap();
        let body = decode_body(&data, Records::Keep).unwrap();
        assert!(!body.legacy);
        assert!(body.table == table);
        assert_eq!(body.payloads, payloads);
        let expected: Vec<(JobId, Vec<u8>)> = archive
            .iter()
            .map(|(id, job)| (*id, encode("archived job", job).unwrap()))
            .collect();
        assert_eq!(body.archived, expected);
        let skipped = decode_body(&data, Records::Skip).unwrap();
        assert!(skipped.table == table && skipped.archived.is_empty());

        let mut partial = archive.clone();
        partial.remove(&1);
        let body = decode_body(
            &encode_body(&table, &payloads, &partial).unwrap(),
            Records::Keep,
        )
        .unwrap();
        assert!(body.table == table, "the table still lists the job");
        assert_eq!(body.archived.len(), 1);

        let mut forged = archive.clone();
        forged.get_mut(&2).unwrap().status = JobStatus::Succeeded;
        let err = decode_body(
            &encode_body(&table, &payloads, &forged).unwrap(),
            Records::Skip,
        )
        .unwrap_err();
        assert!(err.is_corruption(), "{err}");

        let mut longer = data.clone();
        longer.push(0);
        assert!(decode_body(&longer, Records::Skip)
            .unwrap_err()
            .is_corruption());
        let shorter = &data[..data.len() - 1];
        assert!(decode_body(shorter, Records::Skip)
            .unwrap_err()
            .is_corruption());
    }
}
