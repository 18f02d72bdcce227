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
    let norms = [&block.attn_norm, &block.mlp_norm];
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
        compress,
        &mut |_, _| Ok(()),
    )
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
    compress: &mut dyn FnMut(&mut Block, &BlockStats) -> std::result::Result<(), E>,
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
                compress(block, &stats)?;
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
mod tests {
    use super::*;
    use candle_core::Device;
    use shrink_models::{ModelConfig, Transformer};

    #[test]
    fn windows_are_seeded_and_in_range() {
        let tokens: Vec<u32> = (0..100).collect();
        let a = sample_windows(&tokens, 5, 10, 3).unwrap();
        assert_eq!(a, sample_windows(&tokens, 5, 10, 3).unwrap());
        assert_ne!(a, sample_windows(&tokens, 5, 10, 4).unwrap());
        for w in &a {
            assert_eq!(w.len(), 10);
            assert_eq!(w[9], w[0] + 9, "contiguous");
        }
        assert!(sample_windows(&tokens, 1, 101, 0).is_err());
    }

    #[test]
    fn sequential_feeds_compressed_outputs_forward() {
        let cfg = ModelConfig::tiny_for_tests();
        let mut model = Transformer::random(&cfg, 1, &Device::Cpu).unwrap();
        let reference = model.clone();
        let windows = vec![
            vec![1u32, 2, 3, 4, 5, 6],
            vec![7, 8, 9, 10, 11, 12],
            vec![3, 3, 3, 3, 3, 3],
        ];
        let mut hessians = vec![];
        sequential::<_, CalibError>(
            &mut model,
            &windows,
            2,
            true,
            &shrink_core::NoProgress,
            &mut |block, stats| {
                let s = stats
                    .get(&format!("model.layers.{}.mlp.up_proj", block.index))
                    .unwrap();
                assert_eq!(s.rows, 18);
                assert!(std::ptr::eq(
                    s,
                    stats
                        .get(&format!("model.layers.{}.mlp.gate_proj", block.index))
                        .unwrap()
                ));
                hessians.push(
                    stats
                        .get(&format!("model.layers.{}.self_attn.k_proj", block.index))
                        .unwrap()
                        .hessian
                        .clone(),
                );
                // "Compress" block 0 by zeroing its MLP output.
                if block.index == 0 {
                    let zeros = block.down_proj.weight().zeros_like()?;
                    block.down_proj.set_weight(zeros)?;
                }
                Ok(())
            },
        )
        .unwrap();
        // Block 1's inputs were computed with block 0 compressed: its Hessian must equal the
        // one from a direct run of the modified model, not of the original.
        let ids = Tensor::new(windows.clone(), &Device::Cpu).unwrap();
        let ctx = model.attention_context(6, 0).unwrap();
        let x0 = model.embed(&ids).unwrap();
        let x1 = model.blocks[0]
            .forward(&x0, &ctx, None, &mut NoHook)
            .unwrap();
        let h1 = model.blocks[1].attn_norm.forward(&x1).unwrap();
        let mut direct = LinearStats::new(cfg.hidden_size);
        direct.accumulate(&h1).unwrap();
        let diff = hessians[1]
            .iter()
            .zip(&direct.hessian)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-3, "{diff}");
        let x1_ref = reference.blocks[0]
            .forward(&x0, &ctx, None, &mut NoHook)
            .unwrap();
        let mut orig = LinearStats::new(cfg.hidden_size);
        orig.accumulate(&reference.blocks[1].attn_norm.forward(&x1_ref).unwrap())
            .unwrap();
        let moved = orig
            .hessian
            .iter()
            .zip(&direct.hessian)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-2,
            "compression of block 0 must change block 1's statistics"
        );
    }

    #[test]
    fn a_pass_resumed_from_recorded_activations_is_the_uninterrupted_pass() {
        let cfg = ModelConfig::tiny_for_tests();
        let windows: Vec<Vec<u32>> = (0..3)
            .map(|w| (0..6).map(|t| w * 7 + t).collect())
            .collect();
        // Block 0 "compressed" by halving its down projection; each block's Hessians recorded.
        let scratch = tempfile::tempdir().unwrap();
        let run_in = |model: &mut Transformer, start: Option<Resume>, keep: Keep| {
            let (mut hessians, mut after) = (vec![], vec![]);
            sequential_from::<_, CalibError>(
                model,
                &windows,
                2,
                true,
                &Alone,
                &shrink_core::NoProgress,
                start,
                keep,
                &mut |block, stats| {
                    let q = format!("model.layers.{}.self_attn.q_proj", block.index);
                    hessians.push((block.index, stats.get(&q).unwrap().hessian.clone()));
                    let half = (block.down_proj.weight() * 0.5)?;
                    block.down_proj.set_weight(half)?;
                    Ok(())
                },
                &mut |index, xs| {
                    let xs: Vec<Tensor> = (0..xs.len()).map(|k| xs.get(k).unwrap()).collect();
                    after.push((index, xs));
                    Ok(())
                },
            )
            .unwrap();
            (hessians, after)
        };
        let run = |model: &mut Transformer, start| run_in(model, start, Keep::default());
        let fresh = Transformer::random(&cfg, 3, &Device::Cpu).unwrap();
        let (whole, after) = run(&mut fresh.clone(), None);
        // Activations spilled to a scratch file: the same bits, and no file left behind.
        let (spilled, spilled_after) =
            run_in(&mut fresh.clone(), None, Keep::spilled(scratch.path()));
        assert!(spilled == whole, "bit-identical statistics");
        let bits = |xs: &[Tensor]| -> Vec<Vec<f32>> {
            xs.iter()
                .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        for ((_, a), (_, b)) in after.iter().zip(&spilled_after) {
            assert!(bits(a) == bits(b));
        }
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
        // Kept in bf16: the same statistics in memory and spilled, other bits than in f32 but
        // within bf16's rounding (2⁻⁹ relative per input value) of them.
        let bf16 = |spill| Keep {
            spill,
            dtype: candle_core::DType::BF16,
        };
        let (rounded, _) = run_in(&mut fresh.clone(), None, bf16(None));
        let (rounded_spilled, _) = run_in(&mut fresh.clone(), None, bf16(Some(scratch.path())));
        assert!(rounded == rounded_spilled);
        for ((_, exact), (_, rounded)) in whole.iter().zip(&rounded) {
            let difference: f64 = exact
                .iter()
                .zip(rounded)
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            let norm: f64 = exact.iter().map(|a| a * a).sum();
            let relative = (difference / norm).sqrt();
            assert!(relative > 0.0 && relative < 1e-2, "{relative}");
        }
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].1.len(), 2, "one tensor per batch of windows");
        // Resumed at block 1 with what block 0 left (on a model whose block 0 was never run).
        let (resumed, _) = run(
            &mut fresh.clone(),
            Some(Resume {
                block: 1,
                activations: Activations::in_memory(after[0].1.clone()),
            }),
        );
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].0, 1);
        assert!(resumed[0].1 == whole[1].1, "bit-identical statistics");
        let wrong = sequential_from::<_, CalibError>(
            &mut fresh.clone(),
            &windows,
            2,
            true,
            &Alone,
            &shrink_core::NoProgress,
            Some(Resume {
                block: 1,
                activations: Activations::in_memory(vec![]),
            }),
            Keep::default(),
            &mut |_, _| Ok(()),
            &mut |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(
            wrong.to_string().contains("resuming a killed job"),
            "{wrong}"
        );
    }

    #[test]
    fn ranks_that_split_the_batches_get_one_process_statistics_bit_for_bit() {
        let cfg = ModelConfig::tiny_for_tests();
        let windows: Vec<Vec<u32>> = (0..7)
            .map(|w| (0..6).map(|t| (w * 11 + t * 5) % 64).collect())
            .collect();
        let fresh = Transformer::random(&cfg, 5, &Device::Cpu).unwrap();
        // Each block's statistics are recorded and steer its "compression" (down_proj scaled by
        // a factor of its Hessian), so that a difference in any block shows in the next ones.
        let run = |world: &dyn Collective| {
            let mut model = fresh.clone();
            let mut seen = vec![];
            sequential_from::<_, CalibError>(
                &mut model,
                &windows,
                2,
                true,
                world,
                &shrink_core::NoProgress,
                None,
                Keep::default(),
                &mut |block, stats| {
                    let up = stats
                        .get(&format!("model.layers.{}.mlp.up_proj", block.index))
                        .unwrap();
                    let o = stats
                        .get(&format!("model.layers.{}.self_attn.o_proj", block.index))
                        .unwrap();
                    seen.push((up.clone(), o.clone()));
                    let f = 1.0 / (1.0 + up.hessian[1].abs().sqrt());
                    let w = (block.down_proj.weight() * f)?;
                    block.down_proj.set_weight(w)?;
                    Ok(())
                },
                &mut |_, _| Ok(()),
            )
            .unwrap();
            let weights: Vec<Vec<f32>> = model
                .blocks
                .iter()
                .map(|b| {
                    b.down_proj
                        .weight()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (seen, weights)
        };
        let alone = run(&Alone);
        assert_eq!(alone.0[0].0.rows, 7 * 6);
        for size in [2, 3, 4] {
            let ranks = shrink_core::ThreadGroup::new(size);
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks.iter().map(|r| s.spawn(|| run(r))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, got) in results.iter().enumerate() {
                assert!(
                    *got == alone,
                    "{size} ranks: rank {rank} differs from one process"
                );
            }
        }
        // Fewer batches than ranks is refused on every rank.
        let ranks = shrink_core::ThreadGroup::new(5);
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(|| {
                        sequential_from::<_, CalibError>(
                            &mut fresh.clone(),
                            &windows,
                            2,
                            true,
                            r,
                            &shrink_core::NoProgress,
                            None,
                            Keep::default(),
                            &mut |_, _| Ok(()),
                            &mut |_, _| Ok(()),
                        )
                        .unwrap_err()
                        .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            errors
                .iter()
                .all(|e| e.contains("5 ranks need at least 5 batches")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_exchange_adds_the_ranks_batches_in_batch_order() {
        // f64 addition is not associative: 1 − 1 + 2⁻⁶⁰ is 2⁻⁶⁰ in batch order, 0 in reverse.
        let values = [1.0f32, -1.0, 2f32.powi(-60)];
        let single = {
            let mut s = LinearStats::new(1);
            for v in values {
                s.add(&Partial {
                    xtx: vec![v],
                    channels: vec![v, v.abs(), v.abs()],
                    rows: 1,
                });
            }
            s
        };
        assert_eq!(single.hessian[0], 2f64.powi(-60));
        let ranks = shrink_core::ThreadGroup::new(3);
        let got: Vec<LinearStats> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .zip(values)
                .map(|(rank, v)| {
                    s.spawn(move || {
                        let mut hook = StatsHook {
                            stats: BlockStats {
                                stats: vec![LinearStats::new(1)],
                                index: BTreeMap::new(),
                            },
                            last: None,
                            hessian: true,
                            pending: Some(vec![Some(Partial {
                                xtx: vec![v],
                                channels: vec![v, v.abs(), v.abs()],
                                rows: 1,
                            })]),
                        };
                        exchange(rank, &mut hook, 3);
                        hook.stats.stats.remove(0)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for stats in got {
            assert!(stats == single, "{stats:?}");
        }
    }
}
