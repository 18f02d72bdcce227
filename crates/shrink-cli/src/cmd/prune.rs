//! `shrink prune`: Pruning of one model.

use crate::common::{compress, pattern_pairs, CalibrationText};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct PruneArgs {
    model: String,
    /// magnitude, wanda, sparsegpt (unstructured) or heads, channels, layers, width (structured).
    #[arg(long)]
    method: String,
    /// Unstructured methods: a fraction (0.5), a percentage (50%) or N:M (2:4, 4:8).
    #[arg(long)]
    sparsity: Option<String>,
    /// Another sparsity for the linears whose name matches PATTERN, e.g.
    /// `--override down_proj=0.3`; repeatable, the last match wins.
    #[arg(long = "override", value_name = "PATTERN=SPARSITY")]
    overrides: Vec<String>,
    /// Magnitude: one threshold over all block linears instead of the same fraction per layer.
    #[arg(long)]
    global: bool,
    /// SparseGPT dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// SparseGPT: columns per adaptive mask selection.
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Structured methods: the fraction of heads, channels, layers or hidden width to remove.
    #[arg(long)]
    fraction: Option<f64>,
    /// Structured methods: magnitude (weight norms), activation (energy on the calibration
    /// tokens) or taylor (|gradient · weight| of the calibration loss) [default: activation].
    #[arg(long)]
    importance: Option<String>,
    /// Layers: block-influence, angular (a contiguous run) or perplexity [default: block-influence].
    #[arg(long)]
    criterion: Option<String>,
    /// Heads: remove whole key/value groups instead of query heads within every group.
    #[arg(long)]
    kv_groups: bool,
    /// gguf or hf [default: gguf].
    #[arg(long)]
    format: Option<String>,
    /// f32 or f16 [default: f32].
    #[arg(long)]
    dtype: Option<String>,
    /// Calibration text: DATASET:SPLIT or a file.
    #[arg(long, default_value = "shakespeare:calib")]
    calib: String,
    #[arg(long, default_value_t = 128)]
    samples: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Print the summary, with every layer, as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: PruneArgs) -> Result<()> {
    use shrink_pipeline::PruneRequest;
    let kind = shrink_pipeline::PruneKind::parse(&args.method)?;
    let overrides = pattern_pairs(&args.overrides, "SPARSITY", "down_proj=0.3")?;
    let request = PruneRequest {
        sparsity: args.sparsity.clone(),
        overrides,
        global: args.global,
        damp: args.damp,
        block_size: args.block_size,
        fraction: args.fraction,
        importance: args.importance.clone(),
        criterion: args.criterion.clone(),
        kv_groups: args.kv_groups,
        format: args.format.clone(),
        dtype: args.dtype.clone(),
        batch: args.batch,
        ..PruneRequest::new(kind)
    };
    let resolved = request.resolve()?;
    let calib = CalibrationText {
        text: &args.calib,
        samples: args.samples,
        seq_len: args.seq_len,
        seed: args.seed,
    };
    let done = compress(
        &args.model,
        &args.out,
        resolved.calibrates,
        &calib,
        |checkpoint, model| {
            shrink_pipeline::prune::check_prune(&resolved, model)?;
            Ok(shrink_io::check_export(checkpoint, model, resolved.export)?)
        },
        |checkpoint, model, windows, bar| {
            Ok(shrink_pipeline::prune_and_write(
                checkpoint, model, &resolved, windows, args.batch, &args.out, bar,
            )?)
        },
    )?;
    let (checkpoint, outcome, wall_s, model) =
        (&done.checkpoint, &done.outcome, done.wall_s, &done.model);
    let (size_before, after) = (&done.size_before, &done.size_after);
    let (zeros, weights) = outcome.layers.iter().fold((0.0, 0.0), |(z, n), l| {
        let w = (l.shape[0] * l.shape[1]) as f64;
        (z + l.sparsity * w, n + w)
    });
    if args.json {
        let summary = serde_json::json!({
            "schema": "shrink.prune/v1",
            "model": checkpoint.path.display().to_string(),
            "out": args.out.display().to_string(),
            "method": outcome.method,
            "calibration": done.calibration_json(&calib),
            "parameters_before": outcome.parameters_before,
            "parameters_after": outcome.parameters_after,
            "config": shrink_prune::shape_keys(&model.config),
            "size_bytes_before": size_before.file_size_bytes,
            "size_bytes_after": after.file_size_bytes,
            "linear_sparsity": (weights > 0.0).then(|| zeros / weights),
            "structured": outcome.structured,
            "wall_s": wall_s,
            "layers": outcome.layers,
        });
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("model        {}", checkpoint.path.display());
    outln!("method       {}", outcome.method);
    done.print_calibration(&calib);
    if outcome.structured.is_some() {
        outln!(
            "parameters   {} → {} ({:.1}% removed)",
            outcome.parameters_before,
            outcome.parameters_after,
            100.0
                * (1.0 - outcome.parameters_after as f64 / outcome.parameters_before.max(1) as f64)
        );
    } else {
        outln!(
            "parameters   {} (shape unchanged; pruned weights are stored as zeros)",
            outcome.parameters_after
        );
    }
    let c = &model.config;
    outln!(
        "shape        {} layers, hidden {}, MLP {}, {} query / {} KV heads of {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim()
    );
    if weights > 0.0 {
        let errors: Vec<f64> = outcome
            .layers
            .iter()
            .filter_map(|l| l.relative_output_error)
            .collect();
        let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
        outln!(
            "sparsity     {:.2}% of the block linears' weights are zero{}",
            100.0 * zeros / weights,
            if errors.is_empty() {
                String::new()
            } else {
                format!("; mean relative output error {mean:.5}")
            }
        );
    }
    outln!("wrote        {}", args.out.display());
    outln!(
        "size         {:.1} MB → {:.1} MB",
        size_before.file_size_bytes as f64 / 1e6,
        after.file_size_bytes as f64 / 1e6
    );
    outln!("time         {wall_s:.1} s");
    Ok(())
}
