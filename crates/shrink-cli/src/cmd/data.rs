//! `shrink data`: Fetch and locate datasets and demo models.

use crate::common::fetch_with_message;
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum DataCommand {
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

pub(crate) fn run(cmd: DataCommand) -> Result<()> {
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
            // Texts joined by `+`: every part's files, in order.
            for part in name.split('+') {
                let (dataset, split) = match part.split_once(':') {
                    Some((d, s)) => (d.to_string(), Some(s.to_string())),
                    None => (part.to_string(), None),
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
    }
    Ok(())
}
