//! Importance of heads, channels, layers and hidden channels, and the units each structure
//! removes. Everything but Taylor importance and the perplexity criterion works block by block
//! on any [`BlockModel`], so a model held whole and one read from its file one block at a time
//! are scored by the same code, to the same bits.

use super::{Importance, LayerCriterion, Structure};
use crate::{PruneError, Result};
use candle_core::{DType, Tensor, D};
use shrink_calib::{BlockStats, Keep};
use shrink_core::{Collective, Progress};
use shrink_models::{Block, BlockModel, ModelConfig, NoHook, Role, Transformer};
use std::collections::BTreeMap;

/// Squared norms of each row.
fn row_sq(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Squared norms of each column.
fn col_sq(t: &Tensor) -> Result<Vec<f64>> {
    row_sq(&t.t()?)
}

/// Rows of the token embedding widened to f32 at a time (64 MB of f32 at hidden 4096).
const EMBEDDING_ROWS: usize = 4096;

/// Squared norms of each column of the token embedding, widened to f32 a slice of rows at a
/// time and summed in f64: a bf16 embedding is not widened whole.
fn embedding_col_sq(t: &Tensor) -> Result<Vec<f64>> {
    let (rows, cols) = t.dims2()?;
    let mut s = vec![0.0; cols];
    for start in (0..rows).step_by(EMBEDDING_ROWS) {
        let slice = t.narrow(0, start, EMBEDDING_ROWS.min(rows - start))?;
        for (x, v) in s.iter_mut().zip(col_sq(&slice)?) {
            *x += v;
        }
    }
    Ok(s)
}

/// Sum over each row of a 2-D tensor.
pub(super) fn row_sum(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.sum(D::Minus1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Sum over each column of a 2-D tensor.
pub(super) fn col_sum(t: &Tensor) -> Result<Vec<f64>> {
    row_sum(&t.t()?)
}

fn sum_ranges(v: &[f64], width: usize) -> Vec<f64> {
    v.chunks(width).map(|c| c.iter().sum()).collect()
}

fn stats_of<'a>(stats: &'a BlockStats, name: &str) -> Result<&'a shrink_calib::LinearStats> {
    stats
        .get(name)
        .ok_or_else(|| PruneError::Config(format!("no calibration statistics for '{name}'")))
}

pub(super) fn need_windows(windows: Option<&[Vec<u32>]>) -> Result<&[Vec<u32>]> {
    windows.filter(|w| !w.is_empty()).ok_or_else(|| {
        PruneError::Config("this importance measure needs calibration windows".into())
    })
}

/// The `count` lowest-scored indices, ascending; ties go to the lower index.
pub(super) fn lowest(scores: &[f64], count: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let mut out = idx[..count.min(idx.len())].to_vec();
    out.sort_unstable();
    out
}

/// Energy ‖W_o[:, cols] x_cols‖² summed over the calibration tokens, for each run of `width`
/// input columns of `o_proj` (a head, or a KV group's heads), from `o_proj`'s input Hessian.
fn output_energy(w: &Tensor, hessian: &[f64], width: usize) -> Result<Vec<f64>> {
    let w: Vec<Vec<f32>> = w.to_dtype(DType::F32)?.to_vec2()?;
    let n = w[0].len();
    Ok((0..n / width)
        .map(|g| {
            let cols = g * width..(g + 1) * width;
            w.iter()
                .map(|row| {
                    let mut e = 0.0;
                    for a in cols.clone() {
                        let ha = &hessian[a * n..(a + 1) * n];
                        let s: f64 = cols.clone().map(|b| ha[b] * row[b] as f64).sum();
                        e += row[a] as f64 * s;
                    }
                    e
                })
                .sum()
        })
        .collect())
}

/// Per-parameter scores of one block's weights by role (W² by magnitude, G ⊙ W by Taylor);
/// `None` for an absent linear (a GELU MLP's gate).
pub(super) type RoleScores<'a> = dyn Fn(Role) -> Result<Option<Tensor>> + 'a;

/// W² of the weight of `block`'s linear in `role`.
fn squared(block: &Block, role: Role) -> Result<Option<Tensor>> {
    block
        .linear(role)
        .map(|l| Ok(l.weight().to_dtype(DType::F32)?.sqr()?))
        .transpose()
}

/// The width, in `o_proj` input columns, of one unit of a head structure.
fn head_width(structure: Structure, cfg: &ModelConfig) -> usize {
    let group = cfg.num_attention_heads / cfg.num_kv_heads();
    match structure {
        Structure::KvGroups { .. } => cfg.head_dim() * group,
        _ => cfg.head_dim(),
    }
}

/// The score of each unit (query head, KV group or MLP channel) of one block: the sum of its
/// parameters' scores `p`, in absolute value.
pub(super) fn unit_sums(
    structure: Structure,
    cfg: &ModelConfig,
    p: &RoleScores,
) -> Result<Vec<f64>> {
    let need = |role: Role| {
        p(role)?.ok_or_else(|| PruneError::Config(format!("no {} linear", role.short_name())))
    };
    match structure {
        Structure::QueryHeads { .. } | Structure::KvGroups { .. } => {
            let width = head_width(structure, cfg);
            let q = sum_ranges(&row_sum(&need(Role::Q)?)?, width);
            let o = sum_ranges(&col_sum(&need(Role::O)?)?, width);
            let mut s: Vec<f64> = q.iter().zip(&o).map(|(a, b)| a + b).collect();
            if matches!(structure, Structure::KvGroups { .. }) {
                // A whole KV group also takes its key and value heads.
                let hd = cfg.head_dim();
                let k = sum_ranges(&row_sum(&need(Role::K)?)?, hd);
                let v = sum_ranges(&row_sum(&need(Role::V)?)?, hd);
                for (i, x) in s.iter_mut().enumerate() {
                    *x += k[i] + v[i];
                }
            }
            Ok(s.into_iter().map(f64::abs).collect())
        }
        Structure::Channels { .. } => {
            let inter = cfg.intermediate_size;
            let g = match p(Role::Gate)? {
                Some(t) => row_sum(&t)?,
                None => vec![0.0; inter],
            };
            let u = row_sum(&need(Role::Up)?)?;
            let d = col_sum(&need(Role::Down)?)?;
            Ok((0..inter).map(|c| (g[c] + u[c] + d[c]).abs()).collect())
        }
        _ => Err(PruneError::Config(format!(
            "{structure:?} is not scored per block"
        ))),
    }
}

/// The units of one block that `structure` removes, given their scores: the weakest
/// `per_group` query heads within each KV group (so every group keeps as many), or the `count`
/// weakest groups or channels.
pub(super) fn removed_units(structure: Structure, cfg: &ModelConfig, scores: &[f64]) -> Vec<usize> {
    match structure {
        Structure::QueryHeads { per_group } => {
            let group = cfg.num_attention_heads / cfg.num_kv_heads();
            (0..cfg.num_kv_heads())
                .flat_map(|g| {
                    lowest(&scores[g * group..(g + 1) * group], per_group)
                        .into_iter()
                        .map(move |h| g * group + h)
                })
                .collect()
        }
        Structure::KvGroups { count } | Structure::Channels { count } => lowest(scores, count),
        _ => Vec::new(),
    }
}

/// Everything a block-by-block scoring pass reads besides the model: the calibration windows,
/// windows per forward pass, the ranks calibration is split across and how its activations are
/// kept.
#[derive(Clone, Copy)]
pub(super) struct Calibration<'a> {
    pub windows: Option<&'a [Vec<u32>]>,
    pub batch: usize,
    pub world: &'a dyn Collective,
    pub keep: Keep<'a>,
    pub progress: &'a dyn Progress,
}

