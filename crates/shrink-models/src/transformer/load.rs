//! Building a [`Transformer`] from named tensors: the checks on the configuration and the tensors,
//! the checkpoint layouts, and seeded random models.

use super::*;

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

    /// The full names of block `index`'s linears by [`Role`] (empty for a role the family does
    /// not have: GPT-2 and BERT have no gate).
    pub fn block_linear_names(&self, index: usize) -> Result<[String; 7]> {
        let arch = self.arch()?;
        let names = naming(arch);
        Ok(std::array::from_fn(|r| {
            if names.linears[r].is_empty() || (r == Role::Gate as usize && !arch.is_llama_like()) {
                String::new()
            } else {
                format!("{}.{index}.{}", names.layers, names.linears[r])
            }
        }))
    }

    /// The token embedding's tensor name (`model.embed_tokens.weight`, `wte.weight`, …).
    pub fn embedding_name(&self) -> String {
        format!(
            "{}.weight",
            naming(self.arch().unwrap_or(Arch::Llama)).embed
        )
    }

    /// The linears of the blocks, by name (`model.layers.0.self_attn.q_proj`), with their weights'
    /// `[rows, cols]`, in block order.
    pub fn block_linears(&self) -> Vec<(String, [usize; 2])> {
        self.expected_tensors()
            .into_iter()
            .filter_map(|(name, shape)| {
                let stem = name.strip_suffix(".weight")?;
                (Role::of_name(stem).is_some() && shape.len() == 2)
                    .then(|| (stem.to_string(), [shape[0], shape[1]]))
            })
            .collect()
    }

    /// The `nn.Linear` modules, by Hugging Face name and sorted, whose weights are among `tensors`
    /// (names and shapes as a folder of this model stores them), plus the output head a tied
    /// model builds from the token embedding and stores no weight for (`lm_head`;
    /// `BertForMaskedLM`'s `cls.predictions.decoder`). Embedding tables and GPT-2's `Conv1D`
    /// weights are not linears. A compressed-tensors config that targets every `Linear` must
    /// `ignore` those of them it leaves unquantized, or its readers expect packed codes for them.
    pub fn hf_linear_modules<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Vec<String> {
        let arch = self.arch().unwrap_or(Arch::Llama);
        let names = naming(arch);
        let tables: Vec<String> = [Some(names.embed), names.positions, names.token_types]
            .into_iter()
            .flatten()
            .filter_map(|t| crate::checkpoint::checkpoint_name(self, &format!("{t}.weight")))
            .collect();
        let blocks = format!("{}.", names.layers);
        let conv1d = |stem: &str| arch == Arch::Gpt2 && stem.starts_with(&blocks);
        let mut out: Vec<String> = tensors
            .into_iter()
            .filter(|(name, shape)| shape.len() == 2 && !tables.iter().any(|t| t == name))
            .filter_map(|(name, _)| name.strip_suffix(".weight"))
            .filter(|stem| !conv1d(stem))
            .map(str::to_string)
            .collect();
        let head = if self.has_mlm_head() {
            Some("cls.predictions.decoder")
        } else if !arch.is_encoder() && self.ties_embeddings() {
            Some("lm_head")
        } else {
            None
        };
        out.extend(head.map(str::to_string));
        out.sort();
        out.dedup();
        out
    }

    /// Each block linear weight as the checkpoint stores it (see
    /// [`Transformer::stacked_weights`]).
    pub fn stacked_weights(&self) -> Vec<(String, Vec<String>)> {
        let linears: Vec<String> = self.block_linears().into_iter().map(|(n, _)| n).collect();
        crate::checkpoint::stacked_weights(self, &linears)
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
            if arch.has_qk_norm() {
                for n in names.qk_norms {
                    out.push((format!("{p}.{n}.weight"), vec![hd]));
                }
            }
            if arch.has_post_norms() {
                for n in names.post_norms {
                    norm(&mut out, format!("{p}.{n}"));
                }
            }
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

/// Buffers some checkpoints store that are not weights.
fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("embeddings.position_ids")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

/// `t`, the tensor `name`, checked against the shape the model expects and converted to `dtype`.
pub(super) fn checked(
    expected: &BTreeMap<String, Vec<usize>>,
    name: String,
    t: Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let shape = expected
        .get(&name)
        .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
    if t.dims() != shape.as_slice() {
        return Err(ModelError::WrongShape {
            name,
            expected: shape.clone(),
            actual: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(dtype)?)
}

/// The norm called `name` (its weight, and its bias for LayerNorm families).
pub(super) fn load_norm(
    config: &ModelConfig,
    name: &str,
    get: &mut dyn FnMut(String) -> Result<Tensor>,
) -> Result<Norm> {
    let arch = config.arch()?;
    let layer_norm = !arch.is_llama_like();
    Ok(Norm {
        weight: get(format!("{name}.weight"))?,
        bias: if layer_norm {
            Some(get(format!("{name}.bias"))?)
        } else {
            None
        },
        eps: config.norm_eps(),
        offset: arch.norm_offset(),
    })
}

impl Block {
    /// Block `index` of a model of `config`, its tensors (under the model's names) taken from
    /// `get`.
    pub fn load(
        config: &ModelConfig,
        index: usize,
        get: &mut dyn FnMut(String) -> Result<Tensor>,
    ) -> Result<Block> {
        let arch = config.arch()?;
        let names = naming(arch);
        let p = format!("{}.{index}", names.layers);
        let full = config.block_linear_names(index)?;
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
        let mut norm = |name: &str| load_norm(config, &format!("{p}.{name}"), get);
        let attn_norm = norm(names.attn_norm)?;
        let mlp_norm = norm(names.mlp_norm)?;
        let [q_norm, k_norm] = match arch.has_qk_norm() {
            true => names.qk_norms.map(|n| norm(n).map(Some)),
            false => [Ok(None), Ok(None)],
        };
        let [attn_post_norm, mlp_post_norm] = match arch.has_post_norms() {
            true => names.post_norms.map(|n| norm(n).map(Some)),
            false => [Ok(None), Ok(None)],
        };
        Ok(Block {
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
            q_norm: q_norm?,
            k_norm: k_norm?,
            attn_post_norm: attn_post_norm?,
            mlp_post_norm: mlp_post_norm?,
            sliding: config.is_sliding_layer(index),
            attn_scale: config.attention_scale(),
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_kv_heads(),
            head_dim: config.head_dim(),
            post_norm: arch == Arch::Bert,
            activation: config.activation()?,
            names: full,
            kv_f16: false,
        })
    }
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
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            checked(&expected, name, t, dtype)
        };
        let norm = |name: &str, get: &mut dyn FnMut(String) -> Result<Tensor>| {
            load_norm(config, name, get)
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
        let blocks = (0..config.num_hidden_layers)
            .map(|index| Block::load(config, index, &mut get))
            .collect::<Result<Vec<_>>>()?;
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
            attention: AttentionSpec::new(config)?,
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
            tied_packed: None,
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
}
