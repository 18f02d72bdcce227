//! Encoder evaluation: sentence-embedding fidelity against the uncompressed model (mean cosine of
//! each sentence's two embeddings, agreement of top-k nearest neighbours over the sentence set)
//! and, for checkpoints with a masked-LM head, masked-token accuracy and pseudo-perplexity (each
//! token masked in turn, Salazar et al. 2020).

use crate::{EvalError, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{Pooling, Transformer};
use std::time::Instant;

/// Cuts `text` into sentences at `.`, `!`, `?` and blank lines, whitespace collapsed; keeps those
/// of at least `min_words` words, first occurrence only, in text order, at most `count`.
pub fn sentences(text: &str, min_words: usize, count: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for paragraph in text.split("\n\n") {
        let mut current = String::new();
        for c in paragraph.chars() {
            current.push(c);
            if matches!(c, '.' | '!' | '?') {
                push_sentence(&mut out, &mut seen, &current, min_words);
                current.clear();
            }
        }
        push_sentence(&mut out, &mut seen, &current, min_words);
        if out.len() >= count {
            break;
        }
    }
    out.truncate(count);
    out
}

fn push_sentence(
    out: &mut Vec<String>,
    seen: &mut std::collections::BTreeSet<String>,
    raw: &str,
    min_words: usize,
) {
    let words: Vec<&str> = raw.split_whitespace().collect();
    if words.len() >= min_words {
        let s = words.join(" ");
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
}

/// Pads token sequences on the right (with `pad`) into one `(batch, longest)` id tensor.
fn padded(
    batch: &[Vec<u32>],
    pad: u32,
    device: &candle_core::Device,
) -> Result<(Tensor, Vec<usize>)> {
    let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
    let lengths: Vec<usize> = batch.iter().map(Vec::len).collect();
    let ids: Vec<u32> = batch
        .iter()
        .flat_map(|s| {
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, longest - s.len()))
        })
        .collect();
    Ok((
        Tensor::from_vec(ids, (batch.len(), longest), device)?,
        lengths,
    ))
}

/// Sentence embeddings `(sentences, hidden)` as rows of f32, `batch` sentences per forward pass.
/// Sentences are sorted by length for batching (less padding) and returned in input order.
pub fn embed(
    model: &Transformer,
    pooling: &Pooling,
    tokens: &[Vec<u32>],
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f32>>> {
    if !model.arch.is_encoder() {
        return Err(EvalError::Config(format!(
            "sentence embeddings need an encoder; this model is {:?}",
            model.arch
        )));
    }
    let vocab = model.config.vocab_size;
    for (i, s) in tokens.iter().enumerate() {
        if s.is_empty() {
            return Err(EvalError::Config(format!("sentence {i} has no tokens")));
        }
        if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab) {
            return Err(EvalError::TokenOutOfRange {
                id,
                position: i,
                vocab,
            });
        }
    }
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| (tokens[i].len(), i));
    let mut out = vec![Vec::new(); tokens.len()];
    progress.start("encoding sentences", tokens.len() as u64);
    for group in order.chunks(batch.max(1)) {
        let seqs: Vec<Vec<u32>> = group.iter().map(|&i| tokens[i].clone()).collect();
        let (ids, lengths) = padded(&seqs, 0, model.device())?;
        let hidden = model.encode(&ids, &lengths)?;
        let pooled: Vec<Vec<f32>> = pooling.pool(&hidden, &lengths)?.to_vec2()?;
        for (&i, v) in group.iter().zip(pooled) {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(EvalError::NonFinite { chunk: i });
            }
            out[i] = v;
        }
        progress.advance(group.len() as u64, None);
    }
    progress.finish();
    Ok(out)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// The `k` nearest other sentences of each sentence by cosine similarity (ties to the lower index).
pub fn neighbours(embeddings: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
    let n = embeddings.len();
    (0..n)
        .map(|i| {
            let mut sims: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| (cosine(&embeddings[i], &embeddings[j]), j))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut top: Vec<usize> = sims.into_iter().take(k).map(|(_, j)| j).collect();
            top.sort_unstable();
            top
        })
        .collect()
}

/// How closely a compressed encoder's sentence embeddings follow the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingFidelity {
    pub sentences: usize,
    /// Mean over sentences of cos(model embedding, reference embedding).
    pub cosine_mean: f64,
    pub cosine_min: f64,
    /// `k` of the top-k neighbour comparison.
    pub neighbours: usize,
    /// Mean over sentences of |top-k(model) ∩ top-k(reference)| / k.
    pub neighbour_agreement: f64,
}

/// Compares two embedding sets of the same sentences.
pub fn embedding_fidelity(
    model: &[Vec<f32>],
    reference: &[Vec<f32>],
    k: usize,
) -> Result<EmbeddingFidelity> {
    if model.len() != reference.len() || model.len() < 2 {
        return Err(EvalError::Config(format!(
            "embedding fidelity needs the same ≥ 2 sentences from both models (got {} and {})",
            model.len(),
            reference.len()
        )));
    }
    let cos: Vec<f64> = model
        .iter()
        .zip(reference)
        .map(|(a, b)| cosine(a, b))
        .collect();
    let k = k.min(model.len() - 1);
    let (a, b) = (neighbours(model, k), neighbours(reference, k));
    let agreement = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.iter().filter(|i| y.binary_search(i).is_ok()).count() as f64 / k as f64)
        .sum::<f64>()
        / a.len() as f64;
    Ok(EmbeddingFidelity {
        sentences: model.len(),
        cosine_mean: cos.iter().sum::<f64>() / cos.len() as f64,
        cosine_min: cos.iter().copied().fold(f64::INFINITY, f64::min),
        neighbours: k,
        neighbour_agreement: agreement,
    })
}

