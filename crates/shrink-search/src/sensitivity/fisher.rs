//! [`Measure::Fisher`](super::Measure::Fisher): each linear's sensitivity from gradients instead
//! of KL passes. The model is read block by block, as the KL table reads it: one forward pass
//! keeps every block's input (windows × tokens × hidden values per block), the head gives the
//! gradient of each window's negative log-likelihood of tokens drawn from the model's own
//! predictions (one per scored position: the Fisher information of the KL, not the empirical
//! one of the text's tokens) with respect to the last block's output, and
//! the backward pass goes from the last block to the first, one window at a time through one
//! block, chaining the gradient with respect to the block's input to the block before. Only one
//! block's weights and their squared gradients are held at a time; each rank makes variables of
//! the weights it scores only (every rank runs the whole chain).

use super::{
    each_candidate, embed, item_of, linear_count, log_probs, owner, share_all, Candidate,
    SensitivityConfig,
};
use crate::{Item, Result, SearchError};
use candle_core::{DType, Tensor, Var};
use shrink_core::{Collective, Progress};
use shrink_models::{AttentionContext, Block, BlockModel, NoHook};

/// The items of every block linear of `model` on the windows `ids` (as [`super::sensitivity`]
/// returns them, without the embeddings), each format's loss the Fisher prediction of its KL,
/// and, when `reference`, the model's log-probabilities at the scored positions (for measuring
/// the embeddings' formats without another pass).
pub(super) fn items<M: BlockModel>(
    model: &mut M,
    ids: &Tensor,
    ctx: &AttentionContext,
    config: &SensitivityConfig,
    world: &dyn Collective,
    progress: &dyn Progress,
    reference: bool,
) -> Result<(Vec<Item>, Option<Tensor>)> {
    let (windows, len) = ids.dims2()?;
    let blocks = model.num_blocks();
    let mut x = embed(model, ids)?;
    if x.dtype() != DType::F32 {
        return Err(SearchError::Input(format!(
            "the gradient sensitivity runs on f32 models, not {:?}",
            x.dtype()
        )));
    }
    progress.start("gradient sensitivity", 2 * blocks as u64);
    // The forward pass: every block's input.
    let mut inputs = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let next = model.with_block(i, |b| b.forward(&x, ctx, None, &mut NoHook))??;
        inputs.push(std::mem::replace(&mut x, next));
        progress.advance(1, None);
    }
    // The gradient of each window's negative log-likelihood with respect to the last output.
    let head = model.head()?;
    let mut grads = Vec::with_capacity(windows);
    for w in 0..windows {
        let hidden = Var::from_tensor(&x.narrow(0, w, 1)?)?;
        let lp = log_probs(&head, hidden.as_tensor())?;
        let targets = sampled_targets(&lp, w)?;
        let nll = lp.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()?;
        let g = nll.backward()?;
        grads.push(gradient(&g, &hidden, "the last block's output")?);
    }
    let reference = reference.then(|| log_probs(&head, &x)).transpose()?;
    drop((x, head));
    // Each block's linears in the order of the KL table: tensors dealt by their index.
    let counts: Vec<usize> = (0..blocks)
        .map(|i| linear_count(model.config(), i))
        .collect();
    let positions = (windows * (len - len / 2)) as f64;
    let mut per_block: Vec<Vec<Item>> = vec![Vec::new(); blocks];
    for i in (0..blocks).rev() {
        let x = inputs
            .pop()
            .ok_or_else(|| SearchError::Input("a block input is missing".into()))?;
        let dealt = Dealt {
            world,
            offset: counts[..i].iter().sum(),
            count: counts[i],
        };
        let (mine, below) = model.with_block(i, |block| {
            block_items(block, &x, &grads, ctx, config, &dealt, positions, i > 0)
        })??;
        per_block[i] = share_all(world, dealt.offset, dealt.count, mine, |_| {})?;
        grads = below;
        progress.advance(1, Some(format!("block {i}").as_str()));
    }
    progress.finish();
    Ok((per_block.into_iter().flatten().collect(), reference))
}

/// One token per row of `log_probs` (a window's scored positions), drawn from that row's
/// distribution by a generator seeded with the window's index: the targets whose log-likelihood
/// gradients square to the Fisher information of the KL (their expectation over the draws).
pub(crate) fn sampled_targets(log_probs: &Tensor, window: usize) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(window as u64);
    let rows: Vec<Vec<f32>> = log_probs.detach().exp()?.to_vec2()?;
    let targets: Vec<u32> = rows
        .iter()
        .map(|p| {
            let u = rng.gen::<f64>() * p.iter().map(|&v| v as f64).sum::<f64>();
            let mut acc = 0f64;
            let last = p.len().saturating_sub(1);
            p.iter()
                .position(|&v| {
                    acc += v as f64;
                    acc > u
                })
                .unwrap_or(last) as u32
        })
        .collect();
    Ok(Tensor::new(targets, log_probs.device())?)
}

