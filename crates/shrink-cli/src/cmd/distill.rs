//! `shrink distill`: Distillation and quantization-aware training.

use crate::common::{calibration_windows, check_output, load_f32_model, pattern_pairs, read_text};
use crate::progress;
use anyhow::{bail, Context, Result};
use clap::Args;
use shrink_io::Checkpoint;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct DistillArgs {
    /// The teacher: a GGUF file, a Hugging Face folder or a demo model name.
    teacher: String,
    /// Student: a model file or folder (e.g. the output of `shrink prune --method layers`).
    #[arg(long, conflicts_with_all = ["layers", "student_config"])]
    student: Option<String>,
    /// Student: the teacher's layers at these positions (`0,2,4`, `0-7`, `every:2`).
    #[arg(long, conflicts_with = "student_config")]
    layers: Option<String>,
    /// Student: random weights with the teacher's config and these shape keys changed, e.g.
    /// `--student-config num_hidden_layers=6 --student-config hidden_size=384`.
    #[arg(long = "student-config", value_name = "KEY=VALUE")]
    student_config: Vec<String>,
    /// forward-kl or reverse-kl.
    #[arg(long, default_value = "forward-kl")]
    loss: String,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Weight of cross-entropy on the text (the KL gets 1 − alpha).
    #[arg(long, default_value_t = 0.0)]
    alpha: f64,
    /// Hidden-state pairs STUDENT:TEACHER (`0:1,7:14`), or `auto` with --layers.
    #[arg(long)]
    hidden: Option<String>,
    /// mse or cosine.
    #[arg(long, default_value = "mse")]
    hidden_loss: String,
    #[arg(long, default_value_t = 1.0)]
    hidden_weight: f64,
    /// MiniLM attention transfer between layers STUDENT:TEACHER.
    #[arg(long)]
    attention: Option<String>,
    #[arg(long, default_value_t = 1.0)]
    attention_weight: f64,
    /// Keep tensors whose name matches PATTERN frozen; repeatable (`--freeze embed_tokens`).
    #[arg(long, value_name = "PATTERN")]
    freeze: Vec<String>,
    /// Cache the teacher's top-K log-probabilities per token on disk (logit losses only).
    #[arg(long)]
    top_k: Option<usize>,
    /// Quantization-aware training instead of a smaller student: quantize the teacher to this
    /// preset or block type (q4_k_m, q4_0, …), then train the quantized model against the
    /// original (straight-through estimator, LSQ scales) and write it packed.
    #[arg(long, value_name = "PRESET|TYPE", conflicts_with_all = ["student", "layers", "student_config"])]
    qat: Option<String>,
    /// QAT: how the initial codes are chosen (gptq or rtn).
    #[arg(long, default_value = "gptq")]
    qat_init: String,
    /// QAT: keep the initial scales instead of learning them (LSQ; in the k-quants the
    /// super-block and group scales and minima, in IQ4_XS the super-block and group scales, in
    /// IQ4_NL the block scales).
    #[arg(long)]
    fixed_scales: bool,
    /// QAT: also fake-quantize the linears' input activations (int8-per-token).
    #[arg(long)]
    activations: Option<String>,
    /// QAT: calibration text for GPTQ's initial codes [default: as `shrink quantize`'s].
    #[arg(long, default_value = shrink_data::DEFAULT_CALIB, hide_default_value = true)]
    calib: String,
    /// QAT: calibration windows of 512 tokens.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    /// Training text: DATASET:SPLIT or a file.
    #[arg(long, default_value = "shakespeare:train")]
    train: String,
    /// Held-out text for the periodic evaluation.
    #[arg(long, default_value = "shakespeare:eval")]
    eval: String,
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    accumulation: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 disables it).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    #[arg(long, default_value_t = 8)]
    eval_windows: usize,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hold every block's activations for the backward pass instead of recomputing them block
    /// by block (faster, about three times the memory).
    #[arg(long)]
    no_recompute: bool,
    /// gguf or hf [default: gguf].
    #[arg(long)]
    format: Option<String>,
    /// f32 or f16 [default: f32].
    #[arg(long)]
    dtype: Option<String>,
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Print the summary and the training log as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: DistillArgs) -> Result<()> {
    use shrink_pipeline::distill::{self as d, DistillRequest, StudentInit, TrainKeys};
    let student = if let Some(spec) = &args.layers {
        StudentInit::Layers(spec.clone())
    } else if !args.student_config.is_empty() {
        let mut keys = std::collections::BTreeMap::new();
        for (k, v) in pattern_pairs(&args.student_config, "VALUE", "num_hidden_layers=6")? {
            let n: usize = v
                .parse()
                .with_context(|| format!("--student-config {k}={v}: not a whole number"))?;
            keys.insert(k, n);
        }
        StudentInit::Random(keys)
    } else {
        StudentInit::Model
    };
    let request = DistillRequest {
        student,
        loss: args.loss.clone(),
        temperature: args.temperature,
        alpha: args.alpha,
        hidden: args.hidden.clone(),
        hidden_loss: args.hidden_loss.clone(),
        hidden_weight: args.hidden_weight,
        attention: args.attention.clone(),
        attention_weight: args.attention_weight,
        freeze: args.freeze.clone(),
        top_k: args.top_k,
        train: TrainKeys {
            steps: args.steps,
            batch: args.batch,
            accumulation: args.accumulation,
            seq_len: args.seq_len,
            lr: args.lr,
            warmup: args.warmup,
            min_lr_ratio: args.min_lr_ratio,
            weight_decay: args.weight_decay,
            clip: args.clip,
            eval_every: args.eval_every,
            eval_windows: args.eval_windows,
            checkpoint_every: args.checkpoint_every,
            seed: args.seed,
            recompute: !args.no_recompute,
        },
        format: args.format.clone(),
        dtype: args.dtype.clone(),
    };
    for model in std::iter::once(&args.teacher).chain(&args.student) {
        check_output(model, &args.out)?;
    }
    if let Some(target) = &args.qat {
        return qat(&args, target, request);
    }
    if request.student == StudentInit::Model && args.student.is_none() {
        bail!("no student: give --student MODEL, --layers LIST or --student-config KEY=VALUE");
    }
    let mut resolved = request.resolve()?;
    let start = Instant::now();
    let (checkpoint, _, teacher) = load_f32_model(&args.teacher)?;
    let given = match &args.student {
        Some(spec) => Some(load_f32_model(spec)?),
        None => None,
    };
    let student = d::build_student(
        &request,
        &mut resolved,
        &teacher,
        given.as_ref().map(|g| &g.2),
    )?;
    let given_path = given.map(|g| g.0.path);
    let [windows, eval] = training_windows(&checkpoint, &args)?;
    let mut sources = vec![checkpoint.path.as_path()];
    if let Some(p) = &given_path {
        sources.push(p.as_path());
    }
    let fingerprint = d::fingerprint(&request, &sources, &windows);
    let workdir = PathBuf::from(format!("{}.distill", args.out.display()));
    let bar = progress::Bar::new();
    let (_, outcome) = shrink_pipeline::distill_and_write(
        &checkpoint,
        &teacher,
        student,
        &resolved,
        &windows,
        &eval,
        &workdir,
        &fingerprint,
        &args.out,
        &bar,
    )?;
    let log_path = write_log(&workdir, &outcome)?;
    let wall_s = start.elapsed().as_secs_f64();
    let t = &outcome.training;
    if args.json {
        #[derive(serde::Serialize)]
        struct Distilled<'a> {
            outcome: &'a shrink_pipeline::distill::DistillOutcome,
        }
        let summary = Summary {
            schema: "shrink.distill/v1",
            source: Source::Teacher(checkpoint.path.display().to_string()),
            out: args.out.display().to_string(),
            request: &request,
            result: Distilled { outcome: &outcome },
            wall_s,
        };
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!(
        "teacher      {} ({} parameters)",
        checkpoint.path.display(),
        outcome.parameters_teacher
    );
    outln!("student      {} parameters", outcome.parameters_student);
    outln!(
        "data         {}: {} windows × {} tokens; eval {}: {} windows",
        args.train,
        windows.len(),
        args.seq_len,
        args.eval,
        eval.len()
    );
    print_training(t);
    outln!(
        "wrote        {} (log: {})",
        args.out.display(),
        log_path.display()
    );
    outln!("time         {wall_s:.1} s");
    Ok(())
}

