//! Per-tensor sensitivity: the KL divergence from the input model, on calibration windows, when
//! only one tensor is stored in a candidate format. Each block's input is computed once; a change
//! in block `i` reruns only blocks `i..` from that cached input, so a linear costs about half a
//! forward pass per measured format instead of a whole one.

use crate::{Choice, Item, Result, SearchError};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{NoHook, Transformer};
use shrink_quant::{Format, Method};

/// The name of the item that stands for the token embedding (and an untied output head, stored
/// in the same format).
pub const EMBEDDINGS: &str = "embeddings";

/// Which formats of a linear get a measured KL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measure {
    /// Every candidate format: exact, half a forward pass per (linear, format).
    Every,
    /// One reference format per linear (its lowest-bit candidate of at least 4 bits per weight,
    /// else its highest-bit one); the other formats' KL is the reference's scaled by their output
    /// error ‖(W − Ŵ)X‖² relative to the reference's. To second order the KL a small perturbation
    /// adds is a quadratic form in the linear's output change, so for one linear it grows with
    /// that error; this costs one measurement per linear instead of one per format.
    Scaled,
}

/// What [`sensitivity`] measures.
#[derive(Debug, Clone)]
pub struct SensitivityConfig {
    /// Candidate formats of the block linears; a format whose blocks do not divide a linear's
    /// rows is not an option for it.
    pub formats: Vec<Format>,
    /// Candidate formats of the token embedding (and an untied head); empty: not searched.
    pub embeddings: Vec<Format>,
    /// How the codes are chosen: round-to-nearest or GPTQ on the calibration inputs (one linear
    /// at a time, on the unquantized model's activations). Embeddings are always rounded, as
    /// llama-quantize and shrink's writer store them.
    pub method: Method,
    pub measure: Measure,
}

/// Tensor bytes as stored in a GGUF, whose tensor data is aligned to 32 bytes.
pub fn gguf_bytes(bytes: usize) -> u64 {
    bytes.div_ceil(32) as u64 * 32
}

/// Log-probabilities `(positions, vocab)` at the scored positions (the second half of each
/// window) from final, normed hidden states.
fn log_probs(model: &Transformer, hidden: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let half = hidden
        .narrow(1, t / 2, t - t / 2)?
        .reshape((b * (t - t / 2), h))?;
    let logits = model.lm_head(&half)?;
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// Mean over positions of KL(reference ‖ model) from log-probabilities.
fn mean_kl(reference: &Tensor, model: &Tensor) -> Result<f64> {
    let kl = (reference.exp()? * (reference - model)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?.to_scalar::<f32>()? as f64)
}

fn check_windows(windows: &[Vec<u32>]) -> Result<usize> {
    let len = windows.first().map(Vec::len).unwrap_or(0);
    if len < 4 || windows.iter().any(|w| w.len() != len) {
        return Err(SearchError::Input(
            "sensitivity and scoring need windows of one length, at least 4 tokens".into(),
        ));
    }
    Ok(len)
}

/// How far a model is from a reference on held-out windows, scored on the second half of each
/// window as llama.cpp scores perplexity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Mean KL(reference ‖ model) per position.
    pub kl: f64,
    /// Mean negative log-likelihood of the next token.
    pub nll: f64,
    /// Perplexity increase over the reference, in percent: `100 (exp(nll − nll_ref) − 1)`.
    pub ppl_increase_pct: f64,
}

/// Scores models against the reference model's predictions on fixed windows.
pub struct Scorer {
    ids: Tensor,
    targets: Tensor,
    reference: Tensor,
    reference_nll: f64,
}

impl Scorer {
    /// Runs `reference` once on `windows` (all of one length).
    pub fn new(reference: &Transformer, windows: &[Vec<u32>]) -> Result<Self> {
        let len = check_windows(windows)?;
        let ids = Tensor::new(windows.to_vec(), reference.device())?;
        // The token after each scored position (the last position has none and is not scored
        // for the likelihood).
        let targets = Tensor::new(
            windows
                .iter()
                .flat_map(|w| w[len / 2 + 1..].iter().copied())
                .collect::<Vec<u32>>(),
            reference.device(),
        )?;
        let mut s = Self {
            ids,
            targets,
            reference: Tensor::zeros(1, DType::F32, reference.device())?,
            reference_nll: 0.0,
        };
        s.reference = s.log_probs(reference)?;
        s.reference_nll = s.nll(&s.reference)?;
        Ok(s)
    }

    fn log_probs(&self, model: &Transformer) -> Result<Tensor> {
        log_probs(model, &model.forward_hidden(&self.ids, &mut NoHook)?)
    }

