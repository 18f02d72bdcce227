//! Model architectures for shrink, on candle: one [`Transformer`] for the Transformer family, BERT
//! encoders and GPT-2. Every model exposes its linear layers by name and by [`Role`], so that
//! compression stages can observe their inputs ([`LinearHook`]), swap their weights
//! ([`Transformer::linear_mut`]) and run one block at a time ([`Transformer::embed`],
//! [`Block::forward`], [`Transformer::final_hidden`], [`Transformer::lm_head`]) whatever the
//! family.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use shrink_models::{ModelConfig, Transformer};
//! let cfg = ModelConfig::from_json(&serde_json::json!({
//!     "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
//!     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!     "vocab_size": 64, "max_position_embeddings": 256,
//! }))
//! .unwrap();
//! let model = Transformer::random(&cfg, 0, &Device::Cpu).unwrap();
//! let tokens = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
//! let logits = model.forward(&tokens).unwrap();
//! assert_eq!(logits.dims(), &[1, 4, cfg.vocab_size]);
//! ```

mod chat;
mod checkpoint;
mod config;
pub mod family;
mod generate;
mod kernels;
mod pooling;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod transformer;

pub use chat::{render_chat, ChatMessage};
pub use config::{Activation, Arch, ModelConfig};
pub use generate::{generate, Generation, Sampler, SamplingConfig};
pub use kernels::F32Values;
pub use pooling::{Pooling, PoolingMode};
pub use transformer::{
    ActQuant, AttentionContext, Block, BlockModel, Head, KvCache, Linear, LinearHook, MlmHead,
    NoHook, Norm, PackedLoader, PackedSource, Role, ScaleGroup, ScaleSite, StoredType,
    StreamedModel, TensorLoader, Transformer,
};

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}': shrink supports llama, mistral, qwen2, bert and gpt2 (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, BertModel, BertForMaskedLM, GPT2LMHeadModel)")]
    UnknownArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("no linear layer named '{0}'")]
    UnknownLinear(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A tensor a streamed model could not read from its file (the reader's error, as it is).
    #[error(transparent)]
    Load(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Whether a tensor or linear name matches a rule pattern: with `*`, a glob over the whole name
/// (`model.layers.*.mlp.down_proj`); without, any name containing it (`down_proj`).
pub fn name_matches(pattern: &str, name: &str) -> bool {
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
