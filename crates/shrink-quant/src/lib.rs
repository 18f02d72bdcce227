//! Post-training weight quantization: llama.cpp-exact grids (Q4_0, Q4_1, Q8_0 and their b-bit
//! generalisations), per-tensor / per-channel / per-group scales with an optional error-minimising
//! clip search, codes packed at their real bit width, round-to-nearest and GPTQ. GPTQ calibrates
//! block by block through `shrink-calib`'s sequential engine.
//!
//! ```
//! use shrink_quant::{rtn, QuantScheme};
//! let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 10.0).collect();
//! let q = rtn(&w, 2, 32, &QuantScheme::Q4_0, None, "example").unwrap();
//! assert_eq!(q.size_bytes(), 2 * 18); // two Q4_0 blocks: fp16 scale + 16 bytes of nibbles
//! let (_, blocks) = q.to_ggml_blocks().unwrap();
//! assert_eq!(blocks.len(), 36);
//! let back = q.dequantize();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 3.2 / 8.0));
//! ```

pub mod awq;
mod grid;
mod methods;
pub mod pack;
mod tensor;

pub use grid::{Grid, GroupParams};
pub use methods::{gptq, relative_output_error, rtn, GptqConfig};
pub use tensor::{Granularity, QuantScheme, QuantizedTensor};

use candle_core::{DType, Tensor};
use shrink_core::Progress;
use shrink_models::Llama;
use std::collections::BTreeMap;
use std::time::Instant;

/// Errors from quantization; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("quantization scheme: {0}")]
    Scheme(String),
    #[error("tensor '{tensor}': {message}")]
    Shape { tensor: String, message: String },
    #[error("tensor '{tensor}' has a non-finite value at index {index}")]
    NonFinite { tensor: String, index: usize },
    #[error(transparent)]
    Calib(#[from] shrink_calib::CalibError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// Which algorithm chooses the codes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    Rtn,
    Gptq(GptqConfig),
    /// AWQ scales (α grid of `grid` points) folded into the model, then RTN, or GPTQ when given.
    Awq {
        grid: usize,
        gptq: Option<GptqConfig>,
    },
}

/// A scheme for every linear: `default`, except where the name matches an override pattern (the
/// last matching one wins). A pattern with `*` is a glob over the whole name
/// (`model.layers.*.mlp.down_proj`); without, it matches any name containing it (`down_proj`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantPlan {
    pub default: QuantScheme,
    pub overrides: Vec<(String, QuantScheme)>,
}

impl QuantPlan {
    pub fn uniform(scheme: QuantScheme) -> Self {
        Self {
            default: scheme,
            overrides: vec![],
        }
    }

    /// The scheme of the linear called `name`.
    pub fn scheme_for(&self, name: &str) -> QuantScheme {
        self.overrides
            .iter()
            .rev()
            .find(|(pattern, _)| name_matches(pattern, name))
            .map(|(_, s)| *s)
            .unwrap_or(self.default)
    }
}

/// `*` matches any run of characters; a pattern without `*` matches as a substring.
fn name_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// What happened to one linear layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub shape: [usize; 2],
    pub bits_per_weight: f64,
    /// ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs (when calibration data was given).
    pub relative_output_error: Option<f64>,
    pub wall_s: f64,
}

/// The quantized linears of a model, by Hugging Face weight name (`….q_proj.weight`).
#[derive(Debug, Clone, Default)]
pub struct QuantizedModel {
    pub tensors: BTreeMap<String, QuantizedTensor>,
    pub layers: Vec<LayerReport>,
}

fn weight_rows(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (rows, cols) = t.dims2()?;
    Ok((
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        rows,
        cols,
    ))
}

