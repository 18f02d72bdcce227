//! Evaluation: perplexity exactly as `llama-perplexity` computes it (protocol `llama-cpp`) or over
//! every token (`full`), and fidelity against a reference model (mean per-token KL(ref ‖ model),
//! top-1 agreement), measured on the same scored positions in one pass.
//!
//! ```
//! use candle_core::Device;
//! use shrink_models::{Transformer, ModelConfig};
//! use shrink_eval::{evaluate, EvalConfig, Protocol};
//! let model = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &Device::Cpu).unwrap();
//! let tokens: Vec<u32> = (0..64).map(|i| (i * 7 % 64) as u32).collect();
//! let cfg = EvalConfig { protocol: Protocol::LlamaCpp, ctx: 16, chunks: None, batch: 2 };
//! let report = evaluate(&model, Some(&model), &tokens, None, &cfg, &shrink_core::NoProgress).unwrap();
//! assert_eq!(report.chunks, 4);
//! assert_eq!(report.tokens_scored, 4 * 7); // 16/2 .. 16-2 in each chunk
//! let fidelity = report.fidelity.unwrap();
//! assert!(fidelity.kl_mean.abs() < 1e-9 && fidelity.top1_agreement == 1.0);
//! ```

mod decode;
mod encoder;
mod kld;
mod tasks;

pub use decode::{decode_speed, quantized_decode_speed, DecodeSpeed};
pub use encoder::{
    embed, embedding_fidelity, evaluate_encoder, masked_lm, neighbours, sentences,
    EmbeddingFidelity, EncoderEvalConfig, EncoderReport, MaskedLm, ENCODER_SCHEMA,
};
pub use kld::{
    BaseHeader, BaseLogits, BaseWriter, Estimate, KlAgainstBase, KlReport, NoLogits, ScoredLogits,
};
pub use tasks::{choice_log_likelihoods, McDoc, McRequest, McTask, TaskReport, TASKS};

use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shrink_core::{Alone, Collective, Progress};
use shrink_models::{BlockModel, F32Values, Head, NoHook, Transformer};

/// The JSON schema of [`EvalReport`]; bumped on any incompatible change.
pub const EVAL_SCHEMA: &str = "shrink.eval/v1";

/// Errors from evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "the text has {tokens} tokens; protocol {protocol} with ctx {ctx} needs at least {needed}"
    )]
    TooFewTokens {
        tokens: usize,
        protocol: Protocol,
        ctx: usize,
        needed: usize,
    },
    #[error("invalid evaluation setting: {0}")]
    Config(String),
    #[error("task: {0}")]
    Task(String),
    #[error("token id {id} at position {position} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error("the reference model's vocabulary ({reference}) differs from the model's ({model})")]
    VocabMismatch { model: usize, reference: usize },
    #[error("base log-probabilities '{path}': {message}")]
    BaseFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("non-finite logits in chunk {chunk}: the model produced NaN or infinity")]
    NonFinite { chunk: usize },
    /// What another MPI rank met.
    #[error("MPI rank {rank}: {message}")]
    Rank { rank: usize, message: String },
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// Which predictions are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `llama-perplexity`: consecutive chunks of `ctx` tokens of the text tokenized as it does
    /// (BOS in front when the model adds one), at most `tokens/ctx`, each from an empty cache,
    /// its first token replaced by BOS when the model adds one, and only the second half of each
    /// chunk scored (positions `ctx/2 .. ctx-2` predicting the next token).
    LlamaCpp,
    /// Every token after the first of each chunk (after BOS when the model adds one); the last,
    /// shorter chunk included.
    Full,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::LlamaCpp => "llama-cpp",
            Protocol::Full => "full",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama-cpp" | "llama.cpp" => Ok(Protocol::LlamaCpp),
            "full" => Ok(Protocol::Full),
            _ => Err(EvalError::Config(format!(
                "unknown protocol '{s}' (use llama-cpp or full)"
            ))),
        }
    }
}

