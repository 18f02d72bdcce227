//! Pruning for shrink.
//!
//! - **Unstructured and N:M** ([`prune_model`]): magnitude (per layer or global), Wanda and
//!   SparseGPT, with a sparsity per linear from a [`PrunePlan`]. Wanda and SparseGPT calibrate
//!   through the sequential engine of `shrink-calib` (shared with quantization): each block is
//!   pruned on the outputs of the already-pruned blocks before it.
//! - **Structured** ([`prune_structured`]): attention heads (query heads within KV groups, or
//!   whole KV groups), MLP channels, decoder layers and the hidden width, removed for real, so
//!   the model and its config shrink; [`prune_structured_streamed`] does it to a model read
//!   block by block from its file.
//!
//! ```
//! use candle_core::Device;
//! use shrink_models::{Transformer, ModelConfig};
//! use shrink_prune::{prune_model, PruneMethod, PrunePlan, Sparsity};
//! let mut model = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &Device::Cpu).unwrap();
//! let tokens: Vec<u32> = (0..400).map(|i| (i * 7 % 64) as u32).collect();
//! let windows = shrink_calib::sample_windows(&tokens, 4, 16, 0).unwrap();
//! let plan = PrunePlan::uniform(PruneMethod::Wanda, Sparsity::NM { n: 2, m: 4 });
//! let layers = prune_model(&mut model, &plan, Some(&windows), 2, &shrink_core::NoProgress).unwrap();
//! assert!(layers.iter().all(|l| l.sparsity == 0.5));
//! ```

mod structured;
mod unstructured;

pub use structured::{
    check_structure, prune_structured, prune_structured_streamed, scores_block_by_block,
    shape_keys, Importance, LayerCriterion, Structure, StructuredOutcome, Target,
};
pub use unstructured::{magnitude, sparsegpt, wanda, SparseGptConfig, Sparsity};

use candle_core::{DType, Tensor};
use shrink_core::Progress;
use shrink_io::TensorSink;
use shrink_models::{Block, BlockModel, Transformer};
use std::time::Instant;

/// Errors from pruning.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Config(String),
    #[error("tensor '{tensor}': {message}")]
    Shape { tensor: String, message: String },
    #[error(transparent)]
    Weights(#[from] shrink_core::WeightError),
    #[error(transparent)]
    Io(#[from] shrink_io::IoError),
    #[error(transparent)]
    Calib(#[from] shrink_calib::CalibError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PruneError>;

/// Which weights go.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PruneMethod {
    /// Smallest |w| in each layer, or over all block linears at once (`global`).
    Magnitude { global: bool },
    /// Smallest |w|·‖X‖₂ in each output row.
    Wanda,
    /// Adaptive masks with OBS weight updates.
    SparseGpt(SparseGptConfig),
}

impl PruneMethod {
    /// Whether the method needs calibration windows.
    pub fn calibrates(&self) -> bool {
        !matches!(self, PruneMethod::Magnitude { .. })
    }
}

/// A sparsity for every block linear: `default`, except where a rule's pattern matches the name
/// (the last matching one wins; patterns as in quantization plans).
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    pub method: PruneMethod,
    pub default: Sparsity,
    pub rules: Vec<(String, Sparsity)>,
}

impl PrunePlan {
    pub fn uniform(method: PruneMethod, sparsity: Sparsity) -> Self {
        Self {
            method,
            default: sparsity,
            rules: vec![],
        }
    }

    pub fn sparsity_for(&self, name: &str) -> Sparsity {
        self.rules
            .iter()
            .rev()
            .find(|(p, _)| shrink_models::name_matches(p, name))
            .map(|(_, s)| *s)
            .unwrap_or(self.default)
    }

    /// Checks every target and that every linear's rows split into its N:M groups, before any work
    /// (from the config's shapes: a model read block by block is not loaded for it).
    pub fn check_model(&self, model: &impl BlockModel) -> Result<()> {
        for (name, [_, cols]) in model.config().block_linears() {
            let s = self.sparsity_for(&name).validated()?;
            if let Sparsity::NM { m, .. } = s {
                if cols % m != 0 {
                    return Err(PruneError::Shape {
                        tensor: name,
                        message: format!("rows of {cols} weights do not split into groups of {m}"),
                    });
                }
            }
        }
        if matches!(self.method, PruneMethod::Magnitude { global: true })
            && (!self.rules.is_empty() || matches!(self.default, Sparsity::NM { .. }))
        {
            return Err(PruneError::Config(
                "global magnitude pruning takes one fraction for the whole model (no N:M, no per-layer rules)".into(),
            ));
        }
        Ok(())
    }
}

impl PrunePlan {
    /// [`PrunePlan::check_model`] for a model read block by block, which global magnitude
    /// pruning (ranking every weight of the model at once) cannot use.
    pub fn check_streamed(&self, model: &impl BlockModel) -> Result<()> {
        self.check_model(model)?;
        if matches!(self.method, PruneMethod::Magnitude { global: true }) {
            return Err(PruneError::Config(
                "global magnitude pruning ranks every weight of the model at once: it holds the model whole, not block by block".into(),
            ));
        }
        Ok(())
    }
}

/// What pruning did to one linear.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerSparsity {
    pub name: String,
    pub shape: [usize; 2],
    /// The target (`0.5000`, `2:4`).
    pub target: String,
    /// The fraction of exact zeros after pruning.
    pub sparsity: f64,
    /// ‖(W − Ŵ) X‖² / ‖W X‖² on the calibration inputs, when the method gathered the Hessian
    /// (SparseGPT; not magnitude or Wanda, which need no more than channel norms).
    pub relative_output_error: Option<f64>,
    pub wall_s: f64,
}

