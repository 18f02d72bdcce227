//! One transformer for every family shrink runs: the Llama family (RMSNorm, RoPE, grouped-query
//! attention, SwiGLU), BERT encoders (learned positions, post-norm LayerNorm, GELU, biases,
//! bidirectional attention) and GPT-2 (learned positions, pre-norm LayerNorm, GELU). A block
//! always has q/k/v/o and up/down projections (gate for SwiGLU) under the checkpoint's own names,
//! so every technique reaches every family's linears the same way. Weights are `[out, in]`; the
//! GGUF reader undoes llama.cpp's Q/K permutation and [`crate::checkpoint`] GPT-2's Conv1D layout
//! and fused qkv before they get here.

use crate::config::{Activation, Arch, ModelConfig};
use crate::family::bert::{MLM_BIAS, MLM_NORM, MLM_TRANSFORM};
use crate::family::naming;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::collections::BTreeMap;

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

    /// Multiplies input channel `j` (weight column `j`) by `s[j]`.
    pub fn scale_columns(&mut self, s: &[f32]) -> Result<()> {
        let s = Tensor::from_slice(s, (1, s.len()), self.weight.device())?;
        self.weight = self
            .weight
            .broadcast_mul(&s.to_dtype(self.weight.dtype())?)?;
        Ok(())
    }

    /// Divides output channel `i` (weight row `i` and bias `i`) by `s[i]`.
    pub fn divide_rows(&mut self, s: &[f32]) -> Result<()> {
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let col = Tensor::from_slice(&inv, (inv.len(), 1), self.weight.device())?;
        self.weight = self
            .weight
            .broadcast_mul(&col.to_dtype(self.weight.dtype())?)?;
        if let Some(b) = &self.bias {
            let v = Tensor::from_slice(&inv, inv.len(), b.device())?;
            self.bias = Some(b.broadcast_mul(&v.to_dtype(b.dtype())?)?);
        }
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

/// A normalisation with a learned scale: RMSNorm (no bias) or LayerNorm (with bias).
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    /// LayerNorm's shift; `None` for RMSNorm.
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernels carry no gradient: the composed forms do when training.
        let tracked = x.track_op() || self.weight.track_op();
        let eps = self.eps as f32;
        Ok(match &self.bias {
            None if tracked => candle_nn::ops::rms_norm_slow(x, &self.weight, eps)?,
            None => candle_nn::ops::rms_norm(x, &self.weight, eps)?,
            Some(b) if tracked || b.track_op() => {
                candle_nn::ops::layer_norm_slow(x, &self.weight, b, eps)?
            }
            Some(b) => candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, b, eps)?,
        })
    }

    /// Divides the norm's output channel-wise by `s` (its scale and shift), for folding input
    /// scales into the linears it feeds.
    pub fn divide_output(&mut self, s: &[f32]) -> Result<()> {
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let inv = Tensor::from_vec(inv, s.len(), self.weight.device())?;
        self.weight = self
            .weight
            .broadcast_mul(&inv.to_dtype(self.weight.dtype())?)?;
        if let Some(b) = &self.bias {
            self.bias = Some(b.broadcast_mul(&inv.to_dtype(b.dtype())?)?);
        }
        Ok(())
    }
}

/// Per-call attention inputs shared by all blocks: RoPE tables for the positions being processed
/// (Llama family), causality and the sliding window (decoders), or which keys are padding
/// (encoders).
#[derive(Debug, Clone)]
pub struct AttentionContext {
    rope: Option<(Tensor, Tensor)>,
    causal: bool,
    window: Option<usize>,
    /// `(batch, 1, 1, keys)`: 0 for real tokens, −∞ for padding.
    key_mask: Option<Tensor>,
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

/// The role of a linear inside a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Q,
        Role::K,
        Role::V,
        Role::O,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];

    /// The role of a linear (or its weight) from its full name in any family
    /// (`model.layers.3.mlp.up_proj`, `encoder.layer.0.intermediate.dense.weight`,
    /// `h.2.attn.c_attn.q`); `None` for the LM head and other tensors.
    pub fn of_name(name: &str) -> Option<Role> {
        let stem = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        crate::family::ALL_NAMES
            .iter()
            .find_map(|naming| {
                naming.linears.iter().position(|suffix| {
                    !suffix.is_empty()
                        && stem.ends_with(suffix)
                        && stem[..stem.len() - suffix.len()].ends_with('.')
                })
            })
            .map(|i| Role::ALL[i])
    }

    /// The Llama-style short name (`q_proj` … `down_proj`), the same for every family: reports
    /// and charts group linears by it.
    pub fn short_name(self) -> &'static str {
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ][self as usize]
    }
}