/// Quantizes every linear of every decoder block with its scheme from `plan` (embeddings, norms
/// and the output head are left as they are) and replaces each weight in `model` by its dequantized value, so that evaluating
/// the model measures the quantized weights. GPTQ needs calibration `windows`; with RTN they are
/// optional and only add the per-layer output error to the report.
pub fn quantize_model(
    model: &mut Llama,
    method: Method,
    plan: &QuantPlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<QuantizedModel> {
    let mut out = QuantizedModel::default();
    let mut quantize_block = |block: &mut shrink_models::DecoderBlock,
                              stats: Option<&shrink_calib::BlockStats>|
     -> Result<()> {
        let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
        // AWQ rescales the block first; its linears then see scaled inputs.
        let scaled = match (method, stats) {
            (Method::Awq { grid, .. }, Some(stats)) => {
                awq::apply(block, stats, &plan.default, grid)?
            }
            (Method::Awq { .. }, None) => {
                return Err(QuantError::Scheme("AWQ needs calibration data".into()))
            }
            _ => BTreeMap::new(),
        };
        let method = match method {
            Method::Awq {
                gptq: Some(cfg), ..
            } => Method::Gptq(cfg),
            Method::Awq { gptq: None, .. } => Method::Rtn,
            m => m,
        };
        for name in names {
            let start = Instant::now();
            let scheme = &plan.scheme_for(&name);
            let linear = block_linear(block, &name)?;
            let (w, rows, cols) = weight_rows(linear.weight())?;
            let layer_stats = scaled
                .get(&name)
                .or_else(|| stats.and_then(|s| s.get(&name)));
            let q = match (method, layer_stats) {
                (Method::Gptq(cfg), Some(st)) => gptq(&w, rows, cols, st, scheme, &cfg, &name)?,
                (Method::Gptq(_), None) => {
                    return Err(QuantError::Scheme(format!(
                        "GPTQ needs calibration data for '{name}'"
                    )))
                }
                (Method::Awq { .. }, _) => {
                    return Err(QuantError::Scheme(
                        "AWQ resolves to RTN or GPTQ per layer".into(),
                    ))
                }
                (Method::Rtn, st) => {
                    let importance: Option<Vec<f32>> =
                        st.map(|s| (0..cols).map(|i| s.hessian[i * cols + i] as f32).collect());
                    rtn(&w, rows, cols, scheme, importance.as_deref(), &name)?
                }
            };
            let deq = q.dequantize();
            let error = layer_stats
                .map(|st| relative_output_error(&w, &deq, cols, st))
                .transpose()?;
            let linear = block_linear(block, &name)?;
            linear.set_weight(Tensor::from_vec(
                deq,
                (rows, cols),
                linear.weight().device(),
            )?)?;
            out.layers.push(LayerReport {
                name: name.clone(),
                shape: [rows, cols],
                bits_per_weight: q.bits_per_weight(),
                relative_output_error: error,
                wall_s: start.elapsed().as_secs_f64(),
            });
            out.tensors.insert(format!("{name}.weight"), q);
        }
        Ok(())
    };
    match windows {
        Some(windows) => {
            shrink_calib::sequential(model, windows, batch, progress, &mut |block, stats| {
                quantize_block(block, Some(stats))
                    .map_err(|e| shrink_calib::CalibError::Compress(e.to_string()))
            })?;
        }
        None => {
            progress.start("quantizing blocks", model.blocks.len() as u64);
            for block in model.blocks.iter_mut() {
                quantize_block(block, None)?;
                progress.advance(1, None);
            }
            progress.finish();
        }
    }
    Ok(out)
}

fn block_linear<'a>(
    block: &'a mut shrink_models::DecoderBlock,
    name: &str,
) -> Result<&'a mut shrink_models::Linear> {
    block.linear_mut(name).ok_or_else(|| {
        QuantError::Model(shrink_models::ModelError::UnknownLinear(name.to_string()))
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn overrides_match_by_substring_or_glob_last_wins() {
        let plan = QuantPlan {
            default: QuantScheme::Q4_0,
            overrides: vec![
                ("down_proj".into(), QuantScheme::Q8_0),
                ("model.layers.1*.mlp.down_proj".into(), QuantScheme::Q4_1),
            ],
        };
        assert_eq!(
            plan.scheme_for("model.layers.0.self_attn.q_proj"),
            QuantScheme::Q4_0
        );
        assert_eq!(
            plan.scheme_for("model.layers.2.mlp.down_proj"),
            QuantScheme::Q8_0
        );
        assert_eq!(
            plan.scheme_for("model.layers.12.mlp.down_proj"),
            QuantScheme::Q4_1
        );
        assert!(name_matches("*", "anything"));
        assert!(name_matches("a*b*c", "a-x-b-y-c"));
        assert!(!name_matches("a*b*c", "a-x-c-y-b"));
        assert!(!name_matches("ab*ba", "aba"));
    }
}