/// A block's linears among the ranks: tensors `offset..offset + count` of the table.
struct Dealt<'a> {
    world: &'a dyn Collective,
    offset: usize,
    count: usize,
}

/// The gradient `g` holds for `var`, or an error naming `what`.
fn gradient(g: &candle_core::backprop::GradStore, var: &Var, what: &str) -> Result<Tensor> {
    g.get(var.as_tensor())
        .cloned()
        .ok_or_else(|| SearchError::Input(format!("no gradient reached {what}")))
}

/// A block's part of the backward pass on its input `x` (all windows), given the gradient of
/// each window's loss with respect to the block's output: the items of the linears this rank
/// scores (or why it could not: an error only this rank meets travels with its items, so that
/// every rank still shares), and, when `chain`, the gradients with respect to the block's input,
/// per window.
#[allow(clippy::too_many_arguments)]
fn block_items(
    block: &Block,
    x: &Tensor,
    grads: &[Tensor],
    ctx: &AttentionContext,
    config: &SensitivityConfig,
    dealt: &Dealt,
    positions: f64,
    chain: bool,
) -> Result<(Result<Vec<Item>>, Vec<Tensor>)> {
    let linears = block.linears();
    if linears.len() != dealt.count {
        return Err(SearchError::Input(format!(
            "a block has {} linears where its configuration names {}",
            linears.len(),
            dealt.count
        )));
    }
    let world = dealt.world;
    let mine: Vec<usize> = (0..linears.len())
        .filter(|j| owner(world, dealt.offset + j) == world.rank())
        .collect();
    // The block with this rank's weights as variables.
    let mut tracked = block.clone();
    let mut vars = Vec::with_capacity(mine.len());
    for &j in &mine {
        let (name, linear) = linears[j];
        let var = Var::from_tensor(linear.weight())?;
        tracked
            .linear_mut(name)
            .ok_or_else(|| SearchError::Input(format!("no linear '{name}'")))?
            .set_weight(var.as_tensor().clone())?;
        vars.push(var);
    }
    // Squared gradients summed over the windows, for this rank's linears.
    let mut fisher: Vec<Vec<f32>> = mine
        .iter()
        .map(|&j| vec![0f32; linears[j].1.weight().elem_count()])
        .collect();
    let mut own: Result<()> = Ok(());
    let mut below = Vec::with_capacity(if chain { grads.len() } else { 0 });
    for (w, g_out) in grads.iter().enumerate() {
        let input = Var::from_tensor(&x.narrow(0, w, 1)?)?;
        let y = tracked.forward(input.as_tensor(), ctx, None, &mut NoHook)?;
        let g = (y * g_out)?.sum_all()?.backward()?;
        if own.is_ok() {
            own = fisher
                .iter_mut()
                .zip(&vars)
                .zip(&mine)
                .try_for_each(|((acc, var), &j)| {
                    let gw: Vec<f32> = gradient(&g, var, linears[j].0)?.flatten_all()?.to_vec1()?;
                    for (a, v) in acc.iter_mut().zip(gw) {
                        *a += v * v;
                    }
                    Ok(())
                });
        }
        if chain {
            below.push(gradient(&g, &input, "a block's input")?);
        }
    }
    drop((tracked, vars));
    let predicted = || -> Result<Vec<Item>> {
        own?;
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let stats = shrink_calib::block_stats(block, std::slice::from_ref(x), ctx, true)?;
        let mut items = Vec::with_capacity(mine.len());
        for (&j, f) in mine.iter().zip(&fisher) {
            let (name, linear) = linears[j];
            let st = stats
                .get(name)
                .ok_or_else(|| SearchError::Input(format!("'{name}' saw no input")))?;
            let (rows, cols) = linear.weight().dims2()?;
            let w: Vec<f32> = linear.weight().flatten_all()?.to_vec1()?;
            let mut candidates: Vec<Candidate> = Vec::new();
            let mut losses = Vec::new();
            each_candidate(&w, rows, cols, name, st, config, |candidate, weight| {
                let quadratic: f64 = f
                    .iter()
                    .zip(w.iter().zip(&weight))
                    .map(|(&f, (&a, &b))| f as f64 * ((a - b) as f64).powi(2))
                    .sum();
                let kl = 0.5 * quadratic / positions;
                if !kl.is_finite() {
                    return Err(SearchError::Input(format!(
                        "'{name}' in {}: the gradient score is not finite",
                        candidate.format.label()
                    )));
                }
                candidates.push(candidate);
                losses.push(kl);
                Ok(())
            })?;
            items.push(item_of(name, &candidates, losses)?);
        }
        Ok(items)
    };
    Ok((predicted(), below))
}
