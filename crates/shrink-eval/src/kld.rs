//! llama.cpp's KL-divergence protocol. `llama-perplexity --kl-divergence-base FILE` saves the base
//! model's log-probabilities of every scored position (16-bit codes per row with a scale and a
//! minimum); `llama-perplexity --kl-divergence` then scores another model against that file: its
//! perplexity, the base's, their ratio, KL(base ‖ model) with percentiles, the change Δp of the
//! target token's probability and how often both models' most likely token agree. [`BaseWriter`]
//! writes that file byte-compatible, [`BaseLogits`] reads it (either tool's), and [`KlAgainstBase`]
//! computes the statistics with llama.cpp's arithmetic (f32 where it uses f32, its 16-bit base
//! values, terms below e⁻¹⁶ of the base dropped), adding positions in text order.

use crate::{EvalError, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The file's first eight bytes.
const MAGIC: &[u8; 8] = b"_logits_";

/// Receives every evaluated chunk's scored logits, chunk by chunk in text order: `index` the
/// chunk's number, `rows` its scored positions' logits (`positions × vocab`, row-major).
pub trait ScoredLogits {
    fn chunk(&mut self, index: usize, rows: &[f32], vocab: usize) -> Result<()>;
}

/// Nothing to receive.
pub struct NoLogits;

impl ScoredLogits for NoLogits {
    fn chunk(&mut self, _: usize, _: &[f32], _: usize) -> Result<()> {
        Ok(())
    }
}

/// 16-bit values per stored row: two f32 (scale, minimum log-probability), then the vocabulary
/// rounded up to an even count.
fn row_len(vocab: usize) -> usize {
    2 * vocab.div_ceil(2) + 4
}

/// llama.cpp's `nearest_int`: round half to even through the f32 mantissa (|x| < 2²²).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// `log Σ exp(l − max)` as llama.cpp forms it: f32 differences and `expf`, an f64 sum, its log
/// rounded to f32.
fn log_sum_exp(logits: &[f32], max: f32) -> f32 {
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    sum.ln() as f32
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |e| EvalError::BaseFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// One row of logits stored as llama.cpp stores it (its `log_softmax` with `log_prob`): the range
/// `[max − 16, max]` of logits in 65,535 steps, the minimum as a log-probability.
fn encode_row(logits: &[f32], out: &mut [u16]) {
    let max = logits.iter().copied().fold(logits[0], f32::max);
    let min = logits
        .iter()
        .copied()
        .fold(logits[0], f32::min)
        .max(max - 16.0);
    let min_log_prob = min - max - log_sum_exp(logits, max);
    let scale = (max - min) / 65535.0;
    let (head, codes) = out.split_at_mut(4);
    for (pair, v) in head.chunks_mut(2).zip([scale, min_log_prob]) {
        let bits = v.to_bits();
        pair[0] = bits as u16;
        pair[1] = (bits >> 16) as u16;
    }
    codes.fill(0);
    if scale != 0.0 {
        let inverse = 1.0 / scale;
        for (c, &l) in codes.iter_mut().zip(logits) {
            *c = if l > min {
                nearest_int(inverse * (l - min)) as u16
            } else {
                0
            };
        }
    }
}

/// The header every base file starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseHeader {
    pub ctx: usize,
    pub vocab: usize,
    pub chunks: usize,
    /// The evaluated text's tokens, `chunks × ctx` (each chunk's first as in the text: the
    /// evaluation puts BOS there).
    pub tokens: Vec<u32>,
}

impl BaseHeader {
    /// Positions scored per chunk (`ctx/2 .. ctx−2`).
    pub fn scored(&self) -> usize {
        self.ctx - 1 - self.ctx / 2
    }

    fn chunk_bytes(&self) -> usize {
        self.scored() * row_len(self.vocab) * 2
    }
}

/// Writes a base file as the evaluation hands over each chunk's logits (the header once the
/// first chunk gives the vocabulary); the file appears under its name only when
/// [`BaseWriter::finish`] has written every chunk.
pub struct BaseWriter {
    path: PathBuf,
    header: BaseHeader,
    file: Option<shrink_core::AtomicFile>,
    written: usize,
}

impl BaseWriter {
    /// A writer to `path` for the `chunks` chunks of `ctx` tokens of `tokens`, the text as
    /// llama.cpp tokenizes it (BOS in front when the model adds one); more tokens are ignored.
    pub fn new(path: &Path, ctx: usize, chunks: usize, tokens: &[u32]) -> Result<Self> {
        if ctx < 4 || chunks == 0 || tokens.len() < chunks * ctx {
            return Err(EvalError::BaseFile {
                path: path.to_path_buf(),
                message: format!("{} tokens for {chunks} chunks of {ctx}", tokens.len()),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            header: BaseHeader {
                ctx,
                vocab: 0,
                chunks,
                tokens: tokens[..chunks * ctx].to_vec(),
            },
            file: None,
            written: 0,
        })
    }

    /// Renames the file into place once every chunk is written.
    pub fn finish(self) -> Result<()> {
        match self.file {
            Some(file) if self.written == self.header.chunks => Ok(file.commit()?),
            _ => Err(EvalError::BaseFile {
                path: self.path,
                message: format!(
                    "{} of {} chunks evaluated",
                    self.written, self.header.chunks
                ),
            }),
        }
    }

    /// The open file, created with its header at the first chunk.
    fn file(&mut self, vocab: usize) -> Result<&mut shrink_core::AtomicFile> {
        if self.file.is_none() {
            self.header.vocab = vocab;
            let h = &self.header;
            let mut bytes = MAGIC.to_vec();
            for v in [h.ctx, h.vocab, h.chunks] {
                bytes.extend((v as u32).to_le_bytes());
            }
            h.tokens.iter().for_each(|t| bytes.extend(t.to_le_bytes()));
            let mut file = shrink_core::AtomicFile::create(&self.path)?;
            file.writer().write_all(&bytes).map_err(io(&self.path))?;
            self.file = Some(file);
        }
        self.file
            .as_mut()
            .ok_or_else(|| EvalError::Config("base file not open".into()))
    }
}

impl ScoredLogits for BaseWriter {
    fn chunk(&mut self, index: usize, rows: &[f32], vocab: usize) -> Result<()> {
        let (scored, expected) = (self.header.scored(), self.header.vocab);
        if index != self.written || rows.len() != scored * vocab || (index > 0 && vocab != expected)
        {
            return Err(EvalError::BaseFile {
                path: self.path.clone(),
                message: format!(
                    "chunk {index} ({} rows of {vocab}) does not follow chunk {} ({scored} rows)",
                    rows.len() / vocab.max(1),
                    self.written
                ),
            });
        }
        let n = row_len(vocab);
        let mut codes = vec![0u16; scored * n];
        codes
            .par_chunks_mut(n)
            .zip(rows.par_chunks(vocab))
            .for_each(|(out, row)| encode_row(row, out));
        let bytes: Vec<u8> = codes.iter().flat_map(|c| c.to_le_bytes()).collect();
        let path = self.path.clone();
        self.file(vocab)?
            .writer()
            .write_all(&bytes)
            .map_err(io(&path))?;
        self.written += 1;
        Ok(())
    }
}

/// A base file opened for reading: its header, then each chunk's rows read in order.
pub struct BaseLogits {
    path: PathBuf,
    pub header: BaseHeader,
    reader: BufReader<std::fs::File>,
}

impl BaseLogits {
    /// Opens `path` and reads its header, checking it against the file's length.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| EvalError::BaseFile {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut reader = BufReader::new(file);
        let mut fixed = [0u8; 20];
        reader
            .read_exact(&mut fixed)
            .map_err(|_| bad("shorter than a header".into()))?;
        if &fixed[..8] != MAGIC {
            return Err(bad(
                "does not start with \"_logits_\": not a file of base log-probabilities".into(),
            ));
        }
        let field = |i: usize| {
            let b = &fixed[8 + 4 * i..12 + 4 * i];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        };
        let (ctx, vocab, chunks) = (field(0), field(1), field(2));
        if ctx < 4 || vocab == 0 || chunks == 0 {
            return Err(bad(format!(
                "ctx {ctx}, vocabulary {vocab}, {chunks} chunks"
            )));
        }
        let tokens_bytes = (chunks as u64) * (ctx as u64) * 4;
        let chunk_bytes = ((ctx - 1 - ctx / 2) * row_len(vocab) * 2) as u64;
        let want = 20 + tokens_bytes + chunks as u64 * chunk_bytes;
        if len != want {
            return Err(bad(format!(
                "{len} bytes, but {chunks} chunks of {ctx} tokens over a vocabulary of {vocab} take {want}"
            )));
        }
        let mut raw = vec![0u8; tokens_bytes as usize];
        reader.read_exact(&mut raw).map_err(io(path))?;
        let tokens = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            header: BaseHeader {
                ctx,
                vocab,
                chunks,
                tokens,
            },
            reader,
        })
    }

    /// The text's tokens as an evaluation takes them: without the BOS llama.cpp's list starts
    /// with when the model adds one (`bos`).
    pub fn text_tokens(&self, bos: Option<u32>) -> Result<&[u32]> {
        let tokens = &self.header.tokens[..];
        match bos {
            None => Ok(tokens),
            Some(b) if tokens.first() == Some(&b) => Ok(&tokens[1..]),
            Some(b) => Err(EvalError::BaseFile {
                path: self.path.clone(),
                message: format!(
                    "the model adds BOS ({b}), but the file's tokens start with {}: saved from \
                     another model?",
                    tokens[0]
                ),
            }),
        }
    }

    /// The next chunk's rows as 16-bit values (`scored × row_len`).
    fn next_chunk(&mut self) -> Result<Vec<u16>> {
        let mut raw = vec![0u8; self.header.chunk_bytes()];
        self.reader.read_exact(&mut raw).map_err(io(&self.path))?;
        Ok(raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect())
    }
}

