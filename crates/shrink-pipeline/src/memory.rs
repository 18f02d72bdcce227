//! The memory budget of a run: the model's shape read from its file's header, the estimate of
//! [`Pipeline::estimated_peak_bytes`] with the real settings, and the refusal of a run whose
//! estimate exceeds the machine's memory or a `--max-memory` limit before any work starts.

use crate::stage::{JobMemory, ModelSizes};
use crate::{Pipeline, PipelineError, Result};
use std::path::Path;

/// What the memory estimate needs to know of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub parameters: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
}

/// The shape of the model at `path`, from its header only (no weights are read): the embedding's
/// width and the MLP down projection's other dimension. `None` for a model without those.
pub fn model_shape(path: &Path) -> Option<ModelShape> {
    let info = shrink_io::inspect(path).ok()?;
    let dims = |pick: &dyn Fn(&str) -> bool| {
        info.tensors
            .iter()
            .find(|t| pick(&t.name) && t.shape.len() == 2)
            .map(|t| (t.shape[0] as u64, t.shape[1] as u64))
    };
    // Every family's token embedding and MLP down projection (Hugging Face or GGUF names).
    let embedding = ["embed_tokens", "token_embd", "word_embeddings", "wte."];
    let (a, b) = dims(&|n| embedding.iter().any(|e| n.contains(e)))?;
    let hidden = a.min(b);
    let (c, d) = dims(&|n| {
        n.contains("ffn_down.weight")
            || (n.ends_with(".weight")
                && shrink_models::Role::of_name(n) == Some(shrink_models::Role::Down))
    })?;
    Some(ModelShape {
        parameters: info.parameters,
        hidden,
        intermediate: if c == hidden { d } else { c },
        vocab: a.max(b),
    })
}

/// The memory a run may use: `max_bytes` if given, else the machine's memory.
pub fn memory_limit(max_bytes: Option<u64>) -> u64 {
    max_bytes.unwrap_or_else(|| crate::sys::machine().memory_bytes)
}

/// Parses a memory size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024, an
/// optional `B`/`iB`): `16G`, `512MiB`, `1.5G`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 16G or 512M"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024f64.powi(2),
        "G" | "GB" | "GIB" => 1024f64.powi(3),
        "T" | "TB" | "TIB" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

impl Pipeline {
    /// Estimated peak memory in bytes of running the pipeline on a model with `parameters`
    /// weights, `hidden` wide with `intermediate` MLP rows and a `vocab`-token vocabulary: the
    /// checkpoint, the f32 model and the reference model the evaluation compares against, plus,
    /// when a stage calibrates, the calibration activations entering and leaving a block, one
    /// block's Hessians and a batch's working set, and what the stages' jobs hold beside them
    /// (a search's copies of the model) or instead of them (training).
    pub fn estimated_peak_bytes(
        &self,
        parameters: u64,
        hidden: u64,
        intermediate: u64,
        vocab: u64,
    ) -> u64 {
        // In u128 and saturated: settings such as `samples = 1000000000000` must give a huge
        // estimate, not a wrapped small one.
        let sizes = ModelSizes {
            parameters: u128::from(parameters),
            hidden: u128::from(hidden),
            intermediate: u128::from(intermediate),
            vocab: u128::from(vocab),
        };
        let (hidden, intermediate) = (sizes.hidden, sizes.intermediate);
        let model = 3 * sizes.parameters * 4;
        let calibrates = self.plan().iter().any(|s| s.calibrates);
        let calibration = if calibrates {
            let tokens = self.data.samples as u128 * self.data.seq_len as u128;
            let ids = tokens * 4;
            let activations = 2 * tokens * hidden * 4;
            let hessians = (3 * hidden * hidden + intermediate * intermediate) * 8;
            let batch = 8 * self.data.seq_len as u128 * intermediate * 4 * 4;
            ids + activations + hessians + batch
        } else {
            0
        };
        let jobs = self.plan().iter().map(|s| s.job.job().memory(&sizes)).fold(
            JobMemory::default(),
            |a, m| JobMemory {
                with_calibration: a.with_calibration.max(m.with_calibration),
                training: a.training.max(m.training),
            },
        );
        let total = model + (calibration + jobs.with_calibration).max(jobs.training) + (64 << 20);
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    /// The estimated peak memory for a model of `shape`; without a shape (the model is not
    /// here yet), a lower bound from the settings alone: the calibration windows' token ids.
    pub fn estimated_peak_for(&self, shape: Option<ModelShape>) -> u64 {
        match shape {
            Some(s) => self.estimated_peak_bytes(s.parameters, s.hidden, s.intermediate, s.vocab),
            None if self.plan().iter().any(|s| s.calibrates) => {
                (self.data.samples as u128 * self.data.seq_len as u128 * 4)
                    .try_into()
                    .unwrap_or(u64::MAX)
            }
            None => 0,
        }
    }

    /// Refuses a run whose estimated peak memory exceeds `limit` bytes, with the estimate shown.
    /// Returns the estimate.
    pub fn check_memory(&self, shape: Option<ModelShape>, limit: u64) -> Result<u64> {
        let estimate = self.estimated_peak_for(shape);
        if estimate > limit {
            let gb = |b: u64| b as f64 / 1e9;
            return Err(PipelineError::Invalid(format!(
                "the run needs an estimated {:.1} GB of memory{}, more than the {:.1} GB allowed \
                 (the machine's memory, or --max-memory): lower [data] samples or seq_len, or \
                 the training batch",
                gb(estimate),
                if shape.is_none() {
                    " for its calibration token ids alone"
                } else {
                    ""
                },
                gb(limit)
            )));
        }
        Ok(estimate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("0").is_err());
    }
}