/// Where a rescaled input's inverse scale is folded (see [`Block::scale_groups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSite {
    /// The attention norm's scale and shift (pre-norm only).
    AttnNorm,
    /// The MLP norm's scale and shift (pre-norm only).
    MlpNorm,
    /// `up`'s rows and bias (SwiGLU: `silu(gate) · up` is linear in `up`).
    UpRows,
    /// `v`'s rows and bias (attention output is linear in `v`).
    VRows,
}

/// Linears reading one input, and where a scale of that input folds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleGroup {
    pub consumers: Vec<Role>,
    pub site: ScaleSite,
}

/// One transformer block: attention then MLP, each with a residual. Pre-norm (Transformer, GPT-2)
/// normalises each sub-layer's input; post-norm (BERT) normalises each residual sum.
#[derive(Debug, Clone)]
pub struct Block {
    pub index: usize,
    /// The attention sub-layer's norm: before it (pre-norm) or after its residual (post-norm).
    pub attn_norm: Norm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// The MLP sub-layer's norm: before it (pre-norm) or after its residual (post-norm).
    pub mlp_norm: Norm,
    /// SwiGLU's gate; `None` for a plain GELU MLP.
    pub gate_proj: Option<Linear>,
    pub up_proj: Linear,
    pub down_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    post_norm: bool,
    activation: Activation,
    /// Full names by [`Role`]; empty for an absent gate.
    names: [String; 7],
}

impl Block {
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
        let h = if self.post_norm {
            x.clone()
        } else {
            self.attn_norm.forward(x)?
        };
        for name in &self.names[..3] {
            hook.observe(name, &h)?;
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.q_proj.forward(&h)?, nh)?;
        let k = heads(self.k_proj.forward(&h)?, nkv)?;
        let v = heads(self.v_proj.forward(&h)?, nkv)?;
        let (q, k) = match &ctx.rope {
            // candle's fused RoPE carries no gradient: the composed form does when training.
            Some((cos, sin)) => {
                let rope = |x: &Tensor| -> Result<Tensor> {
                    Ok(if x.track_op() {
                        candle_nn::rotary_emb::rope_slow(x, cos, sin)?
                    } else {
                        candle_nn::rotary_emb::rope(x, cos, sin)?
                    })
                };
                (rope(&q)?, rope(&k)?)
            }
            None => (q, k),
        };
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
        let scores = q.matmul(&k.t()?)?;
        let probs = if ctx.causal {
            crate::kernels::causal_softmax(&scores, scale, ctx.window)?
        } else {
            let scores = (scores.to_dtype(DType::F32)? * scale)?;
            let scores = match &ctx.key_mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let probs = if scores.track_op() {
                candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            probs.to_dtype(x.dtype())?
        };
        hook.attention(self.index, &probs)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        hook.observe(&self.names[3], &attn)?;
        let x = (x + self.o_proj.forward(&attn)?)?;
        let x = if self.post_norm {
            self.attn_norm.forward(&x)?
        } else {
            x
        };

        let h = if self.post_norm {
            x.clone()
        } else {
            self.mlp_norm.forward(&x)?
        };
        let act = match &self.gate_proj {
            Some(gate) => {
                hook.observe(&self.names[4], &h)?;
                hook.observe(&self.names[5], &h)?;
                crate::kernels::silu_mul(&gate.forward(&h)?, &self.up_proj.forward(&h)?)?
            }
            None => {
                hook.observe(&self.names[5], &h)?;
                let up = self.up_proj.forward(&h)?;
                match self.activation {
                    Activation::GeluTanh => up.gelu()?,
                    _ => up.gelu_erf()?,
                }
            }
        };
        hook.observe(&self.names[6], &act)?;
        let out = (x + self.down_proj.forward(&act)?)?;
        let out = if self.post_norm {
            self.mlp_norm.forward(&out)?
        } else {
            out
        };
        hook.block_output(self.index, &out)?;
        Ok(out)
    }

