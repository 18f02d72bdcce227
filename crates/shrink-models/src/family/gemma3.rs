//! Gemma 3 (text): the Llama names for the linears, four norms per block (before and after each
//! sub-layer), QK-norm.

use super::{GgufNames, Naming};

/// Checkpoint names (`Gemma3ForCausalLM`).
pub(crate) const NAMES: Naming = Naming {
    embed: "model.embed_tokens",
    positions: None,
    token_types: None,
    embed_norm: None,
    layers: "model.layers",
    linears: super::llama::NAMES.linears,
    attn_norm: "input_layernorm",
    mlp_norm: "pre_feedforward_layernorm",
    qk_norms: ["self_attn.q_norm", "self_attn.k_norm"],
    post_norms: ["post_attention_layernorm", "post_feedforward_layernorm"],
    final_norm: Some("model.norm"),
};

/// GGUF names (llama.cpp's `gemma3` architecture).
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
        ("post_attention_norm", "post_attention_layernorm", false),
        ("ffn_norm", "pre_feedforward_layernorm", false),
        ("ffn_gate", "mlp.gate_proj", false),
        ("ffn_up", "mlp.up_proj", false),
        ("ffn_down", "mlp.down_proj", false),
        ("post_ffw_norm", "post_feedforward_layernorm", false),
    ],
    layers: "model.layers",
    optional_prefix: None,
    weights_and_biases_only: false,
    norm_shift: 1.0,
};
