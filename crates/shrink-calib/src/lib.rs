//! Calibration shared by every technique that looks at activations (GPTQ, AWQ, SparseGPT, Wanda):
//! seeded sampling of token windows, per-linear input statistics (the Hessian `XᵀX` and channel
//! norms), the sequential engine that calibrates one decoder block at a time on the outputs of the
//! already-compressed blocks before it, and the Cholesky routines on the Hessian.
//!
//! ```
//! use candle_core::Device;
//! use shrink_calib::{sample_windows, sequential, BlockStats};
//! use shrink_models::{Block, Transformer, ModelConfig};
//! let mut model = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &Device::Cpu).unwrap();
//! let tokens: Vec<u32> = (0..500).map(|i| (i * 13 % 64) as u32).collect();
//! let windows = sample_windows(&tokens, 4, 32, 0).unwrap();
//! let mut seen = vec![];
//! sequential::<_, shrink_calib::CalibError>(&mut model, &windows, 2, true, &shrink_core::NoProgress, &mut |block: &mut Block, stats: &BlockStats| {
//!     seen.push((block.index, stats.get("model.layers.0.self_attn.q_proj").map(|s| s.rows)));
//!     Ok(())
//! }).unwrap();
//! assert_eq!(seen, [(0, Some(4 * 32)), (1, None)]);
//! ```

mod activations;
mod hessian;
mod linalg;
mod resume;

pub use activations::{Activations, Keep};
pub use hessian::{quadratic, LinearStats, Partial};
pub use linalg::{cholesky_lower, damped_inverse_cholesky_upper, subtract_scaled};
pub use resume::{job_description, BlockJob, Recorded, RECORD_INTERVAL};

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use shrink_core::{Alone, Collective, Progress};
use shrink_models::{AttentionContext, Block, BlockModel, LinearHook, NoHook};
use std::collections::BTreeMap;

/// Errors from calibration.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("calibration needs {needed} tokens per window but the text has only {available}")]
    TooLittleText { needed: usize, available: usize },
    #[error("calibration needs at least one window (samples = 0): a calibrated method without data would write an uncalibrated model")]
    NoSamples,
    #[error("the Hessian of '{linear}' is not positive definite even after dampening (pivot {pivot} at column {column})")]
    NotPositiveDefinite {
        linear: String,
        column: usize,
        pivot: f64,
    },
    #[error("non-finite values in the inputs of '{0}': the model produced NaN or infinity")]
    NonFinite(String),
    #[error("{ranks} ranks need at least {ranks} batches of calibration windows, there are {batches}: use a smaller --batch or more --samples")]
    TooFewBatches { ranks: usize, batches: usize },
    #[error("rank {rank} compressed block {block} differently from rank 0: the ranks' machines compute differently (run every rank on the same kind of CPU)")]
    RanksDiffer { rank: usize, block: usize },
    #[error("resuming a killed job: {0}")]
    Resume(String),
    #[error("spilled activations: {0}")]
    Spill(String),
    /// A caller's failure as text, for callers of [`sequential`] without an error type of their own.
    #[error("{0}")]
    Compress(String),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CalibError>;

