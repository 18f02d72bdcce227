//! Checkpoint layouts that differ from the model's own: GPT-2 stores `Conv1D` weights as
//! `[in, out]` and fuses q/k/v into one `c_attn`; `BertForMaskedLM` prefixes the encoder with
//! `bert.`. Loading converts to the model's layout, writing converts back.

use crate::config::{Arch, ModelConfig};
use crate::{ModelError, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// GPT-2's Conv1D linears besides `c_attn` (stored `[in, out]`).
const GPT2_CONV1D: [&str; 3] = ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

fn take(tensors: &mut BTreeMap<String, Tensor>, name: &str) -> Result<Tensor> {
    tensors
        .remove(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

/// A checkpoint's tensors in the model's layout.
pub(crate) fn to_model_layout(
    config: &ModelConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    match config.arch()? {
        Arch::Gpt2 => gpt2_to_model(config, tensors),
        Arch::Bert => Ok(tensors
            .into_iter()
            .filter(|(name, _)| !name.starts_with("cls.predictions.decoder."))
            .map(|(name, t)| match name.strip_prefix("bert.") {
                Some(rest) => (rest.to_string(), t),
                None => (name, t),
            })
            .collect()),
        _ => Ok(tensors),
    }
}

/// The model's tensors in the checkpoint's layout.
pub(crate) fn to_checkpoint_layout(
    config: &ModelConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    match config.arch()? {
        Arch::Gpt2 => gpt2_to_checkpoint(config, tensors),
        Arch::Bert if config.has_mlm_head() => Ok(tensors
            .into_iter()
            .map(|(name, t)| {
                if name.starts_with("cls.") {
                    (name, t)
                } else {
                    (format!("bert.{name}"), t)
                }
            })
            .collect()),
        _ => Ok(tensors),
    }
}

fn gpt2_to_model(
    config: &ModelConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| match name.strip_prefix("transformer.") {
            Some(rest) => (rest.to_string(), t),
            None => (name, t),
        })
        .collect();
    // GPT2LMHeadModel's head is the token embedding; some files store the copy.
    tensors.remove("lm_head.weight");
    let h = config.hidden_size;
    let wrong = |name: String, t: &Tensor, expected: Vec<usize>| ModelError::WrongShape {
        name,
        expected,
        actual: t.dims().to_vec(),
    };
    for l in 0..config.num_hidden_layers {
        let p = format!("h.{l}");
        let name = format!("{p}.attn.c_attn.weight");
        let w = take(&mut tensors, &name)?;
        if w.dims() != [h, 3 * h] {
            return Err(wrong(name, &w, vec![h, 3 * h]));
        }
        let w = w.t()?.contiguous()?;
        let name = format!("{p}.attn.c_attn.bias");
        let b = take(&mut tensors, &name)?;
        if b.dims() != [3 * h] {
            return Err(wrong(name, &b, vec![3 * h]));
        }
        for (i, part) in ["q", "k", "v"].iter().enumerate() {
            let stem = format!("{p}.attn.c_attn.{part}");
            tensors.insert(
                format!("{stem}.weight"),
                w.narrow(0, i * h, h)?.contiguous()?,
            );
            tensors.insert(format!("{stem}.bias"), b.narrow(0, i * h, h)?.contiguous()?);
        }
        for conv in GPT2_CONV1D {
            let name = format!("{p}.{conv}.weight");
            let w = take(&mut tensors, &name)?;
            tensors.insert(name, w.t()?.contiguous()?);
        }
    }
    Ok(tensors)
}

fn gpt2_to_checkpoint(
    config: &ModelConfig,
    mut tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    for l in 0..config.num_hidden_layers {
        let p = format!("h.{l}");
        let mut weights = vec![];
        let mut biases = vec![];
        for part in ["q", "k", "v"] {
            let stem = format!("{p}.attn.c_attn.{part}");
            weights.push(take(&mut tensors, &format!("{stem}.weight"))?);
            biases.push(take(&mut tensors, &format!("{stem}.bias"))?);
        }
        tensors.insert(
            format!("{p}.attn.c_attn.weight"),
            Tensor::cat(&weights, 0)?.t()?.contiguous()?,
        );
        tensors.insert(format!("{p}.attn.c_attn.bias"), Tensor::cat(&biases, 0)?);
        for conv in GPT2_CONV1D {
            let name = format!("{p}.{conv}.weight");
            let w = take(&mut tensors, &name)?;
            tensors.insert(name, w.t()?.contiguous()?);
        }
    }
    Ok(tensors)
}

/// The checkpoint's name for a model tensor it stores unchanged (`None` when it stores it
/// transposed or fused: GPT-2's Conv1D linears).
pub(crate) fn checkpoint_name(config: &ModelConfig, name: &str) -> Option<String> {
    match config.arch().ok()? {
        Arch::Gpt2 => {
            let conv = name.contains(".attn.c_attn.")
                || GPT2_CONV1D
                    .iter()
                    .any(|c| name.ends_with(&format!("{c}.weight")));
            (!conv).then(|| name.to_string())
        }
        Arch::Bert if config.has_mlm_head() && !name.starts_with("cls.") => {
            Some(format!("bert.{name}"))
        }
        _ => Some(name.to_string()),
    }
}

/// The checkpoint weights made by stacking the rows of model linear weights, with their parts in
/// order: GPT-2's `c_attn` from q, k and v. Every other linear weight is its own part.
pub(crate) fn stacked_weights(
    config: &ModelConfig,
    linears: &[String],
) -> Vec<(String, Vec<String>)> {
    let gpt2 = config.arch().ok() == Some(Arch::Gpt2);
    let mut out: Vec<(String, Vec<String>)> = vec![];
    for name in linears {
        let weight = format!("{name}.weight");
        match name.strip_suffix(".q").filter(|_| gpt2) {
            Some(stem) => out.push((
                format!("{stem}.weight"),
                ["q", "k", "v"]
                    .map(|p| format!("{stem}.{p}.weight"))
                    .to_vec(),
            )),
            None if gpt2 && (name.ends_with(".k") || name.ends_with(".v")) => {}
            None => {
                let ck = checkpoint_name(config, &weight).unwrap_or_else(|| weight.clone());
                out.push((ck, vec![weight]));
            }
        }
    }
    out
}
