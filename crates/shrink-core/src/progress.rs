//! Progress reporting for long work. Libraries call these methods; only the CLI draws bars, so a
//! researcher importing a crate gets no terminal output.

/// Receives progress of long-running work (evaluation chunks, tensors written, blocks calibrated).
pub trait Progress: Sync {
    /// A new phase begins with `total` units of work.
    fn start(&self, _phase: &str, _total: u64) {}
    /// `n` more units are done; `message` optionally describes the latest state (e.g. running ppl).
    fn advance(&self, _n: u64, _message: Option<&str>) {}
    /// The current phase ended.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
