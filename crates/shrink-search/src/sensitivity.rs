//! Per-tensor sensitivity: the KL divergence from the input model, on calibration windows, when
//! only one tensor is stored in a candidate format. The model is read block by block (held whole
//! or from its file): a change in block `i` runs only blocks `i..`, from block `i`'s input in the
//! input model, so a linear costs about half a forward pass per measured format instead of a
//! whole one, and every variant of block `i` goes through each later block together. The
//! gradient score ([`Measure::Fisher`], `sensitivity/fisher.rs`) predicts the KL instead, from
//! one backward pass per window.

use crate::{Choice, Item, Result, SearchError};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use shrink_core::{Collective, Progress};
use shrink_models::{AttentionContext, Block, BlockModel, Head, Linear, NoHook};
use shrink_quant::{Format, Method};

mod fisher;
#[cfg(test)]
pub(crate) use fisher::sampled_targets;

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
    /// No KL pass per linear: a gradient score. One forward pass keeps each block's input, then
    /// one backward pass per window, block by block from the last, gives each linear's gradient
    /// of the window's summed negative log-likelihood of tokens drawn from the model's own
    /// predictions, one per scored position (seeded by the window's index). The draws are
    /// independent with zero-mean gradients, so the squares summed over the windows and divided
    /// by the scored positions estimate the diagonal `F` of the Fisher information per position
    /// (the KL's own curvature at the input model); a format's predicted KL is
    /// `½ Σ F (W − Ŵ)²`, the second-order term of the KL. The diagonal leaves out the
    /// correlations between a row's inputs, which GPTQ's codes exploit, so it overestimates the
    /// KL of GPTQ codes (about sevenfold on SmolLM2; twelvefold with the text's own tokens, whose
    /// gradients share a drift) while ranking the candidates nearly as the measured KL does. The
    /// embeddings' formats are still measured. f32 models only; the
    /// products with a gradient are candle's, whose kernels are chosen by the CPU, so the table
    /// is reproducible on one machine, not bit for bit across CPUs.
    Fisher,
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
/// window) from the last block's outputs.
fn log_probs(head: &Head, hidden: &Tensor) -> Result<Tensor> {
    let hidden = head.final_hidden(hidden)?;
    let (b, t, h) = hidden.dims3()?;
    let half = hidden
        .narrow(1, t / 2, t - t / 2)?
        .reshape((b * (t - t / 2), h))?;
    let logits = head.logits(&half)?;
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// Runs each of `xs` through blocks `from..` of `model`, each block read once for all of them.
fn run_from<M: BlockModel>(
    model: &mut M,
    from: usize,
    xs: &mut [Tensor],
    ctx: &AttentionContext,
) -> Result<()> {
    if xs.is_empty() {
        return Ok(());
    }
    for j in from..model.num_blocks() {
        model.with_block(j, |block| -> Result<()> {
            for x in xs.iter_mut() {
                *x = block.forward(x, ctx, None, &mut NoHook)?;
            }
            Ok(())
        })??;
    }
    Ok(())
}

/// Token ids `(windows, tokens)` embedded in one batch.
fn embed<M: BlockModel>(model: &M, ids: &Tensor) -> Result<Tensor> {
    Ok(model
        .embed_batches(std::slice::from_ref(ids))?
        .swap_remove(0))
}

/// The log-probabilities of `model` on the windows `ids` at the scored positions, its blocks
/// read in order.
fn model_log_probs<M: BlockModel>(
    model: &mut M,
    ids: &Tensor,
    ctx: &AttentionContext,
) -> Result<Tensor> {
    let mut xs = [embed(model, ids)?];
    run_from(model, 0, &mut xs, ctx)?;
    log_probs(&model.head()?, &xs[0])
}

/// Of a window of `len` tokens, the first position whose next token is scored and how many are:
/// the second half, but for the last position (which has no next token).
fn scored_targets(len: usize) -> (usize, usize) {
    (len / 2, len - len / 2 - 1)
}

/// The number of linears of block `i`.
fn linear_count(config: &shrink_models::ModelConfig, i: usize) -> usize {
    config
        .block_linear_names(i)
        .map_or(0, |n| n.iter().filter(|n| !n.is_empty()).count())
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
    pub fn new<M: BlockModel>(reference: &mut M, windows: &[Vec<u32>]) -> Result<Self> {
        let len = check_windows(windows)?;
        let ids = Tensor::new(windows.to_vec(), &Device::Cpu)?;
        // The token after each scored position (the last position has none and is not scored
        // for the likelihood).
        let (first, _) = scored_targets(len);
        let targets = Tensor::new(
            windows
                .iter()
                .flat_map(|w| w[first + 1..].iter().copied())
                .collect::<Vec<u32>>(),
            &Device::Cpu,
        )?;
        let mut s = Self {
            ids,
            targets,
            reference: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
            reference_nll: 0.0,
        };
        s.reference = s.log_probs(reference)?;
        s.reference_nll = s.nll(&s.reference)?;
        Ok(s)
    }

    /// The model's log-probabilities, its blocks read in order.
    fn log_probs<M: BlockModel>(&self, model: &mut M) -> Result<Tensor> {
        let ctx = model.attention_context(self.ids.dim(1)?)?;
        model_log_probs(model, &self.ids, &ctx)
    }

    fn nll(&self, log_probs: &Tensor) -> Result<f64> {
        let (b, t) = self.ids.dims2()?;
        let (_, scored) = scored_targets(t);
        let v = log_probs.dim(1)?;
        let lp = log_probs
            .reshape((b, scored + 1, v))?
            .narrow(1, 0, scored)?
            .reshape((b * scored, v))?;
        let picked = lp.gather(&self.targets.unsqueeze(1)?, 1)?;
        Ok(-(picked.mean_all()?.to_scalar::<f32>()? as f64))
    }

    /// The score of `model`; an error if its predictions are not finite.
    pub fn score<M: BlockModel>(&self, model: &mut M) -> Result<Score> {
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

/// One linear quantized in one format: its stored bytes and relative output error.
pub(crate) struct Candidate {
    format: Format,
    bytes: u64,
    bits: f64,
    error: f64,
}

/// A linear this rank measures: its candidates and which of them get a measured KL (one
/// variant of the block's output each, in order).
struct Pending {
    name: String,
    candidates: Vec<Candidate>,
    measured: Vec<usize>,
}

/// Which rank measures the `index`-th tensor (linears in block order, then the embedding's
/// formats): tensors are dealt to the ranks in turn.
fn owner(world: &dyn Collective, index: usize) -> usize {
    index % world.size()
}

/// The results of tensors `offset..offset + count`, each measured by its owner, on every rank:
/// this rank's own (`mine`, in order) sent, the others' received, `each` called on every one. An
/// error of any rank ends every rank (this rank's own error as it is;
/// [`shrink_core::share_dealt`]).
fn share_all<T: Serialize + serde::de::DeserializeOwned>(
    world: &dyn Collective,
    offset: usize,
    count: usize,
    mine: Result<Vec<T>>,
    each: impl FnMut(&T),
) -> Result<Vec<T>> {
    let shared = shrink_core::share_dealt(world, offset, count, mine, |rank, e| {
        SearchError::Input(format!("rank {rank}: {e}"))
    })?;
    shared.iter().for_each(each);
    Ok(shared)
}

/// For every block linear of `model` (and the token embedding when `config.embeddings` is not
/// empty) and every candidate format that fits it, the KL its quantization alone adds on `windows`
/// (scored on the second half of each window, as llama.cpp scores perplexity), with the tensor's
/// exact size in a GGUF and, for linears, the relative output error on the calibration inputs.
/// Returns one [`Item`] per tensor, ready for [`crate::allocate`].
///
/// The model is read block by block ([`BlockModel`]: held whole, or read from its file one block
/// at a time, with the same results): a reference pass gives the input model's predictions; then
/// at block `i` each measured linear's candidate makes one variant of the block's output, and all
/// of block `i`'s variants go through blocks `i + 1..` together, each block read once for them.
/// The tensors are dealt to the ranks of `world` in turn (MPI: each rank measures its share,
/// every rank gets every result, the same as one process's).
///
/// ```
/// use candle_core::Device;
/// use shrink_models::{ModelConfig, Transformer};
/// use shrink_quant::{Format, Method};
/// use shrink_search::{sensitivity, Measure, SensitivityConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut cfg = ModelConfig::tiny_for_tests();
/// cfg.intermediate_size = 64; // down_proj's rows: whole 32-value blocks
/// let mut model = Transformer::random(&cfg, 0, &Device::Cpu)?;
/// let windows = vec![(0..16).map(|i| (i * 7 % 64) as u32).collect::<Vec<_>>()];
/// let config = SensitivityConfig {
///     formats: vec![Format::parse("q8_0")?, Format::parse("q4_0")?],
///     embeddings: vec![],
///     method: Method::Rtn,
///     measure: Measure::Every,
/// };
/// let alone = shrink_core::Alone;
/// let items = sensitivity(&mut model, &windows, &config, &alone, &shrink_core::NoProgress)?;
/// assert_eq!(items.len(), 14);
/// assert!(items[0].choices[0].loss < items[0].choices[1].loss);
/// # Ok(())
/// # }
/// ```
pub fn sensitivity<M: BlockModel>(
    model: &mut M,
    windows: &[Vec<u32>],
    config: &SensitivityConfig,
    world: &dyn Collective,
    progress: &dyn Progress,
) -> Result<Vec<Item>> {
    let len = check_windows(windows)?;
    if model.config().arch()?.is_encoder() {
        return Err(SearchError::Input(
            "sensitivity compares next-token predictions: it runs on decoders".into(),
        ));
    }
    if config.formats.is_empty() {
        return Err(SearchError::Input("no candidate formats".into()));
    }
    let ids = Tensor::new(windows.to_vec(), &Device::Cpu)?;
    let ctx = model.attention_context(len)?;
    let searched = !config.embeddings.is_empty();
    let (mut items, reference) = match config.measure {
        Measure::Fisher => fisher::items(model, &ids, &ctx, config, world, progress, searched)?,
        Measure::Every | Measure::Scaled => {
            let (items, reference) = kl_items(model, &ids, &ctx, config, world, progress)?;
            (items, Some(reference))
        }
    };
    if let (true, Some(reference)) = (searched, reference) {
        let offset = items.len();
        progress.start("measuring the embeddings' formats", 1);
        items.push(embedding_item(
            model,
            &ids,
            &ctx,
            &reference,
            &config.embeddings,
            world,
            offset,
        )?);
        progress.advance(1, Some(EMBEDDINGS));
        progress.finish();
    }
    Ok(items)
}

/// The KL table's items of every block linear, and the model's log-probabilities at the scored
/// positions (the reference every variant is compared with).
fn kl_items<M: BlockModel>(
    model: &mut M,
    ids: &Tensor,
    ctx: &AttentionContext,
    config: &SensitivityConfig,
    world: &dyn Collective,
    progress: &dyn Progress,
) -> Result<(Vec<Item>, Tensor)> {
    // The reference log-probabilities: one pass.
    let reference = model_log_probs(model, ids, ctx)?;
    let mut x = embed(model, ids)?;
    let blocks = model.num_blocks();
    let cfg = model.config();
    let total: usize = (0..blocks).map(|i| linear_count(cfg, i)).sum();
    progress.start("measuring sensitivity", total as u64);
    let mut items = Vec::with_capacity(total + 1);
    let mut offset = 0;
    for i in 0..blocks {
        // `x` is block i's input in the input model.
        let (measured, next, count) = model.with_block(i, |block| {
            measure_block(block, &x, ctx, config, world, offset)
        })??;
        // What this rank measures of the block; an error is shared like a result, so that
        // every rank stops together.
        let mine = measured.and_then(|(pending, mut variants)| {
            run_from(model, i + 1, &mut variants, ctx)?;
            let kls = if variants.is_empty() {
                Vec::new()
            } else {
                let head = model.head()?;
                variants
                    .iter()
                    .map(|y| mean_kl(&reference, &log_probs(&head, y)?))
                    .collect::<Result<Vec<f64>>>()?
            };
            drop(variants);
            items_of(&pending, &kls, config.measure)
        });
        let shared = share_all(world, offset, count, mine, |item: &Item| {
            progress.advance(1, Some(&item.name))
        })?;
        items.extend(shared);
        x = next;
        offset += count;
    }
    progress.finish();
    Ok((items, reference))
}

/// What this rank measured of a block: the candidates of its linears and one variant of the
/// block's output per measured candidate.
type Measured = (Vec<Pending>, Vec<Tensor>);

/// Block `i`'s part of [`sensitivity`] on its input `x`: what this rank measures of it (or why it
/// could not), the block's own output and its number of linears.
fn measure_block(
    block: &mut Block,
    x: &Tensor,
    ctx: &AttentionContext,
    config: &SensitivityConfig,
    world: &dyn Collective,
    offset: usize,
) -> Result<(Result<Measured>, Tensor, usize)> {
    let measured = measure_linears(block, x, ctx, config, world, offset);
    let count = block.linears().len();
    let next = block.forward(x, ctx, None, &mut NoHook)?;
    Ok((measured, next, count))
}

/// The linears of `block` this rank measures: their candidates, and the block's output with each
/// measured candidate in place.
fn measure_linears(
    block: &Block,
    x: &Tensor,
    ctx: &AttentionContext,
    config: &SensitivityConfig,
    world: &dyn Collective,
    offset: usize,
) -> Result<Measured> {
    let linears = block.linears();
    let mine: Vec<usize> = (0..linears.len())
        .filter(|j| owner(world, offset + j) == world.rank())
        .collect();
    let mut pending = Vec::with_capacity(mine.len());
    let mut variants = Vec::new();
    if !mine.is_empty() {
        let stats = shrink_calib::block_stats(block, std::slice::from_ref(x), ctx, true)?;
        for j in mine {
            let (name, linear) = linears[j];
            let st = stats
                .get(name)
                .ok_or_else(|| SearchError::Input(format!("'{name}' saw no input")))?;
            let (rows, cols) = linear.weight().dims2()?;
            let w: Vec<f32> = linear
                .weight()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            // The block with this linear alone replaced by `weight`.
            let variant = |weight: &[f32]| -> Result<Tensor> {
                let mut changed = block.clone();
                let t = Tensor::from_slice(weight, (rows, cols), linear.weight().device())?
                    .to_dtype(linear.weight().dtype())?;
                changed
                    .linear_mut(name)
                    .ok_or_else(|| SearchError::Input(format!("no linear '{name}'")))?
                    .set_weight(t)?;
                Ok(changed.forward(x, ctx, None, &mut NoHook)?)
            };
            let mut candidates = Vec::new();
            // Measuring every format, each candidate's variant is made at once; measuring one,
            // only the weights of the reference so far are kept (the reference of all the
            // candidates is the reference of the candidates up to itself).
            let mut kept: Option<(usize, Vec<f32>)> = None;
            each_candidate(&w, rows, cols, name, st, config, |candidate, weight| {
                candidates.push(candidate);
                let c = candidates.len() - 1;
                match config.measure {
                    Measure::Every => variants.push(variant(&weight)?),
                    Measure::Scaled => {
                        if reference_candidate(&candidates) == Some(c) {
                            kept = Some((c, weight));
                        }
                    }
                    Measure::Fisher => {
                        return Err(SearchError::Input(
                            "the Fisher measure has its own pass".into(),
                        ))
                    }
                }
                Ok(())
            })?;
            let measured: Vec<usize> = match config.measure {
                Measure::Scaled => reference_candidate(&candidates).into_iter().collect(),
                Measure::Every | Measure::Fisher => (0..candidates.len()).collect(),
            };
            if let (Measure::Scaled, Some((c, weight))) = (config.measure, &kept) {
                if measured != [*c] {
                    return Err(SearchError::Input(format!(
                        "'{name}': the reference candidate's weights were not kept"
                    )));
                }
                variants.push(variant(weight)?);
            }
            pending.push(Pending {
                name: name.to_string(),
                candidates,
                measured,
            });
        }
    }
    Ok((pending, variants))
}

/// Each candidate format of the linear `name` (weights `w`, `rows × cols`, inputs described by
/// `st`) whose blocks divide its rows, quantized as `config` says: its size and output error, and
/// its dequantized weights.
pub(crate) fn each_candidate(
    w: &[f32],
    rows: usize,
    cols: usize,
    name: &str,
    st: &shrink_calib::LinearStats,
    config: &SensitivityConfig,
    mut each: impl FnMut(Candidate, Vec<f32>) -> Result<()>,
) -> Result<()> {
    for &format in &config.formats {
        if !cols.is_multiple_of(format.row_multiple()) {
            continue;
        }
        let q = shrink_quant::quantize_tensor(
            w,
            rows,
            cols,
            config.method,
            Some(st),
            format,
            name,
            false,
        )?;
        let weight = q.dequantize()?;
        let candidate = Candidate {
            format,
            bytes: gguf_bytes(q.size_bytes()),
            bits: q.bits_per_weight(),
            error: st.relative_output_error(w, &weight)?,
        };
        each(candidate, weight)?;
    }
    Ok(())
}

/// The KL, or an error naming what made it not finite.
fn finite(kl: f64, what: &str) -> Result<f64> {
    if kl.is_finite() {
        Ok(kl.max(0.0))
    } else {
        Err(SearchError::Input(format!("{what}: the KL is not finite")))
    }
}

/// The items of `pending` linears from the KLs of their measured candidates, in order.
fn items_of(pending: &[Pending], kls: &[f64], measure: Measure) -> Result<Vec<Item>> {
    let mut kls = kls.iter();
    let mut items = Vec::with_capacity(pending.len());
    for p in pending {
        let mut measured = Vec::with_capacity(p.measured.len());
        for &c in &p.measured {
            let kl = *kls
                .next()
                .ok_or_else(|| SearchError::Input("a measured variant is missing".into()))?;
            let what = format!("'{}' in {}", p.name, p.candidates[c].format.label());
            measured.push(finite(kl, &what)?);
        }
        let losses: Vec<f64> = match measure {
            Measure::Every | Measure::Fisher => measured,
            Measure::Scaled => match (p.measured.first(), measured.first()) {
                (Some(&r), Some(&kl)) => {
                    let c = &p.candidates[r];
                    p.candidates
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
                _ => Vec::new(),
            },
        };
        items.push(item_of(&p.name, &p.candidates, losses)?);
    }
    Ok(items)
}

/// The item of the linear `name` from its candidates and their predicted losses, in order.
pub(crate) fn item_of(name: &str, candidates: &[Candidate], losses: Vec<f64>) -> Result<Item> {
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
    Ok(Item::new(name, choices))
}

/// The candidate whose KL is measured under [`Measure::Scaled`].
fn reference_candidate(candidates: &[Candidate]) -> Option<usize> {
    let by_bits = |a: &usize, b: &usize| candidates[*a].bits.total_cmp(&candidates[*b].bits);
    (0..candidates.len())
        .filter(|&c| candidates[c].bits >= 4.0)
        .min_by(by_bits)
        .or_else(|| (0..candidates.len()).max_by(by_bits))
}

/// `t` rounded to `format` (as llama-quantize and shrink's writer store embeddings) and its
/// bytes in a GGUF; `None` when the format's blocks do not divide its rows.
fn rounded(t: &Tensor, format: Format, what: &str) -> Result<Option<(Tensor, u64)>> {
    let (rows, cols) = t.dims2()?;
    if !cols.is_multiple_of(format.row_multiple()) {
        return Ok(None);
    }
    let w: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q = shrink_quant::rtn_format(
        &w,
        rows,
        cols,
        &format.with_search(false),
        None,
        what,
        false,
    )?;
    // The copy is let go before the dequantized one is made (an embedding is the largest tensor).
    drop(w);
    let back = Tensor::from_vec(q.dequantize()?, (rows, cols), t.device())?.to_dtype(t.dtype())?;
    Ok(Some((back, gguf_bytes(q.size_bytes()))))
}

/// The token embedding (and an untied head) rounded to each format, which this rank measures
/// when dealt it (`offset` tensors came before): all of them through the blocks together.
fn embedding_item<M: BlockModel>(
    model: &mut M,
    ids: &Tensor,
    ctx: &AttentionContext,
    reference: &Tensor,
    formats: &[Format],
    world: &dyn Collective,
    offset: usize,
) -> Result<Item> {
    let mine: Vec<usize> = (0..formats.len())
        .filter(|&f| owner(world, offset + f) == world.rank())
        .collect();
    // This rank's formats, each a choice or none (its blocks do not divide the rows).
    let mut measure = || -> Result<Vec<Option<Choice>>> {
        let mut choices = vec![None; mine.len()];
        let mut measured = Vec::new();
        let mut xs = Vec::new();
        if !mine.is_empty() {
            // The output head has the embedding's rows: a format fits both or neither.
            let table = model.token_embedding()?;
            for (k, &f) in mine.iter().enumerate() {
                if let Some((e, bytes)) = rounded(&table, formats[f], "token embedding")? {
                    xs.push(model.embed_with(&e, ids)?);
                    measured.push((k, bytes));
                }
            }
        }
        run_from(model, 0, &mut xs, ctx)?;
        if xs.is_empty() {
            return Ok(choices);
        }
        let head = model.head()?;
        // A tied head is the rounded embedding; an untied one is rounded too.
        let what = match head.tied {
            true => "token embedding",
            false => "output head",
        };
        for (&(k, bytes), y) in measured.iter().zip(&xs) {
            let format = formats[mine[k]];
            let Some((projection, head_bytes)) = rounded(head.projection.weight(), format, what)?
            else {
                continue;
            };
            let rounded_head = Head {
                projection: Linear::new(projection, None),
                ..head.clone()
            };
            let kl = mean_kl(reference, &log_probs(&rounded_head, y)?)?;
            let kl = finite(kl, &format!("the embeddings in {}", format.label()))?;
            let bytes = bytes + if head.tied { 0 } else { head_bytes };
            choices[k] = Some(Choice::new(&format.label(), bytes, kl));
        }
        Ok(choices)
    };
    let mine = measure();
    let shared: Vec<Choice> = share_all(world, offset, formats.len(), mine, |_| {})?
        .into_iter()
        .flatten()
        .collect();
    if shared.is_empty() {
        return Err(SearchError::NoOptions(EMBEDDINGS.into()));
    }
    Ok(Item::new(EMBEDDINGS, shared))
}
