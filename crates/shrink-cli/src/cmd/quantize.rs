//! `shrink quantize`: Quantization of one model.

use crate::common::{compress, pattern_pairs, Compression};
use anyhow::{bail, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use shrink_pipeline::{PresetChoice, QuantMethod};

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    model: String,
    /// A recipe from configs/quant (q4_0, q4_k_m, w4a16-g128, w8a8) or a preset TOML file; the
    /// flags below override it.
    #[arg(long)]
    preset: Option<String>,
    /// [default: gptq, or the preset's]
    #[arg(long, value_parser = method_parser())]
    method: Option<QuantMethod>,
    /// gguf:TYPE with TYPE one of q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k;
    /// or `hf`: a Hugging Face folder in compressed-tensors' layout (vLLM, transformers), with
    /// the grid of --bits/--group [default: gguf:q4_0, or the preset's]
    #[arg(long)]
    format: Option<String>,
    /// Weight bits of a grid scheme (with --format hf; with gguf types, checked against the type).
    #[arg(long)]
    bits: Option<u8>,
    /// Group size along the input, or `channel` (with --format hf; checked with gguf types).
    #[arg(long)]
    group: Option<String>,
    /// SmoothQuant: migrate activation outliers into the weights with this alpha (0..1) before
    /// quantizing [default: the preset's].
    #[arg(long)]
    smooth: Option<f64>,
    /// Quantize activations too: int8-per-token (W8A8, with --format hf) [default: the preset's].
    #[arg(long)]
    activations: Option<String>,
    /// With --activations: the linears whose inputs stay in 16 bits (name PATTERN, substring or
    /// glob), e.g. `--activations-except down_proj`; repeatable [default: the preset's].
    #[arg(long = "activations-except", value_name = "PATTERN")]
    activations_except: Vec<String>,
    /// Another block type for the linears whose name matches PATTERN (substring, or glob with
    /// `*`), e.g. `--override down_proj=q8_0`; repeatable, the last match wins.
    #[arg(long = "override", value_name = "PATTERN=TYPE")]
    overrides: Vec<String>,
    /// Search each group's scale to minimise the activation-weighted error (grid types).
    #[arg(long)]
    search: bool,
    /// With RTN: calibrate and weight the quantization error by each input channel's mean squared
    /// activation, as llama.cpp's --imatrix (k- and i-quants: ggml's weighted quantizers; others: the
    /// scale search).
    #[arg(long)]
    imatrix: bool,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Quantize GPTQ columns in their original order instead of by decreasing activation energy.
    #[arg(long)]
    no_act_order: bool,
    /// GPTQ: fraction of the Hessian's off-diagonal taken out, H' = (1 − b)·H + b·diag(H)
    /// (0: GPTQ; 1: only the diagonal importance, as llama.cpp weighs the error) [default: the
    /// preset's, else 0].
    #[arg(long, value_parser = unit_interval)]
    blend: Option<f64>,
    /// Type of the token embedding (and untied output head): f32, f16 or a block type
    /// [default: q8_0, or the preset's].
    #[arg(long)]
    embeddings: Option<String>,
    /// GPTQ keeps weights that are exactly zero (a pruned model's mask) at zero.
    #[arg(long)]
    keep_sparsity: bool,
    /// SignRound: signed-gradient steps per block, one calibration batch each [default: 200].
    #[arg(long)]
    steps: Option<usize>,
    /// SignRound: the first step's size in grid steps, decaying linearly [default: 1 / steps].
    #[arg(long)]
    lr: Option<f64>,
    #[command(flatten)]
    common: Compression,
}