/// What one position contributes (llama.cpp's `log_softmax` against a base row).
#[derive(Debug, Clone, Copy)]
struct Position {
    nll: f32,
    nll_base: f32,
    kld: f64,
    same_top: bool,
    p_diff: f32,
}

fn position(logits: &[f32], base: &[u16], target: usize) -> Position {
    let (mut max, mut top) = (logits[0], 0);
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            (max, top) = (l, i);
        }
    }
    let lse = log_sum_exp(logits, max);
    let word = |i: usize| f32::from_bits(base[2 * i] as u32 | (base[2 * i + 1] as u32) << 16);
    let (scale, min_log_prob) = (word(0), word(1));
    let codes = &base[4..];
    let nll = max + lse - logits[target];
    let nll_base = -(scale * codes[target] as f32 + min_log_prob);
    let shifted = max + lse;
    let (mut kld, mut top_base, mut best) = (0f64, 0, 0f32);
    for (i, &l) in logits.iter().enumerate() {
        let p_log_base = scale * codes[i] as f32 + min_log_prob;
        if i == 0 || p_log_base > best {
            (best, top_base) = (p_log_base, i);
        }
        if p_log_base > -16.0 {
            kld += (p_log_base.exp() * (p_log_base - l + shifted)) as f64;
        }
    }
    Position {
        nll,
        nll_base,
        kld,
        same_top: top == top_base,
        p_diff: (-nll).exp() - (-nll_base).exp(),
    }
}

