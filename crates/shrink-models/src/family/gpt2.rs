//! GPT-2: learned positions, pre-norm LayerNorm, GELU (tanh), biases, causal attention.

use super::{GgufNames, Naming};

/// Checkpoint names (GPT-2's fused `c_attn` appears as `attn.c_attn.q`, `.k`, `.v`).
pub(crate) const NAMES: Naming = Naming {
    embed: "wte",
    positions: Some("wpe"),
    token_types: None,
    embed_norm: None,
    layers: "h",
    linears: [
        "attn.c_attn.q",
        "attn.c_attn.k",
        "attn.c_attn.v",
        "attn.c_proj",
        "",
        "mlp.c_fc",
        "mlp.c_proj",
    ],
    attn_norm: "ln_1",
    mlp_norm: "ln_2",
    qk_norms: ["", ""],
    post_norms: ["", ""],
    final_norm: Some("ln_f"),
};

/// GGUF names (llama.cpp's `gpt2` architecture); the checkpoint's Conv1D weights are `[in, out]`.
pub const GGUF: GgufNames = GgufNames {
    fixed: &[
        ("token_embd.weight", "wte.weight"),
        ("position_embd.weight", "wpe.weight"),
        ("output_norm.weight", "ln_f.weight"),
        ("output_norm.bias", "ln_f.bias"),
    ],
    blocks: &[
        ("attn_norm", "ln_1", false),
        ("attn_qkv", "attn.c_attn", true),
        ("attn_output", "attn.c_proj", true),
        ("ffn_norm", "ln_2", false),
        ("ffn_up", "mlp.c_fc", true),
        ("ffn_down", "mlp.c_proj", true),
    ],
    layers: "h",
    optional_prefix: Some("transformer."),
    weights_and_biases_only: true,
    norm_shift: 0.0,
};

/// `config.json` keys GPT-2 spells its own way: (theirs, ours). `n_inner` (the MLP width, `null`
/// for 4 × `n_embd`) is read apart.
pub const CONFIG_KEYS: [(&str, &str); 6] = [
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_positions", "max_position_embeddings"),
    ("activation_function", "hidden_act"),
    ("layer_norm_epsilon", "layer_norm_eps"),
];
