//! Measuring a model: perplexity and fidelity against the input model (decoders) or embedding
//! fidelity (encoders), generations, decode speed, size and sparsity.

use crate::report::DecodeSpeed;
use crate::{Pipeline, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use shrink_core::{Collective, Progress};
use shrink_io::{Checkpoint, FileView, TokenizerBundle};
use shrink_models::PackedLoader;
use shrink_models::{BlockModel, Sampler, SamplingConfig, StreamedModel, Transformer};
use std::path::Path;

/// What was measured on one model, cached in `metrics.json` beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Metrics {
    pub(crate) key: String,
    /// Perplexity and fidelity (decoders).
    #[serde(default)]
    pub(crate) eval: Option<shrink_eval::EvalReport>,
    /// Embedding fidelity and masked-LM scores (encoders).
    #[serde(default)]
    pub(crate) encoder: Option<shrink_eval::EncoderReport>,
    pub(crate) generations: Vec<String>,
    pub(crate) decode: Option<DecodeSpeed>,
    pub(crate) size_bytes: u64,
    pub(crate) bits_per_weight: f64,
    pub(crate) parameters: u64,
    pub(crate) sparsity: f64,
    /// Layers, widths and heads, as `30 × 576, MLP 1536, 9/3 heads`.
    #[serde(default)]
    pub(crate) shape: String,
}

impl Metrics {
    /// What is known of a model before it is evaluated: its file's size and bits (`file`), its
    /// sparsity and its shape (`config`).
    fn of_file(
        key: String,
        file: &FileView,
        sparsity: f64,
        config: &shrink_models::ModelConfig,
    ) -> Self {
        let info = &file.inspection;
        Metrics {
            key,
            eval: None,
            encoder: None,
            generations: vec![],
            decode: None,
            size_bytes: info.file_size_bytes,
            bits_per_weight: info.bits_per_weight,
            parameters: info.parameters,
            sparsity,
            shape: shape_of(config),
        }
    }
}

/// Fraction of exactly-zero values of a tensor.
pub(crate) fn zero_fraction(t: &candle_core::Tensor) -> Result<f64> {
    let n = t.elem_count().max(1);
    let zeros = t
        .eq(0f32)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok(zeros / n as f64)
}

/// Everything the measurements of every model share.
pub(crate) struct Bench<'a> {
    tokens: Vec<u32>,
    bos: Option<u32>,
    eval: shrink_eval::EvalConfig,
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    stop: Vec<u32>,
    decode_prompt: Vec<u32>,
    decode_tokens: usize,
    speed_repeats: usize,
    tokenizer: &'a TokenizerBundle,
    /// Encoders: whether the models are, the held-out sentences, their pooling and the
    /// evaluation settings.
    encoder: bool,
    sentences: Vec<Vec<u32>>,
    pooling: shrink_models::Pooling,
    encoder_eval: shrink_eval::EncoderEvalConfig,
    /// `[eval] tasks` and their requests, tokenized.
    tasks: Vec<(shrink_eval::McTask, Vec<shrink_eval::McRequest>)>,
    progress: &'a dyn Progress,
}

impl<'a> Bench<'a> {
    /// The measurements `pipeline` asks for, on its evaluation text.
    pub(crate) fn new(
        pipeline: &Pipeline,
        checkpoint: &'a Checkpoint,
        eval_text: &str,
        progress: &'a dyn Progress,
    ) -> Result<Self> {
        let tokenizer = checkpoint.tokenizer()?;
        let (tokens, bos) = eval_tokens(checkpoint, eval_text)?;
        let encoder = crate::encoder::is_encoder(checkpoint)?;
        let e = &pipeline.eval;
        Ok(Bench {
            decode_prompt: tokens[..e.prefill_tokens.min(tokens.len())].to_vec(),
            tokens,
            bos,
            eval: shrink_eval::EvalConfig {
                protocol: e.protocol.parse()?,
                ctx: e.ctx,
                chunks: (e.chunks > 0).then_some(e.chunks),
                batch: crate::memory::EVAL_BATCH,
            },
            prompts: e
                .prompts
                .iter()
                .map(|p| prompt_tokens(tokenizer, p, e.chat))
                .collect::<Result<_>>()?,
            max_new_tokens: e.max_new_tokens,
            stop: tokenizer.eos_token_ids.clone(),
            decode_tokens: e.decode_tokens,
            speed_repeats: e.speed_repeats,
            tokenizer,
            encoder,
            sentences: if encoder {
                crate::encoder::sentence_tokens(checkpoint, eval_text, e.sentences)?
            } else {
                vec![]
            },
            pooling: crate::encoder::pooling_of(checkpoint)?,
            encoder_eval: shrink_eval::EncoderEvalConfig {
                mask_id: crate::encoder::mask_id(checkpoint),
                ..Default::default()
            },
            tasks: match encoder {
                true => vec![],
                false => e
                    .tasks
                    .iter()
                    .map(|spec| task_requests(checkpoint, spec))
                    .collect::<Result<_>>()?,
            },
            progress,
        })
    }
}