/// How to cut and batch the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub protocol: Protocol,
    /// Tokens per chunk (llama.cpp's `-c`).
    pub ctx: usize,
    /// At most this many chunks (llama.cpp's `--chunks`); all by default.
    pub chunks: Option<usize>,
    /// Chunks run together in one forward pass.
    pub batch: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            protocol: Protocol::LlamaCpp,
            ctx: 512,
            chunks: None,
            batch: 4,
        }
    }
}

/// Perplexity over the scored tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// llama.cpp's ± figure: ppl × the standard error of the mean NLL.
    pub ppl_stderr: f64,
    pub nll_mean: f64,
    /// Perplexity of each chunk on its own.
    pub chunk_ppl: Vec<f64>,
}

/// Agreement with a reference model on the same scored positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Mean over positions of KL(reference ‖ model), nats.
    pub kl_mean: f64,
    pub kl_stderr: f64,
    /// Largest per-position KL.
    pub kl_max: f64,
    /// Fraction of positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
    /// Perplexity of the reference on the same positions.
    pub reference_ppl: f64,
}

/// Everything one evaluation measured (`--json` prints this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub schema: String,
    pub config: EvalConfig,
    pub tokens_in_text: usize,
    pub chunks: usize,
    pub tokens_processed: usize,
    pub tokens_scored: usize,
    pub perplexity: Perplexity,
    pub fidelity: Option<Fidelity>,
    pub wall_s: f64,
    /// Tokens run through the evaluated model per second of wall time (both models' forward
    /// passes count in wall time when a reference is given).
    pub tokens_per_s: f64,
    /// How busy the machine was during the evaluation, where it can be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<shrink_core::MachineLoad>,
    /// Against saved base log-probabilities ([`KlAgainstBase`]), when scored so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_base: Option<KlReport>,
    /// Zero-shot multiple-choice tasks scored with the perplexity ([`TaskReport`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskReport>,
}

/// One chunk: its input ids and the positions whose next-token prediction is scored.
#[derive(Debug, Clone, PartialEq)]
struct Chunk {
    ids: Vec<u32>,
    first_scored: usize,
}

fn make_chunks(tokens: &[u32], bos: Option<u32>, cfg: &EvalConfig) -> Result<Vec<Chunk>> {
    if cfg.ctx < 4 {
        return Err(EvalError::Config(format!(
            "ctx must be at least 4, got {}",
            cfg.ctx
        )));
    }
    if cfg.batch == 0 || cfg.chunks == Some(0) {
        return Err(EvalError::Config(
            "batch and chunks must be at least 1".into(),
        ));
    }
    let ctx = cfg.ctx;
    let limit = cfg.chunks.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    match cfg.protocol {
        Protocol::LlamaCpp => {
            let len = tokens.len() + usize::from(bos.is_some());
            if len < 2 * ctx {
                return Err(EvalError::TooFewTokens {
                    tokens: len,
                    protocol: cfg.protocol,
                    ctx,
                    needed: 2 * ctx,
                });
            }
            // llama-perplexity's tokens: BOS in front when the model adds one.
            let tokens: Vec<u32> = bos.into_iter().chain(tokens.iter().copied()).collect();
            let n = (tokens.len() / ctx).min(limit);
            for i in 0..n {
                let mut ids = tokens[i * ctx..(i + 1) * ctx].to_vec();
                if let Some(bos) = bos {
                    ids[0] = bos;
                }
                out.push(Chunk {
                    ids,
                    first_scored: ctx / 2,
                });
            }
        }
        Protocol::Full => {
            let body = if bos.is_some() { ctx - 1 } else { ctx };
            for piece in tokens.chunks(body).take(limit) {
                let mut ids = Vec::with_capacity(ctx);
                ids.extend(bos);
                ids.extend_from_slice(piece);
                if ids.len() >= 2 {
                    out.push(Chunk {
                        ids,
                        first_scored: 0,
                    });
                }
            }
            if out.is_empty() {
                return Err(EvalError::TooFewTokens {
                    tokens: tokens.len(),
                    protocol: cfg.protocol,
                    ctx,
                    needed: 2,
                });
            }
        }
    }
    Ok(out)
}

