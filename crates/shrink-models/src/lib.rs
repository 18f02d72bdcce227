//! Model architectures for shrink, on candle. Every model exposes its linear layers by name, so that
//! compression stages can observe their inputs ([`LinearHook`]), swap their weights
//! ([`Llama::linear_mut`]) and run one decoder block at a time ([`Llama::embed`],
//! [`DecoderBlock::forward`], [`Llama::final_hidden`], [`Llama::lm_head`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use shrink_models::{Llama, LlamaConfig};
//! let cfg = LlamaConfig::tiny_for_tests();
//! let model = Llama::random(&cfg, 0, &Device::Cpu).unwrap();
//! let tokens = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
//! let logits = model.forward(&tokens).unwrap();
//! assert_eq!(logits.dims(), &[1, 4, cfg.vocab_size]);
//! ```

mod chat;
mod generate;
mod kernels;
mod llama;

pub use chat::{render_chat, ChatMessage};
pub use generate::{generate, Generation, Sampler, SamplingConfig};
pub use llama::{
    ActQuant, AttentionContext, DecoderBlock, KvCache, Linear, LinearHook, Llama, LlamaConfig,
    NoHook, RmsNorm,
};

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}': shrink supports llama, mistral and qwen2 (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")]
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
}

pub type Result<T> = std::result::Result<T, ModelError>;
