//! The Llama family (Llama 1–3, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention,
//! SwiGLU MLP. Weights use Hugging Face names and layout (`[out, in]`, rotate-half RoPE); the
//! GGUF reader in `shrink-io` undoes llama.cpp's Q/K permutation before they get here.

use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The subset of a Hugging Face `config.json` that defines a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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

/// The families this implementation covers, from `model_type` or `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl LlamaConfig {
    /// Parses and validates a `config.json` value.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let cfg: LlamaConfig =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn family(&self) -> Result<Family> {
        let by_type = match self.model_type.as_str() {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        };
        let by_arch = self.architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Family::Llama),
            "MistralForCausalLM" => Some(Family::Mistral),
            "Qwen2ForCausalLM" => Some(Family::Qwen2),
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

    /// Checks the shape keys are consistent (heads divide, sizes non-zero, known family).
    pub fn validate(&self) -> Result<()> {
        self.family()?;
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
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act '{act}' is not supported (only silu)"));
            }
        }
        if self.mlp_bias {
            return bad("mlp_bias = true is not supported".into());
        }
        self.rope_inv_freq().map(|_| ())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.family().ok() == Some(Family::Qwen2)
    }

    fn o_bias(&self) -> bool {
        self.attention_bias && self.family().ok() != Some(Family::Qwen2)
    }

    fn effective_sliding_window(&self) -> Option<usize> {
        match self.family().ok()? {
            Family::Mistral => self.sliding_window,
            Family::Qwen2 if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// RoPE inverse frequencies, with Llama-3 style scaling when `rope_scaling` asks for it.
    fn rope_inv_freq(&self) -> Result<Vec<f64>> {
        let d = self.head_dim();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
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
                "rope_scaling type '{other}' is not supported (supported: default, llama3)"
            ))),
        }
    }

    /// A 2-block GQA model small enough for unit tests.
    pub fn tiny_for_tests() -> Self {
        LlamaConfig {
            model_type: "llama".into(),
            architectures: vec!["LlamaForCausalLM".into()],
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
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
        }
    }

    /// Names and shapes of every weight the model expects, Hugging Face naming.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (nq, nkv) = (self.num_attention_heads * hd, self.num_kv_heads() * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![nq, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![nkv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![nkv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nq]));
            if self.qkv_bias() {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![nq]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![nkv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![nkv]));
            }
            if self.o_bias() {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

/// Observes the input of every linear layer during a forward pass (calibration capture).
pub trait LinearHook {
    /// Called with the full name of the linear (e.g. `model.layers.3.mlp.down_proj`) and its input,
    /// shaped `(batch, seq, in_features)`, before the linear runs.
    fn observe(&mut self, linear: &str, input: &Tensor) -> candle_core::Result<()>;

    /// Called with the attention probabilities of block `layer`, `(batch, heads, seq, keys)`
    /// (distillation of attention maps). Ignored by default.
    fn attention(&mut self, _layer: usize, _probs: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }

    /// Called with the output hidden states of block `layer`, `(batch, seq, hidden)`
    /// (distillation of hidden states). Ignored by default.
    fn block_output(&mut self, _layer: usize, _hidden: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }
}

/// A hook that observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl LinearHook for NoHook {
    fn observe(&mut self, _: &str, _: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }
}

/// A linear layer `y = x·Wᵀ + b` with `W` shaped `[out, in]`; its weight can be swapped for a
/// quantized-then-dequantized, masked or fake-quantized version.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    act_quant: Option<ActQuant>,
}

/// Simulated activation quantization at a linear's input (W8A8 inference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActQuant {
    /// Each token (row) scaled by its own max |x| / 127 and rounded to int8, as vLLM's dynamic
    /// per-token W8A8 kernels do.
    Int8PerToken,
}

