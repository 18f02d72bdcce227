//! Foundations shared by every shrink crate: atomic file output, the cache location, sha256 hashing
//! and the progress-reporting trait through which libraries report long work without printing.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("out.txt");
//! shrink_core::atomic_write(&path, b"hello").unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"hello");
//! assert_eq!(
//!     shrink_core::sha256_hex(b"abc"),
//!     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
//! );
//! ```

mod collective;
mod fsio;
pub mod gemm;
pub mod ggml;
pub mod iquant;
mod progress;
pub mod qmatmul;
mod simd;
mod stamp;
mod timing;

pub use collective::{share_dealt, share_json, Alone, Collective, ThreadGroup};
pub use fsio::{
    atomic_write, atomic_write_with, cache_dir, check_output_is_not_input, is_plain_name, lock_dir,
    remove_stale_temporaries, resolve_path, sha256_file, sha256_hex, AtomicDir, AtomicFile,
    ResumeDir, NAME_CHARS,
};
pub use progress::{NoProgress, Progress};
pub use stamp::{sha256_file_stamped, sha256_file_stamped_in};
pub use timing::{median_spread, LoadProbe, MachineLoad, Timing, UNDER_LOAD};

/// Errors from the shared foundations: always name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot locate a cache directory: set SHRINK_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("{what} {output} {why} {input}: writing there would modify or delete the input; choose another output")]
    OutputOverlapsInput {
        what: String,
        output: std::path::PathBuf,
        input: std::path::PathBuf,
        why: &'static str,
    },
    #[error("reading what rank {rank} shared: {message}")]
    Shared { rank: usize, message: String },
}

pub type Result<T> = std::result::Result<T, CoreError>;

/// A weight matrix that a technique refuses before touching it.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("tensor '{tensor}': {len} values for {rows}×{cols}")]
    Shape {
        tensor: String,
        len: usize,
        rows: usize,
        cols: usize,
    },
    #[error("tensor '{tensor}' has a non-finite value at index {index}")]
    NonFinite { tensor: String, index: usize },
}

/// Checks that `w` fills a `rows × cols` matrix with finite values; the error names `tensor`.
pub fn check_matrix(
    w: &[f32],
    rows: usize,
    cols: usize,
    tensor: &str,
) -> std::result::Result<(), WeightError> {
    if w.len() != rows * cols {
        return Err(WeightError::Shape {
            tensor: tensor.to_string(),
            len: w.len(),
            rows,
            cols,
        });
    }
    // A branch-free test per chunk (vectorized), the index searched only in a failing chunk.
    const CHUNK: usize = 4096;
    let bad = w
        .chunks(CHUNK)
        .position(|c| !c.iter().fold(true, |ok, v| ok & v.is_finite()))
        .and_then(|k| {
            let chunk = &w[k * CHUNK..w.len().min((k + 1) * CHUNK)];
            chunk
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| k * CHUNK + i)
        });
    match bad {
        Some(index) => Err(WeightError::NonFinite {
            tensor: tensor.to_string(),
            index,
        }),
        None => Ok(()),
    }
}
