//! `shrink eval`: Perplexity and fidelity (decoders), embedding fidelity (encoders).

use super::inspect::human_count;
use crate::common::{build_runnable, load_checkpoint, multiplies_packed, read_text, ComputeType};
use crate::progress;
use anyhow::Result;
use clap::Args;
use shrink_eval::{EvalConfig, Protocol, ScoredLogits};
use shrink_io::Checkpoint;
use shrink_models::Transformer;
use std::path::Path;

#[derive(Args)]
pub(crate) struct EvalArgs {
    model: String,
    /// DATASET:SPLIT (e.g. shakespeare:eval) or a text file.
    #[arg(long, default_value = "shakespeare:eval")]
    text: String,
    /// llama-cpp (what llama-perplexity scores) or full (every token after the first).
    #[arg(long, default_value = "llama-cpp")]
    protocol: String,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// At most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Chunks per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// A reference model for KL divergence and top-1 agreement (encoders: embedding cosine and
    /// top-10 neighbour agreement).
    #[arg(long)]
    reference: Option<String>,
    /// Encoders: held-out sentences of --text to embed.
    #[arg(long, default_value_t = 512)]
    sentences: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeType,
    /// Read the model (and reference) block by block from the checkpoint instead of building it
    /// whole (Llama-family decoders): the same scores, with one block in memory at a time.
    /// Chosen by itself when the models built whole would not fit in the machine's memory.
    #[arg(long)]
    stream: bool,
    /// Multiply a GGUF's quantized weights in f32 after dequantizing them, instead of as
    /// llama.cpp does (activations rounded to 8-bit blocks, integer dot products), which is what
    /// `llama-perplexity` scores.
    #[arg(long)]
    dequantize: bool,
    /// Also save the scored positions' log-probabilities to this file, in the format of
    /// `llama-perplexity --kl-divergence-base` (for `--kl-base` here or `llama-perplexity
    /// --kl-divergence` later; ~(ctx/2)·vocab·2 bytes a chunk).
    #[arg(long, value_name = "FILE", conflicts_with = "kl_base")]
    save_kl_base: Option<String>,
    /// Score against base log-probabilities saved by `--save-kl-base` or by `llama-perplexity
    /// --kl-divergence-base`: the text, ctx and chunks are the file's, and the statistics are
    /// `llama-perplexity --kl-divergence`'s (KL percentiles, Δp, same top token).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["reference", "text", "ctx"])]
    kl_base: Option<String>,
    /// Also score a zero-shot multiple-choice task as lm-evaluation-harness does (accuracy and
    /// length-normalized accuracy): `hellaswag`, `piqa`, `arc_easy` or `arc_challenge` (the
    /// `olmo-tasks` dataset), `NAME:DOCS` for its first DOCS documents, or `NAME=FILE[:DOCS]` for
    /// an OLMES request file of that task's format; repeatable.
    #[arg(long = "task", value_name = "TASK")]
    pub tasks: Vec<String>,
    /// Print the report as JSON (schema shrink.eval/v1; encoders shrink.eval-encoder/v1).
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    /// What was evaluated: the text, or the tokens of the base file scored against.
    fn text_label(&self) -> String {
        match &self.kl_base {
            Some(base) => format!("the tokens of {base}"),
            None => self.text.clone(),
        }
    }
}