/// `count` windows of `len` tokens at seeded random offsets in `tokens`.
pub fn sample_windows(
    tokens: &[u32],
    count: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if count == 0 {
        return Err(CalibError::NoSamples);
    }
    if tokens.len() < len || len == 0 {
        return Err(CalibError::TooLittleText {
            needed: len,
            available: tokens.len(),
        });
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Ok((0..count)
        .map(|_| {
            let start = rng.gen_range(0..=tokens.len() - len);
            tokens[start..start + len].to_vec()
        })
        .collect())
}

/// Input statistics of one block's linears, by full linear name. Linears that read the same input
/// (q/k/v, gate/up) share one accumulation.
#[derive(Debug, Default)]
pub struct BlockStats {
    stats: Vec<LinearStats>,
    index: BTreeMap<String, usize>,
}

impl BlockStats {
    /// The statistics of a linear's input, if it ran.
    pub fn get(&self, linear: &str) -> Option<&LinearStats> {
        self.index.get(linear).map(|&i| &self.stats[i])
    }
}

/// Accumulates [`LinearStats`] for every linear it observes.
struct StatsHook {
    stats: BlockStats,
    last: Option<(candle_core::TensorId, usize)>,
    hessian: bool,
    /// With several ranks, this batch's statistics by slot, exchanged once the batch has run
    /// ([`exchange`]); alone, they are added at once.
    pending: Option<Vec<Option<Partial>>>,
}

impl LinearHook for StatsHook {
    fn observe(&mut self, linear: &str, input: &Tensor) -> candle_core::Result<()> {
        // q/k/v and gate/up receive the very same tensor: accumulate it once.
        let slot = match self.last {
            Some((id, slot)) if id == input.id() => slot,
            _ => {
                let slot = match self.stats.index.get(linear) {
                    Some(&s) => s,
                    None => {
                        let n = input.dim(candle_core::D::Minus1)?;
                        self.stats.stats.push(if self.hessian {
                            LinearStats::new(n)
                        } else {
                            LinearStats::diagonal(n)
                        });
                        self.stats.stats.len() - 1
                    }
                };
                let partial = self.stats.stats[slot].partial(input)?;
                match &mut self.pending {
                    None => self.stats.stats[slot].add(&partial),
                    Some(pending) => {
                        if pending.len() <= slot {
                            pending.resize(slot + 1, None);
                        }
                        pending[slot] = Some(partial);
                    }
                }
                slot
            }
        };
        self.last = Some((input.id(), slot));
        self.stats.index.insert(linear.to_string(), slot);
        Ok(())
    }
}

/// The input statistics of `block`'s linears when it runs on the hidden states `xs` (with or
/// without the full Hessian), checked to be finite.
pub fn block_stats(
    block: &Block,
    xs: &[Tensor],
    ctx: &AttentionContext,
    hessian: bool,
) -> Result<BlockStats> {
    let xs = Activations::in_memory(xs.to_vec());
    block_stats_in(&Alone, block, &xs, ctx, hessian, xs.len())
}

/// [`block_stats`] over `batches` batches split across the ranks of `world`: this rank holds
/// batches `rank`, `rank + size`, … (`xs`). Each rank runs its batch of a round, then every batch's
/// statistics are broadcast and every rank adds them in batch order: all ranks get the statistics
/// of all batches, the same bits as one process running every batch.
pub fn block_stats_in(
    world: &dyn Collective,
    block: &Block,
    xs: &Activations,
    ctx: &AttentionContext,
    hessian: bool,
    batches: usize,
) -> Result<BlockStats> {
    let size = world.size();
    // Every rank must run a batch in the first round, where the statistics' slots are made.
    if batches < size {
        return Err(CalibError::TooFewBatches {
            ranks: size,
            batches,
        });
    }
    let mut hook = StatsHook {
        stats: BlockStats::default(),
        last: None,
        hessian,
        pending: (size > 1).then(Vec::new),
    };
    for round in 0..batches.div_ceil(size) {
        if round < xs.len() {
            block.forward(&xs.get(round)?, ctx, None, &mut hook)?;
        }
        if size > 1 {
            exchange(world, &mut hook, (batches - round * size).min(size));
        }
    }
    for (name, &slot) in &hook.stats.index {
        if !hook.stats.stats[slot].is_finite() {
            return Err(CalibError::NonFinite(name.clone()));
        }
    }
    Ok(hook.stats)
}

/// One round's exchange: for each slot, the batches of ranks `0..contributors` in rank order
/// (which is batch order), each broadcast by its rank and added by every rank.
fn exchange(world: &dyn Collective, hook: &mut StatsHook, contributors: usize) {
    let mut pending = hook.pending.replace(Vec::new()).unwrap_or_default();
    for (slot, stats) in hook.stats.stats.iter_mut().enumerate() {
        let mut mine = pending.get_mut(slot).and_then(Option::take);
        let mut received = None;
        for rank in 0..contributors {
            let partial = match &mut mine {
                Some(p) if rank == world.rank() => p,
                _ => received.get_or_insert_with(|| stats.empty_partial()),
            };
            world.broadcast(rank, bytemuck::cast_slice_mut(&mut partial.xtx));
            world.broadcast(rank, bytemuck::cast_slice_mut(&mut partial.channels));
            let mut rows = partial.rows.to_le_bytes();
            world.broadcast(rank, &mut rows);
            partial.rows = u64::from_le_bytes(rows);
            stats.add(partial);
        }
    }
}

/// Checks that every rank holds the same block after compressing it (a digest of its weights,
/// compared with rank 0's): ranks whose compression computes differently are caught. Ranks whose
/// forward passes compute differently are not (each rank's batches are its own, and every rank
/// adds the same statistics), so the ranks must run on machines that compute alike.
fn check_same_block(world: &dyn Collective, block: &Block) -> Result<()> {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    let norms = block.all_norms();
    let tensors = norms
        .iter()
        .flat_map(|n| std::iter::once(&n.weight).chain(&n.bias))
        .chain(
            block
                .linears()
                .into_iter()
                .flat_map(|(_, l)| std::iter::once(l.weight()).chain(l.bias())),
        );
    for t in tensors {
        let values = t.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        digest.update(bytemuck::cast_slice(&values.to_vec1::<f32>()?));
    }
    let mine: [u8; 32] = digest.finalize().into();
    let mut first = mine;
    world.broadcast(0, &mut first);
    if first != mine {
        return Err(CalibError::RanksDiffer {
            rank: world.rank(),
            block: block.index,
        });
    }
    Ok(())
}

/// Runs `windows` through `model` block by block. For each block: its linears' input statistics
/// are gathered on the current activations, `compress` modifies the block, and the compressed
/// block's outputs become the next block's inputs. Only the activations of the calibration
/// windows at one depth are held in memory, and of a [`shrink_models::StreamedModel`] only the
/// block being compressed (`compress` writes what it keeps). Without `hessian`, only per-channel
/// statistics are gathered. `compress` fails with the caller's own error type `E`, returned as it
/// is; the engine's own failures become `E` through `From<CalibError>`.
pub fn sequential<M: BlockModel, E: From<CalibError>>(
    model: &mut M,
    windows: &[Vec<u32>],
    batch: usize,
    hessian: bool,
    progress: &dyn Progress,
    compress: &mut dyn FnMut(&mut Block, &BlockStats) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    sequential_from(
        model,
        windows,
        batch,
        hessian,
        &Alone,
        progress,
        None,
        Keep::default(),
        &mut |block, stats, _| compress(block, stats),
        &mut |_, _| Ok(()),
    )
}

/// What a block being compressed reads besides its statistics: the hidden states entering it
/// (this rank's batches, the outputs of the blocks already compressed), the attention context
/// they run with, and the ranks sharing the work.
pub struct BlockInputs<'a> {
    pub xs: &'a Activations,
    pub ctx: &'a AttentionContext,
    pub world: &'a dyn Collective,
}