impl Bench<'_> {
    /// At most how many chunks the evaluation scores ([`crate::memory::eval_chunk_bound`]).
    pub(crate) fn chunk_bound(&self) -> u64 {
        crate::memory::eval_chunk_bound(self.tokens.len(), self.eval.ctx, self.eval.chunks)
    }

    /// The evaluation of `model` against `reference` on the text, split across the ranks of
    /// `world` (each calls it with the same models).
    pub(crate) fn evaluate(
        &self,
        world: &dyn Collective,
        model: &Transformer,
        reference: Option<&Transformer>,
    ) -> Result<shrink_eval::EvalReport> {
        Ok(shrink_eval::evaluate_in(
            world,
            model,
            reference,
            &self.tokens,
            self.bos,
            &self.eval,
            &mut shrink_eval::NoLogits,
            self.progress,
        )?)
    }

    /// [`Bench::evaluate`] of models read block by block.
    pub(crate) fn evaluate_streamed(
        &self,
        world: &dyn Collective,
        model: &mut StreamedModel,
        reference: Option<&Checkpoint>,
    ) -> Result<shrink_eval::EvalReport> {
        let mut reference = reference.map(|r| r.streamed(DType::F32)).transpose()?;
        Ok(shrink_eval::evaluate_streamed_in(
            world,
            model,
            reference.as_mut(),
            &self.tokens,
            self.bos,
            &self.eval,
            &mut shrink_eval::NoLogits,
            self.progress,
        )?)
    }

    /// Whether the models measured are encoders (compared by their sentence embeddings, on one
    /// rank).
    pub(crate) fn encoder(&self) -> bool {
        self.encoder
    }

    /// Evaluates `model` (built from the file `file` views) against `reference` (the evaluation
    /// split across the ranks of `world`), generates from the prompts and times decoding — with
    /// the weights `packed` finds stored in ggml blocks multiplied as llama.cpp multiplies them;
    /// the file's size and bits come from the inspection made when it was read.
    pub(crate) fn measure(
        &self,
        world: &dyn Collective,
        key: String,
        model: &Transformer,
        reference: Option<&Transformer>,
        file: &FileView,
        packed: &PackedLoader,
    ) -> Result<Metrics> {
        let sparsity = linear_sparsity(model)?;
        if model.arch.is_encoder() {
            // Encoders neither predict the next token nor generate: their sentence embeddings
            // are compared instead.
            let encoder = shrink_eval::evaluate_encoder(
                model,
                reference,
                &self.pooling,
                &self.sentences,
                &self.encoder_eval,
                self.progress,
            )?;
            return Ok(Metrics {
                encoder: Some(encoder),
                ..Metrics::of_file(key, file, sparsity, &model.config)
            });
        }
        let mut eval = self.evaluate(world, model, reference)?;
        // The tasks run on the same model (a clone shares its tensors).
        eval.tasks = score_tasks(&mut model.clone(), &self.tasks, TASK_BATCH, self.progress)?;
        let mut generations = Vec::with_capacity(self.prompts.len());
        for prompt in &self.prompts {
            let mut greedy = Sampler::new(SamplingConfig::default());
            let g = shrink_models::generate(
                model,
                prompt,
                self.max_new_tokens,
                &mut greedy,
                &self.stop,
                |_| Ok::<(), shrink_models::ModelError>(()),
            )?;
            generations.push(self.tokenizer.decode(&g.tokens, false)?);
        }
        let decode = match self.timed() {
            false => None,
            true => {
                // A GGUF's block weights as llama.cpp multiplies them (the clone shares the
                // f32 tensors); other files, and models with none, in f32.
                let mut runnable = model.clone();
                runnable.set_packed(packed)?;
                Some(shrink_eval::decode_speed(
                    &runnable,
                    &self.decode_prompt,
                    self.decode_tokens,
                    self.speed_repeats,
                )?)
            }
        };
        Ok(Metrics {
            eval: Some(eval),
            generations,
            decode,
            ..Metrics::of_file(key, file, sparsity, &model.config)
        })
    }
}

