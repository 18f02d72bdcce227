//! What encoders (BERT, MiniLM) need from a checkpoint that decoders do not: their pooling, their
//! sentence tokenization, calibration windows framed as `[CLS] … [SEP]`, and the evaluation that
//! replaces perplexity (embedding fidelity, masked-LM scores).

use crate::Result;
use shrink_core::Progress;
use shrink_io::Checkpoint;
use shrink_models::{Pooling, Transformer};

/// The model config of a checkpoint, with its architecture checked; errors name the checkpoint.
pub fn model_config(checkpoint: &Checkpoint) -> Result<shrink_models::ModelConfig> {
    let named = |e: shrink_models::ModelError| {
        crate::PipelineError::Invalid(format!("{}: {e}", checkpoint.path.display()))
    };
    let config = shrink_models::ModelConfig::from_json(&checkpoint.config).map_err(named)?;
    config.arch().map_err(named)?;
    Ok(config)
}

/// Whether a checkpoint is an encoder (BERT): embeddings, not next tokens.
pub fn is_encoder(checkpoint: &Checkpoint) -> Result<bool> {
    Ok(model_config(checkpoint)?.arch()?.is_encoder())
}

/// The sentence-transformers pooling a folder declares (mean pooling without one).
pub fn pooling_of(checkpoint: &Checkpoint) -> Result<Pooling> {
    Ok(Pooling::from_sentence_transformers(
        checkpoint.side_json("1_Pooling/config.json")?.as_ref(),
        checkpoint.side_json("modules.json")?.as_ref(),
    )?)
}

/// The longest input the encoder takes: sentence-transformers' `max_seq_length`, else the model's
/// positions.
fn max_seq_len(checkpoint: &Checkpoint) -> Result<usize> {
    let positions = model_config(checkpoint)?.max_position_embeddings;
    Ok(checkpoint
        .side_json("sentence_bert_config.json")?
        .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
        .map_or(positions, |m| (m as usize).min(positions)))
}

/// `sentences` tokenized as the encoder takes them: its special tokens around each, truncated to
/// its longest input.
pub fn encode_sentences(checkpoint: &Checkpoint, sentences: &[String]) -> Result<Vec<Vec<u32>>> {
    let tokenizer = checkpoint.tokenizer()?;
    let max = max_seq_len(checkpoint)?;
    sentences
        .iter()
        .map(|s| Ok(tokenizer.encode_sentence(s, max)?))
        .collect()
}

/// The held-out sentences of `text` (at least 4 words each, at most `count`) tokenized as the
/// encoder takes them.
pub fn sentence_tokens(checkpoint: &Checkpoint, text: &str, count: usize) -> Result<Vec<Vec<u32>>> {
    encode_sentences(checkpoint, &shrink_eval::sentences(text, 4, count))
}

/// How an encoder frames a window of text: its `[CLS]`/`[SEP]` ids and the window's largest
/// length; `None` for decoders, which take windows as they are.
fn framing(checkpoint: &Checkpoint, seq_len: usize) -> Result<Option<(u32, u32, usize)>> {
    let config = model_config(checkpoint)?;
    if !config.arch()?.is_encoder() {
        return Ok(None);
    }
    let frame = checkpoint.tokenizer()?.encode_sentence("", 2)?;
    let (first, last) = match frame.as_slice() {
        [first, .., last] => (*first, *last),
        _ => {
            return Err(crate::PipelineError::Invalid(format!(
                "{}: the tokenizer adds no [CLS]/[SEP] around a sentence",
                checkpoint.path.display()
            )))
        }
    };
    Ok(Some((
        first,
        last,
        seq_len.min(config.max_position_embeddings),
    )))
}

/// Wraps each body in `[CLS] … [SEP]`.
fn framed(windows: Vec<Vec<u32>>, first: u32, last: u32) -> Vec<Vec<u32>> {
    windows
        .into_iter()
        .map(|w| std::iter::once(first).chain(w).chain([last]).collect())
        .collect()
}

/// Seeded calibration windows of `seq_len` tokens from `text`. An encoder's windows are framed
/// the way it sees text, `[CLS] … [SEP]`, and no longer than its positions allow.
pub fn calibration_windows(
    checkpoint: &Checkpoint,
    text: &str,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let tokens = checkpoint.tokenizer()?.encode(text, false)?;
    Ok(match framing(checkpoint, seq_len)? {
        None => shrink_calib::sample_windows(&tokens, samples, seq_len, seed)?,
        Some((first, last, len)) => framed(
            shrink_calib::sample_windows(&tokens, samples, len.saturating_sub(2), seed)?,
            first,
            last,
        ),
    })
}

/// Consecutive training windows of `seq_len` tokens (at most `max`), framed like calibration
/// windows for encoders.
pub fn training_windows(
    checkpoint: &Checkpoint,
    tokens: &[u32],
    seq_len: usize,
    max: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    use crate::distill::chunk_windows;
    Ok(match framing(checkpoint, seq_len)? {
        None => chunk_windows(tokens, seq_len, max),
        Some((first, last, len)) => framed(
            chunk_windows(tokens, len.saturating_sub(2), max),
            first,
            last,
        ),
    })
}

/// The `[MASK]` token, when the tokenizer has one.
pub fn mask_id(checkpoint: &Checkpoint) -> Option<u32> {
    let tok = checkpoint.tokenizer.as_ref()?;
    tok.tokenizer.token_to_id("[MASK]")
}

/// Evaluates an encoder on the sentences of `text`: fidelity against `reference`, throughput and
/// (with an MLM head) masked-token scores.
pub fn evaluate_encoder(
    checkpoint: &Checkpoint,
    model: &Transformer,
    reference: Option<&Transformer>,
    text: &str,
    sentences: usize,
    batch: usize,
    progress: &dyn Progress,
) -> Result<shrink_eval::EncoderReport> {
    let tokens = sentence_tokens(checkpoint, text, sentences)?;
    let cfg = shrink_eval::EncoderEvalConfig {
        batch,
        mask_id: mask_id(checkpoint),
        ..Default::default()
    };
    Ok(shrink_eval::evaluate_encoder(
        model,
        reference,
        &pooling_of(checkpoint)?,
        &tokens,
        &cfg,
        progress,
    )?)
}
