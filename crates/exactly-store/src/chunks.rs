//! The state tree's layout: the job table's records packed into chunks of a few KiB, each one
//! sled key, instead of one sled key per record.
//!
//! sled 0.34 pays per key: each write is a log record of its own (~5 µs), each key costs index
//! memory and ~1.5 KB of file space once its pages are rewritten. A pending job is three or four
//! records of a few dozen bytes (its record, its ready entry, its key and age entry), so the
//! records are grouped by key order into chunks: a chunk's sled key is the lower bound of the
//! keys it holds (inclusive; the next chunk's sled key is the upper bound, exclusive), and its
//! value is its records in key order, each key stored as the length it shares with the previous
//! key and the rest (job ids and queue names share most of their bytes).
//!
//! Everything here is pure: encoding, decoding (which refuses anything but strictly increasing
//! keys), and [`rewrite`], which says what sled writes a chunk and the changes to its range
//! become. `SledRecords` does the I/O.
//!
//! **Invariant:** every chunk's sled key is at most its first record's key, and its last
//! record's key is below the next chunk's sled key; no chunk is empty.

use serde::{Deserialize, Serialize};

/// The size a chunk is cut at: a chunk grows up to it and is then split. Appends (new keys
/// after every key of the chunk: new job ids, new finish times) fill chunks to it; inserts in
/// the middle split a full chunk in halves.
pub const CHUNK_BYTES_MAX: usize = 4096;

/// The size a chunk of the spaces whose records arrive in no order of their keys (idempotency
/// keys, ordering lines) is cut at: a new record there rewrites a chunk of its own, so those
/// chunks are kept small.
pub const SCATTERED_CHUNK_BYTES_MAX: usize = 1024;

/// The size chunks starting with `key` (a full key: its space's byte first) are cut at.
pub fn chunk_bytes_max(key: &[u8]) -> usize {
    const KEYS: u8 = exactly_core::records::Space::Keys as u8;
    const LINES: u8 = exactly_core::records::Space::Lines as u8;
    match key.first() {
        Some(&KEYS) | Some(&LINES) => SCATTERED_CHUNK_BYTES_MAX,
        _ => CHUNK_BYTES_MAX,
    }
}

/// A chunk's records in key order: (full key, value).
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The format of a chunk's value (the first byte).
const CHUNK_FORMAT: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Encoded<'a> {
    #[serde(borrow)]
    entries: Vec<EncodedEntry<'a>>,
}

#[derive(Serialize, Deserialize)]
struct EncodedEntry<'a> {
    /// How many leading bytes the key shares with the previous record's key.
    shared: u32,
    #[serde(with = "serde_bytes", borrow)]
    suffix: &'a [u8],
    #[serde(with = "serde_bytes", borrow)]
    value: &'a [u8],
}

fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A chunk's value for `entries` (in strictly increasing key order).
pub fn encode(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut previous: &[u8] = &[];
    let encoded = Encoded {
        entries: entries
            .iter()
            .map(|(key, value)| {
                let shared = shared_len(previous, key);
                previous = key;
                EncodedEntry {
                    shared: u32::try_from(shared).expect("record keys are short"),
                    suffix: &key[shared..],
                    value,
                }
            })
            .collect(),
    };
    postcard::to_extend(&encoded, vec![CHUNK_FORMAT]).expect("a chunk encodes into a Vec")
}

/// The records of a chunk's value, or why it is not one.
pub fn decode(bytes: &[u8]) -> Result<Entries, String> {
    let Some((&format, body)) = bytes.split_first() else {
        return Err("an empty chunk value".to_string());
    };
    if format != CHUNK_FORMAT {
        return Err(format!("chunk format {format}, expected {CHUNK_FORMAT}"));
    }
    let encoded: Encoded<'_> = postcard::from_bytes(body).map_err(|e| format!("a chunk: {e}"))?;
    let mut entries: Entries = Vec::with_capacity(encoded.entries.len());
    for entry in encoded.entries {
        let previous = entries.last().map(|(k, _)| k.as_slice()).unwrap_or(&[]);
        let shared = entry.shared as usize;
        if shared > previous.len() {
            return Err(format!(
                "a chunk's key shares {shared} bytes with a key of {}",
                previous.len()
            ));
        }
        let key = [&previous[..shared], entry.suffix].concat();
        if !entries.is_empty() && key.as_slice() <= previous {
            return Err("a chunk's keys are not in increasing order".to_string());
        }
        entries.push((key, entry.value.to_vec()));
    }
    Ok(entries)
}

/// About what a record costs in a chunk's value (its lengths' varints counted as 3 bytes).
fn entry_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 3
}

/// The sled writes (sled key → new value, or `None`: remove) that give the chunk `chunk` (its
/// sled key, `None` if the range has none yet) holding `old` the `changes` (full keys in
/// increasing order, all within the chunk's range; `None` removes): the chunk rewritten,
/// removed once empty, or split into chunks of at most `max_bytes` (appends fill each chunk in
/// turn; anything else splits in halves). Nothing if nothing changed.
pub fn rewrite(
    chunk: Option<&[u8]>,
    old: Entries,
    changes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    max_bytes: usize,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let appended = match (old.last(), changes.first()) {
        (Some((last, _)), Some((first, _))) => first > last,
        _ => true,
    };
    let mut merged: Entries = Vec::with_capacity(old.len() + changes.len());
    let mut changed = false;
    let mut old = old.into_iter().peekable();
    for (key, value) in changes {
        while let Some(entry) = old.next_if(|(k, _)| *k < key) {
            merged.push(entry);
        }
        let before = old.next_if(|(k, _)| *k == key).map(|(_, v)| v);
        changed |= before != value;
        if let Some(value) = value {
            merged.push((key, value));
        }
    }
    merged.extend(old);
    if !changed {
        return Vec::new();
    }
    if merged.is_empty() {
        return chunk.map(|c| (c.to_vec(), None)).into_iter().collect();
    }
    let pieces = split(merged, appended, max_bytes);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let key = match (i, chunk) {
                (0, Some(c)) => c.to_vec(),
                _ => piece[0].0.clone(),
            };
            (key, Some(encode(&piece)))
        })
        .collect()
}