/// Where a [`sequential_from`] pass starts: at `block`, from the activations entering it (one
/// tensor per batch of windows this rank holds, as [`sequential_from`]'s `finished` received
/// them).
#[derive(Debug)]
pub struct Resume {
    pub block: usize,
    pub activations: Activations,
}

/// What [`sequential_from`] calls after each block: its index and the activations leaving it.
pub type Finished<'a, E> = dyn FnMut(usize, &Activations) -> std::result::Result<(), E> + 'a;

/// [`sequential`] that starts at a later block when given `start` (a resumed job), and hands
/// `finished` each block's index and output activations once it is done: all a killed pass needs
/// to resume at the next block. The activations are kept as `keep` says ([`Keep`]): spilled to a
/// scratch file, one batch at a time is in memory, embedding included (the same bits, in less
/// memory, at the cost of writing and reading them once per block); in f16 or bf16, half the
/// bytes (the statistics see the rounded inputs: other bits).
#[allow(clippy::too_many_arguments)]
pub fn sequential_from<M: BlockModel, E: From<CalibError>>(
    model: &mut M,
    windows: &[Vec<u32>],
    batch: usize,
    hessian: bool,
    world: &dyn Collective,
    progress: &dyn Progress,
    start: Option<Resume>,
    keep: Keep,
    compress: &mut dyn FnMut(&mut Block, &BlockStats, &BlockInputs) -> std::result::Result<(), E>,
    finished: &mut Finished<'_, E>,
) -> std::result::Result<(), E> {
    let batch = batch.max(1);
    let Some(len) = windows.first().map(Vec::len) else {
        return Ok(());
    };
    let (rank, ranks) = (world.rank(), world.size());
    let batches = windows.len().div_ceil(batch);
    if batches < ranks {
        return Err(CalibError::TooFewBatches { ranks, batches }.into());
    }
    // This rank's batches: rank, rank + ranks, …
    let mine: Vec<&[Vec<u32>]> = windows.chunks(batch).skip(rank).step_by(ranks).collect();
    let ctx = model.attention_context(len).map_err(CalibError::from)?;
    let (first, mut xs) = match start {
        Some(Resume { block, activations }) => {
            if activations.len() != mine.len() || block > model.num_blocks() {
                return Err(CalibError::Resume(format!(
                    "{} batches of activations entering block {block} of {}, expected {}",
                    activations.len(),
                    model.num_blocks(),
                    mine.len()
                ))
                .into());
            }
            (block, activations)
        }
        None => {
            let ids = mine
                .iter()
                .map(|group| Tensor::new(group.to_vec(), &candle_core::Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(CalibError::from)?;
            // The embedding read once; each batch kept (written out, when spilled) before the
            // next is embedded.
            let mut xs = keep.store()?;
            model.embed_each(&ids, |x| xs.push(x))?;
            (0, xs)
        }
    };
    progress.start("calibrating blocks", model.num_blocks() as u64);
    progress.advance(first as u64, None);
    for index in first..model.num_blocks() {
        model
            .with_block(index, |block| -> std::result::Result<(), E> {
                let stats = block_stats_in(world, block, &xs, &ctx, hessian, batches)?;
                let inputs = BlockInputs {
                    xs: &xs,
                    ctx: &ctx,
                    world,
                };
                compress(block, &stats, &inputs)?;
                drop(stats);
                if ranks > 1 {
                    check_same_block(world, block)?;
                }
                for k in 0..xs.len() {
                    let x = block
                        .forward(&xs.get(k)?, &ctx, None, &mut NoHook)
                        .map_err(CalibError::from)?;
                    xs.set(k, x)?;
                }
                Ok(())
            })
            .map_err(CalibError::from)??;
        finished(index, &xs)?;
        progress.advance(1, Some(&format!("block {index}")));
    }
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests;
