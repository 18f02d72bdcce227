//! Llama, Mistral, Qwen2 and Qwen3: RMSNorm, RoPE, gated SiLU MLP (Qwen3: QK-norm).

use super::{GgufNames, Naming};

/// Checkpoint names.
pub(crate) const NAMES: Naming = Naming {
    embed: "model.embed_tokens",
    positions: None,
    token_types: None,
    embed_norm: None,
    layers: "model.layers",
    linears: [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    attn_norm: "input_layernorm",
    mlp_norm: "post_attention_layernorm",
    qk_norms: ["self_attn.q_norm", "self_attn.k_norm"],
    post_norms: ["", ""],
    final_norm: Some("model.norm"),
};

/// GGUF names (llama.cpp's `llama`, `qwen2` and `qwen3` architectures).
pub const GGUF: GgufNames = GgufNames {
    fixed: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    blocks: &[
        ("attn_norm", "input_layernorm", false),
        ("attn_q", "self_attn.q_proj", false),
        ("attn_k", "self_attn.k_proj", false),
        ("attn_v", "self_attn.v_proj", false),
        ("attn_output", "self_attn.o_proj", false),
        ("attn_q_norm", "self_attn.q_norm", false),
        ("attn_k_norm", "self_attn.k_norm", false),
        ("ffn_norm", "post_attention_layernorm", false),
        ("ffn_gate", "mlp.gate_proj", false),
        ("ffn_up", "mlp.up_proj", false),
        ("ffn_down", "mlp.down_proj", false),
    ],
    layers: "model.layers",
    optional_prefix: None,
    weights_and_biases_only: false,
    norm_shift: 0.0,
};