/// The JSON summary of `shrink distill` (schema `shrink.distill/v1`) and of `--qat`
/// (`shrink.qat/v1`).
#[derive(serde::Serialize)]
struct Summary<'a, R, T> {
    schema: &'static str,
    #[serde(flatten)]
    source: Source,
    out: String,
    request: &'a R,
    #[serde(flatten)]
    result: T,
    wall_s: f64,
}

/// The model trained: distillation's teacher, or the model QAT quantizes.
#[derive(serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Source {
    Teacher(String),
    Model(String),
}

/// Writes a training run's log beside its checkpoints (`WORKDIR/log.json`); returns its path.
fn write_log(workdir: &std::path::Path, log: &impl serde::Serialize) -> Result<PathBuf> {
    let path = workdir.join("log.json");
    shrink_core::atomic_write(&path, &serde_json::to_vec_pretty(log)?)?;
    Ok(path)
}

/// The resumed step, held-out metrics and throughput of a training run.
fn print_training(t: &shrink_train::TrainOutcome) {
    if let Some(step) = t.resumed_from {
        outln!("resumed      from step {step}");
    }
    for (step, metrics) in &t.log.eval {
        let text: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        outln!("eval @ {step:<5} {}", text.join(", "));
    }
    outln!(
        "trained      {} steps, {} tokens, {:.1} tokens/s (teacher forward included)",
        t.steps,
        t.log.tokens,
        t.tokens_per_s
    );
}

