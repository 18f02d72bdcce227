//! The layers blocks are made of: linears (with the hook calibration observes them through and
//! simulated activation quantization), norms, the attention context and the KV cache.

use super::*;

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

    /// Whether [`LinearHook::attention`] should be called for block `layer` (the probabilities
    /// are then materialised; otherwise causal attention is computed without holding them).
    fn wants_attention(&self, _layer: usize) -> bool {
        false
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
    /// The weight as stored in ggml blocks, when it was read from a quantized GGUF and is to be
    /// multiplied as llama.cpp multiplies it (see [`Linear::set_packed`]).
    pub(super) packed: Option<std::sync::Arc<shrink_core::qmatmul::QMatrix>>,
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
            packed: None,
        }
    }

    /// From now on, forward passes outside any gradient computation multiply by `packed` (the
    /// stored blocks this linear's weight was dequantized from) with llama.cpp's integer
    /// products instead of by the f32 weight; `None` goes back to the f32 weight. Changing the
    /// weight in any way drops the blocks.
    pub fn set_packed(
        &mut self,
        packed: Option<std::sync::Arc<shrink_core::qmatmul::QMatrix>>,
    ) -> Result<()> {
        if let Some(p) = &packed {
            let (out, inp) = self.weight.dims2()?;
            if (p.rows(), p.cols()) != (out, inp) {
                return Err(ModelError::WrongShape {
                    name: "packed weight".into(),
                    expected: vec![out, inp],
                    actual: vec![p.rows(), p.cols()],
                });
            }
        }
        self.packed = packed;
        Ok(())
    }

    /// The stored blocks forward passes multiply by, if any.
    pub fn packed(&self) -> Option<&std::sync::Arc<shrink_core::qmatmul::QMatrix>> {
        self.packed.as_ref()
    }

    /// Quantizes this linear's input activations in every forward pass from now on.
    pub fn set_act_quant(&mut self, q: Option<ActQuant>) {
        self.packed = None;
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
        self.packed = None;
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
        self.packed = None;
        let s = Tensor::from_slice(s, (1, s.len()), self.weight.device())?;
        self.weight = self
            .weight
            .broadcast_mul(&s.to_dtype(self.weight.dtype())?)?;
        Ok(())
    }

    /// Divides output channel `i` (weight row `i` and bias `i`) by `s[i]`.
    pub fn divide_rows(&mut self, s: &[f32]) -> Result<()> {
        self.packed = None;
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

    /// The same linear with its tensors detached from any gradient computation.
    pub(super) fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            ..self.clone()
        }
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
        let packed = match (&self.packed, self.act_quant) {
            (Some(p), None) => crate::kernels::packed_linear(&x2, p)?,
            _ => None,
        };
        let y = match packed {
            Some(y) => y,
            None => crate::kernels::linear(&x2, &self.weight)?,
        };
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
    /// Added to the stored scale when applied: Gemma stores `w` and scales by `1 + w` (0 for
    /// every other family).
    pub offset: f32,
}

impl Norm {
    /// The same norm with its tensors detached from any gradient computation.
    pub(super) fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            ..*self
        }
    }

    /// The scale applied to normalized values: the weight plus [`Norm::offset`], computed in
    /// f32 and applied in `x`'s type.
    pub fn scale(&self, dtype: DType) -> Result<Tensor> {
        if self.offset == 0.0 {
            return Ok(self.weight.clone());
        }
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(w.affine(1.0, self.offset as f64)?.to_dtype(dtype)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernels carry no gradient: the composed forms do when training.
        let tracked = x.track_op() || self.weight.track_op();
        let eps = self.eps as f32;
        let scale = self.scale(self.weight.dtype())?;
        Ok(match &self.bias {
            None if tracked => candle_nn::ops::rms_norm_slow(x, &scale, eps)?,
            None => candle_nn::ops::rms_norm(x, &scale, eps)?,
            Some(b) if tracked || b.track_op() => {
                candle_nn::ops::layer_norm_slow(x, &scale, b, eps)?
            }
            Some(b) => candle_nn::ops::layer_norm(&x.contiguous()?, &scale, b, eps)?,
        })
    }

    /// Divides the norm's output channel-wise by `s` (its scale and shift), for folding input
    /// scales into the linears it feeds.
    pub fn divide_output(&mut self, s: &[f32]) -> Result<()> {
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let inv = Tensor::from_vec(inv, s.len(), self.weight.device())?;
        let dtype = self.weight.dtype();
        self.weight = self
            .scale(DType::F32)?
            .broadcast_mul(&inv)?
            .affine(1.0, -self.offset as f64)?
            .to_dtype(dtype)?;
        if let Some(b) = &self.bias {
            self.bias = Some(b.broadcast_mul(&inv.to_dtype(b.dtype())?)?);
        }
        Ok(())
    }
}

/// Per-call attention inputs shared by all blocks: RoPE tables for the positions being processed
/// (Llama family), causality and the sliding window (decoders), or which keys are padding
/// (encoders). Sliding-window layers take `window` and `rope_local` (when their RoPE base is
/// their own); global layers attend to every earlier position with `rope`.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    pub(super) rope: Option<(Tensor, Tensor)>,
    pub(super) rope_local: Option<(Tensor, Tensor)>,
    pub(super) causal: bool,
    pub(super) window: Option<usize>,
    /// `(batch, 1, 1, keys)`: 0 for real tokens, −∞ for padding.
    pub(super) key_mask: Option<Tensor>,
}

/// The key/value cache of one decoder block, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Keys and values as tensors, `(batch, kv_heads, positions, head_dim)` (grown by
    /// concatenation), where the attention is not [`crate::kernels::causal_attention_cached`]'s.
    pub(super) kv: Option<(Tensor, Tensor)>,
    /// Keys and values held in place for [`crate::kernels::causal_attention_cached`].
    pub(super) held: crate::kernels::HeldKv,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv
            .as_ref()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(self.held.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
