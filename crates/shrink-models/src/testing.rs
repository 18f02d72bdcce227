//! Fixtures for tests, built only for tests (`cfg(test)`) and with the `testing` feature, which the
//! workspace's crates enable in their dev-dependencies: not part of the library's API.

use crate::ModelConfig;

impl ModelConfig {
    /// A 2-block GQA Llama small enough for unit tests.
    pub fn tiny_for_tests() -> Self {
        ModelConfig {
            model_type: "llama".into(),
            architectures: vec!["LlamaForCausalLM".into()],
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            layer_norm_eps: None,
            rope_theta: 10_000.0,
            vocab_size: 64,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            attention_bias: false,
            sliding_window: None,
            use_sliding_window: None,
            rope_scaling: None,
            hidden_act: Some("silu".into()),
            mlp_bias: false,
            type_vocab_size: None,
            position_embedding_type: None,
            hidden_activation: None,
            query_pre_attn_scalar: None,
            rope_local_base_freq: None,
            layer_types: None,
            sliding_window_pattern: None,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
        }
    }

    /// A 2-block Qwen3 (QK-norm, no q/k/v biases, a head size of its own, tied embeddings).
    pub fn tiny_qwen3_for_tests() -> Self {
        ModelConfig {
            model_type: "qwen3".into(),
            architectures: vec!["Qwen3ForCausalLM".into()],
            head_dim: Some(12),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_word_embeddings: true,
            ..Self::tiny_for_tests()
        }
    }

    /// A 3-block Gemma 3: sandwich norms stored as `w` (applied as `1 + w`), QK-norm, GeGLU, the
    /// embedding scaled by `√hidden`, two sliding-window layers (window 3, RoPE base 10,000)
    /// around a global one (base 1,000,000), `query_pre_attn_scalar` unlike the head size.
    pub fn tiny_gemma3_for_tests() -> Self {
        ModelConfig {
            model_type: "gemma3_text".into(),
            architectures: vec!["Gemma3ForCausalLM".into()],
            num_hidden_layers: 3,
            head_dim: Some(16),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_local_base_freq: Some(10_000.0),
            sliding_window: Some(3),
            layer_types: Some(vec![
                "sliding_attention".into(),
                "full_attention".into(),
                "sliding_attention".into(),
            ]),
            query_pre_attn_scalar: Some(20.0),
            tie_word_embeddings: true,
            hidden_act: None,
            hidden_activation: Some("gelu_pytorch_tanh".into()),
            ..Self::tiny_for_tests()
        }
    }

    /// A 2-block BERT encoder (4 heads, GELU) for unit tests.
    pub fn tiny_bert_for_tests() -> Self {
        ModelConfig {
            model_type: "bert".into(),
            architectures: vec!["BertModel".into()],
            num_key_value_heads: None,
            layer_norm_eps: Some(1e-12),
            hidden_act: Some("gelu".into()),
            type_vocab_size: Some(2),
            position_embedding_type: Some("absolute".into()),
            max_position_embeddings: 64,
            ..Self::tiny_for_tests()
        }
    }

    /// A 2-block GPT-2 (4 heads, tied embeddings) for unit tests.
    pub fn tiny_gpt2_for_tests() -> Self {
        ModelConfig {
            model_type: "gpt2".into(),
            architectures: vec!["GPT2LMHeadModel".into()],
            num_key_value_heads: None,
            layer_norm_eps: Some(1e-5),
            hidden_act: Some("gelu_new".into()),
            tie_word_embeddings: true,
            max_position_embeddings: 64,
            ..Self::tiny_for_tests()
        }
    }
}

/// The largest absolute difference between two equally long sequences of values.
pub fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.into_iter().copied().collect(),
        b.into_iter().copied().collect(),
    );
    assert_eq!(a.len(), b.len(), "compared sequences differ in length");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A model read block by block from `model`'s own tensors (as from a memory-mapped checkpoint),
/// each converted to the asked type when loaded.
pub fn streamed_copy(model: &crate::Transformer) -> crate::StreamedModel {
    let tensors = model.named_tensors();
    crate::StreamedModel::new(
        &model.config,
        candle_core::DType::F32,
        Box::new(move |name: &str, dtype: candle_core::DType| {
            Ok(tensors
                .get(name)
                .ok_or_else(|| crate::ModelError::MissingTensor(name.into()))?
                .to_dtype(dtype)?)
        }),
    )
    .expect("a valid test model streams")
}