fn weight_of(block: &Block, name: &str) -> Result<(Vec<f32>, usize, usize)> {
    let (_, linear) = block
        .linears()
        .into_iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| PruneError::Config(format!("no linear '{name}'")))?;
    let (rows, cols) = linear.weight().dims2()?;
    Ok((
        linear
            .weight()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
        rows,
        cols,
    ))
}

fn zeros(w: &[f32]) -> f64 {
    w.iter().filter(|v| **v == 0.0).count() as f64 / w.len().max(1) as f64
}

/// Prunes every linear of every decoder block as `plan` says (embeddings, norms and the output
/// head stay dense) and writes the pruned weights back into `model`. Wanda and SparseGPT need
/// calibration `windows`.
pub fn prune_model(
    model: &mut Transformer,
    plan: &PrunePlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<LayerSparsity>> {
    plan.check_model(model)?;
    let threshold = match plan.method {
        PruneMethod::Magnitude { global: true } => {
            Some(global_threshold(model, plan.default.fraction())?)
        }
        _ => None,
    };
    run_blocks(
        model,
        plan,
        windows,
        batch,
        threshold,
        &shrink_core::Alone,
        Default::default(),
        progress,
        None,
        &mut |_| Ok(()),
        &mut |_, _, _| Ok(()),
    )
}

/// What [`prune_blocks`] calls after each block: its index, the activations leaving it (when
/// calibrating) and the layers pruned so far in this run. All a killed job needs to resume at the
/// next block ([`shrink_calib::BlockJob`]).
pub type BlockFinished<'a> =
    dyn FnMut(usize, Option<&shrink_calib::Activations>, &[LayerSparsity]) -> Result<()> + 'a;

/// [`prune_model`] block by block on any [`BlockModel`]: `done` receives each block once its
/// linears are pruned. On a [`shrink_models::StreamedModel`] only one block is ever in memory, so
/// `done` writes it. Global magnitude pruning, which ranks every weight of the model at once, is
/// refused: it needs the model whole ([`prune_model`]). The calibration activations are kept as
/// `keep` says ([`shrink_calib::Keep`]). Calibration is split
/// across the ranks of `world` ([`shrink_calib::sequential_from`]). With `start`, a resumed job
/// begins at a later block; `finished` is called after each block.
#[allow(clippy::too_many_arguments)]
pub fn prune_blocks<M: BlockModel>(
    model: &mut M,
    plan: &PrunePlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    world: &dyn shrink_core::Collective,
    keep: shrink_calib::Keep,
    progress: &dyn Progress,
    start: Option<shrink_calib::Resume>,
    done: &mut dyn FnMut(&Block) -> Result<()>,
    finished: &mut BlockFinished<'_>,
) -> Result<Vec<LayerSparsity>> {
    plan.check_streamed(model)?;
    run_blocks(
        model, plan, windows, batch, None, world, keep, progress, start, done, finished,
    )
}

/// What a pruning of a model read block by block needs besides the model and the method: the
/// calibration windows and windows per forward pass, the ranks calibration is split across (rank
/// 0 writes), how the calibration activations are kept ([`shrink_calib::Keep`]), the output's
/// format and float type, and progress.
#[derive(Clone, Copy)]
pub struct StreamedRun<'a> {
    pub windows: Option<&'a [Vec<u32>]>,
    pub batch: usize,
    pub world: &'a dyn shrink_core::Collective,
    pub keep: shrink_calib::Keep<'a>,
    pub export: shrink_io::Export,
    pub dtype: shrink_io::GgufWriteType,
    pub progress: &'a dyn Progress,
}

