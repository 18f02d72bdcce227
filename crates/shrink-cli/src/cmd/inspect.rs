//! `shrink inspect`: A model file's architecture, parameters, tensor types and bits per weight.

use crate::common::resolve_model;
use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub(crate) struct InspectArgs {
    /// A GGUF file, a Hugging Face folder, or a demo model name (smollm2, minilm).
    model: String,
    #[arg(long)]
    json: bool,
}

pub(crate) fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub(crate) fn run(args: InspectArgs) -> Result<()> {
    let InspectArgs { model, json } = args;
    let path = resolve_model(&model)?;
    let info =
        shrink_io::inspect(&path).with_context(|| format!("inspecting {}", path.display()))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    outln!("path           {}", info.path);
    outln!(
        "format         {}",
        serde_json::to_value(info.format)?.as_str().unwrap_or("?")
    );
    outln!("architecture   {}", info.architecture);
    outln!(
        "parameters     {} ({})",
        info.parameters,
        human_count(info.parameters)
    );
    outln!(
        "file size      {} bytes ({:.1} MB)",
        info.file_size_bytes,
        info.file_size_bytes as f64 / 1e6
    );
    outln!("bits/weight    {:.3}", info.bits_per_weight);
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &info.tensors {
        let e = by_type.entry(&t.dtype).or_default();
        e.0 += 1;
        e.1 += t.parameters;
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(k, (n, p))| format!("{n} × {k} ({})", human_count(*p)))
        .collect();
    outln!("tensor types   {}", types.join(", "));
    outln!();
    outln!(
        "{:<40} {:<6} {:>16} {:>12} {:>7}",
        "tensor",
        "dtype",
        "shape",
        "bytes",
        "bpw"
    );
    for t in &info.tensors {
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×");
        outln!(
            "{:<40} {:<6} {:>16} {:>12} {:>7.3}",
            t.name,
            t.dtype,
            shape,
            t.size_bytes,
            t.bits_per_weight
        );
    }
    Ok(())
}
