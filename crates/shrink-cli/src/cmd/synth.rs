//! `shrink synth`: a random-weight model with the exact shapes of a real one, written as sharded
//! bf16 safetensors with a config and a byte-level BPE tokenizer of the same vocabulary size,
//! tensor by tensor (nothing but the tensor being written is held). Random weights make quality
//! meaningless but memory and time real: the scaling benchmarks run on it.

use anyhow::{bail, Context, Result};
use clap::Args;
use shrink_io::{Checkpoint, GgufVocab, SafetensorsEntry, TokenizerBundle};
use shrink_models::ModelConfig;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct SynthArgs {
    /// The shape: `llama3-8b` (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
    /// 128,256), `small-llama` (8 layers, hidden 256, MLP 768) or `tiny-llama` (2 layers, hidden
    /// 64); the last two for tests.
    shape: String,
    /// The number of blocks, if not the shape's own (every tensor keeps its shape).
    #[arg(long)]
    layers: Option<usize>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard, in MB (Hugging Face's default: 5,000).
    #[arg(long, default_value_t = 5_000)]
    max_shard_mb: u64,
    /// The Hugging Face folder to write.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// The most blocks `--layers` asks for.
const MAX_LAYERS: usize = 1024;

/// `(config, control tokens)` of a shape.
fn shape(name: &str) -> Result<(serde_json::Value, usize)> {
    let (h, i, layers, heads, kv, vocab, specials) = match name {
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128_256, 256),
        "tiny-llama" => (64, 128, 2, 4, 2, 512, 2),
        "small-llama" => (256, 768, 8, 4, 2, 512, 2),
        other => bail!("unknown shape '{other}' (llama3-8b, small-llama, tiny-llama)"),
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": h / heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "_name_or_path": format!("shrink-synth-{name}"),
    });
    Ok((config, specials))
}

/// A byte-level BPE vocabulary of `size` tokens (llama.cpp's `llama-bpe` pre-tokenizer):
/// `specials` control tokens, the 256 bytes, then merges of byte pairs and of pairs with a byte.
fn vocabulary(size: usize, specials: usize) -> Result<GgufVocab> {
    let names: Vec<String> = (0..specials)
        .map(|i| match i {
            0 => "<|begin_of_text|>".to_string(),
            1 => "<|end_of_text|>".to_string(),
            i => format!("<|reserved_special_token_{}|>", i - 2),
        })
        .collect();
    let specials: Vec<&str> = names.iter().map(String::as_str).collect();
    let base = GgufVocab::byte_level(&specials, &[], Some("llama-bpe"));
    let bytes: Vec<&String> = base.tokens[specials.len()..].iter().collect();
    let wanted = size
        .checked_sub(specials.len() + bytes.len())
        .context("vocabulary smaller than its bytes and control tokens")?;
    let mut merges: Vec<String> = Vec::with_capacity(wanted);
    'pairs: for a in &bytes {
        for b in &bytes {
            if merges.len() == wanted {
                break 'pairs;
            }
            merges.push(format!("{a} {b}"));
        }
    }
    let pairs = merges.len();
    'triples: for p in 0..pairs {
        let pair = merges[p].replace(' ', "");
        for b in &bytes {
            if merges.len() == wanted {
                break 'triples;
            }
            merges.push(format!("{pair} {b}"));
        }
    }
    let merges: Vec<&str> = merges.iter().map(String::as_str).collect();
    Ok(GgufVocab::byte_level(&specials, &merges, Some("llama-bpe")))
}

/// The values of tensor `name`: uniform with standard deviation 0.02 for matrices, 1 for norms,
/// from a generator seeded by `seed` and the name (so any tensor can be made alone).
fn values(name: &str, elems: usize, seed: u64, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(elems * 2);
    if name.ends_with("norm.weight") {
        let one = half::bf16::from_f32(1.0).to_le_bytes();
        (0..elems).for_each(|_| out.extend(one));
        return;
    }
    // SplitMix64 over the seed and an FNV-1a hash of the name.
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let half_width = 0.02 * 3f32.sqrt();
    for _ in 0..elems {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        out.extend(half::bf16::from_f32((2.0 * u - 1.0) * half_width).to_le_bytes());
    }
}

pub(crate) fn run(args: SynthArgs) -> Result<()> {
    let (mut config, specials) = shape(&args.shape)?;
    if let Some(layers) = args.layers {
        if !(1..=MAX_LAYERS).contains(&layers) {
            bail!("--layers {layers}: expected 1 to {MAX_LAYERS}");
        }
        config["num_hidden_layers"] = layers.into();
    }
    let cfg = ModelConfig::from_json(&config)?;
    let vocab = vocabulary(cfg.vocab_size, specials)?;
    let tokenizer = TokenizerBundle::from_gguf_vocab(
        Path::new(&args.shape),
        vocab,
        Some(0),
        Some(1),
        true,
        None,
    )?;
    let checkpoint = Checkpoint {
        path: PathBuf::from(&args.shape),
        format: shrink_io::Format::HfFolder,
        config: config.clone(),
        tensors: Default::default(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let plan: Vec<SafetensorsEntry> = cfg
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| SafetensorsEntry {
            name,
            dtype: safetensors::Dtype::BF16,
            shape,
        })
        .collect();
    let total: u64 = plan.iter().map(SafetensorsEntry::bytes).sum();
    let staged = shrink_core::AtomicDir::new(&args.out)?;
    let dir = staged.path().to_path_buf();
    shrink_io::save_hf_files(&checkpoint, &dir, &config)?;
    shrink_core::atomic_write(
        &dir.join("config.json"),
        (serde_json::to_string_pretty(&config)? + "\n").as_bytes(),
    )?;
    let mut writer =
        shrink_io::ShardedWriter::create(&dir, plan.clone(), args.max_shard_mb * 1_000_000)?;
    let bar = crate::progress::Bar::new();
    use shrink_core::Progress;
    bar.start("writing tensors", total);
    let mut data = Vec::new();
    for entry in &plan {
        let elems = entry.shape.iter().product();
        values(&entry.name, elems, args.seed, &mut data);
        writer.append(&entry.name, &data)?;
        bar.advance(data.len() as u64, Some(&entry.name));
    }
    bar.finish();
    let files = writer.finish()?;
    staged.commit()?;
    outln!(
        "shape        {} ({} blocks)",
        args.shape,
        cfg.num_hidden_layers
    );
    outln!(
        "wrote        {} ({} tensors, {:.2} GB of bf16 in {} file{})",
        args.out.display(),
        plan.len(),
        total as f64 / 1e9,
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