/// `log Σ exp(row)` of one row of logits, as llama.cpp computes it (f32 max, f64 sum), or
/// `None` when a logit is not finite.
fn log_normalizer(row: &[f32]) -> Option<f64> {
    if !row.iter().all(|v| v.is_finite()) {
        return None;
    }
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    Some(max as f64 + sum.ln())
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// What one scored position contributes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scored {
    nll: f64,
    /// KL(ref ‖ model), whether the top-1 tokens agree, the reference's NLL.
    reference: Option<(f64, bool, f64)>,
}

/// Scores one position; `None` when a logit is not finite.
fn score(row: &[f32], reference: Option<&[f32]>, target: usize) -> Option<Scored> {
    let log_z = log_normalizer(row)?;
    let reference = match reference {
        Some(rrow) => {
            let log_zr = log_normalizer(rrow)?;
            // Σ p_ref · (log p_ref − log p), each log-probability formed as llama.cpp forms it.
            let kl: f64 = rrow
                .iter()
                .zip(row)
                .map(|(&r, &m)| {
                    let (lr, lm) = (r as f64 - log_zr, m as f64 - log_z);
                    lr.exp() * (lr - lm)
                })
                .sum();
            let top = argmax(rrow) == argmax(row);
            Some((kl, top, -(rrow[target] as f64 - log_zr)))
        }
        None => None,
    };
    Some(Scored {
        nll: -(row[target] as f64 - log_z),
        reference,
    })
}

/// The scores of a batch: for each chunk, each scored position's (`None` where a logit is not
/// finite).
type BatchScores = Vec<Vec<Option<Scored>>>;

/// Scores the positions of `batch` (chunks `first..` of the text) from its logits (and the
/// reference's), `(chunks, scored, vocab)` tensors read in place, in parallel, after handing each
/// chunk's logits to `visit`.
fn score_batch(
    batch: &[Chunk],
    first: usize,
    logits: &Tensor,
    reference: Option<&Tensor>,
    visit: &mut dyn ScoredLogits,
) -> Result<BatchScores> {
    let (_, scored, vocab) = logits.dims3()?;
    let mine = F32Values::of(logits)?;
    let theirs = reference.map(F32Values::of).transpose()?;
    let (mine, theirs): (&[f32], Option<&[f32]>) = (&mine, theirs.as_deref());
    for (b, rows) in mine.chunks(scored * vocab).enumerate() {
        visit.chunk(first + b, rows, vocab)?;
    }
    fn row(values: &[f32], at: usize, vocab: usize) -> &[f32] {
        &values[at * vocab..(at + 1) * vocab]
    }
    Ok(batch
        .iter()
        .enumerate()
        .map(|(b, chunk)| {
            (0..scored)
                .into_par_iter()
                .map(|p| {
                    let target = chunk.ids[chunk.first_scored + p + 1] as usize;
                    let at = b * scored + p;
                    score(
                        row(mine, at, vocab),
                        theirs.map(|t| row(t, at, vocab)),
                        target,
                    )
                })
                .collect()
        })
        .collect())
}

fn scored_logits(model: &Transformer, batch: &[Chunk]) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = batch.iter().map(|c| c.ids.clone()).collect();
    let len = rows[0].len();
    let first = batch[0].first_scored;
    let ids = Tensor::new(rows, model.device())?;
    let hidden = model.forward_hidden(&ids, &mut NoHook)?;
    // Only the scored positions go through the (large) output projection.
    let hidden = hidden.narrow(1, first, len - 1 - first)?;
    Ok(model.lm_head(&hidden)?)
}