    /// Whether each sub-layer's norm follows its residual sum (BERT) instead of preceding it.
    pub fn is_post_norm(&self) -> bool {
        self.post_norm
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The full name of the linear in `role` (`None` for an absent gate).
    pub fn name(&self, role: Role) -> Option<&str> {
        let n = &self.names[role as usize];
        (!n.is_empty()).then_some(n.as_str())
    }

    /// The linear in `role`, if the block has one.
    pub fn linear(&self, role: Role) -> Option<&Linear> {
        match role {
            Role::Q => Some(&self.q_proj),
            Role::K => Some(&self.k_proj),
            Role::V => Some(&self.v_proj),
            Role::O => Some(&self.o_proj),
            Role::Gate => self.gate_proj.as_ref(),
            Role::Up => Some(&self.up_proj),
            Role::Down => Some(&self.down_proj),
        }
    }

    /// The linear in `role`, mutably.
    pub fn linear_by_role_mut(&mut self, role: Role) -> Option<&mut Linear> {
        match role {
            Role::Q => Some(&mut self.q_proj),
            Role::K => Some(&mut self.k_proj),
            Role::V => Some(&mut self.v_proj),
            Role::O => Some(&mut self.o_proj),
            Role::Gate => self.gate_proj.as_mut(),
            Role::Up => Some(&mut self.up_proj),
            Role::Down => Some(&mut self.down_proj),
        }
    }

    /// The block's linear layers with their full names, in execution order.
    pub fn linears(&self) -> Vec<(&str, &Linear)> {
        Role::ALL
            .iter()
            .filter_map(|&r| Some((self.name(r)?, self.linear(r)?)))
            .collect()
    }

    /// The block's linears with their roles.
    pub fn roles(&self) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|&r| self.linear(r).is_some())
            .collect()
    }

    /// A linear of this block by its full name (`model.layers.3.mlp.up_proj`), to swap its weight.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let i = self.names.iter().position(|n| !n.is_empty() && n == name)?;
        self.linear_by_role_mut(Role::ALL[i])
    }

    /// The groups of linears that read one input whose channels can be rescaled without changing
    /// the float block: the scale divides what produces the input and multiplies the linears'
    /// columns (AWQ, SmoothQuant). Pre-norm blocks fold into their norms; SwiGLU folds `down`'s
    /// input into `up`'s rows; with one value head per query head, `o`'s input folds into `v`'s
    /// rows. Post-norm (BERT) norms feed the residual stream too, so only `v → o` remains there.
    pub fn scale_groups(&self) -> Vec<ScaleGroup> {
        let mut groups = vec![];
        if !self.post_norm {
            groups.push(ScaleGroup {
                consumers: vec![Role::Q, Role::K, Role::V],
                site: ScaleSite::AttnNorm,
            });
        }
        if self.num_kv_heads == self.num_heads {
            groups.push(ScaleGroup {
                consumers: vec![Role::O],
                site: ScaleSite::VRows,
            });
        }
        if !self.post_norm {
            let consumers = if self.gate_proj.is_some() {
                vec![Role::Gate, Role::Up]
            } else {
                vec![Role::Up]
            };
            groups.push(ScaleGroup {
                consumers,
                site: ScaleSite::MlpNorm,
            });
        }
        if self.gate_proj.is_some() {
            groups.push(ScaleGroup {
                consumers: vec![Role::Down],
                site: ScaleSite::UpRows,
            });
        }
        groups
    }

    /// Folds the per-input-channel scale `s` of `group`: the consumers' columns × `s`, the
    /// producer's output ÷ `s`. The block computes the same function in float.
    pub fn fold_input_scale(&mut self, group: &ScaleGroup, s: &[f32]) -> Result<()> {
        match group.site {
            ScaleSite::AttnNorm => self.attn_norm.divide_output(s)?,
            ScaleSite::MlpNorm => self.mlp_norm.divide_output(s)?,
            ScaleSite::UpRows => self.up_proj.divide_rows(s)?,
            ScaleSite::VRows => self.v_proj.divide_rows(s)?,
        }
        for &role in &group.consumers {
            if let Some(l) = self.linear_by_role_mut(role) {
                l.scale_columns(s)?;
            }
        }
        Ok(())
    }

    /// Every linear of the block, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ];
        if let Some(g) = self.gate_proj.as_mut() {
            out.push(g);
        }
        out.push(&mut self.up_proj);
        out.push(&mut self.down_proj);
        out
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

