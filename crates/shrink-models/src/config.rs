//! The model config: the subset of a Hugging Face `config.json` that defines the shape of every
//! family shrink runs (Llama, Mistral, Qwen2, Qwen3, Gemma 3, BERT, GPT-2). GPT-2's own key names (`n_embd`,
//! `n_layer`, …) are read and written back under those names.

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The subset of a Hugging Face `config.json` that defines a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// LayerNorm's epsilon (BERT `layer_norm_eps`, GPT-2 `layer_norm_epsilon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_eps: Option<f64>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (Llama's `attention_bias`); Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    /// BERT's segment embeddings (`type_vocab_size`); shrink encodes single sentences (segment 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// Gemma's name for the MLP activation (`gelu_pytorch_tanh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5` (else `head_dim^-0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers (`rope_theta` is the global layers').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: each layer's attention, `sliding_attention` or `full_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 (older configs): every `sliding_window_pattern`-th layer is global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 2's soft caps, which Gemma 3 dropped: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    4096
}

/// The architectures shrink implements, from `model_type` or `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen3: Qwen2 without q/k/v biases, with an RMSNorm on each query and key head (QK-norm).
    Qwen3,
    /// Gemma 3: QK-norm, a norm before and after each sub-layer (`1 + w`), GeGLU, the embedding
    /// scaled by `√hidden`, sliding-window and global layers with their own RoPE bases.
    Gemma3,
    /// BERT-style encoders (BERT, MiniLM): absolute positions, post-norm LayerNorm, GELU, biases,
    /// bidirectional attention.
    Bert,
    /// GPT-2: learned positions, pre-norm LayerNorm, GELU (tanh), biases, causal attention.
    Gpt2,
}

impl Arch {
    /// Names accepted in errors about unknown architectures.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gemma3_text, bert, gpt2";