impl ActQuant {
    /// Quantizes and dequantizes the rows of `x` (`rows × in`).
    pub fn fake_quantize(self, x: &Tensor) -> Result<Tensor> {
        match self {
            ActQuant::Int8PerToken => {
                let scale = (x.abs()?.max_keepdim(1)? / 127.0)?;
                // All-zero rows keep scale 1 so that 0/1 rounds to 0.
                let ones = scale.ones_like()?;
                let safe = scale.eq(0.0)?.where_cond(&ones, &scale)?;
                let q = x.broadcast_div(&safe)?.round()?.clamp(-127f32, 127f32)?;
                let q = q.broadcast_mul(&safe)?;
                // Quantization-aware training: a straight-through gradient (no values are
                // clipped: the scale comes from each row's own maximum).
                Ok(if x.track_op() {
                    (x + (q - x)?.detach())?
                } else {
                    q
                })
            }
        }
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            act_quant: None,
        }
    }

    /// Quantizes this linear's input activations in every forward pass from now on.
    pub fn set_act_quant(&mut self, q: Option<ActQuant>) {
        self.act_quant = q;
    }

    pub fn act_quant(&self) -> Option<ActQuant> {
        self.act_quant
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replaces the weight; the new one must have the same shape (it is cast to the old dtype).
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(ModelError::WrongShape {
                name: "replacement weight".into(),
                expected: self.weight.dims().to_vec(),
                actual: weight.dims().to_vec(),
            });
        }
        self.weight = weight.to_dtype(self.weight.dtype())?;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features.max(1);
        let mut x2 = x.reshape((rows, in_features))?;
        if let Some(q) = self.act_quant {
            x2 = q
                .fake_quantize(&x2.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?;
        }
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel carries no gradient: the composed form does when training.
        Ok(if x.track_op() || self.weight.track_op() {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)?
        } else {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?
        })
    }
}

/// Per-call attention inputs shared by all blocks: RoPE tables for the positions being processed
/// and the sliding window (attention is always causal).
#[derive(Debug, Clone)]
pub struct AttentionContext {
    cos: Tensor,
    sin: Tensor,
    window: Option<usize>,
}

/// The key/value cache of one decoder block, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv
            .as_ref()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoder block: pre-norm attention and pre-norm SwiGLU MLP, each with a residual.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    pub index: usize,
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    names: [String; 7],
}

const LINEAR_SUFFIXES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderBlock {
    /// Runs the block on hidden states `(batch, seq, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        cache: Option<&mut KvCache>,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let h = self.input_layernorm.forward(x)?;
        for name in &self.names[..3] {
            hook.observe(name, &h)?;
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.q_proj.forward(&h)?, nh)?;
        let k = heads(self.k_proj.forward(&h)?, nkv)?;
        let v = heads(self.v_proj.forward(&h)?, nkv)?;
        // candle's fused RoPE carries no gradient: the composed form does when training.
        let rope = |x: &Tensor| -> Result<Tensor> {
            Ok(if x.track_op() {
                candle_nn::rotary_emb::rope_slow(x, &ctx.cos, &ctx.sin)?
            } else {
                candle_nn::rotary_emb::rope(x, &ctx.cos, &ctx.sin)?
            })
        };
        let (q, k) = (rope(&q)?, rope(&k)?);
        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = match &cache.kv {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                    None => (k, v),
                };
                cache.kv = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let (k, v) = (repeat_kv(k, nh / nkv)?, repeat_kv(v, nh / nkv)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let probs = crate::kernels::causal_softmax(&q.matmul(&k.t()?)?, scale, ctx.window)?;
        hook.attention(self.index, &probs)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        hook.observe(&self.names[3], &attn)?;
        let x = (x + self.o_proj.forward(&attn)?)?;

        let h = self.post_attention_layernorm.forward(&x)?;
        hook.observe(&self.names[4], &h)?;
        hook.observe(&self.names[5], &h)?;
        let gated =
            crate::kernels::silu_mul(&self.gate_proj.forward(&h)?, &self.up_proj.forward(&h)?)?;
        hook.observe(&self.names[6], &gated)?;
        let out = (x + self.down_proj.forward(&gated)?)?;
        hook.block_output(self.index, &out)?;
        Ok(out)
    }

    /// The block's linear layers with their full names.
    pub fn linears(&self) -> [(&str, &Linear); 7] {
        let l = [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        std::array::from_fn(|i| (self.names[i].as_str(), l[i]))
    }

    /// A linear of this block by its full name (`model.layers.3.mlp.up_proj`), to swap its weight.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(match i {
            0 => &mut self.q_proj,
            1 => &mut self.k_proj,
            2 => &mut self.v_proj,
            3 => &mut self.o_proj,
            4 => &mut self.gate_proj,
            5 => &mut self.up_proj,
            _ => &mut self.down_proj,
        })
    }
}

