//! `shrink validate`: A pipeline file's plan.

use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub(crate) struct ValidateArgs {
    file: PathBuf,
    #[arg(long)]
    json: bool,
    /// Memory the run may use (16G, 512M); default: the machine's. A pipeline estimated
    /// above it is refused.
    #[arg(long, value_parser = shrink_pipeline::memory::parse_size)]
    max_memory: Option<u64>,
}

pub(crate) fn run(args: ValidateArgs) -> Result<()> {
    let ValidateArgs {
        file,
        json,
        max_memory,
    } = args;
    let pipeline = shrink_pipeline::load(&file)?;
    print_plan(
        &file,
        &pipeline,
        &Path::new("runs").join(&pipeline.name),
        json,
        max_memory,
    )
}

/// The plan of a valid pipeline: stages with inputs and outputs, export, estimated peak memory.
pub(crate) fn print_plan(
    file: &Path,
    pipeline: &shrink_pipeline::Pipeline,
    run_dir: &Path,
    json: bool,
    max_memory: Option<u64>,
) -> Result<()> {
    // The memory estimate needs the model's shape: read it if the model is already here.
    let (shape, memory) = crate::common::pipeline_memory(pipeline, max_memory)?;
    let peak = shape.map(|_| memory.estimate);
    let summary = pipeline.plan_summary(file, run_dir, peak, memory.block_by_block);
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("{}: valid", file.display());
    outln!(
        "name      {} (run folder {})",
        pipeline.name,
        run_dir.display()
    );
    outln!("model     {}", pipeline.model.source);
    outln!(
        "data      calibration {} ({} × {} tokens, seed {}), evaluation {}",
        pipeline.data.calib,
        pipeline.data.samples,
        pipeline.data.seq_len,
        pipeline.seed,
        pipeline.data.eval
    );
    for (i, s) in summary.stages.iter().enumerate() {
        outln!(
            "stage {:<3} {:<28} {:<22} {} → {} ({}){}",
            i + 1,
            s.name,
            s.kind,
            s.input,
            s.output,
            s.format.name(),
            if s.calibrates { "  (calibrates)" } else { "" }
        );
    }
    if let Some(sw) = &pipeline.sweep {
        let values: Vec<String> = sw.values.iter().map(|v| v.to_string()).collect();
        outln!(
            "sweep     {}.{} over {}",
            sw.stage,
            sw.key,
            values.join(", ")
        );
    }
    outln!(
        "eval      {} protocol, ctx {}, {} chunks; {} prompts × {} tokens; decode {} + {} tokens",
        pipeline.eval.protocol,
        pipeline.eval.ctx,
        pipeline.eval.chunks,
        pipeline.eval.prompts.len(),
        pipeline.eval.max_new_tokens,
        pipeline.eval.prefill_tokens,
        pipeline.eval.decode_tokens
    );
    outln!(
        "export    {} → {}",
        pipeline.export.formats.join(", "),
        run_dir.join("model").display()
    );
    outln!(
        "report    {}",
        run_dir.join("report.{json,md,html}").display()
    );
    match peak {
        Some(b) => outln!(
            "memory    ≈ {:.1} GB peak (estimate){}",
            b as f64 / 1e9,
            if memory.block_by_block {
                ", models evaluated block by block"
            } else {
                ""
            }
        ),
        None => outln!("memory    unknown until the model is fetched"),
    }
    Ok(())
}
