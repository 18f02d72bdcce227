//! The processes of a data-parallel job: MPI ranks (the CLI's `mpi` feature), threads of one
//! process (tests), or one process alone.
//!
//! Calibration splits its batches of windows across ranks and exchanges each batch's statistics
//! with [`Collective::broadcast`], every rank adding them in batch order: the sums are the ones a
//! single process makes, to the bit.
//!
//! ```
//! use shrink_core::{Collective, ThreadGroup};
//! let ranks = ThreadGroup::new(3);
//! let got: Vec<Vec<u8>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .iter()
//!         .map(|rank| {
//!             s.spawn(move || {
//!                 let mut data = vec![rank.rank() as u8; 4];
//!                 rank.broadcast(1, &mut data);
//!                 data
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(got, vec![vec![1u8; 4]; 3]);
//! ```

use std::sync::{Arc, Barrier, Mutex};

/// A group of processes (ranks) that run the same job in step. Every rank calls the same
/// collective operations in the same order: a decision that could differ between ranks (a clock,
/// a file only one rank reads, an error only one rank meets) is one rank's, shared.
pub trait Collective {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Copies `root`'s `data` into `data` on every other rank (the same length on every rank).
    fn broadcast(&self, root: usize, data: &mut [u8]);
    /// Ranks that share this machine's memory, this one included.
    fn ranks_on_this_machine(&self) -> usize {
        self.size()
    }
    /// `root`'s `data`, of any length, on every rank (what other ranks pass is ignored).
    fn share(&self, root: usize, data: Vec<u8>) -> Vec<u8> {
        if self.size() == 1 {
            return data;
        }
        let mut len = (data.len() as u64).to_le_bytes();
        self.broadcast(root, &mut len);
        let mut out = if self.rank() == root {
            data
        } else {
            vec![0u8; u64::from_le_bytes(len) as usize]
        };
        self.broadcast(root, &mut out);
        out
    }
}

/// `root`'s `value` on every rank, sent as JSON (exact for floats: the workspace's serde_json
/// round-trips them); what other ranks pass is ignored.
pub fn share_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &dyn Collective,
    root: usize,
    value: Option<&T>,
) -> crate::Result<T> {
    let error = |e: serde_json::Error| crate::CoreError::Shared {
        rank: root,
        message: e.to_string(),
    };
    let bytes = match value {
        Some(v) if world.rank() == root => serde_json::to_vec(v).map_err(error)?,
        _ => Vec::new(),
    };
    serde_json::from_slice(&world.share(root, bytes)).map_err(error)
}

/// Items `offset..offset + count` dealt to the ranks in turn (item `i` is rank `i mod N`'s),
/// each made by its owner and shared with every rank in order: `mine` is this rank's, in order.
/// Every rank takes part in every share even when it failed (sending its error in its turns), so
/// no rank waits for one that stopped. Returns every item, or this rank's own error, or the first
/// error another rank sent, made by `other` from its rank and message.
pub fn share_dealt<T, E>(
    world: &dyn Collective,
    offset: usize,
    count: usize,
    mine: std::result::Result<Vec<T>, E>,
    other: impl FnOnce(usize, String) -> E,
) -> std::result::Result<Vec<T>, E>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    E: std::fmt::Display + From<crate::CoreError>,
{
    if world.size() == 1 {
        return mine;
    }
    let failure = mine.as_ref().err().map(|e| e.to_string());
    let mut own = mine.as_ref().ok().into_iter().flatten();
    let mut shared = Vec::with_capacity(count);
    let mut failed = None;
    for i in offset..offset + count {
        let root = i % world.size();
        let sent: Option<std::result::Result<&T, &str>> =
            (root == world.rank()).then(|| match &failure {
                Some(e) => Err(e.as_str()),
                None => own.next().ok_or("an item is missing"),
            });
        let error = |e: serde_json::Error| crate::CoreError::Shared {
            rank: root,
            message: e.to_string(),
        };
        let bytes = match &sent {
            Some(item) => serde_json::to_vec(item).map_err(error)?,
            None => Vec::new(),
        };
        let got: std::result::Result<T, String> =
            serde_json::from_slice(&world.share(root, bytes)).map_err(error)?;
        match got {
            Ok(item) => shared.push(item),
            Err(message) => {
                failed.get_or_insert((root, message));
            }
        }
    }
    mine?;
    match failed {
        Some((rank, message)) => Err(other(rank, message)),
        None => Ok(shared),
    }
}

/// One process alone: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn broadcast(&self, root: usize, _data: &mut [u8]) {
        assert_eq!(root, 0, "one process has only rank 0");
    }
}

/// Ranks as threads of one process, each holding one of the handles [`ThreadGroup::new`] makes:
/// checks of what a reduction across ranks gives, without MPI.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    barrier: Barrier,
    data: Mutex<Vec<u8>>,
}

impl ThreadGroup {
    /// `size` ranks, one handle per rank, in rank order.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            data: Mutex::new(Vec::new()),
        });
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn broadcast(&self, root: usize, data: &mut [u8]) {
        let lock = || self.shared.data.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == root {
            *lock() = data.to_vec();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            data.copy_from_slice(&lock());
        }
        self.shared.barrier.wait();
    }
}