fn repeat_kv(x: Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x);
    }
    let (b, n_kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, n_kv, groups, s, d))?
        .reshape((b, n_kv * groups, s, d))?)
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub blocks: Vec<DecoderBlock>,
    pub norm: RmsNorm,
    /// The output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    inv_freq: Vec<f64>,
    sliding_window: Option<usize>,
}

impl Llama {
    /// Builds the model from Hugging Face-named tensors, checking every name and shape. Tensors
    /// are converted to `dtype`; unused tensors are an error (they signal a wrong architecture).
    pub fn from_tensors(
        config: &LlamaConfig,
        mut tensors: BTreeMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            if t.dims() != shape {
                return Err(ModelError::WrongShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(dtype)?)
        };
        let expected: BTreeMap<String, Vec<usize>> =
            config.expected_tensors().into_iter().collect();
        let mut get = |name: String| -> Result<Tensor> {
            let shape = expected
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            take(&name, shape)
        };
        let embed_tokens = get("model.embed_tokens.weight".into())?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let p = format!("model.layers.{index}");
            let mut linear = |name: &str, bias: bool| -> Result<Linear> {
                let weight = get(format!("{p}.{name}.weight"))?;
                let bias = if bias {
                    Some(get(format!("{p}.{name}.bias"))?)
                } else {
                    None
                };
                Ok(Linear::new(weight, bias))
            };
            let (qkv_bias, o_bias) = (config.qkv_bias(), config.o_bias());
            let q_proj = linear("self_attn.q_proj", qkv_bias)?;
            let k_proj = linear("self_attn.k_proj", qkv_bias)?;
            let v_proj = linear("self_attn.v_proj", qkv_bias)?;
            let o_proj = linear("self_attn.o_proj", o_bias)?;
            let gate_proj = linear("mlp.gate_proj", false)?;
            let up_proj = linear("mlp.up_proj", false)?;
            let down_proj = linear("mlp.down_proj", false)?;
            let input_layernorm = RmsNorm {
                weight: get(format!("{p}.input_layernorm.weight"))?,
                eps: config.rms_norm_eps,
            };
            let post_attention_layernorm = RmsNorm {
                weight: get(format!("{p}.post_attention_layernorm.weight"))?,
                eps: config.rms_norm_eps,
            };
            blocks.push(DecoderBlock {
                index,
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_kv_heads(),
                head_dim: config.head_dim(),
                names: LINEAR_SUFFIXES.map(|s| format!("{p}.{s}")),
            });
        }
        let norm = RmsNorm {
            weight: get("model.norm.weight".into())?,
            eps: config.rms_norm_eps,
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(get("lm_head.weight".into())?, None))
        };
        // Checkpoints may carry precomputed RoPE tables; anything else left over is an error.
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if let Some(name) = tensors.keys().next() {
            return Err(ModelError::Config(format!(
                "unexpected tensor '{name}' ({} unexpected in all): does config.json describe this checkpoint?",
                tensors.len()
            )));
        }
        Ok(Self {
            inv_freq: config.rope_inv_freq()?,
            sliding_window: config.effective_sliding_window(),
            config: config.clone(),
            embed_tokens,
            blocks,
            norm,
            lm_head,
        })
    }

    /// A model with seeded random weights (normal, std 0.02; norms near 1), for tests and examples.
    pub fn random(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in config.expected_tensors() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + rng.gen_range(-0.2f32..0.2)).collect()
            } else {
                // Sum of uniforms: an approximately normal draw without extra dependencies.
                (0..n)
                    .map(|_| (0..4).map(|_| rng.gen_range(-1f32..1.0)).sum::<f32>() * 0.06)
                    .collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(config, tensors, DType::F32)
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Token ids `(batch, seq)` to embeddings `(batch, seq, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// RoPE tables and mask for `seq_len` new positions after `offset` cached ones.
    pub fn attention_context(&self, seq_len: usize, offset: usize) -> Result<AttentionContext> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in offset..offset + seq_len {
            for f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let device = self.device();
        let dtype = self.dtype();
        let cos = Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?;
        Ok(AttentionContext {
            cos,
            sin,
            window: self.sliding_window,
        })
    }

    /// Applies the final norm.
    pub fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm.forward(hidden)
    }

    /// Projects normalised hidden states `(..., hidden)` to f32 logits `(..., vocab)`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => Linear::new(self.embed_tokens.clone(), None).forward(hidden)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Full-sequence forward to normalised final hidden states, calling `hook` on every linear.
    pub fn forward_hidden(&self, ids: &Tensor, hook: &mut dyn LinearHook) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let ctx = self.attention_context(t, 0)?;
        let mut x = self.embed(ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &ctx, None, hook)?;
        }
        self.final_hidden(&x)
    }

    /// Full-sequence forward: token ids `(batch, seq)` to f32 logits `(batch, seq, vocab)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, &mut NoHook)?;
        self.lm_head(&hidden)
    }

    /// One cache per block, for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }

    /// Incremental forward: processes `ids` after the positions already in `cache` and returns the
    /// f32 logits of the last position, `(batch, vocab)`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut [KvCache]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if cache.len() != self.blocks.len() {
            return Err(ModelError::Config(format!(
                "cache has {} layers, model has {}",
                cache.len(),
                self.blocks.len()
            )));
        }
        let offset = cache.first().map(KvCache::len).unwrap_or(0);
        let ctx = self.attention_context(t, offset)?;
        let mut x = self.embed(ids)?;
        for (block, c) in self.blocks.iter().zip(cache.iter_mut()) {
            x = block.forward(&x, &ctx, Some(c), &mut NoHook)?;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.lm_head(&self.final_hidden(&last)?)
    }

    /// Mean next-token cross-entropy over `ids` `(batch, seq)` (every position predicts the next
    /// one), as a scalar tensor. Differentiable: with weights held in `candle_core::Var`s,
    /// `backward()` gives their gradients.
    pub fn lm_loss(&self, ids: &Tensor) -> Result<Tensor> {
        let logits = self.forward(ids)?.to_dtype(DType::F32)?;
        let (b, t, v) = logits.dims3()?;
        let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let logz = logits.log_sum_exp(candle_core::D::Minus1)?;
        let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        Ok((logz - picked)?.mean_all()?)
    }

    /// Names of every linear layer, in execution order (plus `lm_head` when untied).
    pub fn linear_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .blocks
            .iter()
            .flat_map(|b| b.names.iter().cloned())
            .collect();
        if self.lm_head.is_some() {
            names.push("lm_head".into());
        }
        names
    }

    /// Simulates activation quantization at the input of every block linear (not the LM head).
    pub fn set_act_quant(&mut self, q: Option<ActQuant>) {
        for b in &mut self.blocks {
            for l in [
                &mut b.q_proj,
                &mut b.k_proj,
                &mut b.v_proj,
                &mut b.o_proj,
                &mut b.gate_proj,
                &mut b.up_proj,
                &mut b.down_proj,
            ] {
                l.set_act_quant(q);
            }
        }
    }

    /// A linear layer by full name, to swap its weight.
    pub fn linear_mut(&mut self, name: &str) -> Result<&mut Linear> {
        let unknown = || ModelError::UnknownLinear(name.to_string());
        if name == "lm_head" {
            return self.lm_head.as_mut().ok_or_else(unknown);
        }
        let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
        let (index, _) = rest.split_once('.').ok_or_else(unknown)?;
        let index: usize = index.parse().map_err(|_| unknown())?;
        self.blocks
            .get_mut(index)
            .and_then(|b| b.linear_mut(name))
            .ok_or_else(unknown)
    }

    /// Every weight under its Hugging Face name (the inverse of [`Llama::from_tensors`]).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".into(),
            self.embed_tokens.clone(),
        );
        for b in &self.blocks {
            let p = format!("model.layers.{}", b.index);
            out.insert(
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.weight.clone(),
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.weight.clone(),
            );
            for (name, linear) in b.linears() {
                out.insert(format!("{name}.weight"), linear.weight().clone());
                if let Some(bias) = linear.bias() {
                    out.insert(format!("{name}.bias"), bias.clone());
                }
            }
        }
        out.insert("model.norm.weight".into(), self.norm.weight.clone());
        if let Some(head) = &self.lm_head {
            out.insert("lm_head.weight".into(), head.weight().clone());
        }
        out
    }

    /// Total number of parameters (a tied head counted once).
    pub fn num_parameters(&self) -> usize {
        self.named_tensors().values().map(|t| t.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests;
