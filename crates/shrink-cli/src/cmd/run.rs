//! `shrink run`: A pipeline run.

use super::validate::print_plan;
use crate::progress;
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub(crate) struct RunArgs {
    /// A pipeline file (see pipelines/).
    file: PathBuf,
    /// The run folder [default: runs/NAME].
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Print the plan (as `shrink validate`) and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print a machine-readable summary (schema shrink.run/v1) instead of the table.
    #[arg(long)]
    json: bool,
    /// Memory the run may use (16G, 512M); default: the machine's. A run estimated above it is
    /// refused before any work.
    #[arg(long, value_parser = shrink_pipeline::memory::parse_size)]
    max_memory: Option<u64>,
}

/// Whether the run will evaluate its models block by block (as far as can be told before it
/// starts: from the pipeline file and its model's header, when the model is here).
pub(crate) fn evaluates_block_by_block(args: &RunArgs) -> bool {
    shrink_pipeline::load(&args.file)
        .ok()
        .and_then(|p| crate::common::pipeline_memory(&p, args.max_memory).ok())
        .is_some_and(|(_, memory)| memory.block_by_block)
}

/// Exit code of a run whose report was written but whose gates failed.
const GATES_FAILED: u8 = 3;

/// Runs the pipeline; under `mpirun -n N`, rank 0 runs it and the other ranks take their part of
/// every stage that calibrates reading its model block by block and of every evaluation, and
/// their share of the sweep's variants, printing nothing.
pub(crate) fn run(args: RunArgs, world: &dyn shrink_core::Collective) -> Result<ExitCode> {
    let pipeline = shrink_pipeline::load(&args.file)?;
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&pipeline.name));
    if args.dry_run {
        if world.size() > 1 {
            anyhow::bail!("a dry run plans as one process: run it without mpirun");
        }
        print_plan(&args.file, &pipeline, &run_dir, args.json, args.max_memory)?;
        return Ok(ExitCode::SUCCESS);
    }
    let opts = shrink_pipeline::RunOptions {
        pipeline_file: args.file.clone(),
        run_dir: Some(run_dir),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        max_memory_bytes: args.max_memory,
    };
    if world.rank() > 0 {
        shrink_pipeline::follow(world, &pipeline, &opts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bar = progress::Bar::new();
    let log = |line: &str| {
        bar.suspend(|| eprintln!("{line}"));
    };
    if world.size() > 1 {
        let sweep = match pipeline.sweep {
            Some(_) => " and deal out the sweep's variants",
            None => "",
        };
        log(&format!(
            "{} MPI processes split the stages that calibrate block by block and the \
             evaluations{sweep}",
            world.size()
        ));
    }
    let outcome = shrink_pipeline::run_in(world, &pipeline, &opts, &bar, &log)?;
    let r = &outcome.report;
    let dir = outcome.run_dir.display().to_string();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&outcome.summary())?);
    } else {
        // Encoders are measured by their sentence embeddings, decoders by perplexity.
        let encoder = r.rows.iter().any(|m| m.embedding_cosine.is_some())
            || r.rows.first().is_some_and(|m| !m.perplexity.is_finite());
        let (quality, fidelity) = if encoder {
            (("cosine", "top-10"), ("pseudo-ppl", "tok/s"))
        } else {
            (("ppl", "Δppl"), ("KL", "top-1"))
        };
        outln!(
            "{:<28} {:>10} {:>8} {:>10} {:>7} {:>9} {:>6} {:>9} {:>8}",
            "model",
            quality.0,
            quality.1,
            fidelity.0,
            fidelity.1,
            "size MB",
            "bpw",
            "ms/token",
            "stage s"
        );
        for m in &r.rows {
            let opt = |v: Option<f64>, scale: f64, digits: usize| {
                v.filter(|v| v.is_finite())
                    .map_or("-".to_string(), |v| format!("{:.*}", digits, v * scale))
            };
            let cells = if encoder {
                [
                    opt(m.embedding_cosine, 1.0, 5),
                    opt(m.neighbour_agreement, 100.0, 1) + "%",
                    opt(Some(m.perplexity), 1.0, 3),
                    opt(Some(m.eval_tokens_per_s), 1.0, 0),
                ]
            } else {
                [
                    opt(Some(m.perplexity), 1.0, 4),
                    opt(Some(m.ppl_increase_pct), 1.0, 2) + "%",
                    opt(m.kl_mean, 1.0, 5),
                    opt(m.top1_agreement, 100.0, 1) + "%",
                ]
            };
            outln!(
                "{:<28} {:>10} {:>8} {:>10} {:>7} {:>9.1} {:>6.3} {:>9} {:>8}",
                m.name,
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                m.size_bytes as f64 / 1e6,
                m.bits_per_weight,
                opt(m.decode.as_ref().map(|d| d.decode_ms_per_token), 1.0, 1)
                    + if loaded(m) { "*" } else { "" },
                if m.kind == "baseline" {
                    "-".to_string()
                } else if m.cached {
                    "reused".to_string()
                } else {
                    format!("{:.1}", m.stage_wall_s)
                }
            );
        }
        if let Some(note) = r.rows.iter().find(|m| loaded(m)).and_then(|m| {
            let d = m.decode.as_ref().and_then(|d| d.load);
            d.or(m.eval_load).and_then(|l| l.note())
        }) {
            outln!("* speed measured {note}");
        }
        if let Some(s) = &r.sweep {
            outln!("pareto      {} (size vs perplexity)", s.pareto.join(" → "));
        }
        for g in &r.gates {
            outln!(
                "gate        {} {} on {}: {}",
                if g.passed { "passed" } else { "FAILED" },
                g.gate,
                g.model,
                g.message
            );
        }
        outln!("model       {dir}/model ({})", r.exported.join(", "));
        outln!("report      {dir}/report.html (also report.md, report.json)");
        outln!("time        {:.1} s", r.wall_s);
    }
    if outcome.passed {
        Ok(ExitCode::SUCCESS)
    } else {
        let failed: Vec<String> = r
            .gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| format!("{} on {} ({})", g.gate, g.model, g.message))
            .collect();
        eprintln!("error: quality gates failed: {}", failed.join("; "));
        Ok(ExitCode::from(GATES_FAILED))
    }
}

/// Whether a row's speed figures were measured under load (`shrink_core::MachineLoad`).
fn loaded(m: &shrink_pipeline::report::ModelRow) -> bool {
    let decode = m.decode.as_ref().and_then(|d| d.load);
    [decode, m.eval_load]
        .iter()
        .flatten()
        .any(|l| l.under_load())
}
