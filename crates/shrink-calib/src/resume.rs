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
/// A job split across the ranks of an MPI world resumes too: rank 0 keeps the folder above, and
/// every other rank `r` a folder of its own (`.shrink-resume-<output>.rank<r>`, on its machine)
/// holding the activations of its windows. Each record is a step of all ranks: every rank saves
/// its activations, and only once all have does rank 0 record the state; the other ranks keep
/// their last two activations, so whichever block rank 0's state names when a kill lands, every
/// rank can resume there.
///
/// ```
/// # fn main() -> Result<(), shrink_calib::CalibError> {
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("model.gguf");
/// let world = shrink_core::Alone;
/// let job = shrink_calib::BlockJob::open(&out, "a job", false, &world)?;
/// assert!(job.resumed::<()>(Default::default(), &world)?.is_none());
/// std::fs::write(job.partial(), [0u8; 64]).unwrap();
/// let state = shrink_calib::Recorded { blocks: 1, tensors: 3, bytes: 64, report: () };
/// job.record(&world, 1, Some(&state), None)?;
/// drop(job);
/// // The same job again: it continues after block 0.
/// let job = shrink_calib::BlockJob::open(&out, "a job", false, &world)?;
/// let (state, resume) = job.resumed::<()>(Default::default(), &world)?.unwrap();
/// assert_eq!((state.tensors, state.bytes, resume.block), (3, 64, 1));
/// job.remove()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlockJob {
    dir: shrink_core::ResumeDir,
    calibrating: bool,
    rank: usize,
    /// The block of this rank's previous record (rank 0's state may still name it).
    previous: std::cell::Cell<Option<usize>>,
    /// When this run last recorded.
    last: std::cell::Cell<Option<std::time::Instant>>,
}

/// The least time between two records of a run ([`BlockJob::due`]): a job whose blocks take
/// milliseconds does not spend most of its time syncing files and saving activations, and a
/// kill loses at most this much work beyond the block under way.
pub const RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

const STATE: &str = "state.json";
const PARTIAL: &str = "partial";

fn activations_file(block: usize) -> String {
    format!("activations-{block}.f32")
}

impl BlockJob {
    /// Opens this rank's resume folder of output `out` for the job `job` describes (see
    /// [`job_description`]; the number of ranks is added to it); what another job left there is
    /// removed. `calibrating`: the job records the activations entering each next block.
    pub fn open(
        out: &Path,
        job: &str,
        calibrating: bool,
        world: &dyn shrink_core::Collective,
    ) -> Result<Self> {
        let rank = world.rank();
        let target = match rank {
            0 => out.to_path_buf(),
            r => {
                let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
                out.with_file_name(format!("{}.rank{r}", name.unwrap_or_default()))
            }
        };
        let job = format!("{job}ranks {}\n", world.size());
        Ok(Self {
            dir: shrink_core::ResumeDir::open(&target, &job)?,
            calibrating,
            rank,
            previous: std::cell::Cell::new(None),
            last: std::cell::Cell::new(None),
        })
    }

    /// The partial output, a file or a folder: continued by a resumed job, renamed into place
    /// when complete (rank 0's).
    pub fn partial(&self) -> PathBuf {
        self.dir.file(PARTIAL)
    }

