//! `shrink convert`: Conversion between GGUF and Hugging Face folders.

use super::inspect::human_count;
use crate::common::{check_output, load_checkpoint};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ConvertTarget {
    Hf,
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum FloatType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Args)]
pub(crate) struct ConvertArgs {
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

pub(crate) fn run(args: ConvertArgs) -> Result<()> {
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
