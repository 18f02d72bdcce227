//! Pruning for shrink.
//!
//! - **Unstructured and N:M** ([`prune_model`]): magnitude (per layer or global), Wanda and
//!   SparseGPT, with a sparsity per linear from a [`PrunePlan`]. Wanda and SparseGPT calibrate
//!   through the sequential engine of `shrink-calib` (shared with quantization): each block is
//!   pruned on the outputs of the already-pruned blocks before it.
//! - **Structured** ([`prune_structured`]): attention heads (query heads within KV groups, or
//!   whole KV groups), MLP channels, decoder layers and the hidden width, removed for real, so
//!   the model and its config shrink.
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
    prune_structured, shape_keys, Importance, LayerCriterion, Structure, StructuredOutcome, Target,
};
pub use unstructured::{magnitude, sparsegpt, wanda, SparseGptConfig, Sparsity};

use candle_core::{DType, Tensor};
use shrink_core::Progress;
use shrink_models::{Block, Transformer};
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

    /// Checks every target and that every linear's rows split into its N:M groups, before any work.
    pub fn check_model(&self, model: &Transformer) -> Result<()> {
        for block in &model.blocks {
            for (name, linear) in block.linears() {
                let s = self.sparsity_for(name).validated()?;
                let cols = linear.weight().dim(1)?;
                if let Sparsity::NM { m, .. } = s {
                    if cols % m != 0 {
                        return Err(PruneError::Shape {
                            tensor: name.to_string(),
                            message: format!(
                                "rows of {cols} weights do not split into groups of {m}"
                            ),
                        });
                    }
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

/// What pruning did to one linear.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
    let mut out = Vec::new();
    let device = model.device().clone();
    let dtype = model.dtype();
    let mut prune_block = |block: &mut Block,
                           stats: Option<&shrink_calib::BlockStats>,
                           threshold: Option<(f32, &mut usize)>|
     -> Result<()> {
        let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
        let mut threshold = threshold;
        for name in names {
            let start = Instant::now();
            let (orig, rows, cols) = weight_of(block, &name)?;
            let mut w = orig.clone();
            let sparsity = plan.sparsity_for(&name);
            let st = stats.and_then(|s| s.get(&name));
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
                        } else if a == *t && **ties > 0 {
                            *v = 0.0;
                            **ties -= 1;
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
            let relative_output_error = st
                .filter(|s| s.has_hessian())
                .map(|s| s.relative_output_error(&orig, &w))
                .transpose()?;
            let linear = block
                .linear_mut(&name)
                .ok_or_else(|| PruneError::Config(format!("no linear '{name}'")))?;
            linear
                .set_weight(Tensor::from_vec(w.clone(), (rows, cols), &device)?.to_dtype(dtype)?)?;
            out.push(LayerSparsity {
                name,
                shape: [rows, cols],
                target: match plan.method {
                    PruneMethod::Magnitude { global: true } => format!("{} global", plan.default),
                    _ => sparsity.to_string(),
                },
                sparsity: zeros(&w),
                relative_output_error,
                wall_s: start.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    };
    match (plan.method, windows) {
        (PruneMethod::Magnitude { global }, None) => {
            let mut threshold = None;
            if global {
                threshold = Some(global_threshold(model, plan.default.fraction())?);
            }
            progress.start("pruning blocks", model.blocks.len() as u64);
            for block in model.blocks.iter_mut() {
                let t = threshold.as_mut().map(|(t, ties)| (*t, ties));
                prune_block(block, None, t)?;
                progress.advance(1, Some(&format!("block {}", block.index)));
            }
            progress.finish();
        }
        (method, Some(windows)) => {
            let mut threshold = match method {
                PruneMethod::Magnitude { global: true } => {
                    Some(global_threshold(model, plan.default.fraction())?)
                }
                _ => None,
            };
            // Wanda reads only the channel norms: no Hessian, half the calibration time or less.
            let hessian = !matches!(method, PruneMethod::Wanda);
            for_each_block(model, windows, batch, hessian, progress, |block, stats| {
                let t = threshold.as_mut().map(|(t, ties)| (*t, ties));
                prune_block(block, Some(stats), t)
            })?;
        }
        (_, None) => {
            return Err(PruneError::Config(
                "Wanda and SparseGPT need calibration windows".into(),
            ))
        }
    }
    Ok(out)
}

/// Runs the sequential calibration engine, calling `each` with every block and its input
/// statistics (before the block's outputs feed the next block); `each`'s error is returned as is.
pub(crate) fn for_each_block(
    model: &mut Transformer,
    windows: &[Vec<u32>],
    batch: usize,
    hessian: bool,
    progress: &dyn Progress,
    mut each: impl FnMut(&mut Block, &shrink_calib::BlockStats) -> Result<()>,
) -> Result<()> {
    shrink_calib::sequential(model, windows, batch, hessian, progress, &mut each)
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