    /// The checkpoint prefix of the blocks' tensors (`model.layers`, `encoder.layer`, `h`): block
    /// `i`'s tensors are named `{prefix}.{i}.…`.
    pub fn layer_prefix(self) -> &'static str {
        crate::family::naming(self).layers
    }

    /// Encoders attend in both directions and produce embeddings rather than next tokens.
    pub fn is_encoder(self) -> bool {
        self == Arch::Bert
    }

    /// The Llama family and its descendants: RMSNorm, RoPE, a gated MLP.
    pub fn is_llama_like(self) -> bool {
        matches!(
            self,
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3
        )
    }

    /// An RMSNorm over each query and key head before RoPE (`q_norm`, `k_norm`).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// A second norm on each sub-layer's output before its residual sum (Gemma's sandwich).
    pub fn has_post_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// RMSNorm scales stored as `w` and applied as `1 + w` (Gemma).
    pub fn norm_offset(self) -> f32 {
        if self == Arch::Gemma3 {
            1.0
        } else {
            0.0
        }
    }
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` (Llama).
    SiluGated,
    /// GELU with the exact erf (BERT's `gelu`).
    GeluErf,
    /// GELU's tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// `gelu_tanh(gate) · up` (Gemma's GeGLU).
    GeluTanhGated,
}

impl ModelConfig {
    /// Parses and validates a `config.json` value.
    pub fn from_json(value: &Value) -> Result<Self> {
        let mut value = value.clone();
        rope_parameters_to_ours(&mut value)?;
        match value.get("model_type").and_then(Value::as_str) {
            Some("gpt2") => gpt2_keys_to_ours(&mut value)?,
            Some("bert") => bert_pruned_heads(&mut value)?,
            _ => {}
        }
        let cfg: ModelConfig =
            serde_json::from_value(value).map_err(|e| ModelError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The keys of `config.json` that give the model's shape, under the family's own names: what
    /// changes when layers, heads or channels are removed.
    pub fn shape_json(&self) -> Vec<(&'static str, Value)> {
        let mut keys: Vec<(&'static str, Value)> = vec![
            ("hidden_size", self.hidden_size.into()),
            ("intermediate_size", self.intermediate_size.into()),
            ("num_hidden_layers", self.num_hidden_layers.into()),
            ("num_attention_heads", self.num_attention_heads.into()),
        ];
        match self.arch() {
            Ok(Arch::Gpt2) => {
                for key in keys.iter_mut() {
                    if let Some((theirs, _)) = crate::family::gpt2::CONFIG_KEYS
                        .iter()
                        .find(|(_, ours)| *ours == key.0)
                    {
                        key.0 = theirs;
                    } else if key.0 == "intermediate_size" {
                        key.0 = "n_inner";
                    }
                }
            }
            Ok(Arch::Bert) => {
                // BERT derives the head size from hidden_size / num_attention_heads: removed heads
                // are written as transformers writes them, the original count plus `pruned_heads`.
                let original = self.hidden_size / self.head_dim().max(1);
                let removed: serde_json::Map<String, Value> = (0..self.num_hidden_layers)
                    .filter(|_| original > self.num_attention_heads)
                    .map(|l| {
                        let heads: Vec<Value> = (self.num_attention_heads..original)
                            .map(Value::from)
                            .collect();
                        (l.to_string(), Value::Array(heads))
                    })
                    .collect();
                keys[3].1 = original.into();
                keys.push(("pruned_heads", Value::Object(removed)));
            }
            _ => {
                keys.push(("num_key_value_heads", self.num_kv_heads().into()));
                keys.push(("head_dim", self.head_dim().into()));
                keys.push(("rms_norm_eps", self.rms_norm_eps.into()));
                // Each layer's attention follows its layer when layers are removed.
                if let Some(types) = &self.layer_types {
                    keys.push(("layer_types", types.clone().into()));
                }
            }
        }
        keys
    }

    /// The architecture, or an error naming what the config says.
    pub fn arch(&self) -> Result<Arch> {
        let by_type = match self.model_type.as_str() {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3_text" => Some(Arch::Gemma3),
            "bert" => Some(Arch::Bert),
            "gpt2" => Some(Arch::Gpt2),
            _ => None,
        };
        let by_arch = self.architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "Gemma3ForCausalLM" => Some(Arch::Gemma3),
            "BertModel" | "BertForMaskedLM" => Some(Arch::Bert),
            "GPT2LMHeadModel" | "GPT2Model" => Some(Arch::Gpt2),
            _ => None,
        });
        by_type.or(by_arch).ok_or_else(|| {
            let name = if self.model_type.is_empty() {
                self.architectures.join(",")
            } else {
                self.model_type.clone()
            };
            ModelError::UnknownArchitecture(name)
        })
    }

    /// Checks the shape keys are consistent (heads divide, sizes non-zero, known family, supported
    /// activation and positions).
    pub fn validate(&self) -> Result<()> {
        let arch = self.arch()?;
        let bad = |m: String| Err(ModelError::Config(m));
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_attention_heads and vocab_size must be positive".into());
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        self.activation()?;
        if arch.is_llama_like() {
            if !self.head_dim().is_multiple_of(2) {
                return bad(format!(
                    "head_dim ({}) must be even for RoPE",
                    self.head_dim()
                ));
            }
            if self.mlp_bias {
                return bad("mlp_bias = true is not supported".into());
            }
            for (key, cap) in [
                ("final_logit_softcapping", self.final_logit_softcapping),
                ("attn_logit_softcapping", self.attn_logit_softcapping),
            ] {
                if cap.is_some() {
                    return bad(format!("{key} (Gemma 2's soft caps) is not supported"));
                }
            }
            if let Some(types) = &self.layer_types {
                if types.len() != self.num_hidden_layers {
                    return bad(format!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    ));
                }
                if let Some(t) = types
                    .iter()
                    .find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
                {
                    return bad(format!(
                        "layer_types holds '{t}' (expected sliding_attention or full_attention)"
                    ));
                }
            }
            if self.sliding_window_pattern == Some(0) {
                return bad("sliding_window_pattern must be positive".into());
            }
            self.rope_inv_freq().map(|_| ())
        } else {
            if kv != self.num_attention_heads {
                return bad(format!(
                    "{arch:?} has no grouped-query attention: num_key_value_heads ({kv}) must equal num_attention_heads ({})",
                    self.num_attention_heads
                ));
            }
            if let Some(kind) = &self.position_embedding_type {
                if kind != "absolute" {
                    return bad(format!(
                        "position_embedding_type '{kind}' is not supported (only absolute)"
                    ));
                }
            }
            if self.max_position_embeddings == 0 {
                return bad("max_position_embeddings must be positive".into());
            }
            Ok(())
        }
    }

    /// The MLP activation the config names, checked against the family.
    pub fn activation(&self) -> Result<Activation> {
        let arch = self.arch()?;
        let act = self
            .hidden_act
            .as_deref()
            .or(self.hidden_activation.as_deref());
        let found = match (arch, act) {
            (Arch::Gemma3, None | Some("gelu_pytorch_tanh")) => Some(Activation::GeluTanhGated),
            (Arch::Gemma3, _) => None,
            (a, None | Some("silu")) if a.is_llama_like() => Some(Activation::SiluGated),
            (Arch::Bert, None | Some("gelu")) => Some(Activation::GeluErf),
            (Arch::Bert | Arch::Gpt2, Some("gelu_new" | "gelu_pytorch_tanh")) => {
                Some(Activation::GeluTanh)
            }
            (Arch::Gpt2, None) => Some(Activation::GeluTanh),
            (Arch::Gpt2, Some("gelu")) => Some(Activation::GeluErf),
            _ => None,
        };
        found.ok_or_else(|| {
            ModelError::Config(format!(
                "hidden_act '{}' is not supported for {arch:?}",
                act.unwrap_or("")
            ))
        })
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The epsilon of the family's norms.
    pub fn norm_eps(&self) -> f64 {
        match self.arch() {
            Ok(a) if a.is_llama_like() => self.rms_norm_eps,
            Ok(Arch::Bert) => self.layer_norm_eps.unwrap_or(1e-12),
            _ => self.layer_norm_eps.unwrap_or(1e-5),
        }
    }

    pub(crate) fn qkv_bias(&self) -> bool {
        match self.arch() {
            Ok(Arch::Qwen2 | Arch::Bert | Arch::Gpt2) => true,
            Ok(Arch::Gemma3) => false,
            _ => self.attention_bias,
        }
    }

    pub(crate) fn o_bias(&self) -> bool {
        match self.arch() {
            Ok(Arch::Bert | Arch::Gpt2) => true,
            Ok(Arch::Qwen2 | Arch::Gemma3) => false,
            _ => self.attention_bias,
        }
    }

    /// Biases on the MLP's linears.
    pub(crate) fn mlp_biases(&self) -> bool {
        matches!(self.arch(), Ok(Arch::Bert | Arch::Gpt2))
    }

    /// Whether the output projection is the token embedding (GPT-2 always ties).
    pub fn ties_embeddings(&self) -> bool {
        self.tie_word_embeddings || self.arch().ok() == Some(Arch::Gpt2)
    }

    pub(crate) fn effective_sliding_window(&self) -> Option<usize> {
        match self.arch().ok()? {
            Arch::Mistral | Arch::Gemma3 => self.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if self.use_sliding_window == Some(true) => {
                self.sliding_window
            }
            _ => None,
        }
    }

    /// Whether layer `index` attends through the sliding window (when the model has one) with
    /// the local RoPE base: every layer of Mistral and windowed Qwen; Gemma 3's `layer_types`, or
    /// all but every `sliding_window_pattern`-th layer (6 by default).
    pub fn is_sliding_layer(&self, index: usize) -> bool {
        if self.effective_sliding_window().is_none() {
            return false;
        }
        if self.arch().ok() != Some(Arch::Gemma3) {
            return true;
        }
        match &self.layer_types {
            Some(types) => types.get(index).is_some_and(|t| t == "sliding_attention"),
            None => !(index + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6)),
        }
    }

    /// The factor scaling attention scores: `query_pre_attn_scalar^-0.5` (Gemma) or
    /// `head_dim^-0.5`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim() as f64)
            .sqrt()
    }

    /// The config of the same model with only layers `kept` (ascending), renumbered from 0: each
    /// keeps its own attention (Gemma 3's `layer_types` are cut, not recomputed by index).
    pub fn with_layers(&self, kept: &[usize]) -> ModelConfig {
        let mut c = self.clone();
        c.num_hidden_layers = kept.len();
        if let Some(types) = &self.layer_types {
            c.layer_types = Some(kept.iter().filter_map(|&i| types.get(i).cloned()).collect());
        } else if self.arch().ok() == Some(Arch::Gemma3)
            && self.effective_sliding_window().is_some()
        {
            c.layer_types = Some(
                kept.iter()
                    .map(|&i| match self.is_sliding_layer(i) {
                        true => "sliding_attention".to_string(),
                        false => "full_attention".to_string(),
                    })
                    .collect(),
            );
        }
        c
    }

    /// The factor the token embeddings are multiplied by (Gemma: `√hidden_size`).
    pub fn embedding_scale(&self) -> Option<f64> {
        (self.arch().ok() == Some(Arch::Gemma3)).then(|| (self.hidden_size as f64).sqrt())
    }

    /// RoPE inverse frequencies, with Llama-3 style scaling when `rope_scaling` asks for it; empty
    /// for families with learned positions.
    pub(crate) fn rope_inv_freq(&self) -> Result<Vec<f64>> {
        self.rope_inv_freq_with(self.rope_theta)
    }

    /// The sliding-window layers' RoPE inverse frequencies when their base differs from the
    /// global one (Gemma 3's `rope_local_base_freq`, unscaled).
    pub(crate) fn rope_local_inv_freq(&self) -> Result<Option<Vec<f64>>> {
        match self.rope_local_base_freq {
            Some(base) if self.effective_sliding_window().is_some() => {
                let d = self.head_dim();
                Ok(Some(
                    (0..d / 2)
                        .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
                        .collect(),
                ))
            }
            _ => Ok(None),
        }
    }

    fn rope_inv_freq_with(&self, theta: f64) -> Result<Vec<f64>> {
        if !self.arch()?.is_llama_like() {
            return Ok(vec![]);
        }
        let d = self.head_dim();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let Some(scaling) = &self.rope_scaling else {
            return Ok(inv);
        };
        if scaling.is_null() {
            return Ok(inv);
        }
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let num = |key: &str| {
            scaling.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                ModelError::Config(format!("rope_scaling.{key} is missing or not a number"))
            })
        };
        match kind {
            "default" => Ok(inv),
            "linear" => {
                let factor = num("factor")?;
                for f in inv.iter_mut() {
                    *f /= factor;
                }
                Ok(inv)
            }
            "llama3" => {
                let factor = num("factor")?;
                let low = num("low_freq_factor")?;
                let high = num("high_freq_factor")?;
                let original = num("original_max_position_embeddings")?;
                let low_wavelen = original / low;
                let high_wavelen = original / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    *f = if wavelen < high_wavelen {
                        *f
                    } else if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * *f / factor + smooth * *f
                    };
                }
                Ok(inv)
            }
            other => Err(ModelError::Config(format!(
                "rope_scaling type '{other}' is not supported (supported: default, linear, llama3)"
            ))),
        }
    }

    /// The config as `config.json` for its family (GPT-2 under its own key names).
    pub fn to_json(&self) -> Result<Value> {
        let mut value =
            serde_json::to_value(self).map_err(|e| ModelError::Config(e.to_string()))?;
        if self.arch()? == Arch::Gpt2 {
            if let Some(map) = value.as_object_mut() {
                for (theirs, ours) in crate::family::gpt2::CONFIG_KEYS {
                    if let Some(v) = map.remove(ours) {
                        map.insert(theirs.into(), v);
                    }
                }
                if let Some(v) = map.remove("intermediate_size") {
                    map.insert("n_inner".into(), v);
                }
            }
        }
        Ok(value)
    }
}

/// transformers' `pruned_heads` (layer → removed heads, `num_attention_heads` still the original
/// count) as our shape: the same number removed from every layer, the head size kept.
fn bert_pruned_heads(value: &mut Value) -> Result<()> {
    let Some(map) = value.as_object_mut() else {
        return Err(ModelError::Config("config.json is not an object".into()));
    };
    let Some(pruned) = map.get("pruned_heads").and_then(Value::as_object) else {
        return Ok(());
    };
    if pruned.is_empty() {
        return Ok(());
    }
    let layers = map
        .get("num_hidden_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let counts: Vec<usize> = (0..layers)
        .map(|l| {
            pruned
                .get(&l.to_string())
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .collect();
    if counts.windows(2).any(|w| w[0] != w[1]) {
        return Err(ModelError::Config(format!(
            "pruned_heads removes different numbers of heads per layer ({counts:?}); shrink needs the same number in every layer"
        )));
    }
    let (Some(hidden), Some(heads)) = (
        map.get("hidden_size").and_then(Value::as_u64),
        map.get("num_attention_heads").and_then(Value::as_u64),
    ) else {
        return Ok(()); // missing keys are reported by the parse
    };
    let removed = counts.first().copied().unwrap_or(0) as u64;
    if heads == 0 || removed >= heads {
        return Err(ModelError::Config(format!(
            "pruned_heads removes {removed} of {heads} heads"
        )));
    }
    map.insert("head_dim".into(), (hidden / heads).into());
    map.insert("num_attention_heads".into(), (heads - removed).into());
    Ok(())
}

/// transformers 5's `rope_parameters` (one set, or one per attention kind: `full_attention`,
/// `sliding_attention`) as the older keys: `rope_theta`, `rope_local_base_freq` and, when not
/// the default, `rope_scaling`. Other kinds of layer are refused.
fn rope_parameters_to_ours(value: &mut Value) -> Result<()> {
    let Some(params) = value.get("rope_parameters").cloned() else {
        return Ok(());
    };
    let Some(map) = value.as_object_mut() else {
        return Err(ModelError::Config("config.json is not an object".into()));
    };
    map.remove("rope_parameters");
    let Some(by_kind) = params.as_object() else {
        return Ok(()); // null: the defaults
    };
    // One set per attention kind: its values are objects.
    let per_kind = by_kind.values().any(Value::is_object);
    let set_of = |params: &Value, theta_key: &str, map: &mut serde_json::Map<String, Value>| {
        if let Some(theta) = params.get("rope_theta") {
            map.insert(theta_key.into(), theta.clone());
        }
        let kind = params
            .get("rope_type")
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" && theta_key == "rope_theta" {
            map.insert("rope_scaling".into(), params.clone());
        }
    };
    if !per_kind {
        set_of(&params, "rope_theta", map);
        return Ok(());
    }
    for (kind, params) in by_kind {
        match kind.as_str() {
            "full_attention" => set_of(params, "rope_theta", map),
            "sliding_attention" => {
                let local = params.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                if local != "default" {
                    return Err(ModelError::Config(format!(
                        "rope_parameters.sliding_attention.rope_type '{local}' is not supported (only default)"
                    )));
                }
                set_of(params, "rope_local_base_freq", map)
            }
            other => {
                return Err(ModelError::Config(format!(
                    "rope_parameters.{other}: unknown attention kind (expected full_attention, sliding_attention)"
                )))
            }
        }
    }
    Ok(())
}

/// Renames GPT-2's keys to ours; `n_inner` (null means 4 × `n_embd`) becomes `intermediate_size`.
fn gpt2_keys_to_ours(value: &mut Value) -> Result<()> {
    let Some(map) = value.as_object_mut() else {
        return Err(ModelError::Config("config.json is not an object".into()));
    };
    for (theirs, ours) in crate::family::gpt2::CONFIG_KEYS {
        if let Some(v) = map.remove(theirs) {
            map.entry(ours.to_string()).or_insert(v);
        }
    }
    let inner = map.remove("n_inner").filter(|v| !v.is_null());
    let hidden = map
        .get("hidden_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| ModelError::Config("n_embd is missing or not a positive integer".into()))?;
    map.entry("intermediate_size".to_string())
        .or_insert(inner.unwrap_or_else(|| (4 * hidden).into()));
    map.entry("tie_word_embeddings".to_string())
        .or_insert(true.into());
    Ok(())
}
