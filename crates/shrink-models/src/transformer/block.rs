//! A transformer block: its linears by role, the scale groups AWQ and SmoothQuant fold through,
//! and its forward pass.

use super::*;

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
    /// QK-norm: RMSNorms over each query and each key head (`head_dim` wide), before RoPE.
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    /// Norms on the attention and MLP outputs before their residual sums (Gemma).
    pub attn_post_norm: Option<Norm>,
    pub mlp_post_norm: Option<Norm>,
    /// Attends through the context's sliding window with its local RoPE tables.
    pub(super) sliding: bool,
    /// The factor attention scores are scaled by.
    pub(super) attn_scale: f64,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) post_norm: bool,
    pub(super) activation: Activation,
    /// Full names by [`Role`]; empty for an absent gate.
    pub(super) names: [String; 7],
    /// Keys and values rounded to f16 as they enter attention, as llama.cpp's default KV cache
    /// stores them (set with packed weights: [`Block::set_packed`]).
    pub(super) kv_f16: bool,
}

impl Block {
    /// Every weight of the block under the model's names (`arch` names its norms).
    pub fn named_tensors(&self, arch: Arch) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, n) in self.norms(arch) {
            out.insert(format!("{name}.weight"), n.weight.clone());
            if let Some(b) = &n.bias {
                out.insert(format!("{name}.bias"), b.clone());
            }
        }
        for (name, linear) in self.linears() {
            out.insert(format!("{name}.weight"), linear.weight().clone());
            if let Some(bias) = linear.bias() {
                out.insert(format!("{name}.bias"), bias.clone());
            }
        }
        out
    }

    /// The block's norms with their full names (`model.layers.3.input_layernorm`): the two every
    /// block has, then QK-norm and post-norms where the family has them.
    pub fn norms(&self, arch: Arch) -> Vec<(String, &Norm)> {
        let names = crate::family::naming(arch);
        let p = format!("{}.{}", names.layers, self.index);
        let slot_names = [
            names.attn_norm,
            names.mlp_norm,
            names.qk_norms[0],
            names.qk_norms[1],
            names.post_norms[0],
            names.post_norms[1],
        ];
        slot_names
            .into_iter()
            .zip(self.norm_slots())
            .filter_map(|(name, n)| Some((format!("{p}.{name}"), n?)))
            .collect()
    }

    /// Every norm of the block, in [`Block::norms`]' order, without names.
    pub fn all_norms(&self) -> Vec<&Norm> {
        self.norm_slots().into_iter().flatten().collect()
    }

    /// The block's six norm places (attention, MLP, query, key, attention output, MLP output),
    /// `None` where the family has none.
    fn norm_slots(&self) -> [Option<&Norm>; 6] {
        [
            Some(&self.attn_norm),
            Some(&self.mlp_norm),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
            self.attn_post_norm.as_ref(),
            self.mlp_post_norm.as_ref(),
        ]
    }

    /// Every norm of the block, mutably.
    fn norms_mut(&mut self) -> Vec<&mut Norm> {
        let mut out = vec![&mut self.attn_norm, &mut self.mlp_norm];
        out.extend(
            [
                self.q_norm.as_mut(),
                self.k_norm.as_mut(),
                self.attn_post_norm.as_mut(),
                self.mlp_post_norm.as_mut(),
            ]
            .into_iter()
            .flatten(),
        );
        out
    }

    /// The same block with its tensors detached from any gradient computation (the same
    /// storage): its forward pass takes the inference kernels.
    pub(super) fn detached(&self) -> Self {
        let mut block = self.clone();
        for norm in block.norms_mut() {
            *norm = norm.detached();
        }
        for linear in block.linears_mut() {
            *linear = linear.detached();
        }
        block
    }

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
        let head_norm = |x: Tensor, norm: &Option<Norm>| match norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        };
        let q = head_norm(heads(self.q_proj.forward(&h)?, nh)?, &self.q_norm)?;
        let k = head_norm(heads(self.k_proj.forward(&h)?, nkv)?, &self.k_norm)?;
        let v = heads(self.v_proj.forward(&h)?, nkv)?;
        let rope = match (self.sliding, &ctx.rope_local) {
            (true, Some(local)) => Some(local),
            _ => ctx.rope.as_ref(),
        };
        let (q, k) = match rope {
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
        // Rounded before the cache takes them: cached keys and values are held as rounded.
        let (k, v) = match self.kv_f16 && k.dtype() == DType::F32 {
            true => {
                let f16 = |x: Tensor| x.to_dtype(DType::F16)?.to_dtype(DType::F32);
                (f16(k)?, f16(v)?)
            }
            false => (k, v),
        };
        let attn = self.attend(x, &q, k, v, ctx, cache, hook)?;
        let attn = attn.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        hook.observe(&self.names[3], &attn)?;
        let x = (x + head_norm(self.o_proj.forward(&attn)?, &self.attn_post_norm)?)?;
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
                let (g, u) = (gate.forward(&h)?, self.up_proj.forward(&h)?);
                match self.activation {
                    Activation::GeluTanhGated => (g.gelu()? * u)?,
                    _ => crate::kernels::silu_mul(&g, &u)?,
                }
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
        let out = (x + head_norm(self.down_proj.forward(&act)?, &self.mlp_post_norm)?)?;
        let out = if self.post_norm {
            self.mlp_norm.forward(&out)?
        } else {
            out
        };
        hook.block_output(self.index, &out)?;
        Ok(out)
    }

    /// Attention of `q` over `k`, `v` and the positions cached before them (which `k`, `v` join):
    /// causal attention outside training by query blocks, its cache held in place
    /// ([`crate::kernels::causal_attention_cached`]); otherwise [`Block::attention`].
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        x: &Tensor,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        ctx: &AttentionContext,
        cache: Option<&mut KvCache>,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        let scale = self.attn_scale;
        let window = self.window(ctx);
        let fused = ctx.causal && !hook.wants_attention(self.index);
        let (k, v) = match cache {
            Some(cache) => {
                if fused && cache.kv.is_none() {
                    let (held, w) = (&mut cache.held, window);
                    let attn =
                        crate::kernels::causal_attention_cached(q, &k, &v, held, groups, scale, w)?;
                    if let Some(attn) = attn {
                        return Ok(attn);
                    }
                }
                if cache.held.len() > 0 {
                    return Err(ModelError::Config(
                        "a KV cache held for fused attention used by another attention".into(),
                    ));
                }
                let (k, v) = match &cache.kv {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                    None => (k, v),
                };
                cache.kv = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        if fused {
            if let Some(attn) = crate::kernels::causal_attention(q, &k, &v, groups, scale, window)?
            {
                return Ok(attn);
            }
        }
        self.attention(x, q, (k, v), (groups, scale), ctx, hook)
    }

    /// Attention with its probabilities materialised (`batch × heads × t × s`, shown to the
    /// hook): bidirectional attention, training, or a hook that asks for them.
    /// `groups` query heads share a key/value head; scores are scaled by `scale`.
    fn attention(
        &self,
        x: &Tensor,
        q: &Tensor,
        (k, v): (Tensor, Tensor),
        (groups, scale): (usize, f64),
        ctx: &AttentionContext,
        hook: &mut dyn LinearHook,
    ) -> Result<Tensor> {
        let scores = match crate::kernels::per_head(q, &k, groups, true)? {
            Some(scores) => scores,
            None => q.matmul(&repeat_kv(k.clone(), groups)?.t()?)?,
        };
        let probs = if ctx.causal {
            crate::kernels::causal_softmax(&scores, scale, self.window(ctx))?
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
        Ok(match crate::kernels::per_head(&probs, &v, groups, false)? {
            Some(attn) => attn,
            None => probs.matmul(&repeat_kv(v, groups)?)?,
        })
    }

    /// The sliding window this block attends through (`None`: every earlier position).
    fn window(&self, ctx: &AttentionContext) -> Option<usize> {
        ctx.window.filter(|_| self.sliding)
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

    /// Gives each linear the stored blocks `get` finds for its weight ([`Linear::set_packed`]);
    /// returns how many it found. A block with any such weight computes as llama.cpp does
    /// throughout: its keys and values are also rounded to f16, as llama.cpp's KV cache holds
    /// them by default.
    pub fn set_packed(&mut self, get: &super::PackedSource) -> Result<usize> {
        let mut found = 0;
        for role in self.roles() {
            let Some(name) = self.name(role).map(|n| format!("{n}.weight")) else {
                continue;
            };
            if let (Some(p), Some(linear)) = (get(&name)?, self.linear_by_role_mut(role)) {
                linear.set_packed(Some(p))?;
                found += 1;
            }
        }
        self.kv_f16 = found > 0;
        Ok(found)
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