impl ModelConfig {
    /// Whether the checkpoint carries BERT's masked-LM head (`BertForMaskedLM`).
    pub fn has_mlm_head(&self) -> bool {
        self.arch().ok() == Some(Arch::Bert)
            && self.architectures.iter().any(|a| a == "BertForMaskedLM")
    }

    /// Refuses a layer count the checkpoint's `tensors` cannot hold (every block has at least
    /// four weights), before anything proportional to the config's count is allocated.
    pub fn check_layer_count(&self, tensors: usize) -> Result<()> {
        if self.num_hidden_layers.saturating_mul(4) > tensors {
            return Err(ModelError::Config(format!(
                "num_hidden_layers = {} but the checkpoint holds only {tensors} tensors (at least 4 per layer)",
                self.num_hidden_layers
            )));
        }
        Ok(())
    }

    /// Names and shapes of every weight the model expects, under the names [`Transformer`] uses
    /// (the checkpoint's, with GPT-2's fused qkv split and transposed).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let arch = self.arch().unwrap_or(Arch::Llama);
        let names = naming(arch);
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (nq, nkv) = (self.num_attention_heads * hd, self.num_kv_heads() * hd);
        let layer_norm = !arch.is_llama_like();
        let mut out = vec![(format!("{}.weight", names.embed), vec![self.vocab_size, h])];
        let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
            out.push((format!("{name}.weight"), vec![h]));
            if layer_norm {
                out.push((format!("{name}.bias"), vec![h]));
            }
        };
        if let Some(p) = names.positions {
            out.push((format!("{p}.weight"), vec![self.max_position_embeddings, h]));
        }
        if let Some(p) = names.token_types {
            out.push((
                format!("{p}.weight"),
                vec![self.type_vocab_size.unwrap_or(2), h],
            ));
        }
        if let Some(p) = names.embed_norm {
            norm(&mut out, p.to_string());
        }
        let gated = arch.is_llama_like();
        for l in 0..self.num_hidden_layers {
            let p = format!("{}.{l}", names.layers);
            norm(&mut out, format!("{p}.{}", names.attn_norm));
            let linear = |role: Role| format!("{p}.{}", names.linears[role as usize]);
            let attn = [(Role::Q, nq), (Role::K, nkv), (Role::V, nkv)];
            for (role, rows) in attn {
                out.push((format!("{}.weight", linear(role)), vec![rows, h]));
            }
            out.push((format!("{}.weight", linear(Role::O)), vec![h, nq]));
            if self.qkv_bias() {
                for (role, rows) in attn {
                    out.push((format!("{}.bias", linear(role)), vec![rows]));
                }
            }
            if self.o_bias() {
                out.push((format!("{}.bias", linear(Role::O)), vec![h]));
            }
            norm(&mut out, format!("{p}.{}", names.mlp_norm));
            if gated {
                out.push((format!("{}.weight", linear(Role::Gate)), vec![i, h]));
            }
            out.push((format!("{}.weight", linear(Role::Up)), vec![i, h]));
            out.push((format!("{}.weight", linear(Role::Down)), vec![h, i]));
            if self.mlp_biases() {
                out.push((format!("{}.bias", linear(Role::Up)), vec![i]));
                out.push((format!("{}.bias", linear(Role::Down)), vec![h]));
            }
        }
        if let Some(f) = names.final_norm {
            norm(&mut out, f.to_string());
        }
        if self.has_mlm_head() {
            out.push((format!("{MLM_TRANSFORM}.weight"), vec![h, h]));
            out.push((format!("{MLM_TRANSFORM}.bias"), vec![h]));
            norm(&mut out, MLM_NORM.to_string());
            out.push((MLM_BIAS.to_string(), vec![self.vocab_size]));
        }
        if !arch.is_encoder() && !self.ties_embeddings() {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

/// BERT's masked-LM head: dense, GELU, LayerNorm, then the tied word embeddings plus a bias.
#[derive(Debug, Clone)]
pub struct MlmHead {
    pub transform: Linear,
    pub norm: Norm,
    pub bias: Tensor,
}

/// A transformer of any supported family: a causal language model (Llama family, GPT-2) or an
/// encoder (BERT).
#[derive(Debug, Clone)]
pub struct Transformer {
    pub config: ModelConfig,
    pub arch: Arch,
    pub embed_tokens: Tensor,
    /// Learned absolute positions (BERT, GPT-2).
    pub embed_positions: Option<Tensor>,
    /// BERT's segment embeddings; single sentences use segment 0.
    pub embed_token_types: Option<Tensor>,
    /// BERT's embedding LayerNorm.
    pub embed_norm: Option<Norm>,
    pub blocks: Vec<Block>,
    /// The final norm of pre-norm models (`None` for BERT).
    pub norm: Option<Norm>,
    /// The output projection of decoders; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// BERT's masked-LM head, when the checkpoint has one.
    pub mlm_head: Option<MlmHead>,
    /// Tensors carried through unchanged (BERT's pooler).
    pub extra: BTreeMap<String, Tensor>,
    inv_freq: Vec<f64>,
    sliding_window: Option<usize>,
}

/// Buffers some checkpoints store that are not weights.
fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("embeddings.position_ids")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

impl Transformer {
    /// Builds the model from tensors under its own names ([`ModelConfig::expected_tensors`]),
    /// checking every name and shape. Tensors are converted to `dtype`; unused tensors are an
    /// error (they signal a wrong architecture), except BERT's pooler, kept in `extra`.
    pub fn from_tensors(
        config: &ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        config.check_layer_count(tensors.len())?;
        let arch = config.arch()?;
        let names = naming(arch);
        let expected: BTreeMap<String, Vec<usize>> =
            config.expected_tensors().into_iter().collect();
        let mut get = |name: String| -> Result<Tensor> {
            let shape = expected
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::WrongShape {
                    name,
                    expected: shape.clone(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(dtype)?)
        };
        let eps = config.norm_eps();
        let layer_norm = !arch.is_llama_like();
        let norm = |name: &str, get: &mut dyn FnMut(String) -> Result<Tensor>| {
            Ok::<_, ModelError>(Norm {
                weight: get(format!("{name}.weight"))?,
                bias: if layer_norm {
                    Some(get(format!("{name}.bias"))?)
                } else {
                    None
                },
                eps,
            })
        };
        let embed_tokens = get(format!("{}.weight", names.embed))?;
        let embed_positions = match names.positions {
            Some(p) => Some(get(format!("{p}.weight"))?),
            None => None,
        };
        let embed_token_types = match names.token_types {
            Some(p) => Some(get(format!("{p}.weight"))?),
            None => None,
        };
        let embed_norm = match names.embed_norm {
            Some(p) => Some(norm(p, &mut get)?),
            None => None,
        };
        let activation = config.activation()?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let p = format!("{}.{index}", names.layers);
            let full: [String; 7] = std::array::from_fn(|r| {
                if names.linears[r].is_empty()
                    || (r == Role::Gate as usize && !arch.is_llama_like())
                {
                    String::new()
                } else {
                    format!("{p}.{}", names.linears[r])
                }
            });
            let mut linear = |role: Role, bias: bool| -> Result<Linear> {
                let name = &full[role as usize];
                let weight = get(format!("{name}.weight"))?;
                let bias = if bias {
                    Some(get(format!("{name}.bias"))?)
                } else {
                    None
                };
                Ok(Linear::new(weight, bias))
            };
            let (qkv_bias, o_bias, mlp_bias) =
                (config.qkv_bias(), config.o_bias(), config.mlp_biases());
            let q_proj = linear(Role::Q, qkv_bias)?;
            let k_proj = linear(Role::K, qkv_bias)?;
            let v_proj = linear(Role::V, qkv_bias)?;
            let o_proj = linear(Role::O, o_bias)?;
            let gate_proj = if full[Role::Gate as usize].is_empty() {
                None
            } else {
                Some(linear(Role::Gate, false)?)
            };
            let up_proj = linear(Role::Up, mlp_bias)?;
            let down_proj = linear(Role::Down, mlp_bias)?;
            let attn_norm = norm(&format!("{p}.{}", names.attn_norm), &mut get)?;
            let mlp_norm = norm(&format!("{p}.{}", names.mlp_norm), &mut get)?;
            blocks.push(Block {
                index,
                attn_norm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                mlp_norm,
                gate_proj,
                up_proj,
                down_proj,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_kv_heads(),
                head_dim: config.head_dim(),
                post_norm: arch == Arch::Bert,
                activation,
                names: full,
            });
        }
        let norm_final = match names.final_norm {
            Some(f) => Some(norm(f, &mut get)?),
            None => None,
        };
        let mlm_head = if config.has_mlm_head() {
            Some(MlmHead {
                transform: Linear::new(
                    get(format!("{MLM_TRANSFORM}.weight"))?,
                    Some(get(format!("{MLM_TRANSFORM}.bias"))?),
                ),
                norm: norm(MLM_NORM, &mut get)?,
                bias: get(MLM_BIAS.to_string())?,
            })
        } else {
            None
        };
        let lm_head = if arch.is_encoder() || config.ties_embeddings() {
            None
        } else {
            Some(Linear::new(get("lm_head.weight".into())?, None))
        };
        tensors.retain(|name, _| !is_buffer(name));
        let mut extra = BTreeMap::new();
        if arch == Arch::Bert {
            let pooler: Vec<String> = tensors
                .keys()
                .filter(|n| n.starts_with("pooler."))
                .cloned()
                .collect();
            for name in pooler {
                if let Some(t) = tensors.remove(&name) {
                    extra.insert(name, t.to_dtype(dtype)?);
                }
            }
        }
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
            arch,
            embed_tokens,
            embed_positions,
            embed_token_types,
            embed_norm,
            blocks,
            norm: norm_final,
            lm_head,
            mlm_head,
            extra,
        })
    }

    /// Builds the model from a checkpoint's tensors in the family's own layout (GPT-2's Conv1D
    /// weights and fused qkv, BertForMaskedLM's `bert.` prefix).
    pub fn from_checkpoint(
        config: &ModelConfig,
        tensors: BTreeMap<String, Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        config.check_layer_count(tensors.len())?;
        let tensors = crate::checkpoint::to_model_layout(config, tensors)?;
        Self::from_tensors(config, tensors, dtype)
    }

    /// Every weight in the checkpoint's own layout (the inverse of
    /// [`Transformer::from_checkpoint`]), for writing.
    pub fn checkpoint_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        crate::checkpoint::to_checkpoint_layout(&self.config, self.named_tensors())
    }

    /// The checkpoint's name for a model tensor it stores unchanged; `None` when the checkpoint
    /// stores it transposed or fused (GPT-2's Conv1D linears).
    pub fn checkpoint_name(&self, name: &str) -> Option<String> {
        crate::checkpoint::checkpoint_name(&self.config, name)
    }

    /// Each linear weight as the checkpoint stores it (by the checkpoint's name; GGUF keeps the
    /// `[out, in]` row order), with the model weights whose rows it stacks: GPT-2's `c_attn` is
    /// q, k and v; every other weight is itself.
    pub fn stacked_weights(&self) -> Vec<(String, Vec<String>)> {
        crate::checkpoint::stacked_weights(&self.config, &self.linear_names())
    }

    /// A model with seeded random weights (normal, std 0.02; norms near 1), for tests and examples.
    pub fn random(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in config.expected_tensors() {
            let n: usize = shape.iter().product();
            // Norm scales are the only 1-D weights (biases end in `.bias`).
            let is_norm = shape.len() == 1 && name.ends_with(".weight");
            let data: Vec<f32> = if is_norm {
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

    /// Token ids `(batch, seq)` to embeddings `(batch, seq, hidden)` at positions from 0.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_at(ids, 0)
    }

    /// Token ids `(batch, seq)` to embeddings at positions `offset..offset + seq`.
    pub fn embed_at(&self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        let flat = ids.flatten_all()?;
        let mut x = self
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, t, h))?;
        if let Some(pos) = &self.embed_positions {
            let max = pos.dim(0)?;
            if offset + t > max {
                return Err(ModelError::Config(format!(
                    "sequence of {} positions exceeds max_position_embeddings ({max})",
                    offset + t
                )));
            }
            x = x.broadcast_add(&pos.narrow(0, offset, t)?.unsqueeze(0)?)?;
        }
        if let Some(types) = &self.embed_token_types {
            x = x.broadcast_add(&types.narrow(0, 0, 1)?)?;
        }
        match &self.embed_norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Attention inputs for `seq_len` new positions after `offset` cached ones: RoPE tables and
    /// the causal mask for decoders, full attention for encoders.
    pub fn attention_context(&self, seq_len: usize, offset: usize) -> Result<AttentionContext> {
        let rope = if self.inv_freq.is_empty() {
            None
        } else {
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
            Some((
                Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?,
                Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?,
            ))
        };
        Ok(AttentionContext {
            rope,
            causal: !self.arch.is_encoder(),
            window: self.sliding_window,
            key_mask: None,
        })
    }

    /// Attention inputs for an encoder batch padded on the right: sequence `i` has `lengths[i]`
    /// real tokens and its padding is never attended to.
    pub fn padded_context(&self, seq_len: usize, lengths: &[usize]) -> Result<AttentionContext> {
        let mut ctx = self.attention_context(seq_len, 0)?;
        if lengths.iter().any(|&l| l < seq_len) {
            let mask: Vec<f32> = lengths
                .iter()
                .flat_map(|&l| {
                    (0..seq_len).map(move |j| if j < l { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            ctx.key_mask = Some(Tensor::from_vec(
                mask,
                (lengths.len(), 1, 1, seq_len),
                self.device(),
            )?);
        }
        Ok(ctx)
    }

    /// Applies the final norm (pre-norm models; BERT's blocks end normalised).
    pub fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(n) => n.forward(hidden),
            None => Ok(hidden.clone()),
        }
    }

    /// Projects final hidden states `(..., hidden)` to f32 logits `(..., vocab)`: the LM head of
    /// decoders, the masked-LM head of encoders that have one.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let tied = || Linear::new(self.embed_tokens.clone(), None);
        let logits = if self.arch.is_encoder() {
            let head = self.mlm_head.as_ref().ok_or_else(|| {
                ModelError::Config(
                    "this encoder has no masked-LM head (only BertForMaskedLM checkpoints have one)"
                        .into(),
                )
            })?;
            let h = head.transform.forward(hidden)?;
            let h = match self.config.activation()? {
                Activation::GeluTanh => h.gelu()?,
                _ => h.gelu_erf()?,
            };
            let h = head.norm.forward(&h)?;
            tied().forward(&h)?.broadcast_add(&head.bias)?
        } else {
            match &self.lm_head {
                Some(head) => head.forward(hidden)?,
                None => tied().forward(hidden)?,
            }
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Whether [`Transformer::lm_head`] gives logits (decoders, and encoders with an MLM head).
    pub fn has_token_head(&self) -> bool {
        !self.arch.is_encoder() || self.mlm_head.is_some()
    }

    /// Full-sequence forward to final hidden states, calling `hook` on every linear.
    pub fn forward_hidden(&self, ids: &Tensor, hook: &mut dyn LinearHook) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let ctx = self.attention_context(t, 0)?;
        self.run_blocks(ids, &ctx, hook)
    }

    /// Encoder forward of a right-padded batch: final hidden states `(batch, seq, hidden)`.
    pub fn encode(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let ctx = self.padded_context(t, lengths)?;
        self.run_blocks(ids, &ctx, &mut NoHook)
    }

    fn run_blocks(
        &self,
        ids: &Tensor,
        ctx: &AttentionContext,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for block in &self.blocks {
            x = block.forward(&x, ctx, None, hook)?;
        }
        self.final_hidden(&x)
    }

    /// Full-sequence forward: token ids `(batch, seq)` to f32 logits `(batch, seq, vocab)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, &mut NoHook)?;
        self.lm_head(&hidden)
    }

    /// One cache per block, for [`Transformer::forward_cached`].
    pub fn new_cache(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }

    /// Incremental forward of a decoder: processes `ids` after the positions already in `cache`
    /// and returns the f32 logits of the last position, `(batch, vocab)`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut [KvCache]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if self.arch.is_encoder() {
            return Err(ModelError::Config("an encoder cannot generate text".into()));
        }
        if cache.len() != self.blocks.len() {
            return Err(ModelError::Config(format!(
                "cache has {} layers, model has {}",
                cache.len(),
                self.blocks.len()
            )));
        }
        let offset = cache.first().map(KvCache::len).unwrap_or(0);
        let ctx = self.attention_context(t, offset)?;
        let mut x = self.embed_at(ids, offset)?;
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
            .flat_map(|b| b.linears().into_iter().map(|(n, _)| n.to_string()))
            .collect();
        if self.lm_head.is_some() {
            names.push("lm_head".into());
        }
        names
    }

    /// Simulates activation quantization at the input of every block linear (not the LM head).
    pub fn set_act_quant(&mut self, q: Option<ActQuant>) {
        for b in &mut self.blocks {
            for l in b.linears_mut() {
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
        let layers = naming(self.arch).layers;
        let rest = name
            .strip_prefix(layers)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(unknown)?;
        let (index, _) = rest.split_once('.').ok_or_else(unknown)?;
        let index: usize = index.parse().map_err(|_| unknown())?;
        self.blocks
            .get_mut(index)
            .and_then(|b| b.linear_mut(name))
            .ok_or_else(unknown)
    }

    /// The token embedding's tensor name (`model.embed_tokens.weight`, `wte.weight`, …).
    pub fn embedding_name(&self) -> String {
        format!("{}.weight", naming(self.arch).embed)
    }

    /// The same model with only blocks `layers` (ascending), renumbered from 0: depth pruning and
    /// DistilBERT-style students.
    pub fn keep_layers(&self, layers: &[usize]) -> Result<Self> {
        if layers.windows(2).any(|w| w[0] >= w[1]) || layers.iter().any(|&l| l >= self.blocks.len())
        {
            return Err(ModelError::Config(format!(
                "layers {layers:?} must be increasing and below {}",
                self.blocks.len()
            )));
        }
        let prefix = format!("{}.", self.layer_prefix());
        let mut tensors = BTreeMap::new();
        for (name, t) in self.named_tensors() {
            let layer = name
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
            match layer {
                Some((i, rest)) => {
                    if let Some(new) = layers.iter().position(|&l| l == i) {
                        tensors.insert(format!("{prefix}{new}.{rest}"), t);
                    }
                }
                None => {
                    tensors.insert(name, t);
                }
            }
        }
        let mut config = self.config.clone();
        config.num_hidden_layers = layers.len();
        Self::from_tensors(&config, tensors, self.dtype())
    }

    /// The name prefix of the blocks (`model.layers`, `encoder.layer`, `h`).
    pub fn layer_prefix(&self) -> &'static str {
        naming(self.arch).layers
    }

    /// Every weight under the model's own names (the inverse of [`Transformer::from_tensors`]).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let names = naming(self.arch);
        let mut out = BTreeMap::new();
        let norm = |out: &mut BTreeMap<String, Tensor>, name: &str, n: &Norm| {
            out.insert(format!("{name}.weight"), n.weight.clone());
            if let Some(b) = &n.bias {
                out.insert(format!("{name}.bias"), b.clone());
            }
        };
        out.insert(format!("{}.weight", names.embed), self.embed_tokens.clone());
        if let (Some(p), Some(t)) = (names.positions, &self.embed_positions) {
            out.insert(format!("{p}.weight"), t.clone());
        }
        if let (Some(p), Some(t)) = (names.token_types, &self.embed_token_types) {
            out.insert(format!("{p}.weight"), t.clone());
        }
        if let (Some(p), Some(n)) = (names.embed_norm, &self.embed_norm) {
            norm(&mut out, p, n);
        }
        for b in &self.blocks {
            let p = format!("{}.{}", names.layers, b.index);
            norm(&mut out, &format!("{p}.{}", names.attn_norm), &b.attn_norm);
            norm(&mut out, &format!("{p}.{}", names.mlp_norm), &b.mlp_norm);
            for (name, linear) in b.linears() {
                out.insert(format!("{name}.weight"), linear.weight().clone());
                if let Some(bias) = linear.bias() {
                    out.insert(format!("{name}.bias"), bias.clone());
                }
            }
        }
        if let (Some(f), Some(n)) = (names.final_norm, &self.norm) {
            norm(&mut out, f, n);
        }
        if let Some(head) = &self.mlm_head {
            out.insert(
                format!("{MLM_TRANSFORM}.weight"),
                head.transform.weight().clone(),
            );
            if let Some(b) = head.transform.bias() {
                out.insert(format!("{MLM_TRANSFORM}.bias"), b.clone());
            }
            norm(&mut out, MLM_NORM, &head.norm);
            out.insert(MLM_BIAS.to_string(), head.bias.clone());
        }
        if let Some(head) = &self.lm_head {
            out.insert("lm_head.weight".into(), head.weight().clone());
        }
        for (name, t) in &self.extra {
            out.insert(name.clone(), t.clone());
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