    fn nll(&self, log_probs: &Tensor) -> Result<f64> {
        let (b, t) = self.ids.dims2()?;
        let scored = t - t / 2;
        let v = log_probs.dim(1)?;
        let lp = log_probs
            .reshape((b, scored, v))?
            .narrow(1, 0, scored - 1)?
            .reshape((b * (scored - 1), v))?;
        let picked = lp.gather(&self.targets.unsqueeze(1)?, 1)?;
        Ok(-(picked.mean_all()?.to_scalar::<f32>()? as f64))
    }

    /// The score of `model`; an error if its predictions are not finite.
    pub fn score(&self, model: &Transformer) -> Result<Score> {
        let lp = self.log_probs(model)?;
        let kl = mean_kl(&self.reference, &lp)?;
        let nll = self.nll(&lp)?;
        if !kl.is_finite() || !nll.is_finite() {
            return Err(SearchError::Input(
                "the model's predictions are not finite (NaN or infinity in its weights?)".into(),
            ));
        }
        Ok(Score {
            kl: kl.max(0.0),
            nll,
            ppl_increase_pct: 100.0 * ((nll - self.reference_nll).exp() - 1.0),
        })
    }
}

/// One linear quantized in one format: its stored bytes, relative output error and dequantized
/// weight.
struct Candidate {
    format: Format,
    bytes: u64,
    bits: f64,
    error: f64,
    weight: Vec<f32>,
}

/// For every block linear of `model` (and the token embedding when `config.embeddings` is not
/// empty) and every candidate format that fits it, the KL its quantization alone adds on `windows`
/// (scored on the second half of each window, as llama.cpp scores perplexity), with the tensor's
/// exact size in a GGUF and, for linears, the relative output error on the calibration inputs.
/// Returns one [`Item`] per tensor, ready for [`crate::allocate`].
///
/// ```
/// use candle_core::Device;
/// use shrink_models::{ModelConfig, Transformer};
/// use shrink_quant::{Format, Method};
/// use shrink_search::{sensitivity, Measure, SensitivityConfig};
/// let mut cfg = ModelConfig::tiny_for_tests();
/// cfg.intermediate_size = 64; // down_proj's rows: whole 32-value blocks
/// let model = Transformer::random(&cfg, 0, &Device::Cpu).unwrap();
/// let windows = vec![(0..16).map(|i| (i * 7 % 64) as u32).collect::<Vec<_>>()];
/// let config = SensitivityConfig {
///     formats: vec![Format::parse("q8_0").unwrap(), Format::parse("q4_0").unwrap()],
///     embeddings: vec![],
///     method: Method::Rtn,
///     measure: Measure::Every,
/// };
/// let items = sensitivity(&model, &windows, &config, &shrink_core::NoProgress).unwrap();
/// assert_eq!(items.len(), 14);
/// assert!(items[0].choices[0].loss < items[0].choices[1].loss);
/// ```
pub fn sensitivity(
    model: &Transformer,
    windows: &[Vec<u32>],
    config: &SensitivityConfig,
    progress: &dyn Progress,
) -> Result<Vec<Item>> {
    let len = check_windows(windows)?;
    if !model.has_token_head() {
        return Err(SearchError::Input(
            "sensitivity compares next-token predictions: the model needs a token head".into(),
        ));
    }
    if config.formats.is_empty() {
        return Err(SearchError::Input("no candidate formats".into()));
    }
    let ids = Tensor::new(windows.to_vec(), model.device())?;
    let ctx = model.attention_context(len, 0)?;
    // Each block's input, and the reference log-probabilities.
    let mut inputs = Vec::with_capacity(model.blocks.len());
    let mut x = model.embed(&ids)?;
    for block in &model.blocks {
        inputs.push(x.clone());
        x = block.forward(&x, &ctx, None, &mut NoHook)?;
    }
    let reference = log_probs(model, &model.final_hidden(&x)?)?;
    let finite = |kl: f64, what: &str| {
        if kl.is_finite() {
            Ok(kl.max(0.0))
        } else {
            Err(SearchError::Input(format!("{what}: the KL is not finite")))
        }
    };
    let total: usize = model.blocks.iter().map(|b| b.linears().len()).sum();
    let embedding_steps = usize::from(!config.embeddings.is_empty());
    progress.start("measuring sensitivity", (total + embedding_steps) as u64);
    let mut items = Vec::with_capacity(total + embedding_steps);
    for (i, block) in model.blocks.iter().enumerate() {
        let stats = shrink_calib::block_stats(block, &inputs[i..=i], &ctx, true)?;
        for (name, linear) in block.linears() {
            let (rows, cols) = linear.weight().dims2()?;
            let w: Vec<f32> = linear
                .weight()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let st = stats
                .get(name)
                .ok_or_else(|| SearchError::Input(format!("'{name}' saw no input")))?;
            let mut candidates = Vec::new();
            for &format in &config.formats {
                if !cols.is_multiple_of(format.row_multiple()) {
                    continue;
                }
                let q = shrink_quant::quantize_tensor(
                    &w,
                    rows,
                    cols,
                    config.method,
                    Some(st),
                    format,
                    name,
                )?;
                let weight = q.dequantize()?;
                candidates.push(Candidate {
                    format,
                    bytes: gguf_bytes(q.size_bytes()),
                    bits: q.bits_per_weight(),
                    error: st.relative_output_error(&w, &weight)?,
                    weight,
                });
            }
            // The KL with this linear alone replaced by `weight`.
            let kl_of = |weight: &[f32]| -> Result<f64> {
                let mut changed = block.clone();
                let t = Tensor::from_slice(weight, (rows, cols), linear.weight().device())?
                    .to_dtype(linear.weight().dtype())?;
                changed
                    .linear_mut(name)
                    .ok_or_else(|| SearchError::Input(format!("no linear '{name}'")))?
                    .set_weight(t)?;
                let mut y = changed.forward(&inputs[i], &ctx, None, &mut NoHook)?;
                for later in &model.blocks[i + 1..] {
                    y = later.forward(&y, &ctx, None, &mut NoHook)?;
                }
                mean_kl(&reference, &log_probs(model, &model.final_hidden(&y)?)?)
            };
            let losses: Vec<f64> = match config.measure {
                Measure::Every => candidates
                    .iter()
                    .map(|c| {
                        finite(
                            kl_of(&c.weight)?,
                            &format!("'{name}' in {}", c.format.label()),
                        )
                    })
                    .collect::<Result<_>>()?,
                Measure::Scaled => match reference_candidate(&candidates) {
                    None => Vec::new(),
                    Some(r) => {
                        let c = &candidates[r];
                        let kl = finite(
                            kl_of(&c.weight)?,
                            &format!("'{name}' in {}", c.format.label()),
                        )?;
                        candidates
                            .iter()
                            .map(|o| {
                                if c.error > 0.0 {
                                    kl * o.error / c.error
                                } else {
                                    kl
                                }
                            })
                            .collect()
                    }
                },
            };
            let choices: Vec<Choice> = candidates
                .iter()
                .zip(losses)
                .map(|(c, loss)| Choice {
                    error: Some(c.error),
                    ..Choice::new(&c.format.label(), c.bytes, loss)
                })
                .collect();
            if choices.is_empty() {
                return Err(SearchError::NoOptions(name.to_string()));
            }
            items.push(Item::new(name, choices));
            progress.advance(1, Some(name));
        }
    }
    if !config.embeddings.is_empty() {
        items.push(embedding_item(model, &ids, &reference, &config.embeddings)?);
        progress.advance(1, Some(EMBEDDINGS));
    }
    progress.finish();
    Ok(items)
}