impl Bench<'_> {
    /// Whether decoding is timed.
    fn timed(&self) -> bool {
        self.decode_tokens > 0 && !self.decode_prompt.is_empty()
    }

    /// The decode speed of `file` (a model of `config`) through candle's quantized kernels (which
    /// hold only the file's tensors: a model measured block by block), when it is a GGUF they run
    /// and decoding is timed. candle's quantized Llama derives the head size from the width: a
    /// structurally pruned model whose heads no longer fill the width is not timed, nor a file
    /// with block types candle has no kernels for (the i-quants).
    fn quantized_decode(
        &self,
        file: &FileView,
        config: &shrink_models::ModelConfig,
    ) -> Result<Option<DecodeSpeed>> {
        let fills = config.head_dim() * config.num_attention_heads == config.hidden_size;
        let path = Path::new(&file.inspection.path);
        let candle_runs = |gguf: &[u8]| -> Result<bool> {
            let layout = shrink_io::check_gguf_layout(path, gguf)?;
            Ok(layout
                .tensors
                .iter()
                .all(|t| shrink_io::ggml::to_candle(t.dtype).is_some()))
        };
        match (self.timed() && fills, file.gguf_bytes()) {
            (true, Some(gguf)) if candle_runs(gguf)? => {
                Ok(Some(shrink_eval::quantized_decode_speed(
                    gguf,
                    path,
                    &self.decode_prompt,
                    self.decode_tokens,
                    self.speed_repeats,
                )?))
            }
            _ => Ok(None),
        }
    }

    /// [`Bench::measure`] of the model of `checkpoint` read block by block, against the
    /// `reference` checkpoint read so too: the same perplexity, KL, top-1 and sparsity with one
    /// block in memory at a time ([`shrink_eval::evaluate_streamed`]). No generations, which need
    /// the model whole in f32; the decode speed of a GGUF through candle's quantized kernels,
    /// which hold its tensors as stored (the file's size), when that fits in `limit` with a
    /// quarter to spare — after the evaluation, whose memory is freed by then.
    pub(crate) fn measure_streamed(
        &self,
        world: &dyn Collective,
        key: String,
        checkpoint: &Checkpoint,
        reference: Option<&Checkpoint>,
        file: &FileView,
        limit: u64,
    ) -> Result<Metrics> {
        let mut model = checkpoint.streamed(DType::F32)?;
        let mut eval = self.evaluate_streamed(world, &mut model, reference)?;
        eval.tasks = score_tasks(&mut model, &self.tasks, TASK_BATCH, self.progress)?;
        let sparsity = streamed_sparsity(&mut model)?;
        let held = file.gguf_bytes().map_or(u64::MAX, |g| g.len() as u64);
        let decode = match held.saturating_add(held / 4) <= limit {
            true => self.quantized_decode(file, model.config())?,
            false => None,
        };
        Ok(Metrics {
            eval: Some(eval),
            decode,
            ..Metrics::of_file(key, file, sparsity, model.config())
        })
    }
}

/// Fraction of exactly-zero weights over the block linears.
pub(crate) fn linear_sparsity(model: &Transformer) -> Result<f64> {
    let mut counts = (0.0, 0.0);
    for block in &model.blocks {
        count_zeros(block, &mut counts)?;
    }
    Ok(counts.0 / counts.1.max(1.0))
}

/// [`linear_sparsity`] of a model read block by block.
fn streamed_sparsity(model: &mut StreamedModel) -> Result<f64> {
    let mut counts = (0.0, 0.0);
    for index in 0..model.num_blocks() {
        model.with_block(index, |block| count_zeros(block, &mut counts))??;
    }
    Ok(counts.0 / counts.1.max(1.0))
}

/// Adds a block's exactly-zero linear weights and its linear weights to `(zeros, weights)`.
fn count_zeros(block: &shrink_models::Block, counts: &mut (f64, f64)) -> Result<()> {
    for (_, linear) in block.linears() {
        let n = linear.weight().elem_count() as f64;
        counts.0 += zero_fraction(linear.weight())? * n;
        counts.1 += n;
    }
    Ok(())
}

/// `30 × 576, MLP 1536, 9/3 heads`: the model's shape in the report.
pub(crate) fn shape_of(c: &shrink_models::ModelConfig) -> String {
    format!(
        "{} × {}, MLP {}, {}/{} heads",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_kv_heads()
    )
}

