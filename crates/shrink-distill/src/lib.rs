//! Knowledge distillation: a student initialised from a structurally pruned teacher, from a subset
//! of the teacher's layers or from a config with random weights, trained with the losses and the
//! trainer of [`shrink_train`] (logit KL with temperature, cross-entropy mix, hidden-state and
//! attention-map losses, teacher top-k cached on disk).
//!
//! ```
//! use candle_core::Device;
//! use shrink_distill::{distill, layer_subset, DistillJob};
//! use shrink_models::{Transformer, ModelConfig};
//! let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &Device::Cpu).unwrap();
//! // Keep the teacher's second block; match its output to the teacher's.
//! let student = layer_subset(&teacher, &[1]).unwrap();
//! let mut job = DistillJob::default();
//! job.train.steps = 4;
//! job.train.lr = 1e-3;
//! job.loss.hidden = vec![(0, 1)];
//! let windows: Vec<Vec<u32>> = (0..4).map(|w| (0..16).map(|i| (w + i * 5) % 64).collect()).collect();
//! let (trained, outcome) =
//!     distill(&teacher, student, &job, &windows, &windows[..1], None, "doc", &shrink_core::NoProgress).unwrap();
//! assert_eq!(trained.config.num_hidden_layers, 1);
//! assert_eq!(outcome.log.train.len(), 4);
//! ```

use candle_core::Device;
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{ModelConfig, Transformer};
use shrink_train::{trainable, DistillConfig, Distiller, Teacher, TopKCache};
use std::collections::BTreeMap;
use std::path::Path;

pub use shrink_train::{TrainConfig, TrainOutcome};

/// Errors from distillation.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error("student: {0}")]
    Student(String),
    /// A student configuration the model code refuses.
    #[error("student: {0}")]
    StudentConfig(#[source] shrink_models::ModelError),
    #[error(transparent)]
    Train(#[from] shrink_train::TrainError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DistillError>;

/// Everything a distillation run needs besides its models and text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillJob {
    pub train: TrainConfig,
    pub loss: DistillConfig,
    /// Name patterns of student tensors kept frozen (e.g. `embed_tokens`).
    pub frozen: Vec<String>,
    /// Cache the teacher's top-k log-probabilities for every training window (logit losses only).
    pub top_k: Option<usize>,
}

/// Parses a layer list: `0,2,4`, ranges `0-7`, or `every:2` (layers 0, 2, 4, …) of `count`.
pub fn parse_layers(spec: &str, count: usize) -> Result<Vec<usize>> {
    let bad = |m: String| DistillError::Student(format!("layers '{spec}': {m}"));
    let mut out = Vec::new();
    if let Some(step) = spec.strip_prefix("every:") {
        let step: usize = step
            .trim()
            .parse()
            .map_err(|_| bad("expected every:N with N ≥ 1".into()))?;
        if step == 0 {
            return Err(bad("expected every:N with N ≥ 1".into()));
        }
        out.extend((0..count).step_by(step));
    } else {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let num = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| bad(format!("'{s}' is not a layer number")))
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad(format!("range {a}-{b} is backwards")));
                    }
                    out.extend(a..=b);
                }
                None => out.push(num(part)?),
            }
        }
    }
    if out.is_empty() {
        return Err(bad("no layers".into()));
    }
    if let Some(&l) = out.iter().find(|&&l| l >= count) {
        return Err(bad(format!(
            "layer {l} does not exist (the teacher has {count})"
        )));
    }
    if out.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("layers must be increasing and distinct".into()));
    }
    Ok(out)
}

/// A student made of the teacher's blocks `layers` (in order), with its embeddings, final norm
/// and head: DistilBERT's initialisation.
pub fn layer_subset(teacher: &Transformer, layers: &[usize]) -> Result<Transformer> {
    Ok(teacher.keep_layers(layers)?)
}

