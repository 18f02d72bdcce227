//! Training for shrink, shared by distillation (`shrink-distill`) and quantization-aware training
//! (`shrink-quant`): distillation losses, AdamW on a warmup + cosine schedule, gradient
//! accumulation and clipping, frozen parameter groups, periodic evaluation, and checkpoints with the
//! optimizer state and data position, so that a resumed run ends with bit-identical weights.
//!
//! ```
//! use candle_core::Device;
//! use shrink_models::{Transformer, ModelConfig};
//! use shrink_train::{train, trainable, DistillConfig, Distiller, Teacher, TrainConfig};
//! let config = ModelConfig::tiny_for_tests();
//! let teacher = Transformer::random(&config, 0, &Device::Cpu).unwrap();
//! let student = Transformer::random(&config, 1, &Device::Cpu).unwrap();
//! // Train everything except the embeddings.
//! let (student, params) = trainable(&student, &["embed_tokens".to_string()]).unwrap();
//! let mut objective =
//!     Distiller::new(student, params, Teacher::Model(teacher), DistillConfig::default()).unwrap();
//! let windows: Vec<Vec<u32>> = (0..8).map(|w| (0..16).map(|i| (w * 7 + i * 3) % 64).collect()).collect();
//! let run = TrainConfig { steps: 5, batch: 2, lr: 1e-3, warmup: 1, ..TrainConfig::default() };
//! let outcome = train(&mut objective, &run, &windows, &windows[..2], None, "doc", &shrink_core::NoProgress).unwrap();
//! let kl = |i: usize| outcome.log.eval[i].1[1].1;
//! assert!(kl(1) < kl(0));
//! ```

mod distill;
pub mod loss;
mod optim;
mod trainer;

pub use distill::{Capture, DistillConfig, Distiller, HiddenLoss, Prepare, Teacher, TopKCache};
pub use loss::{Divergence, Target};
pub use optim::{AdamW, AdamWConfig, Schedule};
pub use trainer::{
    global_norm, train, Batch, LogPoint, Loss, Objective, Step, TrainConfig, TrainLog, TrainOutcome,
};

use candle_core::{DType, Var};
use shrink_models::{name_matches, Transformer};
use std::path::PathBuf;

/// Errors from training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training: {0}")]
    Config(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("non-finite loss or gradient ({loss}) at step {step}: lower the learning rate, or check the model for NaNs")]
    NonFinite { step: u64, loss: f64 },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A caller's hook (such as QAT's weight preparation) failed with its own error.
    #[error(transparent)]
    Hook(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// An f32 copy of `model` whose tensors are [`Var`]s, except those whose name matches a `frozen`
/// pattern (see [`name_matches`]) and those the forward pass never reads (BERT's pooler, kept in
/// [`Transformer::extra`]); returns the trainable ones by name. The input model is not changed.
pub fn trainable(
    model: &Transformer,
    frozen: &[String],
) -> Result<(Transformer, Vec<(String, Var)>)> {
    let mut tensors = std::collections::BTreeMap::new();
    let mut params = Vec::new();
    for (name, tensor) in model.named_tensors() {
        let tensor = tensor.to_dtype(DType::F32)?;
        if model.extra.contains_key(&name) || frozen.iter().any(|p| name_matches(p, &name)) {
            tensors.insert(name, tensor.detach());
        } else {
            let var = Var::from_tensor(&tensor)?;
            tensors.insert(name.clone(), var.as_tensor().clone());
            params.push((name, var));
        }
    }
    let student = Transformer::from_tensors(&model.config, tensors, DType::F32)?;
    Ok((student, params))
}

#[cfg(test)]
mod tests;
