//! Serving speed: prefill throughput and per-token decode latency of shrink's own model — with
//! a GGUF's block weights multiplied as llama.cpp multiplies them ([`decode_speed`] of a model
//! given its stored blocks, `shrink-integer`) or in f32 (`candle-f32`) — or of a GGUF file through
//! candle's quantized kernels ([`quantized_decode_speed`]: candle-transformers' quantized Llama
//! reading the file itself, holding only the file's tensors, which also checks that an
//! independent reader loads what shrink wrote).

use crate::{EvalError, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use serde::{Deserialize, Serialize};
use shrink_models::{Sampler, SamplingConfig, Transformer};
use std::path::Path;
use std::time::Instant;

/// How fast a model answers: one prompt's prefill, then greedy decoding, timed `repeats` times;
/// the figures are the medians of the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeSpeed {
    /// `shrink-integer` (shrink's integer products on a GGUF's blocks), `candle-f32` (shrink's
    /// model in f32) or `candle-quantized` (candle's quantized kernels).
    pub backend: String,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_ms_per_token: f64,
    /// Timed runs (reports written before runs were repeated hold one).
    #[serde(default = "one")]
    pub repeats: usize,
    /// The slowest run over the fastest, of the prefill and of the decoding (1 = no spread).
    #[serde(default = "one_f64")]
    pub prefill_spread: f64,
    #[serde(default = "one_f64")]
    pub decode_spread: f64,
    /// How busy the machine was over the runs, where it can be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<shrink_core::MachineLoad>,
    /// The greedy continuation that was timed (absent from reports written without it).
    #[serde(default)]
    pub tokens: Vec<u32>,
}

fn one() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// Times a GGUF file through candle's quantized kernels: prefill of `prompt`, then `decode_tokens`
/// greedy steps of one token each, `repeats` times. candle reads `gguf`, the file's bytes (as mapped when shrink
/// loaded it, so the file is not read again); `name` names the file in errors.
pub fn quantized_decode_speed(
    gguf: &[u8],
    name: &Path,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> Result<DecodeSpeed> {
    let gguf_err = |e: candle_core::Error| EvalError::Config(format!("{}: {e}", name.display()));
    let mut reader = std::io::Cursor::new(gguf);
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut reader).map_err(gguf_err)?;
    let mut model =
        ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).map_err(gguf_err)?;
    // Position 0 starts a new sequence: candle's quantized Llama drops its cache.
    time_decode(
        "candle-quantized",
        prompt,
        decode_tokens,
        repeats,
        |ids, pos| {
            let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
            Ok(model.forward(&x, pos)?.squeeze(0)?)
        },
    )
}

/// The same measurement on shrink's own model: `shrink-integer` when it multiplies stored ggml
/// blocks ([`Transformer::set_packed`]), `candle-f32` otherwise.
pub fn decode_speed(
    model: &Transformer,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> Result<DecodeSpeed> {
    let mut cache = model.new_cache();
    let backend = match model.multiplies_packed() {
        true => "shrink-integer",
        false => "candle-f32",
    };
    time_decode(backend, prompt, decode_tokens, repeats, |ids, pos| {
        if pos == 0 {
            cache = model.new_cache();
        }
        let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
        Ok(model.forward_cached(&x, &mut cache)?.squeeze(0)?)
    })
}

/// `step(ids, position)` returns the logits after `ids` given that `position` tokens came before
/// (position 0: a new sequence). Each of `repeats` runs (at least one) decodes the same greedy
/// continuation; a run that does not is an error (the model is not deterministic).
fn time_decode(
    backend: &str,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
    mut step: impl FnMut(&[u32], usize) -> Result<Tensor>,
) -> Result<DecodeSpeed> {
    if prompt.is_empty() {
        return Err(EvalError::Config("the decode prompt is empty".into()));
    }
    let timing = shrink_core::Timing::start();
    let (mut prefill, mut decode, mut tokens) = (vec![], vec![], None);
    for _ in 0..repeats.max(1) {
        let mut sampler = Sampler::new(SamplingConfig::default());
        let start = Instant::now();
        let mut logits = step(prompt, 0)?;
        let mut next = sampler.sample(&logits)?;
        prefill.push(start.elapsed().as_secs_f64());
        let mut run = vec![next];
        let start = Instant::now();
        for i in 0..decode_tokens {
            logits = step(&[next], prompt.len() + i)?;
            next = sampler.sample(&logits)?;
            run.push(next);
        }
        decode.push(start.elapsed().as_secs_f64());
        match &tokens {
            Some(first) if *first != run => {
                return Err(EvalError::Config(format!(
                    "{backend}: greedy decoding gave different tokens in two timed runs"
                )))
            }
            _ => tokens = Some(run),
        }
    }
    let load = timing.load();
    let (prefill_s, prefill_spread) = shrink_core::median_spread(&prefill);
    let (decode_s, decode_spread) = shrink_core::median_spread(&decode);
    Ok(DecodeSpeed {
        backend: backend.into(),
        prefill_tokens: prompt.len(),
        prefill_tokens_per_s: prompt.len() as f64 / prefill_s.max(1e-9),
        decode_tokens,
        decode_ms_per_token: if decode_tokens == 0 {
            0.0
        } else {
            decode_s * 1e3 / decode_tokens as f64
        },
        repeats: prefill.len(),
        prefill_spread,
        decode_spread: if decode_tokens == 0 {
            1.0
        } else {
            decode_spread
        },
        load,
        tokens: tokens.unwrap_or_default(),
    })
}