/// Prunes the model read block by block from `checkpoint` (unstructured or N:M, as `plan` says)
/// and writes it to `out` as it goes (a GGUF or a Hugging Face folder of `run`'s float type,
/// atomically): the embedding first, each block as soon as it is pruned, then the output
/// tensors. Only one block's weights (and the calibration activations) are in memory at a time.
/// A GGUF has the bytes [`prune_model`] and [`shrink_io::write_model`] write; a folder has their
/// tensors, in the model's order and in 5 GB shards. The calibration activations are kept as
/// `run.keep` says. Calibration is split across the ranks of `run.world`
/// ([`shrink_calib::sequential_from`]); every rank prunes every block and rank 0 alone writes.
pub fn prune_streamed(
    checkpoint: &shrink_io::Checkpoint,
    plan: &PrunePlan,
    run: &StreamedRun,
    out: &std::path::Path,
) -> Result<Streamed> {
    let StreamedRun {
        windows,
        batch,
        world,
        keep,
        export,
        dtype,
        progress,
    } = *run;
    let mut model = checkpoint.streamed(DType::F32)?;
    plan.check_streamed(&model)?;
    let config = model.config().clone();
    let arch = config.arch()?;
    let written = shrink_io::Checkpoint {
        config: shrink_io::config_for(checkpoint, &config),
        ..checkpoint.clone()
    };
    // Rank 0 writes; the other ranks calibrate and prune (each block's weights are checked
    // against rank 0's) but write nothing. The tensors outside the blocks are written as stored.
    // The job records each finished block beside `out` (every rank its own activations) and
    // resumes after a kill ([`shrink_calib::BlockJob`]), to a GGUF or a folder.
    let settings = format!(
        "pruning\nmethod {:?}\nplan {:?} {:?}\nwritten {export:?} {dtype:?}\nkept in {:?}",
        plan.method, plan.default, plan.rules, keep.dtype
    );
    let job = shrink_calib::job_description(&checkpoint.path, &settings, windows, batch);
    let job = shrink_calib::BlockJob::open(out, &job, windows.is_some(), world)?;
    let (state, start) = job.resumed::<Report>(keep, world)?.unzip();
    let partial = job.partial();
    let sink = match world.rank() {
        0 => Some(shrink_io::ModelStream::resumable(
            &written,
            &config,
            export,
            dtype,
            out,
            Some({
                let (tensors, bytes) = state.as_ref().map_or((0, 0), |s| (s.tensors, s.bytes));
                (partial.as_path(), tensors, bytes)
            }),
        )?),
        _ => None,
    };
    let resumed_at = state.as_ref().map(|s| s.blocks);
    let earlier = state.map(|s| s.report.layers).unwrap_or_default();
    let sink = std::cell::RefCell::new(sink);
    if let Some(sink) = sink.borrow_mut().as_mut() {
        checkpoint.supply_stored(sink, Some(&config.embedding_name()))?;
    }
    let layers = prune_blocks(
        &mut model,
        plan,
        windows,
        batch,
        world,
        keep,
        progress,
        start,
        &mut |block| {
            if let Some(sink) = sink.borrow_mut().as_mut() {
                for (name, t) in block.named_tensors(arch) {
                    sink.tensor(&name, t)?;
                }
            }
            Ok(())
        },
        &mut |index, xs, layers| {
            // Recorded when due, where the file holds whole blocks and nothing is waiting.
            let point = resume_point(&job, sink.borrow_mut().as_mut())?;
            let state = point.map(|(tensors, bytes)| shrink_calib::Recorded {
                blocks: index + 1,
                tensors,
                bytes,
                report: Report {
                    layers: earlier.iter().chain(layers).cloned().collect(),
                },
            });
            Ok(job.record(world, index + 1, state.as_ref(), xs)?)
        },
    )?;
    let finished = match sink.into_inner() {
        Some(mut sink) => checkpoint
            .supply_stored(&mut sink, None)
            .map_err(PruneError::from)
            .and_then(|()| Ok(sink.finish()?)),
        None => Ok(()),
    };
    job.complete(world, finished)?;
    let layers = earlier.into_iter().chain(layers).collect();
    Ok(Streamed { layers, resumed_at })
}