/// A calibrated scoring pass's progress over the blocks finished so far: the units each removes
/// (heads, groups, channels) or the width's sums over them. Recorded after each block, with the
/// activations leaving it, so that a killed job resumes at the next block.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Scored {
    pub removed: Vec<Vec<usize>>,
    pub width: Vec<f64>,
}

/// What a calibrated scoring pass calls after each block: its index, the activations leaving it
/// and the scores so far.
pub(super) type ScoredBlock<'a> =
    dyn FnMut(usize, &shrink_calib::Activations, &Scored) -> Result<()> + 'a;

/// Where a resumed calibrated scoring pass begins: the finished blocks' scores and the engine's
/// start.
pub(super) type ScoringStart = (Scored, shrink_calib::Resume);

/// The units `structure` removes, ranked by `importance` (magnitude or activation) or, for
/// layers, by a block-influence or angular criterion: per layer for heads, groups and channels,
/// one list for layers and width. Reads the model one block at a time; `embedding` loads the
/// token embedding (for the width's magnitude). A calibrated pass by activation importance
/// (heads, groups, channels, width) begins at `start` when given and calls `finished` after
/// each block; the others score from the first block and call nothing.
pub(super) fn removal_by_blocks<M: BlockModel>(
    model: &mut M,
    structure: Structure,
    importance: Importance,
    embedding: &dyn Fn() -> Result<Tensor>,
    calibration: Calibration,
    start: Option<ScoringStart>,
    finished: &mut ScoredBlock<'_>,
) -> Result<Vec<Vec<usize>>> {
    let cfg = model.config().clone();
    let Calibration { progress, .. } = calibration;
    match (structure, importance) {
        (Structure::Layers { count, criterion }, _) => {
            let span = match criterion {
                LayerCriterion::BlockInfluence => 1,
                LayerCriterion::Angular => count,
                LayerCriterion::Perplexity => return Err(whole_only("the perplexity criterion")),
            };
            if count == 0 {
                return Ok(vec![vec![]]);
            }
            let distance = layer_distances(model, span, calibration)?;
            Ok(vec![if criterion == LayerCriterion::Angular {
                let start = lowest(&distance, 1)[0];
                (start..start + count).collect()
            } else {
                lowest(&distance, count)
            }])
        }
        (_, Importance::Taylor) => Err(whole_only("taylor importance")),
        (Structure::Width { count }, importance) => {
            let scores = width_scores(model, importance, embedding, calibration, start, finished)?;
            Ok(vec![lowest(&scores, count)])
        }
        (_, Importance::Magnitude) => {
            let n = model.num_blocks();
            progress.start("scoring blocks", n as u64);
            let mut out = Vec::with_capacity(n);
            for index in 0..n {
                let scores = model.with_block(index, |b| {
                    unit_sums(structure, &cfg, &|role| squared(b, role))
                })??;
                out.push(removed_units(structure, &cfg, &scores));
                progress.advance(1, Some(&format!("block {index}")));
            }
            progress.finish();
            Ok(out)
        }
        (_, Importance::Activation) => {
            let heads = !matches!(structure, Structure::Channels { .. });
            let (scored, start) = start.unzip();
            let scored = std::cell::RefCell::new(scored.unwrap_or_default());
            calibrate(
                model,
                heads,
                calibration,
                start,
                &mut |b, stats| {
                    let scores = if heads {
                        let st = stats_of(stats, b.name(Role::O).unwrap_or_default())?;
                        let width = head_width(structure, &cfg);
                        output_energy(b.o_proj.weight(), &st.hessian, width)?
                    } else {
                        let st = stats_of(stats, b.name(Role::Down).unwrap_or_default())?;
                        let d = col_sq(b.down_proj.weight())?;
                        // ‖W_down[:, c]‖² Σ g_c²: the energy channel c writes to the residual.
                        (0..cfg.intermediate_size)
                            .map(|c| d[c] * st.channel_sq[c])
                            .collect()
                    };
                    let removed = removed_units(structure, &cfg, &scores);
                    scored.borrow_mut().removed.push(removed);
                    Ok(())
                },
                &mut |index, xs| finished(index, xs, &scored.borrow()),
            )?;
            Ok(scored.into_inner().removed)
        }
    }
}

