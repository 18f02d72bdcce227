//! Models worked on block by block: [`BlockModel`] is what the block-wise engines (calibration,
//! quantization, pruning) need of a model, whether it is held whole in memory ([`Transformer`]) or
//! read from a memory-mapped checkpoint one block at a time ([`StreamedModel`]).

use super::*;

/// What the block-wise engines need of a model: its embeddings, its attention inputs and its
/// blocks, one at a time, in order.
pub trait BlockModel {
    fn config(&self) -> &ModelConfig;

    fn num_blocks(&self) -> usize;

    /// Each batch of token ids `(batch, seq)` embedded at positions from 0, handed to `each` in
    /// order (which may write it out before the next is made). A streamed model loads the
    /// embedding once for all the batches and drops it after.
    fn embed_each<E: From<ModelError>>(
        &self,
        batches: &[Tensor],
        each: impl FnMut(Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>;

    /// Every batch embedded ([`BlockModel::embed_each`]), held together.
    fn embed_batches(&self, batches: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut xs = Vec::with_capacity(batches.len());
        self.embed_each(batches, |x| {
            xs.push(x);
            Ok::<(), ModelError>(())
        })?;
        Ok(xs)
    }

    /// Attention inputs for `seq_len` positions from 0.
    fn attention_context(&self, seq_len: usize) -> Result<AttentionContext>;

    /// Whether the blocks outlive [`BlockModel::with_block`] (a model held whole), so that what
    /// a compression leaves in them is read again.
    fn keeps_blocks(&self) -> bool;

    /// Runs `f` on block `index`: the model's own (what `f` changes stays) or one loaded from the
    /// checkpoint for the call (dropped after it; `f` must write what it wants to keep).
    fn with_block<R>(&mut self, index: usize, f: impl FnOnce(&mut Block) -> R) -> Result<R>;

    /// The output side of a decoder: its final norm and LM head. A streamed model loads them for
    /// the caller, who drops them when done.
    fn head(&self) -> Result<Head>;

    /// The token embedding table, in the compute type (a streamed model loads it for the call).
    fn token_embedding(&self) -> Result<Tensor>;

    /// Token ids `(batch, seq)` embedded as [`BlockModel::embed_each`] embeds them, with `tokens`
    /// in place of the model's token table (a rounded copy of it, say).
    fn embed_with(&self, tokens: &Tensor, ids: &Tensor) -> Result<Tensor>;
}

/// A decoder's final norm and output projection (the token embedding when tied), as
/// [`Transformer::final_hidden`] and [`Transformer::lm_head`] apply them.
#[derive(Debug, Clone)]
pub struct Head {
    pub norm: Option<Norm>,
    pub projection: Linear,
    /// Whether the projection is the token embedding.
    pub tied: bool,
}

impl Head {
    /// The last block's outputs, normalized.
    pub fn final_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(n) => n.forward(hidden),
            None => Ok(hidden.clone()),
        }
    }

    /// Final hidden states `(..., hidden)` to f32 logits `(..., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.projection.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

impl BlockModel for Transformer {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn embed_each<E: From<ModelError>>(
        &self,
        batches: &[Tensor],
        mut each: impl FnMut(Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        for ids in batches {
            each(self.embed(ids)?)?;
        }
        Ok(())
    }

    fn attention_context(&self, seq_len: usize) -> Result<AttentionContext> {
        Transformer::attention_context(self, seq_len, 0)
    }

    fn keeps_blocks(&self) -> bool {
        true
    }

    fn with_block<R>(&mut self, index: usize, f: impl FnOnce(&mut Block) -> R) -> Result<R> {
        let n = self.blocks.len();
        let block = self
            .blocks
            .get_mut(index)
            .ok_or_else(|| ModelError::Config(format!("block {index} of a model of {n} blocks")))?;
        Ok(f(block))
    }

    fn head(&self) -> Result<Head> {
        if self.arch.is_encoder() {
            return Err(ModelError::Config(
                "an encoder has no decoder head to score next tokens with".into(),
            ));
        }
        Ok(Head {
            norm: self.norm.clone(),
            projection: match &self.lm_head {
                Some(head) => head.clone(),
                None => self.tied_head(),
            },
            tied: self.lm_head.is_none(),
        })
    }

    fn token_embedding(&self) -> Result<Tensor> {
        Ok(self.embed_tokens.clone())
    }

    fn embed_with(&self, tokens: &Tensor, ids: &Tensor) -> Result<Tensor> {
        self.embeddings(tokens).forward(ids, 0, self.dtype())
    }
}

/// Loads one tensor, under the model's own name, in the asked float type.
pub type TensorLoader = dyn Fn(&str, DType) -> Result<Tensor> + Send + Sync;

/// A model read from its checkpoint one block at a time: only the block being worked on (and,
/// while embedding, the embedding) is ever materialized. Tensors are loaded through a
/// [`TensorLoader`] (a memory-mapped GGUF or safetensors file) and checked against the shapes
/// the config implies, as [`Transformer::from_tensors`] checks them.
pub struct StreamedModel {
    config: ModelConfig,
    arch: Arch,
    dtype: DType,
    expected: BTreeMap<String, Vec<usize>>,
    load: Box<TensorLoader>,
    attention: AttentionSpec,
    /// Tensors keep the float type the loader gives them (see [`StreamedModel::keeping_stored_types`]).
    stored: bool,
    /// The float type each tensor is stored in, when the loader's checkpoint knows it (see
    /// [`StreamedModel::knowing_stored_types`]).
    stored_type: Option<Box<StoredType>>,
    /// Where each block's weights stored in ggml blocks are found, when they are multiplied as
    /// stored (see [`StreamedModel::multiplying_packed`]).
    packed: Option<Box<PackedLoader>>,
}

/// [`super::PackedSource`] owned by a streamed model.
pub type PackedLoader =
    dyn Fn(&str) -> Result<Option<std::sync::Arc<shrink_core::qmatmul::QMatrix>>> + Send + Sync;

/// The float type a tensor is stored in (loads without conversion), if known.
pub type StoredType = dyn Fn(&str) -> Option<DType> + Send + Sync;

impl std::fmt::Debug for StreamedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedModel")
            .field("arch", &self.arch)
            .field("dtype", &self.dtype)
            .field("blocks", &self.config.num_hidden_layers)
            .finish()
    }
}