/// The evaluation tokens of `text` as `llama-perplexity` makes them (special-token text not
/// parsed; a BOS only when the model adds one, given separately) and that BOS.
pub fn eval_tokens(checkpoint: &Checkpoint, text: &str) -> Result<(Vec<u32>, Option<u32>)> {
    let tokens = checkpoint.tokenizer()?.encode(text, false)?;
    match eval_bos(checkpoint)? {
        // The tokenizer put BOS in front: the evaluation puts it back where llama.cpp does.
        Some(bos) => Ok((tokens[1..].to_vec(), Some(bos))),
        None => Ok((tokens, None)),
    }
}

/// Sequences a forward pass when tasks are scored.
const TASK_BATCH: usize = 16;

/// A multiple-choice task and its scoring requests tokenized by `checkpoint`'s tokenizer (BOS as
/// the model adds one, special-token text not parsed). `spec` is `NAME[:DOCS]` (a task of the
/// `olmo-tasks` dataset, its first DOCS documents) or `NAME=FILE[:DOCS]` (a request file of the
/// same format for task NAME).
pub fn task_requests(
    checkpoint: &Checkpoint,
    spec: &str,
) -> Result<(shrink_eval::McTask, Vec<shrink_eval::McRequest>)> {
    let (task, path, docs) = match spec.split_once('=') {
        Some((name, rest)) => {
            let (file, docs) = match rest.rsplit_once(':') {
                Some((f, d)) if d.parse::<usize>().is_ok() => (f, d.parse().ok()),
                _ => (rest, None),
            };
            (name.to_string(), std::path::PathBuf::from(file), docs)
        }
        None => {
            let (name, docs) = shrink_data::parse_task(spec)?;
            let path = shrink_data::task_file(&name)?;
            (name, path, docs)
        }
    };
    let task = shrink_eval::McTask::read(&task, &path, docs)?;
    let bundle = checkpoint.tokenizer()?;
    // Special-token text is not parsed; one tokenizer for every request.
    let mut plain = bundle.tokenizer.clone();
    plain.set_encode_special_tokens(true);
    // lm-evaluation-harness adds no BOS to Hugging Face models but Gemma's.
    let gemma = shrink_models::ModelConfig::from_json(&checkpoint.config)
        .ok()
        .and_then(|c| c.arch().ok())
        == Some(shrink_models::Arch::Gemma3);
    let bos = bundle.bos_token_id.filter(|_| gemma);
    let encode = |text: &str| -> shrink_eval::Result<Vec<u32>> {
        let encoding = plain
            .encode_fast(text, false)
            .map_err(|e| shrink_eval::EvalError::Task(format!("tokenizing: {e}")))?;
        Ok(bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    };
    let requests = task.requests(&encode)?;
    Ok((task, requests))
}

/// Each task's accuracy and length-normalized accuracy under `model` (held whole or read block
/// by block), `batch` sequences a forward pass.
pub fn score_tasks<M: shrink_models::BlockModel>(
    model: &mut M,
    tasks: &[(shrink_eval::McTask, Vec<shrink_eval::McRequest>)],
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<shrink_eval::TaskReport>> {
    tasks
        .iter()
        .map(|(task, requests)| {
            let lls = shrink_eval::choice_log_likelihoods(model, requests, batch, progress)?;
            Ok(task.report(requests, &lls))
        })
        .collect()
}

/// The BOS id when the model's tokenizer adds one (llama.cpp's `add_bos_token`, with a BOS id).
pub fn eval_bos(checkpoint: &Checkpoint) -> Result<Option<u32>> {
    let tokenizer = checkpoint.tokenizer()?;
    Ok(tokenizer.bos_token_id.filter(|_| tokenizer.add_bos))
}

/// A prompt's token ids, wrapped in the model's chat template when `chat` and it has one.
pub fn prompt_tokens(tokenizer: &TokenizerBundle, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let text = match (&tokenizer.chat_template, chat) {
        (Some(template), true) => {
            let token =
                |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            shrink_models::render_chat(
                template,
                &[shrink_models::ChatMessage {
                    role: "user".into(),
                    content: prompt.to_string(),
                }],
                &token(tokenizer.bos_token_id),
                &token(tokenizer.eos_token_ids.first().copied()),
            )?
        }
        _ => prompt.to_string(),
    };
    Ok(tokenizer.encode(&text, true)?)
}