fn whole_only(what: &str) -> PruneError {
    PruneError::Config(format!(
        "{what} needs the model whole (it does not score block by block)"
    ))
}

/// Runs the sequential calibration engine over the original blocks (from `start` when given),
/// calling `each` with every block and its input statistics (full Hessians with `hessian`) and
/// `finished` after it.
fn calibrate<M: BlockModel>(
    model: &mut M,
    hessian: bool,
    c: Calibration,
    start: Option<shrink_calib::Resume>,
    each: &mut dyn FnMut(&mut Block, &BlockStats) -> Result<()>,
    finished: &mut dyn FnMut(usize, &shrink_calib::Activations) -> Result<()>,
) -> Result<()> {
    shrink_calib::sequential_from(
        model,
        need_windows(c.windows)?,
        c.batch,
        hessian,
        c.world,
        c.progress,
        start,
        c.keep,
        &mut |block, stats, _| each(block, stats),
        finished,
    )
}

/// The importance of each hidden channel: its squared weight norms in the embedding and in
/// every `o_proj` and `down_proj` row (magnitude), or the RMS of each channel at the output of
/// both norms on the calibration tokens (activation; Minitron, from `start` when given, calling
/// `finished` after each block).
fn width_scores<M: BlockModel>(
    model: &mut M,
    importance: Importance,
    embedding: &dyn Fn() -> Result<Tensor>,
    calibration: Calibration,
    start: Option<ScoringStart>,
    finished: &mut ScoredBlock<'_>,
) -> Result<Vec<f64>> {
    let progress = calibration.progress;
    let mut s = vec![0.0; model.config().hidden_size];
    match importance {
        Importance::Magnitude => {
            s = embedding_col_sq(&embedding()?)?;
            let n = model.num_blocks();
            progress.start("scoring blocks", n as u64);
            for index in 0..n {
                model.with_block(index, |b| -> Result<()> {
                    for w in [b.o_proj.weight(), b.down_proj.weight()] {
                        for (x, v) in s.iter_mut().zip(row_sq(w)?) {
                            *x += v;
                        }
                    }
                    Ok(())
                })??;
                progress.advance(1, Some(&format!("block {index}")));
            }
            progress.finish();
        }
        _ => {
            let (scored, start) = start.unzip();
            let scored = std::cell::RefCell::new(scored.unwrap_or(Scored {
                removed: Vec::new(),
                width: s,
            }));
            calibrate(
                model,
                false,
                calibration,
                start,
                &mut |b, stats| {
                    let sums = &mut scored.borrow_mut().width;
                    for role in [Role::Q, Role::Gate] {
                        let name = b.name(role).unwrap_or_default();
                        let st = stats_of(stats, name)?;
                        for (x, v) in sums.iter_mut().zip(&st.channel_sq) {
                            *x += (v / st.rows.max(1) as f64).sqrt();
                        }
                    }
                    Ok(())
                },
                &mut |index, xs| finished(index, xs, &scored.borrow()),
            )?;
            s = scored.into_inner().width;
        }
    }
    Ok(s)
}

