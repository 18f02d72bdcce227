//! Token sampling for generation: greedy, temperature and nucleus (top-p), seeded.

use crate::{Result, Transformer};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Tokens generated from a prompt, with the timings a server cares about.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Prompt processing until the first token is chosen.
    pub time_to_first_token_s: f64,
    /// Every later token: one cached forward of one token each.
    pub decode_s: f64,
}

impl Generation {
    /// Mean time per decoded token after the first (0 when fewer than two tokens).
    pub fn ms_per_token(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 {
            0.0
        } else {
            self.decode_s * 1e3 / n as f64
        }
    }
}

/// Generates up to `max_tokens` after `prompt` with a KV cache, stopping at a `stop` token (not
/// included). `on_token` sees each token as it is chosen; its error (the caller's own type, which
/// model errors convert into) stops the generation and is returned as it is.
pub fn generate<E: From<crate::ModelError> + From<candle_core::Error>>(
    model: &Transformer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(&[u32]) -> std::result::Result<(), E>,
) -> std::result::Result<Generation, E> {
    let device = model.device().clone();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let mut logits =
        model.forward_cached(&Tensor::new(vec![prompt.to_vec()], &device)?, &mut cache)?;
    let mut tokens = Vec::new();
    let mut first = None;
    for _ in 0..max_tokens {
        let next = sampler.sample(&logits.squeeze(0)?)?;
        first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if stop.contains(&next) {
            break;
        }
        tokens.push(next);
        on_token(&tokens)?;
        if tokens.len() == max_tokens {
            break;
        }
        logits = model.forward_cached(&Tensor::new(&[[next]], &device)?, &mut cache)?;
    }
    let total = start.elapsed().as_secs_f64();
    let time_to_first_token_s = first.unwrap_or(total);
    Ok(Generation {
        tokens,
        time_to_first_token_s,
        decode_s: total - time_to_first_token_s,
    })
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Draws tokens from logits; deterministic for a given seed.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(config.seed),
            config,
        }
    }

    /// Picks the next token from f32 logits shaped `(vocab,)`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(self.sample_slice(&logits))
    }

    fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.config.temperature <= 0.0 {
            return argmax();
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l as f64 - max) / self.config.temperature).exp()))
            .collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        // Sort by probability, ties by token id, so the draw is reproducible.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.config.top_p {
                break;
            }
        }
        let mut r = self.rng.gen::<f64>() * mass;
        for p in &probs[..kept] {
            r -= p.1;
            if r <= 0.0 {
                return p.0 as u32;
            }
        }
        probs[kept - 1].0 as u32
    }
}

#[cfg(test)]
mod tests;
