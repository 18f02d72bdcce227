//! BERT-style encoders (BERT, MiniLM). llama.cpp's BERT GGUF needs a WordPiece vocabulary shrink
//! does not write, so the family has no GGUF names here.

use super::Naming;

/// Checkpoint names (`BertModel`; `BertForMaskedLM` adds `bert.` before them).
pub(crate) const NAMES: Naming = Naming {
    embed: "embeddings.word_embeddings",
    positions: Some("embeddings.position_embeddings"),
    token_types: Some("embeddings.token_type_embeddings"),
    embed_norm: Some("embeddings.LayerNorm"),
    layers: "encoder.layer",
    linears: [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "",
        "intermediate.dense",
        "output.dense",
    ],
    attn_norm: "attention.output.LayerNorm",
    mlp_norm: "output.LayerNorm",
    qk_norms: ["", ""],
    post_norms: ["", ""],
    final_norm: None,
};

/// BERT's masked-language-model head (`BertForMaskedLM`'s `cls.predictions`).
pub(crate) const MLM_TRANSFORM: &str = "cls.predictions.transform.dense";
pub(crate) const MLM_NORM: &str = "cls.predictions.transform.LayerNorm";
pub(crate) const MLM_BIAS: &str = "cls.predictions.bias";