/// A mean and llama.cpp's ± (the standard error, 0 below 11 values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub uncertainty: f64,
}

fn mean_and_uncertainty(sum: f64, sum2: f64, n: usize) -> Estimate {
    if n == 0 {
        return Estimate {
            value: 0.0,
            uncertainty: 0.0,
        };
    }
    let f = sum / n as f64;
    let df = sum2 / n as f64 - f * f;
    let uncertainty = if df > 0.0 && n > 10 {
        (df / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    Estimate {
        value: f,
        uncertainty,
    }
}

/// llama.cpp's interpolated percentile of sorted values.
fn percentile(sorted: &[f32], fraction: f32) -> f64 {
    if fraction <= 0.0 {
        return sorted[0] as f64;
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1] as f64;
    }
    let p = fraction * (sorted.len() - 1) as f32;
    let i = p as usize;
    let p = p - i as f32;
    ((1.0 - p) * sorted[i] + p * sorted[(i + 1).min(sorted.len() - 1)]) as f64
}

fn median(sorted: &[f32]) -> f64 {
    let n = sorted.len();
    if n.is_multiple_of(2) {
        (0.5 * (sorted[n / 2] + sorted[n / 2 - 1])) as f64
    } else {
        sorted[n / 2] as f64
    }
}

/// The statistics `llama-perplexity --kl-divergence` prints, from the same sums.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlReport {
    pub positions: usize,
    pub ppl: Estimate,
    pub ppl_base: Estimate,
    /// Correlation of the two models' per-position NLL.
    pub ln_ppl_correlation: f64,
    pub ln_ppl_ratio: Estimate,
    pub kld: Estimate,
    /// KL percentiles: maximum, 99.9, 99, 95, 90, median, 10, 5, 1, 0.1 %, minimum.
    pub kld_percentiles: Vec<(String, f64)>,
    /// Mean change of the target token's probability (model − base).
    pub p_diff: Estimate,
    /// Δp percentiles: maximum, 99.9, 99, 95, 90, 75, median, 25, 10, 5, 1, 0.1 %, minimum.
    pub p_diff_percentiles: Vec<(String, f64)>,
    pub p_diff_rms: Estimate,
    /// Fraction of positions whose most likely token is the base's.
    pub same_top: Estimate,
}

