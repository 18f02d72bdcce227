//! `shrink tokenize`: A model's tokenizer on a text.

use crate::common::{load_checkpoint, read_text};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub(crate) struct TokenizeArgs {
    model: String,
    /// DATASET:SPLIT (e.g. shakespeare:eval) or a file path.
    #[arg(long)]
    text: String,
    /// Print only the number of tokens.
    #[arg(long)]
    count: bool,
}

pub(crate) fn run(args: TokenizeArgs) -> Result<()> {
    let checkpoint = load_checkpoint(&args.model)?;
    let ids = checkpoint
        .tokenizer()?
        .encode(&read_text(&args.text)?, false)?;
    if args.count {
        outln!("{}", ids.len());
    } else {
        let line: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        outln!("{}", line.join(" "));
    }
    Ok(())
}
