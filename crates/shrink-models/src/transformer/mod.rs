//! One transformer for every family shrink runs: the Llama family (RMSNorm, RoPE, grouped-query
//! attention, SwiGLU), BERT encoders (learned positions, post-norm LayerNorm, GELU, biases,
//! bidirectional attention) and GPT-2 (learned positions, pre-norm LayerNorm, GELU). A block
//! always has q/k/v/o and up/down projections (gate for SwiGLU) under the checkpoint's own names,
//! so every technique reaches every family's linears the same way. Weights are `[out, in]`; the
//! GGUF reader undoes llama.cpp's Q/K permutation and [`crate::checkpoint`] GPT-2's Conv1D layout
//! and fused qkv before they get here.

mod block;
mod layers;
mod load;
mod stream;

pub use block::*;
pub use layers::*;
pub use stream::{BlockModel, Head, PackedLoader, StoredType, StreamedModel, TensorLoader};

use crate::config::{Activation, Arch, ModelConfig};
use crate::family::bert::{MLM_BIAS, MLM_NORM, MLM_TRANSFORM};
use crate::family::naming;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use shrink_core::qmatmul::QMatrix;
use std::collections::BTreeMap;
use std::sync::Arc;

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
    attention: AttentionSpec,
    /// The token embedding's stored blocks, multiplied by when the head is tied to it.
    tied_packed: Option<Arc<QMatrix>>,
}

/// Finds the stored ggml blocks of a weight by its tensor name (`Ok(None)`: it is not stored in
/// blocks, or not to be multiplied that way).
pub type PackedSource<'a> = dyn Fn(&str) -> Result<Option<Arc<QMatrix>>> + 'a;

/// The embedding tensors of a model, borrowed.
pub(crate) struct Embeddings<'a> {
    pub tokens: &'a Tensor,
    pub positions: Option<&'a Tensor>,
    pub token_types: Option<&'a Tensor>,
    pub norm: Option<&'a Norm>,
    /// The factor token embeddings are multiplied by (Gemma's `√hidden`).
    pub scale: Option<f64>,
}

impl Embeddings<'_> {
    /// Token ids `(batch, seq)` to embeddings at positions `offset..offset + seq`, in `dtype`
    /// (rows are looked up in the table's own type and converted before anything else).
    pub fn forward(&self, ids: &Tensor, offset: usize, dtype: DType) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.tokens.dim(1)?;
        let flat = ids.flatten_all()?;
        let mut x = self
            .tokens
            .index_select(&flat, 0)?
            .reshape((b, t, h))?
            .to_dtype(dtype)?;
        if let Some(scale) = self.scale {
            x = (x * scale)?;
        }
        if let Some(pos) = self.positions {
            let max = pos.dim(0)?;
            if offset + t > max {
                return Err(ModelError::Config(format!(
                    "sequence of {} positions exceeds max_position_embeddings ({max})",
                    offset + t
                )));
            }
            x = x.broadcast_add(&pos.narrow(0, offset, t)?.unsqueeze(0)?)?;
        }
        if let Some(types) = self.token_types {
            x = x.broadcast_add(&types.narrow(0, 0, 1)?)?;
        }
        match self.norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }
}

/// What a model's attention context is made from: RoPE frequencies (global, and local for
/// sliding-window layers with their own base), causality and the sliding window.
#[derive(Debug, Clone)]
pub(crate) struct AttentionSpec {
    inv_freq: Vec<f64>,
    local_inv_freq: Option<Vec<f64>>,
    causal: bool,
    window: Option<usize>,
}

impl AttentionSpec {
    pub fn new(config: &ModelConfig) -> Result<Self> {
        Ok(Self {
            inv_freq: config.rope_inv_freq()?,
            local_inv_freq: config.rope_local_inv_freq()?,
            causal: !config.arch()?.is_encoder(),
            window: config.effective_sliding_window(),
        })
    }

