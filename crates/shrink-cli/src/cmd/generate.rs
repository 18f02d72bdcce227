//! `shrink generate`: Text generation with a KV cache.

use crate::common::{build_runnable, load_checkpoint, multiplies_packed, ComputeType};
use anyhow::{bail, Result};
use clap::Args;
use shrink_models::{Sampler, SamplingConfig};
use std::io::Write;

#[derive(Args)]
pub(crate) struct GenerateArgs {
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
    /// Multiply a GGUF's quantized weights in f32 after dequantizing them, instead of as
    /// llama.cpp does (8-bit activations, integer dot products, f16 keys and values).
    #[arg(long)]
    dequantize: bool,
}

pub(crate) fn run(args: GenerateArgs) -> Result<()> {
    let checkpoint = load_checkpoint(&args.model)?;
    let tok = checkpoint.tokenizer()?;
    if args.chat && tok.chat_template.is_none() {
        bail!("--chat: the model has no chat template in its tokenizer metadata");
    }
    let ids = shrink_pipeline::prompt_tokens(tok, &args.prompt, args.chat)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let dtype = args.dtype.dtype();
    let model = build_runnable(
        &checkpoint,
        dtype,
        multiplies_packed(dtype, args.dequantize),
    )?;
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
            let text = tok.decode(generated, false)?;
            // Print only complete characters: a byte-level token may end mid-character.
            if !text.ends_with('\u{FFFD}') {
                let mut out = stdout.lock();
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
            Ok::<(), anyhow::Error>(())
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
