//! What a streamed block-by-block job (quantization, pruning) records after each block so that the
//! same job run again after a kill continues at the next block and writes the same bytes.

use crate::{Activations, CalibError, Keep, Result, Resume};
use std::path::{Path, PathBuf};

/// A streamed job's record after a block: how many blocks are finished, how much of the partial
/// output file is final, and the job's own report of those blocks (`R`, stored beside them).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Recorded<R> {
    /// Blocks finished.
    pub blocks: usize,
    /// Tensors and bytes of the partial output file that are final.
    pub tensors: usize,
    pub bytes: u64,
    #[serde(flatten)]
    pub report: R,
}

/// The resume folder of a streamed job writing one file (a [`shrink_core::ResumeDir`] beside
/// it): the partial output, the last [`Recorded`] state and, when calibrating, the activations
/// entering the next block (exactly, so the resumed job computes the same bits).
///
/// ```
/// # fn main() -> Result<(), shrink_calib::CalibError> {
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("model.gguf");
/// let job = shrink_calib::BlockJob::open(&out, "a job", false)?;
/// assert!(job.resumed::<()>(Default::default())?.is_none());
/// std::fs::write(job.partial(), [0u8; 64]).unwrap();
/// let state = shrink_calib::Recorded { blocks: 1, tensors: 3, bytes: 64, report: () };
/// job.record(&state, None)?;
/// drop(job);
/// // The same job again: it continues after block 0.
/// let job = shrink_calib::BlockJob::open(&out, "a job", false)?;
/// let (state, resume) = job.resumed::<()>(Default::default())?.unwrap();
/// assert_eq!((state.tensors, state.bytes, resume.block), (3, 64, 1));
/// job.remove()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlockJob {
    dir: shrink_core::ResumeDir,
    calibrating: bool,
}

const STATE: &str = "state.json";
const PARTIAL: &str = "partial";

fn activations_file(block: usize) -> String {
    format!("activations-{block}.f32")
}

impl BlockJob {
    /// Opens the resume folder of output `out` for the job `job` describes (see
    /// [`job_description`]); what another job left there is removed. `calibrating`: the job
    /// records the activations entering each next block.
    pub fn open(out: &Path, job: &str, calibrating: bool) -> Result<Self> {
        Ok(Self {
            dir: shrink_core::ResumeDir::open(out, job)?,
            calibrating,
        })
    }

    /// The partial output, a file or a folder: continued by a resumed job, renamed into place
    /// when complete.
    pub fn partial(&self) -> PathBuf {
        self.dir.file(PARTIAL)
    }

    /// The state a killed run of this job recorded and where the sequential engine resumes
    /// (the activations loaded and kept as `keep` says), or `None` to start
    /// over: nothing recorded, or a record the files no longer back (a kill after the output was
    /// renamed into place, say).
    pub fn resumed<R: serde::de::DeserializeOwned>(
        &self,
        keep: Keep,
    ) -> Result<Option<(Recorded<R>, Resume)>> {
        let Some(bytes) = self.dir.read(STATE)? else {
            return Ok(None);
        };
        let state: Recorded<R> = serde_json::from_slice(&bytes).map_err(|e| {
            CalibError::Resume(format!(
                "{}: unreadable ({e}); remove it to start over",
                self.dir.file(STATE).display()
            ))
        })?;
        // A partial folder's shards are checked by its writer; a partial file must hold what
        // was recorded.
        let backed = match std::fs::metadata(self.partial()) {
            Ok(m) if m.is_dir() => true,
            Ok(m) => m.len() >= state.bytes,
            Err(_) => false,
        };
        let xs = self.dir.file(&activations_file(state.blocks));
        if !backed || (self.calibrating && !xs.exists()) {
            return Ok(None);
        }
        let activations = match self.calibrating {
            true => Activations::load(&xs, keep)?,
            false => Activations::in_memory(vec![]),
        };
        let resume = Resume {
            block: state.blocks,
            activations,
        };
        Ok(Some((state, resume)))
    }

    /// Records `state` (the partial file synced up to `state.bytes`) and, when calibrating,
    /// `xs`: the activations entering block `state.blocks`. Older activations are removed.
    pub fn record<R: serde::Serialize>(
        &self,
        state: &Recorded<R>,
        xs: Option<&Activations>,
    ) -> Result<()> {
        if let (true, Some(xs)) = (self.calibrating, xs) {
            let path = self.dir.file(&activations_file(state.blocks));
            let tmp = self
                .dir
                .file(&format!("{}.tmp", activations_file(state.blocks)));
            xs.save(&tmp)?;
            std::fs::rename(&tmp, &path).map_err(|source| shrink_core::CoreError::Io {
                action: "renaming into place",
                path,
                source,
            })?;
        }
        let json = serde_json::to_vec(state)
            .map_err(|e| CalibError::Resume(format!("recording its progress: {e}")))?;
        self.dir.write(STATE, &json)?;
        for old in 0..state.blocks {
            let _ = std::fs::remove_file(self.dir.file(&activations_file(old)));
        }
        Ok(())
    }

    /// Removes the folder: the output is complete.
    pub fn remove(self) -> Result<()> {
        Ok(self.dir.remove()?)
    }
}

/// Everything that decides a streamed job's bytes, to tell a resumable run of the same job from
/// another: shrink's version and the running program (size, modification time: another build
/// may round differently), the input files at `input` (names, sizes, modification times), the
/// job's own `settings`, the batch, the thread count and the calibration windows.
pub fn job_description(
    input: &Path,
    settings: &str,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
) -> String {
    let identity = |p: &Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Some(format!("{} {} {modified}", p.display(), m.len()))
    };
    let listed: Vec<PathBuf> = match std::fs::read_dir(input) {
        Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => vec![input.to_path_buf()],
    };
    let mut files: Vec<String> = listed.iter().filter_map(|p| identity(p)).collect();
    files.sort();
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| identity(&p))
        .unwrap_or_default();
    let ids: Vec<u8> = windows
        .unwrap_or_default()
        .iter()
        .flat_map(|w| w.iter().flat_map(|t| t.to_le_bytes()))
        .collect();
    format!(
        "shrink {} streamed job\nprogram {program}\ninput {}\n{settings}\nbatch {batch}\n\
         threads {}\nwindows {} × {} sha256 {}\n",
        env!("CARGO_PKG_VERSION"),
        files.join("; "),
        rayon::current_num_threads(),
        windows.map_or(0, <[_]>::len),
        windows.and_then(|w| w.first()).map_or(0, Vec::len),
        shrink_core::sha256_hex(&ids),
    )
}