/// Evaluates; under `mpirun -n N` the ranks share the chunks out (rank `k mod N` runs batch `k`)
/// and rank 0 alone prints the report, one process's figures.
pub(crate) fn run(args: EvalArgs, world: &dyn shrink_core::Collective) -> Result<()> {
    let protocol: Protocol = args.protocol.parse()?;
    // Rank 0 fetches a demo model, the reference and the text; the others then find them cached.
    if world.size() > 1 {
        if world.rank() == 0 {
            crate::common::resolve_model(&args.model)?;
            if let Some(reference) = &args.reference {
                crate::common::resolve_model(reference)?;
            }
            read_text(&args.text)?;
        }
        world.broadcast(0, &mut [0]);
    }
    let checkpoint = load_checkpoint(&args.model)?;
    let encoder = shrink_pipeline::encoder::is_encoder(&checkpoint)?;
    if encoder && world.size() > 1 {
        anyhow::bail!(
            "started as one of {} MPI processes: an encoder's evaluation does not split across \
             processes; run it as one process",
            world.size()
        );
    }
    let base = args
        .kl_base
        .as_deref()
        .map(|p| shrink_eval::BaseLogits::open(Path::new(p)))
        .transpose()?;
    let kl_job = base.is_some() || args.save_kl_base.is_some();
    if kl_job && (encoder || protocol != Protocol::LlamaCpp || world.size() > 1) {
        anyhow::bail!(
            "--kl-base and --save-kl-base score a decoder by llama.cpp's protocol in one process \
             (not an encoder, --protocol full or MPI)"
        );
    }
    let text = match base {
        Some(_) => String::new(),
        None => read_text(&args.text)?,
    };
    // As llama-perplexity: special-token text is not parsed; BOS only if the model adds one.
    let (tokens, bos) = match &base {
        _ if encoder => (vec![], None),
        None => shrink_pipeline::eval_tokens(&checkpoint, &text)?,
        Some(b) => {
            let bos = shrink_pipeline::eval_bos(&checkpoint)?;
            (b.text_tokens(bos)?.to_vec(), bos)
        }
    };
    let cfg = match &base {
        None => EvalConfig {
            protocol,
            ctx: args.ctx,
            chunks: args.chunks,
            batch: args.batch,
        },
        Some(b) => EvalConfig {
            protocol,
            ctx: b.header.ctx,
            chunks: Some(
                args.chunks
                    .map_or(b.header.chunks, |c| c.min(b.header.chunks)),
            ),
            batch: args.batch,
        },
    };
    // What receives the scored logits: a base file being written or one scored against.
    let mut writer = match &args.save_kl_base {
        Some(path) => {
            let llama: Vec<u32> = bos.into_iter().chain(tokens.iter().copied()).collect();
            let chunks = (llama.len() / cfg.ctx).min(cfg.chunks.unwrap_or(usize::MAX));
            Some(shrink_eval::BaseWriter::new(
                Path::new(path),
                cfg.ctx,
                chunks,
                &llama,
            )?)
        }
        None => None,
    };
    let mut against = base.map(shrink_eval::KlAgainstBase::new);
    let mut nothing = shrink_eval::NoLogits;
    let visit: &mut dyn ScoredLogits = match (&mut writer, &mut against) {
        (Some(w), _) => w,
        (_, Some(k)) => k,
        _ => &mut nothing,
    };
    let reference_checkpoint = args.reference.as_deref().map(load_checkpoint).transpose()?;
    // Quantized GGUF weights are multiplied as llama.cpp multiplies them (f32 compute only).
    let integer = multiplies_packed(args.dtype.dtype(), args.dequantize);
    let bar = progress::Bar::new();
    let streams = shrink_pipeline::quantize::reads_block_by_block;
    let can_stream =
        !encoder && streams(&checkpoint) && reference_checkpoint.as_ref().is_none_or(streams);
    // Ranks on one machine share its memory.
    let limit = shrink_pipeline::memory::memory_limit(None) / world.ranks_on_this_machine() as u64;
    if args.stream && !can_stream {
        anyhow::bail!(
            "--stream: only Llama-family decoders without int8 activations (W8A8) are read block \
             by block"
        );
    }
    // Whether to read block by block, and whether that fits: rank 0's judgement, for every rank.
    let decide = || -> Result<bool> {
        let reference = reference_checkpoint.as_ref();
        let stream = can_stream
            && (args.stream || !fits_whole(&checkpoint, reference, args.dtype, integer, limit));
        if stream {
            check_streamed_memory(&checkpoint, reference, &tokens, &cfg, integer, world)?;
        }
        Ok(stream)
    };
    let stream = match world.size() {
        1 => decide()?,
        _ => {
            let mut decided = [0u8];
            if world.rank() == 0 {
                decided[0] = u8::from(decide()?);
            }
            world.broadcast(0, &mut decided);
            decided[0] == 1
        }
    };
    if !args.tasks.is_empty() && (encoder || world.size() > 1 || kl_job) {
        anyhow::bail!(
            "--task scores a decoder in one process, without --kl-base or --save-kl-base"
        );
    }
    let tasks = args
        .tasks
        .iter()
        .map(|spec| shrink_pipeline::task_requests(&checkpoint, spec).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let (report, parameters, streamed) = if stream {
        let dtype = args.dtype.dtype();
        let packed = |c: &Checkpoint, model: shrink_models::StreamedModel| match integer {
            true => model.multiplying_packed(c.packed_source()),
            false => model,
        };
        let mut model = packed(&checkpoint, checkpoint.streamed(dtype)?);
        let mut reference = reference_checkpoint
            .as_ref()
            .map(|r| r.streamed(dtype).map(|m| packed(r, m)))
            .transpose()?;
        let report = shrink_eval::evaluate_streamed_in(
            world,
            &mut model,
            reference.as_mut(),
            &tokens,
            bos,
            &cfg,
            visit,
            &bar,
        )?;
        let parameters =
            shrink_pipeline::memory::model_shape(&checkpoint.path).map_or(0, |s| s.parameters);
        let mut report = report;
        report.tasks = shrink_pipeline::score_tasks(&mut model, &tasks, args.batch * 4, &bar)?;
        (report, parameters, true)
    } else {
        let build = |c: &Checkpoint| build_runnable(c, args.dtype.dtype(), integer);
        let model = build(&checkpoint)?;
        let reference = reference_checkpoint.as_ref().map(build).transpose()?;
        if encoder {
            return eval_encoder(&args, &checkpoint, &text, &model, reference.as_ref());
        }
        let reference = reference.as_ref();
        let mut report =
            shrink_eval::evaluate_in(world, &model, reference, &tokens, bos, &cfg, visit, &bar)?;
        let mut model = model;
        report.tasks = shrink_pipeline::score_tasks(&mut model, &tasks, args.batch * 4, &bar)?;
        (report, model.num_parameters() as u64, false)
    };
    let mut report = report;
    if let Some(w) = writer {
        w.finish()?;
    }
    if let Some(k) = against {
        report.kl_base = Some(k.finish(report.chunks)?);
    }
    if world.rank() > 0 {
        return Ok(());
    }
    if args.json {
        return print_eval_json(&report, &checkpoint, &args, parameters);
    }
    let p = &report.perplexity;
    print_model(&checkpoint, parameters, "");
    outln!(
        "text        {} ({} tokens)",
        args.text_label(),
        report.tokens_in_text
    );
    outln!(
        "protocol    {}, ctx {}, {} chunks, batch {}",
        protocol,
        cfg.ctx,
        report.chunks,
        cfg.batch
    );
    outln!(
        "perplexity  {:.4} ± {:.4}   ({} tokens scored)",
        p.ppl,
        p.ppl_stderr,
        report.tokens_scored
    );
    if let Some(f) = &report.fidelity {
        outln!(
            "reference   {} (perplexity {:.4})",
            args.reference.as_deref().unwrap_or(""),
            f.reference_ppl
        );
        outln!(
            "KL(ref‖m)   {:.6} ± {:.6} nats/token (max {:.4})",
            f.kl_mean,
            f.kl_stderr,
            f.kl_max
        );
        outln!("top-1       {:.2}%", f.top1_agreement * 100.0);
    }
    if let Some(k) = &report.kl_base {
        print_kl(args.kl_base.as_deref().unwrap_or(""), k);
    }
    if let Some(path) = &args.save_kl_base {
        outln!("saved       base log-probabilities to {path}");
    }
    for t in &report.tasks {
        outln!(
            "{:<11} acc {:.2} ± {:.2}%, acc_norm {:.2} ± {:.2}%   ({} documents, zero-shot)",
            t.task,
            t.acc * 100.0,
            t.acc_stderr * 100.0,
            t.acc_norm * 100.0,
            t.acc_norm_stderr * 100.0,
            t.docs
        );
    }
    outln!(
        "time        {:.1} s, {:.1} tokens/s ({} tokens processed)",
        report.wall_s,
        report.tokens_per_s,
        report.tokens_processed
    );
    if let Some(note) = report.load.as_ref().and_then(|l| l.note()) {
        outln!("            {note}");
    }
    if streamed {
        outln!(
            "memory      peak RSS {:.2} GB (block by block)",
            shrink_pipeline::peak_rss_bytes() as f64 / 1e9
        );
    }
    Ok(())
}

/// Whether the model (and the reference) built whole in `dtype` fit in `limit` (this rank's
/// share of the machine's memory), with a quarter to spare for activations and logits.
fn fits_whole(
    checkpoint: &Checkpoint,
    reference: Option<&Checkpoint>,
    dtype: ComputeType,
    packed: bool,
    limit: u64,
) -> bool {
    let per_weight = dtype.dtype().size_in_bytes() as u64
        + if packed {
            shrink_pipeline::memory::PACKED_BYTES
        } else {
            0
        };
    let bytes = |c: &Checkpoint| {
        shrink_pipeline::memory::model_shape(&c.path).map_or(0, |s| s.parameters * per_weight)
    };
    let held = bytes(checkpoint) + reference.map_or(0, bytes);
    held + held / 4 < limit
}

/// Refuses a streamed evaluation estimated above this machine's memory
/// ([`shrink_pipeline::memory::streamed_eval_peak`]), shared by the ranks of `world` on it (each
/// holding its share of the chunks; judged by rank 0 for all, on its machine).
fn check_streamed_memory(
    checkpoint: &Checkpoint,
    reference: Option<&Checkpoint>,
    tokens: &[u32],
    cfg: &EvalConfig,
    packed: bool,
    world: &dyn shrink_core::Collective,
) -> Result<()> {
    let Some(shape) = shrink_pipeline::memory::model_shape(&checkpoint.path) else {
        return Ok(());
    };
    let all = shrink_pipeline::memory::eval_chunk_bound(tokens.len(), cfg.ctx, cfg.chunks);
    // A shorter last chunk runs as a batch of its own.
    let batches = (all.saturating_sub(1).div_ceil(cfg.batch as u64) + 1).min(all);
    let chunks = (batches.div_ceil(world.size() as u64) * cfg.batch as u64).min(all);
    let estimate = shrink_pipeline::memory::streamed_eval_peak(
        &shape,
        &shrink_pipeline::memory::StreamedEval {
            chunks,
            ctx: cfg.ctx as u64,
            scored: shrink_pipeline::memory::scored_per_chunk(cfg.protocol, cfg.ctx),
            batch: cfg.batch as u64,
            models: 1 + u64::from(reference.is_some()),
            widened_head_bytes: shrink_pipeline::memory::widened_head_bytes(
                std::iter::once(checkpoint).chain(reference),
            ),
            packed,
        },
    );
    // Ranks on one machine share its memory.
    let limit = shrink_pipeline::memory::memory_limit(None) / world.ranks_on_this_machine() as u64;
    if estimate > limit {
        anyhow::bail!(
            "evaluating block by block needs an estimated {:.1} GB ({chunks} chunks of {} \
             tokens, {} at a time, and each model's output head in f32), more than this \
             process's share of the machine's memory, {:.1} GB: lower --chunks, --ctx or --batch",
            estimate as f64 / 1e9,
            cfg.ctx,
            cfg.batch,
            limit as f64 / 1e9
        );
    }
    Ok(())
}

/// The summary's first line: the model and its parameter count (`note` follows the count).
/// The statistics as `llama-perplexity --kl-divergence` prints them.
fn print_kl(base: &str, k: &shrink_eval::KlReport) {
    let pm = |e: &shrink_eval::Estimate| format!("{:10.6} ± {:10.6}", e.value, e.uncertainty);
    outln!("against     {base} ({} positions)", k.positions);
    outln!("Mean PPL(Q)                   : {}", pm(&k.ppl));
    outln!("Mean PPL(base)                : {}", pm(&k.ppl_base));
    outln!(
        "Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%",
        100.0 * k.ln_ppl_correlation
    );
    outln!("Mean ln(PPL(Q)/PPL(base))     : {}", pm(&k.ln_ppl_ratio));
    outln!("Mean    KLD: {}", pm(&k.kld));
    for (label, v) in &k.kld_percentiles {
        outln!("{label:<8}KLD: {v:10.6}");
    }
    let pct = |e: &shrink_eval::Estimate| {
        format!("{:6.3} ± {:5.3} %", 100.0 * e.value, 100.0 * e.uncertainty)
    };
    outln!("Mean    Δp: {}", pct(&k.p_diff));
    for (label, v) in &k.p_diff_percentiles {
        outln!("{label:<8}Δp: {:6.3}%", 100.0 * v);
    }
    outln!("RMS Δp    : {}", pct(&k.p_diff_rms));
    outln!("Same top p: {}", pct(&k.same_top));
}

fn print_model(checkpoint: &Checkpoint, parameters: u64, note: &str) {
    outln!(
        "model       {} ({} parameters{note})",
        checkpoint.path.display(),
        human_count(parameters)
    );
}

/// An evaluation report as JSON, with what was evaluated on what.
pub(crate) fn print_eval_json(
    report: &impl serde::Serialize,
    checkpoint: &Checkpoint,
    args: &EvalArgs,
    parameters: u64,
) -> Result<()> {
    #[derive(serde::Serialize)]
    struct Summary<'a, R> {
        #[serde(flatten)]
        report: &'a R,
        model: String,
        text: String,
        reference: &'a Option<String>,
        parameters: u64,
    }
    let summary = Summary {
        report,
        model: checkpoint.path.display().to_string(),
        text: args.text_label(),
        reference: &args.reference,
        parameters,
    };
    outln!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `shrink eval` on an encoder: embedding fidelity, throughput, masked-LM scores.
pub(crate) fn eval_encoder(
    args: &EvalArgs,
    checkpoint: &Checkpoint,
    text: &str,
    model: &Transformer,
    reference: Option<&Transformer>,
) -> Result<()> {
    let bar = progress::Bar::new();
    let report = shrink_pipeline::encoder::evaluate_encoder(
        checkpoint,
        model,
        reference,
        text,
        args.sentences,
        // --batch counts decoder chunks; an encoder batch holds 8 short sentences per chunk.
        args.batch.max(1) * 8,
        &bar,
    )?;
    if args.json {
        return print_eval_json(&report, checkpoint, args, model.num_parameters() as u64);
    }
    print_model(checkpoint, model.num_parameters() as u64, ", encoder");
    outln!(
        "text        {} ({} sentences, {} tokens; pooling {})",
        args.text,
        report.sentences,
        report.tokens,
        report.pooling
    );
    if let Some(f) = &report.fidelity {
        outln!("reference   {}", args.reference.as_deref().unwrap_or(""));
        outln!(
            "cosine      {:.6} mean, {:.6} min",
            f.cosine_mean,
            f.cosine_min
        );
        outln!(
            "top-{}      {:.2}% neighbour agreement",
            f.neighbours,
            f.neighbour_agreement * 100.0
        );
    }
    if let Some(m) = &report.masked_lm {
        outln!(
            "masked LM   {:.2}% accuracy, pseudo-perplexity {:.4} ({} tokens)",
            m.accuracy * 100.0,
            m.pseudo_perplexity,
            m.tokens_scored
        );
    }
    outln!(
        "time        {:.1} s, {:.1} tokens/s, {:.1} sentences/s encoding",
        report.wall_s,
        report.encode_tokens_per_s,
        report.sentences_per_s
    );
    Ok(())
}