/// The candidate whose KL is measured under [`Measure::Scaled`].
fn reference_candidate(candidates: &[Candidate]) -> Option<usize> {
    let by_bits = |a: &usize, b: &usize| candidates[*a].bits.total_cmp(&candidates[*b].bits);
    (0..candidates.len())
        .filter(|&c| candidates[c].bits >= 4.0)
        .min_by(by_bits)
        .or_else(|| (0..candidates.len()).max_by(by_bits))
}

/// The token embedding (and an untied head) rounded to each format: a whole forward pass each.
fn embedding_item(
    model: &Transformer,
    ids: &Tensor,
    reference: &Tensor,
    formats: &[Format],
) -> Result<Item> {
    let mut choices = Vec::new();
    for &format in formats {
        let mut m = model.clone();
        let mut bytes = 0;
        let mut round = |t: &Tensor, what: &str| -> Result<Option<Tensor>> {
            let (rows, cols) = t.dims2()?;
            if !cols.is_multiple_of(format.row_multiple()) {
                return Ok(None);
            }
            let w: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let q =
                shrink_quant::rtn_format(&w, rows, cols, &format.with_search(false), None, what)?;
            bytes += gguf_bytes(q.size_bytes());
            Ok(Some(
                Tensor::from_vec(q.dequantize()?, (rows, cols), t.device())?.to_dtype(t.dtype())?,
            ))
        };
        let Some(e) = round(&model.embed_tokens, "token embedding")? else {
            continue;
        };
        m.embed_tokens = e;
        if let Some(head) = &model.lm_head {
            let Some(h) = round(head.weight(), "output head")? else {
                continue;
            };
            if let Some(mh) = m.lm_head.as_mut() {
                mh.set_weight(h)?;
            }
        }
        let lp = log_probs(&m, &m.forward_hidden(ids, &mut NoHook)?)?;
        let kl = mean_kl(reference, &lp)?;
        if !kl.is_finite() {
            return Err(SearchError::Input(format!(
                "the embeddings in {}: the KL is not finite",
                format.label()
            )));
        }
        choices.push(Choice::new(&format.label(), bytes, kl.max(0.0)));
    }
    if choices.is_empty() {
        return Err(SearchError::NoOptions(EMBEDDINGS.into()));
    }
    Ok(Item::new(EMBEDDINGS, choices))
}