/// The training windows (all of `--train`) and held-out windows (the first `--eval-windows` of
/// `--eval`) of `--seq-len` tokens.
fn training_windows(checkpoint: &Checkpoint, args: &DistillArgs) -> Result<[Vec<Vec<u32>>; 2]> {
    use shrink_pipeline::encoder::training_windows;
    let tokenizer = checkpoint.tokenizer()?;
    let train = tokenizer.encode(&read_text(&args.train)?, false)?;
    let eval = tokenizer.encode(&read_text(&args.eval)?, false)?;
    Ok([
        training_windows(checkpoint, &train, args.seq_len, None)?,
        training_windows(checkpoint, &eval, args.seq_len, Some(args.eval_windows))?,
    ])
}

/// `shrink distill --qat`: quantization-aware training of the teacher itself.
fn qat(args: &DistillArgs, target: &str, request: shrink_pipeline::DistillRequest) -> Result<()> {
    use shrink_pipeline::{distill as d, qat::QatRequest};
    let preset = shrink_pipeline::PresetChoice::load(target).ok();
    let quantize = shrink_pipeline::QuantizeRequest {
        format: preset.is_none().then(|| target.to_string()),
        preset,
        method: Some(match args.qat_init.as_str() {
            "gptq" | "rtn" => shrink_pipeline::QuantMethod::parse(&args.qat_init)?,
            other => anyhow::bail!("--qat-init {other}: expected gptq or rtn"),
        }),
        activations: args.activations.clone(),
        ..Default::default()
    };
    let qat = QatRequest {
        loss: request.loss.clone(),
        temperature: request.temperature,
        alpha: request.alpha,
        freeze: (!args.freeze.is_empty()).then(|| args.freeze.clone()),
        learn_scales: !args.fixed_scales,
        train: request.train.clone(),
        ..QatRequest::new(quantize)
    };
    let resolved = qat.resolve()?;
    let start = Instant::now();
    let (checkpoint, size_before, mut model) = load_f32_model(&args.teacher)?;
    let calibration = if resolved.quantize.calibrates {
        Some(calibration_windows(
            &checkpoint,
            &args.calib,
            args.calib_samples,
            512,
            args.seed,
            4,
        )?)
    } else {
        None
    };
    let [windows, eval] = training_windows(&checkpoint, args)?;
    let fingerprint = d::fingerprint(&qat, &[checkpoint.path.as_path()], &windows);
    let workdir = PathBuf::from(format!("{}.qat", args.out.display()));
    let bar = progress::Bar::new();
    let (outcome, training) = shrink_pipeline::qat_and_write(
        &checkpoint,
        &mut model,
        &resolved,
        calibration.as_deref(),
        8,
        &windows,
        &eval,
        &workdir,
        &fingerprint,
        &args.out,
        &bar,
    )?;
    let log_path = write_log(&workdir, &training)?;
    let after = shrink_io::inspect(&args.out)?;
    let wall_s = start.elapsed().as_secs_f64();
    if args.json {
        #[derive(serde::Serialize)]
        struct Trained<'a> {
            quantization: &'a shrink_pipeline::QuantizeOutcome,
            training: &'a shrink_train::TrainOutcome,
            size_bytes_before: u64,
            size_bytes_after: u64,
        }
        let result = Trained {
            quantization: &outcome,
            training: &training,
            size_bytes_before: size_before.file_size_bytes,
            size_bytes_after: after.file_size_bytes,
        };
        let summary = Summary {
            schema: "shrink.qat/v1",
            source: Source::Model(checkpoint.path.display().to_string()),
            out: args.out.display().to_string(),
            request: &qat,
            result,
            wall_s,
        };
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("model        {}", checkpoint.path.display());
    outln!("method       {}", outcome.method);
    outln!(
        "bits/weight  {:.3} over the quantized linears",
        outcome.linear_bits_per_weight
    );
    print_training(&training);
    outln!(
        "wrote        {} ({:.1} MB; log: {})",
        args.out.display(),
        after.file_size_bytes as f64 / 1e6,
        log_path.display()
    );
    outln!("time         {wall_s:.1} s");
    Ok(())
}