/// Masked-LM quality: every non-special token masked in turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedLm {
    pub tokens_scored: usize,
    /// Fraction of masked tokens predicted exactly (argmax).
    pub accuracy: f64,
    /// exp(mean −log p(token | the rest)).
    pub pseudo_perplexity: f64,
}

/// Scores `tokens` (each `[CLS] … [SEP]`) by masking every inner position in turn with `mask_id`.
pub fn masked_lm(
    model: &Transformer,
    tokens: &[Vec<u32>],
    mask_id: u32,
    progress: &dyn Progress,
) -> Result<MaskedLm> {
    if !model.has_token_head() {
        return Err(EvalError::Config(
            "masked-token scores need a masked-LM head (BertForMaskedLM)".into(),
        ));
    }
    let (mut nll, mut correct, mut scored) = (0f64, 0usize, 0usize);
    progress.start("masked-LM scoring", tokens.len() as u64);
    for s in tokens {
        let inner: Vec<usize> = (1..s.len().saturating_sub(1)).collect();
        if inner.is_empty() {
            progress.advance(1, None);
            continue;
        }
        let copies: Vec<Vec<u32>> = inner
            .iter()
            .map(|&p| {
                let mut c = s.clone();
                c[p] = mask_id;
                c
            })
            .collect();
        let (ids, lengths) = padded(&copies, 0, model.device())?;
        let hidden = model.encode(&ids, &lengths)?;
        for (row, &p) in inner.iter().enumerate() {
            let logits: Vec<f32> = model
                .lm_head(&hidden.narrow(0, row, 1)?.narrow(1, p, 1)?)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if !max.is_finite() {
                return Err(EvalError::NonFinite { chunk: row });
            }
            let logz = max as f64
                + logits
                    .iter()
                    .map(|&l| ((l - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            let target = s[p] as usize;
            nll += logz - logits[target] as f64;
            let best = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i);
            correct += usize::from(best == Some(target));
            scored += 1;
        }
        progress.advance(1, None);
    }
    progress.finish();
    if scored == 0 {
        return Err(EvalError::Config(
            "no maskable tokens in the sentences".into(),
        ));
    }
    Ok(MaskedLm {
        tokens_scored: scored,
        accuracy: correct as f64 / scored as f64,
        pseudo_perplexity: (nll / scored as f64).exp(),
    })
}

/// Everything an encoder evaluation measured (`shrink eval --json` on an encoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderReport {
    pub schema: String,
    pub pooling: String,
    pub sentences: usize,
    pub tokens: usize,
    pub fidelity: Option<EmbeddingFidelity>,
    pub masked_lm: Option<MaskedLm>,
    /// Tokens encoded per second by the evaluated model (padding excluded).
    pub encode_tokens_per_s: f64,
    pub sentences_per_s: f64,
    pub wall_s: f64,
}

/// The JSON schema of [`EncoderReport`].
pub const ENCODER_SCHEMA: &str = "shrink.eval-encoder/v1";

/// What [`evaluate_encoder`] runs.
#[derive(Debug, Clone)]
pub struct EncoderEvalConfig {
    pub batch: usize,
    /// `k` of the neighbour agreement.
    pub neighbours: usize,
    /// Masked-LM scoring on the first this many sentences (when the model has the head).
    pub mlm_sentences: usize,
    /// The `[MASK]` token id, when the tokenizer has one.
    pub mask_id: Option<u32>,
}

impl Default for EncoderEvalConfig {
    fn default() -> Self {
        Self {
            batch: 32,
            neighbours: 10,
            mlm_sentences: 64,
            mask_id: None,
        }
    }
}

/// Embeds `tokens` with `model` (and `reference`, if given) and measures fidelity, throughput and,
/// where the model has a masked-LM head, masked-token scores.
pub fn evaluate_encoder(
    model: &Transformer,
    reference: Option<&Transformer>,
    pooling: &Pooling,
    tokens: &[Vec<u32>],
    cfg: &EncoderEvalConfig,
    progress: &dyn Progress,
) -> Result<EncoderReport> {
    let start = Instant::now();
    let embeddings = embed(model, pooling, tokens, cfg.batch, progress)?;
    let encode_s = start.elapsed().as_secs_f64();
    let fidelity = match reference {
        Some(r) => {
            let reference = embed(r, pooling, tokens, cfg.batch, progress)?;
            Some(embedding_fidelity(&embeddings, &reference, cfg.neighbours)?)
        }
        None => None,
    };
    let masked = match (model.has_token_head(), cfg.mask_id) {
        (true, Some(mask)) => {
            let n = cfg.mlm_sentences.min(tokens.len());
            Some(masked_lm(model, &tokens[..n], mask, progress)?)
        }
        _ => None,
    };
    let total: usize = tokens.iter().map(Vec::len).sum();
    Ok(EncoderReport {
        schema: ENCODER_SCHEMA.into(),
        pooling: format!(
            "{:?}{}",
            pooling.mode,
            if pooling.normalize {
                " + normalize"
            } else {
                ""
            }
        )
        .to_lowercase(),
        sentences: tokens.len(),
        tokens: total,
        fidelity,
        masked_lm: masked,
        encode_tokens_per_s: total as f64 / encode_s.max(1e-9),
        sentences_per_s: tokens.len() as f64 / encode_s.max(1e-9),
        wall_s: start.elapsed().as_secs_f64(),
    })
}
