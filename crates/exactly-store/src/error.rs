//! `store::Error`: what can go wrong below the state machine, split into what an operator can fix
//! (I/O, a locked directory) and what means the node must stop (corruption, lost durability).

use std::path::PathBuf;

/// An error of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an I/O operation (disk full, permissions, a missing device).
    /// Not corruption: fixing the environment and restarting is enough.
    #[error("storage I/O failed while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Data read from the data directory cannot be decoded or breaks an invariant of the format.
    /// Fatal: the node must stop rather than act on it.
    #[error("corrupt {what} in the data directory: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A value could not be encoded. This is a bug in a type's serde implementation. Fatal.
    #[error("could not encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    /// Another process holds the data directory's lock.
    #[error("the data directory {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    /// An earlier flush or fsync failed. After a failed fsync the kernel may have dropped the
    /// dirty pages, so what is on disk is unknown; the store refuses every later durability point
    /// (the "fsyncgate" lesson) and the node must restart and recover from disk. Fatal.
    #[error("an earlier fsync failed ({0}); the store refuses to continue")]
    DurabilityLost(String),
    /// The in-memory state machine was left half-updated by a panic during apply. Fatal (a bug).
    #[error("the in-memory state machine was poisoned by a panic during apply")]
    Poisoned,
    /// A blocking storage task panicked or was cancelled. Fatal (a bug).
    #[error("a blocking storage task failed: {0}")]
    Task(String),
    /// The store was asked for something its state does not allow (a bug in the caller).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Whether the node must stop: the data on disk or in memory can no longer be trusted.
    /// `false` for problems of the environment ([`Error::Io`], [`Error::Locked`]) that an
    /// operator can fix before restarting.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Error::Io { .. } | Error::Locked { .. })
    }

    /// Whether the data on disk is corrupt.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        Error::Io { context, source }
    }

    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Error::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }

    /// Maps a sled error. sled reports corruption and its own bugs separately from I/O.
    pub(crate) fn sled(context: &'static str, e: sled::Error) -> Self {
        match e {
            sled::Error::Io(source) => Error::Io { context, source },
            sled::Error::Corruption { at, .. } => Error::Corrupt {
                what: "sled database",
                detail: format!("{context}: corruption at {at:?}"),
            },
            other => Error::Corrupt {
                what: "sled database",
                detail: format!("{context}: {other}"),
            },
        }
    }

    pub(crate) fn task(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }

    /// Converts into the I/O error openraft's storage traits return, saying what was being
    /// done. openraft stops the Raft node on any storage error, which is right for the fatal
    /// kinds and acceptable for I/O (the node restarts).
    pub(crate) fn into_io(self, doing: &'static str) -> std::io::Error {
        std::io::Error::other(format!("{doing}: {self}"))
    }
}

/// Shorthand for the results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