/// Per-token cosine similarity between `a` and `b` (`(batch, seq, hidden)`), summed.
fn cosine_sum(a: &Tensor, b: &Tensor) -> Result<f64> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / ((na * nb)? + 1e-12)?)?;
    Ok(cos.sum_all()?.to_scalar::<f32>()? as f64)
}

/// For each run of `span` consecutive blocks starting at `l`, 1 − the mean per-token cosine
/// between the hidden states entering block `l` and those leaving block `l + span − 1`: Block
/// Influence for `span` 1, the angular distance's ranking for longer runs (arccos of the mean
/// cosine ranks the same way). The calibration batches are split across the ranks; each batch's
/// sum is shared and every rank adds them in batch order (the same bits as one process).
/// Holds `span + 1` copies of the windows' hidden states, kept as `keep` says.
fn layer_distances<M: BlockModel>(model: &mut M, span: usize, c: Calibration) -> Result<Vec<f64>> {
    let windows = need_windows(c.windows)?;
    let n = model.num_blocks();
    let batch = c.batch.max(1);
    let len = windows[0].len();
    let (rank, ranks) = (c.world.rank(), c.world.size());
    let batches = windows.len().div_ceil(batch);
    if batches < ranks {
        return Err(shrink_calib::CalibError::TooFewBatches { ranks, batches }.into());
    }
    let ids = windows
        .chunks(batch)
        .skip(rank)
        .step_by(ranks)
        .map(|group| Tensor::new(group.to_vec(), &candle_core::Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ctx = model.attention_context(len)?;
    // The states entering the last `span` blocks, oldest first.
    let mut states = std::collections::VecDeque::new();
    let mut xs = c.keep.store()?;
    model.embed_each(&ids, |x| xs.push(x))?;
    states.push_back(xs);
    let mut sims = vec![0.0; n + 1 - span];
    c.progress.start("scoring layers", n as u64);
    for index in 0..n {
        let mut next = c.keep.store()?;
        let mut sums = Vec::with_capacity(ids.len());
        model.with_block(index, |block| -> Result<()> {
            let (first, last) = (&states[0], &states[states.len() - 1]);
            for k in 0..ids.len() {
                let y = block.forward(&last.get(k)?, &ctx, None, &mut NoHook)?;
                if index + 1 >= span {
                    sums.push(cosine_sum(&first.get(k)?, &y)?);
                }
                next.push(y)?;
            }
            Ok(())
        })??;
        if index + 1 >= span {
            for b in 0..batches {
                let mut bytes = sums.get(b / ranks).copied().unwrap_or(0.0).to_le_bytes();
                c.world.broadcast(b % ranks, &mut bytes);
                sims[index + 1 - span] += f64::from_le_bytes(bytes);
            }
        }
        states.push_back(next);
        if states.len() > span {
            states.pop_front();
        }
        c.progress.advance(1, Some(&format!("block {index}")));
    }
    c.progress.finish();
    let tokens = (windows.len() * len) as f64;
    Ok(sims.iter().map(|s| 1.0 - s / tokens).collect())
}

/// Methods scored by the calibration loss need a token-prediction head.
fn need_token_loss(model: &Transformer, what: &str) -> Result<()> {
    if model.has_token_head() {
        return Ok(());
    }
    Err(PruneError::Config(format!(
        "{what} needs a token-prediction loss, and this encoder has no masked-LM head: use activation or magnitude importance (layers: block-influence or angular)"
    )))
}

fn calibration_loss(model: &Transformer, windows: &[Vec<u32>], batch: usize) -> Result<f64> {
    need_token_loss(model, "the perplexity criterion")?;
    let mut total = 0.0;
    for group in windows.chunks(batch.max(1)) {
        let ids = Tensor::new(group.to_vec(), model.device())?;
        total += model.lm_loss(&ids)?.to_scalar::<f32>()? as f64 * group.len() as f64;
    }
    Ok(total / windows.len().max(1) as f64)
}

/// The `count` layers whose absence alone raises the calibration loss least (the model run
/// whole without each block in turn).
pub(super) fn rank_by_perplexity(
    model: &Transformer,
    count: usize,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<usize>> {
    let n = model.blocks.len();
    if count == 0 {
        return Ok(vec![]);
    }
    progress.start("scoring layers", n as u64);
    let mut scores = Vec::with_capacity(n);
    for i in 0..n {
        let mut without = model.clone();
        without.blocks.remove(i);
        scores.push(calibration_loss(&without, windows, batch)?);
        progress.advance(1, Some(&format!("without block {i}")));
    }
    progress.finish();
    Ok(lowest(&scores, count))
}

/// The units `structure` removes by first-order Taylor importance: |Σ G ⊙ W| over each unit's
/// parameters, with G the gradient of the calibration loss through the model held whole.
pub(super) fn removal_by_taylor(
    model: &Transformer,
    structure: Structure,
    windows: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<Vec<Vec<usize>>> {
    let p = taylor_products(model, windows, progress)?;
    let cfg = &model.config;
    if let Structure::Width { count } = structure {
        let mut s = vec![0.0; cfg.hidden_size];
        for (name, t) in &p {
            let add: Vec<f64> = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                col_sum(t)?
            } else if name.contains(".q_norm.") || name.contains(".k_norm.") {
                continue; // QK-norms act across a head, not the width
            } else if name.ends_with("norm.weight") {
                t.to_vec1::<f32>()?.into_iter().map(f64::from).collect()
            } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                row_sum(t)?
            } else if t.rank() == 2 {
                col_sum(t)?
            } else {
                continue; // biases of q/k/v/gate/up are not in the residual stream
            };
            for (x, v) in s.iter_mut().zip(add) {
                *x += v;
            }
        }
        let s: Vec<f64> = s.into_iter().map(f64::abs).collect();
        return Ok(vec![lowest(&s, count)]);
    }
    model
        .blocks
        .iter()
        .map(|b| {
            let scores = unit_sums(structure, cfg, &|role| {
                Ok(b.name(role).map(|n| p[&format!("{n}.weight")].clone()))
            })?;
            Ok(removed_units(structure, cfg, &scores))
        })
        .collect()
}

/// G ⊙ W for every parameter (by Hugging Face name), with G the gradient of the calibration
/// loss summed over `windows`: −Σ over a part of G ⊙ W is the loss change, to first order, of
/// setting that part to zero.
fn taylor_products(
    model: &Transformer,
    windows: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<BTreeMap<String, Tensor>> {
    need_token_loss(model, "taylor importance")?;
    let vars: BTreeMap<String, candle_core::Var> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
        .collect::<Result<_>>()?;
    let tracked = Transformer::from_tensors(
        &model.config,
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
    )?;
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    // A backward pass keeps every activation of the forward: one window at a time bounds memory.
    let groups: Vec<&[Vec<u32>]> = windows.chunks(1).collect();
    progress.start("gradients", groups.len() as u64);
    for group in groups {
        let ids = Tensor::new(group.to_vec(), model.device())?;
        // The mean over this batch's tokens, weighted by its windows: the sum over windows.
        let loss = (tracked.lm_loss(&ids)? * group.len() as f64)?;
        let grads = loss.backward()?;
        for (name, var) in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let sum = match sums.remove(name) {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                };
                sums.insert(name.clone(), sum);
            }
        }
        progress.advance(1, None);
    }
    progress.finish();
    vars.iter()
        .map(|(name, var)| {
            let g = sums
                .remove(name)
                .ok_or_else(|| PruneError::Config(format!("no gradient reached '{name}'")))?;
            Ok((name.clone(), (g * var.as_tensor().detach())?))
        })
        .collect()
}