/// Where rank 0's output can resume from now (see [`shrink_io::ModelStream::checkpoint`]), when
/// a record is due ([`shrink_calib::BlockJob::due`]); `None` otherwise, and on the other ranks,
/// which write nothing.
pub(crate) fn resume_point(
    job: &shrink_calib::BlockJob,
    sink: Option<&mut shrink_io::ModelStream>,
) -> Result<Option<(usize, u64)>> {
    Ok(match sink {
        Some(sink) if job.due() => sink.checkpoint()?,
        _ => None,
    })
}

/// A streamed pruning's report of its finished blocks, recorded after each block.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    layers: Vec<LayerSparsity>,
}

/// What [`prune_streamed`] did: every linear's pruning (blocks finished before a kill included)
/// and the block a resumed job began at.
#[derive(Debug)]
pub struct Streamed {
    pub layers: Vec<LayerSparsity>,
    pub resumed_at: Option<usize>,
}

/// Prunes each block of `model` in order (through the sequential engine when calibrating) and
/// hands it to `done`. `threshold`: global magnitude pruning's |w| and ties (see
/// [`global_threshold`]).
#[allow(clippy::too_many_arguments)]
fn run_blocks<M: BlockModel>(
    model: &mut M,
    plan: &PrunePlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    threshold: Option<(f32, usize)>,
    world: &dyn shrink_core::Collective,
    keep: shrink_calib::Keep,
    progress: &dyn Progress,
    start: Option<shrink_calib::Resume>,
    done: &mut dyn FnMut(&Block) -> Result<()>,
    finished: &mut BlockFinished<'_>,
) -> Result<Vec<LayerSparsity>> {
    let out = std::cell::RefCell::new(Vec::new());
    let mut threshold = threshold;
    let mut prune_block = |block: &mut Block,
                           stats: Option<&shrink_calib::BlockStats>|
     -> Result<()> {
        let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let start = Instant::now();
            let (mut w, rows, cols) = weight_of(block, &name)?;
            let sparsity = plan.sparsity_for(&name);
            let st = stats.and_then(|s| s.get(&name));
            // The unpruned weights, kept only to measure the output error (SparseGPT's Hessian).
            let orig = st.filter(|s| s.has_hessian()).map(|_| w.clone());
            let need = || {
                st.ok_or_else(|| {
                    PruneError::Config(format!("no calibration statistics for '{name}'"))
                })
            };
            match (plan.method, threshold.as_mut()) {
                (PruneMethod::Magnitude { global: true }, Some((t, ties))) => {
                    shrink_core::check_matrix(&w, rows, cols, &name)?;
                    for v in w.iter_mut() {
                        let a = v.abs();
                        if a < *t {
                            *v = 0.0;
                        } else if a == *t && *ties > 0 {
                            *v = 0.0;
                            *ties -= 1;
                        }
                    }
                }
                (PruneMethod::Magnitude { .. }, _) => {
                    magnitude(&mut w, rows, cols, sparsity, &name)?
                }
                (PruneMethod::Wanda, _) => wanda(&mut w, rows, cols, need()?, sparsity, &name)?,
                (PruneMethod::SparseGpt(cfg), _) => {
                    sparsegpt(&mut w, rows, cols, need()?, sparsity, &cfg, &name)?
                }
            }
            let relative_output_error = match (st, orig) {
                (Some(s), Some(orig)) => Some(s.relative_output_error(&orig, &w)?),
                _ => None,
            };
            let zero_fraction = zeros(&w);
            let linear = block
                .linear_mut(&name)
                .ok_or_else(|| PruneError::Config(format!("no linear '{name}'")))?;
            let (device, dtype) = (linear.weight().device().clone(), linear.weight().dtype());
            linear.set_weight(Tensor::from_vec(w, (rows, cols), &device)?.to_dtype(dtype)?)?;
            out.borrow_mut().push(LayerSparsity {
                name,
                shape: [rows, cols],
                target: match plan.method {
                    PruneMethod::Magnitude { global: true } => format!("{} global", plan.default),
                    _ => sparsity.to_string(),
                },
                sparsity: zero_fraction,
                relative_output_error,
                wall_s: start.elapsed().as_secs_f64(),
            });
        }
        done(block)
    };
    match (plan.method, windows) {
        (PruneMethod::Magnitude { .. }, None) => {
            let n = model.num_blocks();
            let first = start.map_or(0, |s| s.block);
            progress.start("pruning blocks", n as u64);
            progress.advance(first as u64, None);
            for index in first..n {
                model.with_block(index, |block| prune_block(block, None))??;
                finished(index, None, &out.borrow())?;
                progress.advance(1, Some(&format!("block {index}")));
            }
            progress.finish();
        }
        (method, Some(windows)) => {
            // Wanda reads only the channel norms: no Hessian, half the calibration time or less.
            let hessian = !matches!(method, PruneMethod::Wanda);
            shrink_calib::sequential_from(
                model,
                windows,
                batch,
                hessian,
                world,
                progress,
                start,
                keep,
                &mut |block, stats, _| prune_block(block, Some(stats)),
                &mut |index, xs| finished(index, Some(xs), &out.borrow()),
            )?;
        }
        (_, None) => {
            return Err(PruneError::Config(
                "Wanda and SparseGPT need calibration windows".into(),
            ))
        }
    }
    Ok(out.into_inner())
}

/// The |w| below which global magnitude pruning removes every block-linear weight, and how many
/// weights equal to it must go too (the first ones met, in block and linear order), so that exactly
/// `round(fraction · total)` go.
fn global_threshold(model: &Transformer, fraction: f64) -> Result<(f32, usize)> {
    let mut all: Vec<f32> = Vec::new();
    for block in &model.blocks {
        for (name, linear) in block.linears() {
            let w: Vec<f32> = linear
                .weight()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            shrink_core::check_matrix(&w, w.len(), 1, name)?;
            all.extend(w.iter().map(|v| v.abs()));
        }
    }
    let k = (fraction * all.len() as f64).round() as usize;
    if k == 0 {
        return Ok((0.0, 0));
    }
    let (_, t, _) = all.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
    let t = *t;
    let below = all.iter().filter(|v| **v < t).count();
    Ok((t, k - below))
}

#[cfg(test)]
mod tests;