/// `entries` cut into chunks of at most `max_bytes` (one if they fit): filled in turn when
/// `appended`, else in pieces of about equal size.
fn split(entries: Entries, appended: bool, max_bytes: usize) -> Vec<Entries> {
    let total: usize = entries.iter().map(|(k, v)| entry_bytes(k, v)).sum();
    if total <= max_bytes {
        return vec![entries];
    }
    let target = if appended {
        max_bytes
    } else {
        total.div_ceil(total.div_ceil(max_bytes)).max(1)
    };
    let mut pieces = Vec::new();
    let mut piece: Entries = Vec::new();
    let mut bytes = 0;
    for (key, value) in entries {
        let size = entry_bytes(&key, &value);
        if !piece.is_empty() && bytes + size > max_bytes {
            pieces.push(std::mem::take(&mut piece));
            bytes = 0;
        }
        bytes += size;
        piece.push((key, value));
        if bytes >= target {
            pieces.push(std::mem::take(&mut piece));
            bytes = 0;
        }
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(keys: &[u64]) -> Entries {
        keys.iter()
            .map(|k| (k.to_be_bytes().to_vec(), vec![*k as u8; 4]))
            .collect()
    }

    #[test]
    fn a_chunk_decodes_to_what_was_encoded() {
        for keys in [vec![], vec![1], vec![1, 2, 3, 256, 65_536, u64::MAX]] {
            let e = entries(&keys);
            assert_eq!(decode(&encode(&e)).unwrap(), e);
        }
        let e = vec![
            (b"a".to_vec(), vec![]),
            (b"ab".to_vec(), b"x".to_vec()),
            (b"b".to_vec(), vec![]),
        ];
        assert_eq!(decode(&encode(&e)).unwrap(), e);
    }

    #[test]
    fn a_chunk_with_keys_out_of_order_or_a_bad_prefix_is_refused() {
        // (shared, suffix) pairs, encoded as they are, unchecked.
        let raw = |entries: &[(u32, &'static [u8])]| {
            let encoded = Encoded {
                entries: entries
                    .iter()
                    .map(|&(shared, suffix)| EncodedEntry {
                        shared,
                        suffix,
                        value: b"",
                    })
                    .collect(),
            };
            postcard::to_extend(&encoded, vec![CHUNK_FORMAT]).unwrap()
        };
        let backwards = raw(&[(0, b"b"), (0, b"a")]);
        assert!(decode(&backwards).unwrap_err().contains("increasing"));
        let too_shared = raw(&[(2, b"a")]);
        assert!(decode(&too_shared).unwrap_err().contains("shares"));
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0]).unwrap_err().contains("format"));
        assert!(decode(&[CHUNK_FORMAT, 1, 0]).is_err());
    }

    /// Each written chunk's sled key and the record keys it holds.
    fn cut_of(writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<(Vec<u8>, Vec<u64>)> {
        writes
            .iter()
            .map(|(k, v)| (k.clone(), keys_of(v.as_ref().unwrap())))
            .collect()
    }

    fn keys_of(value: &[u8]) -> Vec<u64> {
        decode(value)
            .unwrap()
            .into_iter()
            .map(|(k, _)| u64::from_be_bytes(k.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn appends_fill_chunks_in_turn_and_inserts_split_in_halves() {
        // 15 bytes per record: 8-byte key, 4-byte value, 3.
        let max = 15 * 4;
        let changes = |keys: &[u64]| -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
            entries(keys)
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect()
        };
        let writes = rewrite(None, vec![], changes(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), max);
        let cut = cut_of(&writes);
        assert_eq!(
            cut,
            vec![
                (1u64.to_be_bytes().to_vec(), vec![1, 2, 3, 4]),
                (5u64.to_be_bytes().to_vec(), vec![5, 6, 7, 8]),
                (9u64.to_be_bytes().to_vec(), vec![9]),
            ]
        );
        // A chunk whose lower bound is 0 gets a record in its middle: halves, the first keeps
        // the chunk's sled key.
        let writes = rewrite(
            Some(&0u64.to_be_bytes()),
            entries(&[10, 20, 30, 40]),
            changes(&[25]),
            max,
        );
        let cut = cut_of(&writes);
        assert_eq!(
            cut,
            vec![
                (0u64.to_be_bytes().to_vec(), vec![10, 20, 25]),
                (30u64.to_be_bytes().to_vec(), vec![30, 40]),
            ]
        );
    }

    #[test]
    fn an_emptied_chunk_is_removed_and_an_unchanged_one_not_written() {
        let chunk = 5u64.to_be_bytes();
        let gone: Vec<_> = entries(&[5, 6])
            .into_iter()
            .map(|(k, _)| (k, None))
            .collect();
        assert_eq!(
            rewrite(Some(&chunk), entries(&[5, 6]), gone, 4096),
            vec![(chunk.to_vec(), None)]
        );
        let same: Vec<_> = entries(&[6])
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .chain([(7u64.to_be_bytes().to_vec(), None)])
            .collect();
        assert!(rewrite(Some(&chunk), entries(&[5, 6]), same, 4096).is_empty());
        let nothing = vec![(7u64.to_be_bytes().to_vec(), None)];
        assert!(rewrite(None, vec![], nothing, 4096).is_empty());
    }
}