    /// Attention inputs for `seq_len` new positions after `offset` cached ones (`at`): RoPE
    /// tables and the causal mask for decoders, full attention for encoders.
    pub fn context(
        &self,
        (seq_len, offset): (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<AttentionContext> {
        let tables = |inv_freq: &[f64]| -> Result<Option<(Tensor, Tensor)>> {
            if inv_freq.is_empty() {
                return Ok(None);
            }
            let half = inv_freq.len();
            let mut cos = Vec::with_capacity(seq_len * half);
            let mut sin = Vec::with_capacity(seq_len * half);
            for pos in offset..offset + seq_len {
                for f in inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            Ok(Some((
                Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?,
                Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?,
            )))
        };
        Ok(AttentionContext {
            rope: tables(&self.inv_freq)?,
            rope_local: match &self.local_inv_freq {
                Some(f) => tables(f)?,
                None => None,
            },
            causal: self.causal,
            window: self.window,
            key_mask: None,
        })
    }
}

impl Transformer {
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
        self.embeddings(&self.embed_tokens)
            .forward(ids, offset, self.dtype())
    }

    /// The model's embeddings with `tokens` as the token table.
    pub(crate) fn embeddings<'a>(&'a self, tokens: &'a Tensor) -> Embeddings<'a> {
        Embeddings {
            tokens,
            positions: self.embed_positions.as_ref(),
            token_types: self.embed_token_types.as_ref(),
            norm: self.embed_norm.as_ref(),
            scale: self.config.embedding_scale(),
        }
    }

    /// Attention inputs for `seq_len` new positions after `offset` cached ones: RoPE tables and
    /// the causal mask for decoders, full attention for encoders.
    pub fn attention_context(&self, seq_len: usize, offset: usize) -> Result<AttentionContext> {
        self.attention
            .context((seq_len, offset), self.device(), self.dtype())
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
        let tied = || self.tied_head();
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

    /// The head tied to the token embedding (with its stored blocks, if they are used).
    pub(crate) fn tied_head(&self) -> Linear {
        let mut head = Linear::new(self.embed_tokens.clone(), None);
        head.packed = self.tied_packed.clone();
        head
    }

    /// Multiplies every linear (and a tied head) whose weight `get` finds stored in ggml blocks
    /// by those blocks, as llama.cpp does, from now on ([`Linear::set_packed`]). Returns how many
    /// weights it found.
    pub fn set_packed(&mut self, get: &PackedSource) -> Result<usize> {
        let mut found = 0;
        for block in &mut self.blocks {
            found += block.set_packed(get)?;
        }
        if let Some(head) = &mut self.lm_head {
            if let Some(p) = get("lm_head.weight")? {
                head.set_packed(Some(p))?;
                found += 1;
            }
        }
        if self.lm_head.is_none() && !self.arch.is_encoder() {
            let name = self.embedding_name();
            self.tied_packed = get(&name)?;
            if let Some(p) = &self.tied_packed {
                self.tied_head().set_packed(Some(p.clone()))?; // checks the shape
                found += 1;
            }
        }
        Ok(found)
    }

    /// The same model with every tensor detached from any gradient computation, sharing their
    /// storage: a trained model's forward pass without a graph, through the inference kernels
    /// (activation recomputation runs the model this way first).
    pub fn detached(&self) -> Self {
        let norm = |n: &Option<Norm>| n.as_ref().map(Norm::detached);
        Self {
            embed_tokens: self.embed_tokens.detach(),
            embed_positions: self.embed_positions.as_ref().map(Tensor::detach),
            embed_token_types: self.embed_token_types.as_ref().map(Tensor::detach),
            embed_norm: norm(&self.embed_norm),
            blocks: self.blocks.iter().map(Block::detached).collect(),
            norm: norm(&self.norm),
            lm_head: self.lm_head.as_ref().map(Linear::detached),
            mlm_head: self.mlm_head.as_ref().map(|h| MlmHead {
                transform: h.transform.detached(),
                norm: h.norm.detached(),
                bias: h.bias.detach(),
            }),
            extra: self
                .extra
                .iter()
                .map(|(n, t)| (n.clone(), t.detach()))
                .collect(),
            ..self.clone()
        }
    }

    /// Whether any linear (or a tied head) multiplies by stored ggml blocks
    /// ([`Transformer::set_packed`]).
    pub fn multiplies_packed(&self) -> bool {
        self.tied_packed.is_some()
            || self.lm_head.as_ref().is_some_and(|h| h.packed().is_some())
            || self
                .blocks
                .iter()
                .any(|b| b.linears().iter().any(|(_, l)| l.packed().is_some()))
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
        self.set_act_quant_by(|_| q);
    }

    /// Simulates activation quantization at the input of each block linear as `of` says for its
    /// full name (`model.layers.3.mlp.down_proj`; `None`: its inputs stay as they are).
    pub fn set_act_quant_by(&mut self, of: impl Fn(&str) -> Option<ActQuant>) {
        for b in &mut self.blocks {
            let names: Vec<String> = b.linears().iter().map(|(n, _)| n.to_string()).collect();
            for name in names {
                if let Some(l) = b.linear_mut(&name) {
                    l.set_act_quant(of(&name));
                }
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
        self.config.embedding_name()
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
        Self::from_tensors(&self.config.with_layers(layers), tensors, self.dtype())
    }

    /// The name prefix of the blocks (`model.layers`, `encoder.layer`, `h`).
    pub fn layer_prefix(&self) -> &'static str {
        self.arch.layer_prefix()
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
            out.extend(b.named_tensors(self.arch));
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
