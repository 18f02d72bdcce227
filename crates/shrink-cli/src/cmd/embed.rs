//! `shrink embed`: Sentence embeddings from an encoder.

use crate::common::{build_llama, load_checkpoint, read_text};
use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;

#[derive(Args)]
pub(crate) struct EmbedArgs {
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
}

pub(crate) fn run(args: EmbedArgs) -> Result<()> {
    let EmbedArgs {
        model: model_spec,
        sentences,
        text,
        count,
        json,
    } = args;
    let checkpoint = load_checkpoint(&model_spec)?;
    let model = build_llama(&checkpoint, DType::F32)?;
    let tokens = match text.as_deref() {
        Some(spec) => {
            shrink_pipeline::encoder::sentence_tokens(&checkpoint, &read_text(spec)?, count)?
        }
        None if sentences.is_empty() => bail!("give sentences to embed, or --text"),
        None => shrink_pipeline::encoder::encode_sentences(&checkpoint, &sentences)?,
    };
    let pooling = shrink_pipeline::encoder::pooling_of(&checkpoint)?;
    let vectors = shrink_eval::embed(&model, &pooling, &tokens, 32, &shrink_core::NoProgress)?;
    if json {
        #[derive(serde::Serialize)]
        struct Sentence<'a> {
            tokens: &'a [u32],
            /// Widened to f64, as the summary has always printed them.
            embedding: Vec<f64>,
        }
        #[derive(serde::Serialize)]
        struct Embeddings<'a, P> {
            pooling: &'a P,
            sentences: Vec<Sentence<'a>>,
        }
        let sentences = tokens
            .iter()
            .zip(&vectors)
            .map(|(tokens, v)| Sentence {
                tokens,
                embedding: v.iter().map(|&x| f64::from(x)).collect(),
            })
            .collect();
        let summary = Embeddings {
            pooling: &pooling,
            sentences,
        };
        outln!("{}", serde_json::to_string(&summary)?);
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