impl StreamedModel {
    /// A model of `config` in `dtype` whose tensors `load` reads. Only decoders whose checkpoint
    /// layout is the model's own (the Llama family) stream; the config is validated now, the
    /// tensors as each block is loaded.
    pub fn new(config: &ModelConfig, dtype: DType, load: Box<TensorLoader>) -> Result<Self> {
        config.validate()?;
        let arch = config.arch()?;
        if !arch.is_llama_like() {
            return Err(ModelError::Config(format!(
                "{arch:?} models are read whole, not block by block (only the Llama family streams)"
            )));
        }
        Ok(Self {
            config: config.clone(),
            arch,
            dtype,
            expected: config.expected_tensors().into_iter().collect(),
            load,
            attention: AttentionSpec::new(config)?,
            stored: false,
            stored_type: None,
            packed: None,
        })
    }

    /// The model told the type each tensor is stored in, so that the embedding is read in it and
    /// only the rows a batch looks up are widened to the compute type (a bf16 128k × 4096
    /// embedding holds 1 GB while the batches are embedded, not 2 GB in f32).
    pub fn knowing_stored_types(mut self, stored_type: Box<StoredType>) -> Self {
        self.stored_type = Some(stored_type);
        self
    }

    /// The model with each tensor in the type its loader gives it (a loader that reads every
    /// tensor as stored: f16 linears beside f32 norms, say) instead of converted to one compute
    /// type: for jobs that only read the weights and never run the blocks (rounding without
    /// calibration), so that no tensor is widened or narrowed.
    pub fn keeping_stored_types(mut self) -> Self {
        self.stored = true;
        self
    }

    /// The model with every linear (and the head) whose weight `packed` finds in ggml blocks
    /// multiplied by those blocks as llama.cpp does ([`Linear::set_packed`]).
    pub fn multiplying_packed(mut self, packed: Box<PackedLoader>) -> Self {
        self.packed = Some(packed);
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The (decoder's) embeddings with `tokens` as the token table.
    fn embeddings<'a>(&self, tokens: &'a Tensor) -> Embeddings<'a> {
        Embeddings {
            tokens,
            positions: None,
            token_types: None,
            norm: None,
            scale: self.config.embedding_scale(),
        }
    }

    /// The tensor `name` (a model name), checked against its expected shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = (self.load)(name, self.dtype)?;
        let dtype = if self.stored { t.dtype() } else { self.dtype };
        load::checked(&self.expected, name.to_string(), t, dtype)
    }
}

impl BlockModel for StreamedModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn embed_each<E: From<ModelError>>(
        &self,
        batches: &[Tensor],
        mut each: impl FnMut(Tensor) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let name = format!("{}.weight", naming(self.arch).embed);
        // Rows are looked up in the stored type and widened after: the same values as widening
        // the whole table first (a Llama embedding is a plain lookup).
        let stored = self
            .stored_type
            .as_ref()
            .and_then(|f| f(&name))
            .filter(|d| d.is_float() && !self.stored);
        let tokens = match stored {
            Some(dtype) => load::checked(
                &self.expected,
                name.clone(),
                (self.load)(&name, dtype)?,
                dtype,
            )?,
            None => self.tensor(&name)?,
        };
        let embeddings = self.embeddings(&tokens);
        for ids in batches {
            each(embeddings.forward(ids, 0, self.dtype)?)?;
        }
        Ok(())
    }

    fn attention_context(&self, seq_len: usize) -> Result<AttentionContext> {
        self.attention
            .context((seq_len, 0), &Device::Cpu, self.dtype)
    }

    fn keeps_blocks(&self) -> bool {
        false
    }

    fn with_block<R>(&mut self, index: usize, f: impl FnOnce(&mut Block) -> R) -> Result<R> {
        let mut get = |name: String| self.tensor(&name);
        let mut block = Block::load(&self.config, index, &mut get)?;
        if let Some(packed) = &self.packed {
            block.set_packed(packed.as_ref())?;
        }
        Ok(f(&mut block))
    }

    fn head(&self) -> Result<Head> {
        let names = naming(self.arch);
        let mut get = |name: String| self.tensor(&name);
        let norm = match names.final_norm {
            Some(name) => Some(load::load_norm(&self.config, name, &mut get)?),
            None => None,
        };
        let tied = self.config.ties_embeddings();
        let projection = if tied {
            format!("{}.weight", names.embed)
        } else {
            "lm_head.weight".to_string()
        };
        let mut head = Linear::new(self.tensor(&projection)?, None);
        if let Some(packed) = &self.packed {
            head.set_packed(packed(&projection)?)?;
        }
        Ok(Head {
            norm,
            projection: head,
            tied,
        })
    }

    fn token_embedding(&self) -> Result<Tensor> {
        self.tensor(&format!("{}.weight", naming(self.arch).embed))
    }

    fn embed_with(&self, tokens: &Tensor, ids: &Tensor) -> Result<Tensor> {
        self.embeddings(tokens).forward(ids, 0, self.dtype)
    }
}