/// The chunks run together: runs of at most `batch` equal-length chunks (only the last chunk of
/// protocol `full` can be shorter).
fn batches(chunks: &[Chunk], batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < chunks.len() {
        let len = chunks[i].ids.len();
        let mut j = i;
        while j < chunks.len() && j - i < batch && chunks[j].ids.len() == len {
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// The tokens checked against the model's vocabulary, cut into chunks.
fn checked_chunks(
    vocab: usize,
    reference_vocab: Option<usize>,
    tokens: &[u32],
    bos: Option<u32>,
    cfg: &EvalConfig,
) -> Result<Vec<Chunk>> {
    if let Some(reference) = reference_vocab.filter(|&r| r != vocab) {
        return Err(EvalError::VocabMismatch {
            model: vocab,
            reference,
        });
    }
    if let Some((position, &id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(EvalError::TokenOutOfRange {
            id,
            position,
            vocab,
        });
    }
    make_chunks(tokens, bos, cfg)
}

/// Evaluates `model` on `tokens`; with `reference`, also KL and top-1 agreement against it.
/// `bos` is the BOS id when the model adds one (llama.cpp's `add_bos_token`).
pub fn evaluate(
    model: &Transformer,
    reference: Option<&Transformer>,
    tokens: &[u32],
    bos: Option<u32>,
    cfg: &EvalConfig,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    evaluate_in(
        &Alone,
        model,
        reference,
        tokens,
        bos,
        cfg,
        &mut NoLogits,
        progress,
    )
}

/// [`evaluate`] split across the ranks of `world` (every rank calls it with the same models and
/// text): batch `k` of chunks is rank `k mod N`'s, and every rank adds every position's scores
/// in chunk order, so the report is one process's to the bit (but its timings). `visit` receives
/// the scored logits of this rank's chunks in order (e.g. a [`BaseWriter`] or [`KlAgainstBase`]:
/// one process).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_in(
    world: &dyn Collective,
    model: &Transformer,
    reference: Option<&Transformer>,
    tokens: &[u32],
    bos: Option<u32>,
    cfg: &EvalConfig,
    visit: &mut dyn ScoredLogits,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let chunks = checked_chunks(
        model.config.vocab_size,
        reference.map(|r| r.config.vocab_size),
        tokens,
        bos,
        cfg,
    )?;
    let start = shrink_core::Timing::start();
    let ranges = batches(&chunks, cfg.batch);
    let mine = owned(world, ranges.len());
    progress.start("evaluating", mine.len() as u64);
    let scores = mine
        .iter()
        .map(|&k| {
            let batch = &chunks[ranges[k].clone()];
            let logits = scored_logits(model, batch)?;
            let theirs = reference.map(|r| scored_logits(r, batch)).transpose()?;
            progress.advance(1, Some(&format!("batch {}/{}", k + 1, ranges.len())));
            score_batch(batch, ranges[k].start, &logits, theirs.as_ref(), visit)
        })
        .collect::<Result<Vec<_>>>();
    progress.finish();
    let scores = share_scores(world, ranges.len(), scores)?;
    tally(
        tokens.len(),
        &chunks,
        cfg,
        reference.is_some(),
        start,
        scores,
    )
}

/// [`evaluate`] on models read block by block ([`shrink_models::StreamedModel`]): every chunk is
/// run through one block at a time, holding the hidden states of all chunks at one depth and one
/// block (each model's in turn, with a reference), then the final norm and output head score them
/// one chunk at a time (a chunk's logits, not a batch's, are held: a quarter of the memory with a
/// 128k vocabulary and batches of 4). Gives the bits [`evaluate`] gives on the same models held
/// whole.
pub fn evaluate_streamed<M: BlockModel>(
    model: &mut M,
    reference: Option<&mut M>,
    tokens: &[u32],
    bos: Option<u32>,
    cfg: &EvalConfig,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    evaluate_streamed_in(
        &Alone,
        model,
        reference,
        tokens,
        bos,
        cfg,
        &mut NoLogits,
        progress,
    )
}

/// [`evaluate_streamed`] split across the ranks of `world` as [`evaluate_in`] splits it: each
/// rank runs only its batches through the blocks (reading every block) and scores them; `visit`
/// as in [`evaluate_in`].
#[allow(clippy::too_many_arguments)]
pub fn evaluate_streamed_in<M: BlockModel>(
    world: &dyn Collective,
    model: &mut M,
    reference: Option<&mut M>,
    tokens: &[u32],
    bos: Option<u32>,
    cfg: &EvalConfig,
    visit: &mut dyn ScoredLogits,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let chunks = checked_chunks(
        model.config().vocab_size,
        reference.as_ref().map(|r| r.config().vocab_size),
        tokens,
        bos,
        cfg,
    )?;
    let start = shrink_core::Timing::start();
    let ranges = batches(&chunks, cfg.batch);
    let mine: Vec<_> = owned(world, ranges.len())
        .into_iter()
        .map(|k| ranges[k].clone())
        .collect();
    let with_reference = reference.is_some();
    let scores = (|| {
        // A rank with no batch reads nothing.
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let (hidden, head) = scored_hidden(model, &chunks, &mine, progress)?;
        let reference = match reference {
            Some(r) => Some(scored_hidden(r, &chunks, &mine, progress)?),
            None => None,
        };
        // One chunk's logits at a time; `hidden` holds my chunks in order.
        let mut at = 0;
        let mut scores = Vec::with_capacity(mine.len());
        for range in &mine {
            let mut batch = Vec::with_capacity(range.len());
            for (index, chunk) in range.clone().zip(&chunks[range.clone()]) {
                let logits = head.logits(&hidden[at])?;
                let theirs = match &reference {
                    Some((h, head)) => Some(head.logits(&h[at])?),
                    None => None,
                };
                batch.extend(score_batch(
                    std::slice::from_ref(chunk),
                    index,
                    &logits,
                    theirs.as_ref(),
                    visit,
                )?);
                at += 1;
            }
            scores.push(batch);
        }
        Ok(scores)
    })();
    let scores = share_scores(world, ranges.len(), scores)?;
    let mut report = tally(tokens.len(), &chunks, cfg, with_reference, start, scores)?;
    report.config = *cfg;
    Ok(report)
}
/// The batches of chunks `ranges` through `model` block by block: the normalized final hidden
/// states of each of their chunks' scored positions (`(1, scored, hidden)`, in order), and the
/// model's head.
fn scored_hidden<M: BlockModel>(
    model: &mut M,
    chunks: &[Chunk],
    ranges: &[std::ops::Range<usize>],
    progress: &dyn Progress,
) -> Result<(Vec<Tensor>, Head)> {
    let device = candle_core::Device::Cpu;
    let ids = ranges
        .iter()
        .map(|r| {
            let rows: Vec<Vec<u32>> = chunks[r.clone()].iter().map(|c| c.ids.clone()).collect();
            Tensor::new(rows, &device)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut xs = model.embed_batches(&ids)?;
    let mut contexts = std::collections::BTreeMap::new();
    for r in ranges {
        let len = chunks[r.start].ids.len();
        if let std::collections::btree_map::Entry::Vacant(e) = contexts.entry(len) {
            e.insert(model.attention_context(len)?);
        }
    }
    progress.start("evaluating blocks", model.num_blocks() as u64);
    for index in 0..model.num_blocks() {
        model.with_block(index, |block| -> Result<()> {
            for (x, r) in xs.iter_mut().zip(ranges) {
                let ctx = &contexts[&chunks[r.start].ids.len()];
                *x = block.forward(x, ctx, None, &mut NoHook)?;
            }
            Ok(())
        })??;
        progress.advance(1, Some(&format!("block {index}")));
    }
    progress.finish();
    let head = model.head()?;
    let mut hidden = Vec::with_capacity(chunks.len());
    for (x, r) in xs.into_iter().zip(ranges) {
        let (len, first) = (chunks[r.start].ids.len(), chunks[r.start].first_scored);
        let scored = head.final_hidden(&x)?.narrow(1, first, len - 1 - first)?;
        // A copy of each chunk's scored positions: the rest of the batch is freed.
        for j in 0..r.len() {
            hidden.push(scored.narrow(0, j, 1)?.contiguous()?);
        }
    }
    Ok((hidden, head))
}

/// The batches (of `batches`) that are this rank's: batch `k` is rank `k mod N`'s.
fn owned(world: &dyn Collective, batches: usize) -> Vec<usize> {
    (world.rank()..batches).step_by(world.size()).collect()
}

/// Every batch's scores on every rank, in batch order, each sent by the rank that made it
/// (`mine`: this rank's batches, in order; [`shrink_core::share_dealt`]).
fn share_scores(
    world: &dyn Collective,
    batches: usize,
    mine: Result<Vec<BatchScores>>,
) -> Result<Vec<BatchScores>> {
    shrink_core::share_dealt(world, 0, batches, mine, |rank, message| EvalError::Rank {
        rank,
        message,
    })
}

/// The report of the scores of every batch of `chunks` (in order): sums in position order, so
/// that they do not depend on the thread or rank count.
fn tally(
    tokens_in_text: usize,
    chunks: &[Chunk],
    cfg: &EvalConfig,
    with_reference: bool,
    start: shrink_core::Timing,
    scores: Vec<BatchScores>,
) -> Result<EvalReport> {
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let (mut kl, mut kl2, mut kl_max, mut agree, mut ref_nll) = (0f64, 0f64, 0f64, 0usize, 0f64);
    let mut chunk_ppl = Vec::with_capacity(chunks.len());
    let mut processed = 0;
    let per_chunk = scores.into_iter().flatten();
    for (i, (chunk, positions)) in chunks.iter().zip(per_chunk).enumerate() {
        let mut chunk_nll = 0f64;
        let scored = positions.len();
        for s in positions {
            let s = s.ok_or(EvalError::NonFinite { chunk: i })?;
            nll += s.nll;
            nll2 += s.nll * s.nll;
            chunk_nll += s.nll;
            if let Some((d, same, r_nll)) = s.reference {
                kl += d;
                kl2 += d * d;
                kl_max = kl_max.max(d);
                agree += usize::from(same);
                ref_nll += r_nll;
            }
        }
        count += scored;
        chunk_ppl.push((chunk_nll / scored.max(1) as f64).exp());
        processed += chunk.ids.len();
    }
    let wall_s = start.elapsed_s();
    let n = count as f64;
    let nll_mean = nll / n;
    let var = nll2 / n - nll_mean * nll_mean;
    let ppl = nll_mean.exp();
    let ppl_stderr = if var > 0.0 && count > 1 {
        ppl * (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let fidelity = with_reference.then(|| {
        let kl_mean = kl / n;
        let kl_var = kl2 / n - kl_mean * kl_mean;
        Fidelity {
            kl_mean,
            kl_stderr: if kl_var > 0.0 && count > 1 {
                (kl_var / (n - 1.0)).sqrt()
            } else {
                0.0
            },
            kl_max,
            top1_agreement: agree as f64 / n,
            reference_ppl: (ref_nll / n).exp(),
        }
    });
    Ok(EvalReport {
        schema: EVAL_SCHEMA.to_string(),
        config: *cfg,
        tokens_in_text,
        chunks: chunks.len(),
        tokens_processed: processed,
        tokens_scored: count,
        perplexity: Perplexity {
            ppl,
            ppl_stderr,
            nll_mean,
            chunk_ppl,
        },
        fidelity,
        wall_s,
        tokens_per_s: processed as f64 / wall_s.max(1e-9),
        load: start.load(),
        kl_base: None,
        tasks: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
