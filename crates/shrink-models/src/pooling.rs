//! Sentence embeddings from an encoder's token states, as sentence-transformers computes them:
//! the pooling its `1_Pooling/config.json` names, then L2 normalisation when `modules.json` lists
//! a `Normalize` module.

use crate::{ModelError, Result};
use candle_core::{DType, Tensor, D};
use serde_json::Value;

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// Scale each sentence vector to unit length.
    pub normalize: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolingMode {
    /// The mean of the real (non-padding) tokens' states.
    Mean,
    /// The first token's (`[CLS]`) state.
    Cls,
    /// The channel-wise maximum over real tokens.
    Max,
}

impl Default for Pooling {
    /// Mean pooling without normalisation (what sentence-transformers does without a config).
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

impl Pooling {
    /// Reads sentence-transformers' `1_Pooling/config.json` and `modules.json` (either may be
    /// absent: mean pooling, no normalisation).
    pub fn from_sentence_transformers(
        pooling: Option<&Value>,
        modules: Option<&Value>,
    ) -> Result<Self> {
        let mut out = Pooling::default();
        if let Some(cfg) = pooling {
            let flag = |key: &str| cfg.get(key).and_then(Value::as_bool).unwrap_or(false);
            let modes = [
                ("pooling_mode_mean_tokens", Some(PoolingMode::Mean)),
                ("pooling_mode_cls_token", Some(PoolingMode::Cls)),
                ("pooling_mode_max_tokens", Some(PoolingMode::Max)),
                ("pooling_mode_mean_sqrt_len_tokens", None),
                ("pooling_mode_weightedmean_tokens", None),
                ("pooling_mode_lasttoken", None),
            ];
            let on: Vec<_> = modes.iter().filter(|(k, _)| flag(k)).collect();
            out.mode =
                match on.as_slice() {
                    [(_, Some(mode))] => *mode,
                    [(key, None)] => {
                        return Err(ModelError::Config(format!(
                            "1_Pooling/config.json: {key} is not supported (mean, cls or max)"
                        )))
                    }
                    [] => {
                        return Err(ModelError::Config(
                            "1_Pooling/config.json: no pooling mode is set".into(),
                        ))
                    }
                    _ => return Err(ModelError::Config(
                        "1_Pooling/config.json: several pooling modes at once are not supported"
                            .into(),
                    )),
                };
        }
        if let Some(list) = modules.and_then(Value::as_array) {
            out.normalize = list.iter().any(|m| {
                m.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with("models.Normalize"))
            });
        }
        Ok(out)
    }

    /// Pools right-padded token states `(batch, seq, hidden)` to f32 sentence vectors
    /// `(batch, hidden)`; sequence `i` has `lengths[i]` real tokens.
    pub fn pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        let (b, t, _) = hidden.dims3()?;
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            return Err(ModelError::Config(format!(
                "pooling: lengths {lengths:?} do not fit a batch of {b} × {t}"
            )));
        }
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&l| (0..t).map(move |j| if j < l { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, t, 1), hidden.device())?;
        let pooled = match self.mode {
            PoolingMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Mean => {
                let counts: Vec<f32> = lengths.iter().map(|&l| l as f32).collect();
                let counts = Tensor::from_vec(counts, (b, 1), hidden.device())?;
                hidden
                    .broadcast_mul(&mask)?
                    .sum(1)?
                    .broadcast_div(&counts)?
            }
            PoolingMode::Max => {
                // Padding gets a very negative value so it never wins.
                let penalty = ((mask - 1.0)? * 1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
        };
        if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            Ok(pooled.broadcast_div(&norm)?)
        } else {
            Ok(pooled)
        }
    }
}

#[cfg(test)]
mod tests;