pub(crate) fn run(args: QuantizeArgs, world: &dyn shrink_core::Collective) -> Result<()> {
    use shrink_pipeline::QuantizeRequest;
    if let Some(f) = &args.format {
        if f != "hf" && !f.starts_with("gguf:") {
            bail!("--format {f}: expected gguf:TYPE (e.g. gguf:q4_k) or hf");
        }
    }
    let overrides = pattern_pairs(&args.overrides, "TYPE", "down_proj=q8_0")?;
    let signround = matches!(
        args.method,
        Some(QuantMethod::SignRound | QuantMethod::GptqSignRound)
    );
    if (args.steps.is_some() || args.lr.is_some()) && !signround {
        bail!("--steps and --lr are SignRound's settings: give them with --method signround");
    }
    let request = QuantizeRequest {
        preset: args
            .preset
            .as_deref()
            .map(PresetChoice::load)
            .transpose()
            .map_err(|e| anyhow::anyhow!("preset: {e}"))?,
        method: args.method,
        format: args.format.clone(),
        bits: args.bits,
        group: args.group.clone(),
        smooth: args.smooth,
        activations: args.activations.clone(),
        activations_except: (!args.activations_except.is_empty())
            .then(|| args.activations_except.clone()),
        overrides,
        search: args.search,
        imatrix: args.imatrix,
        damp: args.damp,
        act_order: !args.no_act_order,
        blend: args.blend,
        awq_grid: 20,
        embeddings: args.embeddings.clone(),
        batch: args.common.batch,
        keep_zeros: args.keep_sparsity,
        signround: shrink_quant::SignRoundConfig {
            steps: args
                .steps
                .unwrap_or(shrink_quant::SignRoundConfig::default().steps),
            lr: args.lr,
            keep_zeros: false,
            gptq: None,
        },
    };
    let resolved = request.resolve()?;
    let common = &args.common;
    // Ranks other than 0 have written nothing and print nothing.
    let Some(done) = compress(&args.model, common, &resolved, world)? else {
        return Ok(());
    };
    let (checkpoint, outcome, wall_s) = (&done.checkpoint, &done.outcome, done.wall_s);
    let (size_before, after) = (&done.size_before, &done.size_after);
    if common.json {
        let summary = done.summary("shrink.quantize/v1", common, ());
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("model        {}", checkpoint.path.display());
    outln!("method       {}", outcome.method);
    outln!(
        "types        {}",
        outcome
            .types
            .iter()
            .map(|(t, n)| format!("{n} × {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    done.print_calibration(common);
    if let Some(block) = outcome.resumed_at_block {
        outln!("resumed      at block {block} of a killed run (its finished blocks were kept)");
    }
    outln!("wrote        {}", common.out.display());
    done.print_memory();
    outln!(
        "size         {:.1} MB → {:.1} MB ({:.3} → {:.3} bits/weight; quantized linears {:.3})",
        size_before.file_size_bytes as f64 / 1e6,
        after.file_size_bytes as f64 / 1e6,
        size_before.bits_per_weight,
        after.bits_per_weight,
        outcome.linear_bits_per_weight
    );
    let errors: Vec<f64> = outcome
        .layers
        .iter()
        .filter_map(|l| l.relative_output_error)
        .collect();
    if !errors.is_empty() {
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        outln!(
            "error        mean relative output error {mean:.5} over {} layers; worst:",
            errors.len()
        );
        let mut worst: Vec<&shrink_quant::LayerReport> = outcome.layers.iter().collect();
        worst.sort_by(|a, b| {
            b.relative_output_error
                .unwrap_or(0.0)
                .total_cmp(&a.relative_output_error.unwrap_or(0.0))
        });
        for l in worst.iter().take(5) {
            outln!(
                "             {:<40} {:.5}",
                l.name,
                l.relative_output_error.unwrap_or(0.0)
            );
        }
    }
    outln!(
        "time         {:.1} s ({} layers)",
        wall_s,
        outcome.layers.len()
    );
    Ok(())
}

/// `--method`: the pipeline's own [`QuantMethod`], its names and descriptions listed in the help.
fn method_parser() -> impl TypedValueParser<Value = QuantMethod> {
    let choices = QuantMethod::CHOICES
        .iter()
        .map(|&(name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(choices).try_map(|name| QuantMethod::parse(&name).map_err(Box::new))
}

fn unit_interval(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Ok(x) => Err(format!("{x} is outside 0..=1")),
        Err(e) => Err(e.to_string()),
    }
}