/// Scores each chunk's logits against a base file's rows (see the module documentation).
pub struct KlAgainstBase {
    base: BaseLogits,
    chunks: usize,
    positions: Vec<Position>,
}

impl KlAgainstBase {
    pub fn new(base: BaseLogits) -> Self {
        Self {
            base,
            chunks: 0,
            positions: Vec::new(),
        }
    }

    /// The statistics over every position seen, or an error when the evaluation stopped early.
    pub fn finish(self, evaluated: usize) -> Result<KlReport> {
        if self.chunks != evaluated || self.positions.is_empty() {
            return Err(EvalError::BaseFile {
                path: self.base.path,
                message: format!("{} of {evaluated} chunks scored", self.chunks),
            });
        }
        let p = &self.positions;
        let n = p.len();
        let sum = |f: &dyn Fn(&Position) -> f64| p.iter().map(f).sum::<f64>();
        let (nll, nll2) = (sum(&|x| x.nll as f64), sum(&|x| (x.nll * x.nll) as f64));
        let base = sum(&|x| x.nll_base as f64);
        let base2 = sum(&|x| (x.nll_base * x.nll_base) as f64);
        let cross = sum(&|x| (x.nll * x.nll_base) as f64);
        let (kld, kld2) = (sum(&|x| x.kld), sum(&|x| x.kld * x.kld));
        let p_diff = sum(&|x| x.p_diff as f64);
        // llama.cpp squares Δp in f32, then squares that in f64.
        let p_diff2 = sum(&|x| (x.p_diff * x.p_diff) as f64);
        let p_diff4 = sum(&|x| ((x.p_diff * x.p_diff) as f64).powi(2));
        let same = p.iter().filter(|x| x.same_top).count();
        let log_ppl = mean_and_uncertainty(nll, nll2, n);
        let log_base = mean_and_uncertainty(base, base2, n);
        let cov = if n < 10 {
            0.0
        } else {
            (cross / n as f64 - (nll / n as f64) * (base / n as f64)) / (n - 1) as f64
        };
        let exp = |e: Estimate| Estimate {
            value: e.value.exp(),
            uncertainty: e.value.exp() * e.uncertainty,
        };
        let ratio_unc = (log_ppl.uncertainty.powi(2) + log_base.uncertainty.powi(2) - 2.0 * cov)
            .max(0.0)
            .sqrt();
        let mse = mean_and_uncertainty(p_diff2, p_diff4, n);
        let rms = mse.value.sqrt();
        let top = same as f64 / n as f64;
        let mut klds: Vec<f32> = p.iter().map(|x| x.kld as f32).collect();
        let mut diffs: Vec<f32> = p.iter().map(|x| x.p_diff).collect();
        klds.sort_by(f32::total_cmp);
        diffs.sort_by(f32::total_cmp);
        let table = |sorted: &[f32], fractions: &[(&str, f32)]| -> Vec<(String, f64)> {
            fractions
                .iter()
                .map(|&(label, f)| {
                    let v = if label == "median" {
                        median(sorted)
                    } else {
                        percentile(sorted, f)
                    };
                    (label.to_string(), v)
                })
                .collect()
        };
        let common = [
            ("99.9%", 0.999),
            ("99.0%", 0.99),
            ("95.0%", 0.95),
            ("90.0%", 0.9),
        ];
        let low = [
            ("10.0%", 0.1),
            ("5.0%", 0.05),
            ("1.0%", 0.01),
            ("0.1%", 0.001),
        ];
        let kld_fractions: Vec<(&str, f32)> = std::iter::once(("maximum", 1.0))
            .chain(common)
            .chain([("median", 0.5)])
            .chain(low)
            .chain([("minimum", 0.0)])
            .collect();
        let p_fractions: Vec<(&str, f32)> = std::iter::once(("maximum", 1.0))
            .chain(common)
            .chain([("75.0%", 0.75), ("median", 0.5), ("25.0%", 0.25)])
            .chain(low)
            .chain([("minimum", 0.0)])
            .collect();
        Ok(KlReport {
            positions: n,
            ppl: exp(log_ppl),
            ppl_base: exp(log_base),
            ln_ppl_correlation: cov / (log_ppl.uncertainty * log_base.uncertainty),
            ln_ppl_ratio: Estimate {
                value: log_ppl.value - log_base.value,
                uncertainty: ratio_unc,
            },
            kld: mean_and_uncertainty(kld, kld2, n),
            kld_percentiles: table(&klds, &kld_fractions),
            p_diff: mean_and_uncertainty(p_diff, p_diff2, n),
            p_diff_percentiles: table(&diffs, &p_fractions),
            p_diff_rms: Estimate {
                value: rms,
                uncertainty: 0.5 / rms * mse.uncertainty,
            },
            same_top: Estimate {
                value: top,
                uncertainty: (top * (1.0 - top) / (n - 1).max(1) as f64).sqrt(),
            },
        })
    }
}

impl ScoredLogits for KlAgainstBase {
    fn chunk(&mut self, index: usize, rows: &[f32], vocab: usize) -> Result<()> {
        let h = &self.base.header;
        if index != self.chunks || vocab != h.vocab || index >= h.chunks {
            return Err(EvalError::BaseFile {
                path: self.base.path.clone(),
                message: format!(
                    "chunk {index} (vocabulary {vocab}) does not follow chunk {} of {} (vocabulary {})",
                    self.chunks, h.chunks, h.vocab
                ),
            });
        }
        let (ctx, n) = (h.ctx, row_len(vocab));
        let targets: Vec<usize> = (ctx / 2..ctx - 1)
            .map(|p| h.tokens[index * ctx + p + 1] as usize)
            .collect();
        let base = self.base.next_chunk()?;
        let found: Vec<Position> = rows
            .par_chunks(vocab)
            .zip(base.par_chunks(n))
            .zip(targets.par_iter())
            .map(|((row, base), &t)| position(row, base, t))
            .collect();
        self.positions.extend(found);
        self.chunks += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