/// A randomly initialised student with the teacher's vocabulary and `config`'s shape.
pub fn random_student(
    teacher: &Transformer,
    mut config: ModelConfig,
    seed: u64,
) -> Result<Transformer> {
    config.vocab_size = teacher.config.vocab_size;
    Ok(Transformer::random(&config, seed, &Device::Cpu)?)
}

/// The teacher's config with shape keys (`num_hidden_layers`, `hidden_size`,
/// `intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`) overridden.
pub fn student_config(
    teacher: &ModelConfig,
    overrides: &BTreeMap<String, usize>,
) -> Result<ModelConfig> {
    let mut c = teacher.clone();
    for (key, &v) in overrides {
        match key.as_str() {
            "num_hidden_layers" => {
                if v != c.num_hidden_layers {
                    c.layer_types = None; // a new depth takes the family's pattern
                }
                c.num_hidden_layers = v
            }
            "hidden_size" => c.hidden_size = v,
            "intermediate_size" => c.intermediate_size = v,
            "num_attention_heads" => c.num_attention_heads = v,
            "num_key_value_heads" => c.num_key_value_heads = Some(v),
            "head_dim" => c.head_dim = Some(v),
            other => {
                return Err(DistillError::Student(format!(
                    "unknown student config key '{other}' (expected num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads or head_dim)"
                )))
            }
        }
    }
    if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads.max(1)) {
        c.head_dim = Some(teacher.head_dim());
    }
    c.validate().map_err(DistillError::StudentConfig)?;
    Ok(c)
}

/// Distils `teacher` into `student` on `windows`, evaluating on `eval`. With `workdir`, checkpoints
/// go to `workdir` (a rerun with the same `fingerprint` resumes) and the top-k cache, when asked
/// for, to `workdir/teacher-top-k.safetensors`. Returns the trained student (plain f32 tensors)
/// and the training log. The teacher is not modified; the student is consumed (dropped once its
/// trainable copy exists, so that training does not hold it twice).
#[allow(clippy::too_many_arguments)]
pub fn distill(
    teacher: &Transformer,
    student: Transformer,
    job: &DistillJob,
    windows: &[Vec<u32>],
    eval: &[Vec<u32>],
    workdir: Option<&Path>,
    fingerprint: &str,
    progress: &dyn Progress,
) -> Result<(Transformer, TrainOutcome)> {
    if teacher.arch.is_encoder() && job.top_k.is_some() {
        return Err(DistillError::Student(
            "the top-k cache holds the teacher's token log-probabilities; an encoder is distilled on its hidden states, without top-k".into(),
        ));
    }
    let (model, params) = trainable(&student, &job.frozen)?;
    drop(student);
    let source = match job.top_k {
        None => Teacher::Model(teacher.clone()),
        Some(k) => {
            let seq = windows.first().map(Vec::len).unwrap_or(0);
            let t = job.loss.temperature;
            let cached = workdir
                .map(|d| d.join("teacher-top-k.safetensors"))
                .filter(|p| p.exists())
                .and_then(|p| TopKCache::load(&p, windows.len(), seq, teacher.device()).ok())
                .filter(|c| c.k == k && c.temperature == t);
            let cache = match cached {
                Some(c) => c,
                None => {
                    let c = TopKCache::build(teacher, windows, k, t, job.train.batch, progress)?;
                    if let Some(d) = workdir {
                        std::fs::create_dir_all(d).map_err(|e| {
                            DistillError::Student(format!("creating {}: {e}", d.display()))
                        })?;
                        c.save(&d.join("teacher-top-k.safetensors"))?;
                    }
                    c
                }
            };
            Teacher::TopK(cache, Some(teacher.clone()))
        }
    };
    let (trained, outcome) = Distiller::new(model, params, source, job.loss.clone())?.fit(
        &job.train,
        windows,
        eval,
        workdir,
        fingerprint,
        progress,
    )?;
    Ok((trained, outcome))
}

#[cfg(test)]
mod tests;
