//! `shrink prune`: Pruning of one model.

use crate::common::{compress, pattern_pairs, Compression};
use anyhow::Context;
use anyhow::Result;
use clap::Args;

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
    #[command(flatten)]
    common: Compression,
}

pub(crate) fn run(args: PruneArgs, world: &dyn shrink_core::Collective) -> Result<()> {
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
        batch: args.common.batch,
        ..PruneRequest::new(kind)
    };
    let resolved = request.resolve()?;
    let common = &args.common;
    let Some(done) = compress(&args.model, common, &resolved, world)? else {
        return Ok(());
    };
    let (checkpoint, outcome, wall_s) = (&done.checkpoint, &done.outcome, done.wall_s);
    // A model held whole has its pruned shape; one read block by block is read back.
    let config = match &done.model {
        Some(model) => model.config.clone(),
        None => {
            let written = shrink_io::load(&common.out)
                .with_context(|| format!("reading back {}", common.out.display()))?;
            shrink_models::ModelConfig::from_json(&written.config)
                .context("reading the pruned model's config")?
        }
    };
    let (size_before, after) = (&done.size_before, &done.size_after);
    if common.json {
        #[derive(serde::Serialize)]
        struct Details {
            config: std::collections::BTreeMap<String, usize>,
            linear_sparsity: Option<f64>,
        }
        let details = Details {
            config: shrink_prune::shape_keys(&config),
            linear_sparsity: outcome.linear_sparsity(),
        };
        let summary = done.summary("shrink.prune/v1", common, details);
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("model        {}", checkpoint.path.display());
    outln!("method       {}", outcome.method);
    done.print_calibration(common);
    if let Some(block) = outcome.resumed_at_block {
        outln!("resumed      at block {block} of a killed run (its finished blocks were kept)");
    }
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
    let c = &config;
    outln!(
        "shape        {} layers, hidden {}, MLP {}, {} query / {} KV heads of {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim()
    );
    if let Some(sparsity) = outcome.linear_sparsity() {
        let errors: Vec<f64> = outcome
            .layers
            .iter()
            .filter_map(|l| l.relative_output_error)
            .collect();
        let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
        outln!(
            "sparsity     {:.2}% of the block linears' weights are zero{}",
            100.0 * sparsity,
            if errors.is_empty() {
                String::new()
            } else {
                format!("; mean relative output error {mean:.5}")
            }
        );
    }
    outln!("wrote        {}", common.out.display());
    done.print_memory();
    outln!(
        "size         {:.1} MB → {:.1} MB",
        size_before.file_size_bytes as f64 / 1e6,
        after.file_size_bytes as f64 / 1e6
    );
    outln!("time         {wall_s:.1} s");
    Ok(())
}
