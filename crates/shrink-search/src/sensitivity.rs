//! Per-linear sensitivity: the KL divergence from the input model, on calibration windows, when
//! only one linear is stored in a candidate format. Each block's input is computed once; a change
//! in block `i` reruns only blocks `i..` from that cached input, so a linear costs about half a
//! forward pass per format instead of a whole one.

use crate::{Choice, Item, Result, SearchError};
use candle_core::{DType, Tensor, D};
use shrink_core::Progress;
use shrink_models::{NoHook, Transformer};
use shrink_quant::Format;

/// Log-probabilities `(positions, vocab)` at the scored positions: the second half of each window.
fn log_probs(model: &Transformer, hidden: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let half = hidden
        .narrow(1, t / 2, t - t / 2)?
        .reshape((b * (t - t / 2), h))?;
    let logits = model.lm_head(&model.final_hidden(&half)?)?;
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

/// For every block linear of `model` and every format in `formats` that fits its rows, the KL
/// its round-to-nearest quantization alone adds on `windows` (scored on the second half of each
/// window, as llama.cpp scores perplexity), with the quantized tensor's exact size. Returns one
/// [`Item`] per linear, ready for [`crate::allocate`].
///
/// ```
/// use candle_core::Device;
/// use shrink_models::{ModelConfig, Transformer};
/// use shrink_quant::Format;
/// let mut cfg = ModelConfig::tiny_for_tests();
/// cfg.intermediate_size = 64; // down_proj's rows: whole 32-value blocks
/// let model = Transformer::random(&cfg, 0, &Device::Cpu).unwrap();
/// let windows = vec![(0..16).map(|i| (i * 7 % 64) as u32).collect::<Vec<_>>()];
/// let formats = [Format::parse("q8_0").unwrap(), Format::parse("q4_0").unwrap()];
/// let items = shrink_search::sensitivity(&model, &windows, &formats, &shrink_core::NoProgress).unwrap();
/// assert_eq!(items.len(), 14);
/// assert!(items[0].choices[0].loss < items[0].choices[1].loss);
/// ```
pub fn sensitivity(
    model: &Transformer,
    windows: &[Vec<u32>],
    formats: &[Format],
    progress: &dyn Progress,
) -> Result<Vec<Item>> {
    let len = windows.first().map(Vec::len).unwrap_or(0);
    if len < 2 || windows.iter().any(|w| w.len() != len) {
        return Err(SearchError::Input(
            "sensitivity needs calibration windows of one length, at least 2 tokens".into(),
        ));
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
    let reference = log_probs(model, &x)?;
    let total: usize = model.blocks.iter().map(|b| b.linears().len()).sum();
    progress.start("measuring sensitivity", total as u64);
    let mut items = Vec::with_capacity(total);
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, linear) in block.linears() {
            let (rows, cols) = linear.weight().dims2()?;
            let w: Vec<f32> = linear
                .weight()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let mut choices = Vec::new();
            for format in formats {
                // A format whose blocks do not divide the rows is not an option for this tensor.
                if !cols.is_multiple_of(format.row_multiple()) {
                    continue;
                }
                let q = shrink_quant::rtn_format(&w, rows, cols, format, None, name)?;
                let mut changed = block.clone();
                let dequantized =
                    Tensor::from_vec(q.dequantize()?, (rows, cols), linear.weight().device())?;
                changed
                    .linear_mut(name)
                    .ok_or_else(|| SearchError::Input(format!("no linear '{name}'")))?
                    .set_weight(dequantized)?;
                let mut y = changed.forward(&inputs[i], &ctx, None, &mut NoHook)?;
                for later in &model.blocks[i + 1..] {
                    y = later.forward(&y, &ctx, None, &mut NoHook)?;
                }
                let kl = mean_kl(&reference, &log_probs(model, &y)?)?;
                if !kl.is_finite() {
                    return Err(SearchError::Input(format!(
                        "'{name}' in {}: the KL is not finite",
                        format.label()
                    )));
                }
                choices.push(Choice::new(
                    &format.label(),
                    q.size_bytes() as u64,
                    kl.max(0.0),
                ));
            }
            if choices.is_empty() {
                return Err(SearchError::NoOptions(name.to_string()));
            }
            items.push(Item::new(name, choices));
            progress.advance(1, Some(name));
        }
    }
    progress.finish();
    Ok(items)
}
