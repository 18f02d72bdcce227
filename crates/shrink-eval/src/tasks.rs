//! Zero-shot multiple-choice tasks scored as lm-evaluation-harness scores them: each choice's
//! log-likelihood as a continuation of the context, accuracy (the most likely choice is the gold
//! one) and length-normalized accuracy (the log-likelihood divided by the choice's length in
//! characters). Requests are tokenized as the harness does: the context's trailing whitespace
//! moves to the continuation, `context + continuation` is encoded whole and the continuation is every token
//! after the context's own encoding.
//!
//! The documents come from OLMES request files (`requests.jsonl.gz`, one line per choice; the
//! unconditioned requests, `doc_id` ≥ 1,000,000, are skipped), formatted as the harness formats
//! its zero-shot tasks: HellaSwag's preprocessed context and endings as they are, PIQA as
//! `Question: {goal}\nAnswer:`, ARC as `Question: {question}\nAnswer:`.

use crate::{EvalError, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{BlockModel, NoHook};
use std::io::BufRead;
use std::path::Path;

/// The tasks shrink reads, by the name their request file is known by.
pub const TASKS: [&str; 4] = ["hellaswag", "piqa", "arc_easy", "arc_challenge"];

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct McDoc {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// A task's documents, in the file's order.
#[derive(Debug, Clone)]
pub struct McTask {
    pub name: String,
    pub docs: Vec<McDoc>,
}

#[derive(Deserialize)]
struct Request {
    doc_id: u64,
    doc: serde_json::Value,
}

impl McTask {
    /// Reads task `name` (one of [`TASKS`]) from its OLMES request file at `path`, keeping the
    /// first `limit` documents when given.
    pub fn read(name: &str, path: &Path, limit: Option<usize>) -> Result<Self> {
        if !TASKS.contains(&name) {
            return Err(EvalError::Task(format!(
                "unknown task '{name}' (known: {})",
                TASKS.join(", ")
            )));
        }
        let bad = |line: usize, message: String| {
            EvalError::Task(format!("{}: line {line}: {message}", path.display()))
        };
        let file = std::fs::File::open(path)
            .map_err(|e| EvalError::Task(format!("{}: {e}", path.display())))?;
        let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
        let mut docs = Vec::new();
        let mut last = None;
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| bad(i + 1, e.to_string()))?;
            let request: Request =
                serde_json::from_str(&line).map_err(|e| bad(i + 1, e.to_string()))?;
            if request.doc_id >= 1_000_000 || last == Some(request.doc_id) {
                continue; // unconditioned requests; the other choices of the last document
            }
            if limit.is_some_and(|l| docs.len() >= l) {
                break;
            }
            last = Some(request.doc_id);
            docs.push(format_doc(name, &request.doc).map_err(|m| bad(i + 1, m))?);
        }
        if docs.is_empty() {
            return Err(EvalError::Task(format!("{}: no documents", path.display())));
        }
        Ok(Self {
            name: name.to_string(),
            docs,
        })
    }

    /// Every choice of every document as a scoring request, tokenized by `encode` (which adds a
    /// BOS where the harness does: for Gemma only, its default for Hugging Face models).
    pub fn requests(&self, encode: &dyn Fn(&str) -> Result<Vec<u32>>) -> Result<Vec<McRequest>> {
        let mut out = Vec::new();
        for (d, doc) in self.docs.iter().enumerate() {
            for (c, choice) in doc.choices.iter().enumerate() {
                let continuation = format!(" {choice}");
                let trimmed = doc.context.trim_end();
                let moved = &doc.context[trimmed.len()..];
                let (context, continuation) = (trimmed, format!("{moved}{continuation}"));
                let context_ids = encode(context)?;
                let ids = encode(&format!("{context}{continuation}"))?;
                if ids.len() <= context_ids.len() || context_ids.is_empty() {
                    return Err(EvalError::Task(format!(
                        "{} document {d} choice {c}: the continuation adds no token after the context",
                        self.name
                    )));
                }
                out.push(McRequest {
                    doc: d,
                    choice: c,
                    context_len: context_ids.len(),
                    ids,
                });
            }
        }
        Ok(out)
    }

    /// Accuracy and length-normalized accuracy from each request's log-likelihood
    /// (`lls[i]` is `requests[i]`'s).
    pub fn report(&self, requests: &[McRequest], lls: &[f64]) -> TaskReport {
        let mut per_doc: Vec<Vec<f64>> = self
            .docs
            .iter()
            .map(|d| vec![f64::NEG_INFINITY; d.choices.len()])
            .collect();
        for (r, &ll) in requests.iter().zip(lls) {
            per_doc[r.doc][r.choice] = ll;
        }
        let first_max = |v: &[f64]| {
            v.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 {
                        (i, x)
                    } else {
                        best
                    }
                })
                .0
        };
        let (mut acc, mut acc_norm) = (Vec::new(), Vec::new());
        for (doc, lls) in self.docs.iter().zip(&per_doc) {
            let norm: Vec<f64> = lls
                .iter()
                .zip(&doc.choices)
                .map(|(ll, c)| ll / c.chars().count().max(1) as f64)
                .collect();
            acc.push(f64::from(first_max(lls) == doc.gold));
            acc_norm.push(f64::from(first_max(&norm) == doc.gold));
        }
        let (acc, acc_stderr) = mean_stderr(&acc);
        let (acc_norm, acc_norm_stderr) = mean_stderr(&acc_norm);
        TaskReport {
            task: self.name.clone(),
            docs: self.docs.len(),
            acc,
            acc_stderr,
            acc_norm,
            acc_norm_stderr,
        }
    }
}