    /// The state a killed run of this job recorded (rank 0's, on every rank) and where the
    /// sequential engine resumes (this rank's activations loaded and kept as `keep` says), or
    /// `None` on every rank to start over: nothing recorded, a record the files no longer back (a
    /// kill after the output was renamed into place, say), or a rank missing its activations.
    pub fn resumed<R: serde::de::DeserializeOwned>(
        &self,
        keep: Keep,
        world: &dyn shrink_core::Collective,
    ) -> Result<Option<(Recorded<R>, Resume)>> {
        let recorded = match self.rank {
            0 => self.backed_state()?.unwrap_or_default(),
            _ => Vec::new(),
        };
        let recorded = world.share(0, recorded);
        let state = match recorded.is_empty() {
            true => None,
            false => Some(
                serde_json::from_slice::<Recorded<R>>(&recorded).map_err(|e| {
                    let file = match self.rank {
                        0 => self.dir.file(STATE).display().to_string(),
                        _ => format!("rank 0's {STATE}"),
                    };
                    CalibError::Resume(format!("{file}: unreadable ({e}); remove it to start over"))
                })?,
            ),
        };
        let xs = state
            .as_ref()
            .map(|s| self.dir.file(&activations_file(s.blocks)));
        let ready = xs
            .as_ref()
            .is_some_and(|xs| !self.calibrating || xs.exists());
        let everywhere =
            shrink_core::share_dealt(world, 0, world.size(), Ok(vec![ready]), |r, m| {
                CalibError::Resume(format!("rank {r}: {m}"))
            })?;
        let (Some(state), Some(xs), true) = (state, xs, everywhere.iter().all(|&r| r)) else {
            return Ok(None);
        };
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

    /// Rank 0's recorded state as stored, if its partial output holds what it says.
    fn backed_state(&self) -> Result<Option<Vec<u8>>> {
        let Some(bytes) = self.dir.read(STATE)? else {
            return Ok(None);
        };
        #[derive(serde::Deserialize)]
        struct Extent {
            bytes: u64,
        }
        let extent: Extent = serde_json::from_slice(&bytes).map_err(|e| {
            CalibError::Resume(format!(
                "{}: unreadable ({e}); remove it to start over",
                self.dir.file(STATE).display()
            ))
        })?;
        // A partial folder's shards are checked by its writer; a partial file must hold what
        // was recorded (nothing, before a job's writing begins).
        let backed = match std::fs::metadata(self.partial()) {
            Ok(m) if m.is_dir() => true,
            Ok(m) => m.len() >= extent.bytes,
            Err(_) => extent.bytes == 0,
        };
        Ok(backed.then_some(bytes))
    }

    /// Whether a record is due after this block: the run has not recorded yet, or
    /// [`RECORD_INTERVAL`] has passed since it last did. Callers ask before syncing their output
    /// and pass no state when it is not (only rank 0's answer counts: it decides for all).
    pub fn due(&self) -> bool {
        self.last
            .get()
            .is_none_or(|at| at.elapsed() >= RECORD_INTERVAL)
    }

    /// Records that `blocks` blocks are finished, a step every rank takes after each block:
    /// `state` is rank 0's (the partial file synced up to `state.bytes`), `None` where its file
    /// holds no point to resume from (then no rank records); when calibrating, each rank saves
    /// `xs`, its activations entering block `blocks`, and rank 0 writes the state only once every
    /// rank has. Older activations are removed (a rank other than 0 keeps those of its previous
    /// record: rank 0's state may still name them).
    pub fn record<R: serde::Serialize>(
        &self,
        world: &dyn shrink_core::Collective,
        blocks: usize,
        state: Option<&Recorded<R>>,
        xs: Option<&Activations>,
    ) -> Result<()> {
        let mut point = [u8::from(state.is_some())];
        world.broadcast(0, &mut point);
        if point[0] == 0 {
            return Ok(());
        }
        let saved = match (self.calibrating, xs) {
            (true, Some(xs)) => self.save(blocks, xs),
            _ => Ok(()),
        };
        shrink_core::share_dealt(world, 0, world.size(), saved.map(|()| vec![()]), |r, m| {
            CalibError::Resume(format!("rank {r}: {m}"))
        })?;
        if let Some(state) = state.filter(|_| self.rank == 0) {
            let json = serde_json::to_vec(state)
                .map_err(|e| CalibError::Resume(format!("recording its progress: {e}")))?;
            self.dir.write(STATE, &json)?;
        }
        self.last.set(Some(std::time::Instant::now()));
        let kept = match self.rank {
            0 => blocks,
            _ => self.previous.replace(Some(blocks)).unwrap_or(0).min(blocks),
        };
        for old in 0..kept {
            let _ = std::fs::remove_file(self.dir.file(&activations_file(old)));
        }
        Ok(())
    }

    /// Saves `xs` as the activations entering block `blocks`, unless an earlier record of the
    /// same block saved them (a structured pruning records its writing as one block, each tensor).
    fn save(&self, blocks: usize, xs: &Activations) -> Result<()> {
        let path = self.dir.file(&activations_file(blocks));
        if path.exists() {
            return Ok(());
        }
        let tmp = self.dir.file(&format!("{}.tmp", activations_file(blocks)));
        xs.save(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|source| shrink_core::CoreError::Io {
            action: "renaming into place",
            path,
            source,
        })?;
        Ok(())
    }

    /// Removes the folder: the output is complete.
    pub fn remove(self) -> Result<()> {
        Ok(self.dir.remove()?)
    }

    /// Ends the job, a step of every rank once rank 0's output is in place: `done` is this
    /// rank's outcome (rank 0's, writing the output, or another rank's, discarding it). Only
    /// when every rank succeeded does every rank remove its folder (so that none drops the
    /// activations rank 0's state names while rank 0 may still fail); otherwise this rank's
    /// error, or the first another rank had, is returned and the records are kept.
    pub fn complete<T, E>(
        self,
        world: &dyn shrink_core::Collective,
        done: std::result::Result<T, E>,
    ) -> std::result::Result<T, E>
    where
        E: std::fmt::Display + From<CalibError>,
    {
        let mine = match &done {
            Ok(_) => Ok(vec![()]),
            Err(e) => Err(CalibError::Compress(e.to_string())),
        };
        let shared = shrink_core::share_dealt(world, 0, world.size(), mine, |r, m| {
            CalibError::Compress(format!("rank {r}: {m}"))
        });
        let value = done?;
        shared?;
        self.remove()?;
        Ok(value)
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

#[cfg(test)]
mod tests;