/// The mean and its standard error (the sample standard deviation over √n, as the harness).
fn mean_stderr(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// A document of task `name` in the harness's zero-shot format.
fn format_doc(name: &str, doc: &serde_json::Value) -> std::result::Result<McDoc, String> {
    let text = |key: &str| -> std::result::Result<String, String> {
        doc.get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("the document has no text '{key}'"))
    };
    let index = |key: &str| -> std::result::Result<usize, String> {
        doc.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| format!("the document has no index '{key}'"))
    };
    let out = match name {
        "piqa" => McDoc {
            context: format!("Question: {}\nAnswer:", text("goal")?),
            choices: vec![text("sol1")?, text("sol2")?],
            gold: index("label")?,
        },
        _ => McDoc {
            context: text("query")?,
            choices: doc
                .get("choices")
                .and_then(|v| v.as_array())
                .ok_or("the document has no choices")?
                .iter()
                .map(|c| c.as_str().map(str::to_string).ok_or("a choice is not text"))
                .collect::<std::result::Result<_, _>>()?,
            gold: index("gold")?,
        },
    };
    if out.gold >= out.choices.len() {
        return Err(format!(
            "gold answer {} of {} choices",
            out.gold,
            out.choices.len()
        ));
    }
    Ok(out)
}

/// One choice to score: `ids` is context and continuation; the continuation is `ids[context_len..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct McRequest {
    pub doc: usize,
    pub choice: usize,
    pub context_len: usize,
    pub ids: Vec<u32>,
}

/// A task's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub task: String,
    pub docs: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

/// Sequences run through the blocks together: their hidden states at one depth are what is held.
const GROUP_TOKENS: usize = 1 << 16;
/// Rows of logits computed at once (a 262k vocabulary: 256 MB).
const HEAD_ROWS: usize = 256;

/// The log-likelihood of each request's continuation under `model` (held whole or read block by
/// block): requests are sorted by length, run `batch` at a time (padded on the right, which a
/// causal model never attends to) in groups of about 65k tokens through one block at a time, and
/// the head computes logits only at the continuations' positions.
pub fn choice_log_likelihoods<M: BlockModel>(
    model: &mut M,
    requests: &[McRequest],
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<f64>> {
    let vocab = model.config().vocab_size;
    if let Some(r) = requests
        .iter()
        .find(|r| r.ids.iter().any(|&t| t as usize >= vocab))
    {
        return Err(EvalError::Task(format!(
            "document {} holds a token id outside the model's vocabulary of {vocab}",
            r.doc
        )));
    }
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (requests[i].ids.len(), i));
    let batches: Vec<&[usize]> = order.chunks(batch.max(1)).collect();
    let mut lls = vec![0.0; requests.len()];
    progress.start("scoring choices", requests.len() as u64);
    let mut start = 0;
    while start < batches.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < batches.len() && (end == start || tokens < GROUP_TOKENS) {
            let b = batches[end];
            tokens += b.len() * (requests[*b.last().unwrap()].ids.len() - 1);
            end += 1;
        }
        score_group(model, requests, &batches[start..end], &mut lls)?;
        let done: usize = batches[start..end].iter().map(|b| b.len()).sum();
        progress.advance(done as u64, None);
        start = end;
    }
    progress.finish();
    Ok(lls)
}

/// The batches of one group through every block, then their continuations scored.
fn score_group<M: BlockModel>(
    model: &mut M,
    requests: &[McRequest],
    batches: &[&[usize]],
    lls: &mut [f64],
) -> Result<()> {
    let device = candle_core::Device::Cpu;
    // Inputs are every token but the last; position p predicts token p + 1.
    let inputs = batches
        .iter()
        .map(|b| {
            let len = b
                .iter()
                .map(|&i| requests[i].ids.len() - 1)
                .max()
                .unwrap_or(1);
            let rows: Vec<Vec<u32>> = b
                .iter()
                .map(|&i| {
                    let mut row = requests[i].ids[..requests[i].ids.len() - 1].to_vec();
                    row.resize(len, 0);
                    row
                })
                .collect();
            Tensor::new(rows, &device)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut xs = model.embed_batches(&inputs)?;
    let mut contexts = std::collections::BTreeMap::new();
    for x in &inputs {
        let len = x.dim(1)?;
        if let std::collections::btree_map::Entry::Vacant(e) = contexts.entry(len) {
            e.insert(model.attention_context(len)?);
        }
    }
    for index in 0..model.num_blocks() {
        model.with_block(index, |block| -> Result<()> {
            for (x, ids) in xs.iter_mut().zip(&inputs) {
                *x = block.forward(x, &contexts[&ids.dim(1)?], None, &mut NoHook)?;
            }
            Ok(())
        })??;
    }
    let head = model.head()?;
    for (x, b) in xs.into_iter().zip(batches) {
        let (n, t, h) = x.dims3()?;
        let flat = x.reshape((n * t, h))?;
        // (row in the flattened batch, target token, request) of every continuation token.
        let mut rows = Vec::new();
        for (j, &i) in b.iter().enumerate() {
            let r = &requests[i];
            for p in r.context_len - 1..r.ids.len() - 1 {
                rows.push(((j * t + p) as u32, r.ids[p + 1], i));
            }
        }
        for slice in rows.chunks(HEAD_ROWS) {
            let idx: Vec<u32> = slice.iter().map(|r| r.0).collect();
            let picked = flat.index_select(&Tensor::new(idx, &device)?, 0)?;
            let logits = head.logits(&head.final_hidden(&picked.unsqueeze(0)?)?)?;
            let logp =
                candle_nn::ops::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F32)?, D::Minus1)?;
            let targets: Vec<u32> = slice.iter().map(|r| r.1).collect();
            let got = logp
                .gather(&Tensor::new(targets, &device)?.unsqueeze(1)?, 1)?
                .squeeze(1)?
                .to_vec1::<f32>()?;
            for (r, v) in slice.iter().zip(got) {
                lls[r.2] += v as f64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
