//! The memory budget of a run: the model's shape read from its file's header, the estimate of
//! [`Pipeline::estimated_peak_bytes`] with the real settings, and the refusal of a run whose
//! estimate exceeds the machine's memory or a `--max-memory` limit before any work starts.

use crate::stage::{JobMemory, ModelSizes};
use crate::{Pipeline, PipelineError, PlannedStage, Result};
use std::path::Path;

/// What the memory estimate needs to know of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub parameters: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub vocab: u64,
    /// The weights of one decoder block (the first).
    pub block_parameters: u64,
}

/// The shape of the model at `path`, from its header only (no weights are read): the embedding's
/// width and the MLP down projection's other dimension. `None` for a model without those.
pub fn model_shape(path: &Path) -> Option<ModelShape> {
    let info = shrink_io::inspect(path).ok()?;
    let dims = |pick: &dyn Fn(&str) -> bool| {
        info.tensors
            .iter()
            .find(|t| pick(&t.name) && t.shape.len() == 2)
            .map(|t| (t.shape[0] as u64, t.shape[1] as u64))
    };
    // Every family's token embedding and MLP down projection (Hugging Face or GGUF names).
    let embedding = ["embed_tokens", "token_embd", "word_embeddings", "wte."];
    let (a, b) = dims(&|n| embedding.iter().any(|e| n.contains(e)))?;
    let hidden = a.min(b);
    let (c, d) = dims(&|n| {
        n.contains("ffn_down.weight")
            || (n.ends_with(".weight")
                && shrink_models::Role::of_name(n) == Some(shrink_models::Role::Down))
    })?;
    // Block 0's tensors under every family's names (GGUF, Llama/BERT/GPT-2 checkpoints).
    let first_block = ["blk.0.", "layers.0.", "layer.0.", "h.0."];
    let block_parameters = info
        .tensors
        .iter()
        .filter(|t| first_block.iter().any(|p| t.name.contains(p)))
        .map(|t| t.parameters)
        .sum();
    Some(ModelShape {
        parameters: info.parameters,
        hidden,
        intermediate: if c == hidden { d } else { c },
        vocab: a.max(b),
        block_parameters,
    })
}

/// A job that reads the model one block at a time, as the memory formula sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamedJob {
    /// Calibration windows, tokens per window and windows per forward pass, when it calibrates.
    pub calibration: Option<(u64, u64, u64)>,
    /// Whether the job accumulates full Hessians (GPTQ, AWQ, SmoothQuant, SparseGPT) rather than
    /// per-channel statistics (Wanda).
    pub hessians: bool,
    /// Whether GPTQ (or SparseGPT) factors the Hessians.
    pub factors: bool,
    /// Bytes per value of a block's weights in memory (4 in f32; 2 when rounding 16-bit blocks).
    pub block_value_bytes: u64,
    /// Bytes per weight of the copies of the widest linear held beside the block while it is
    /// compressed: 12 for quantization (three f32 copies), 8 for magnitude and Wanda pruning (the
    /// weights read out and their magnitudes), 16 for SparseGPT (the weights read out, the
    /// unpruned ones kept to measure the error, and its f64 working copy).
    pub widest_copies: u64,
    /// Bytes per value of the token embedding as stored (read in that type).
    pub embedding_value_bytes: u64,
    /// Bytes per value of the token embedding as written (4 in f32, 2 in f16; 1 bounds a block
    /// type's packed bytes).
    pub embedding_written_bytes: u64,
    /// Whether the calibration activations are spilled to a scratch file (one batch in memory).
    pub spilled: bool,
    /// Bytes per value the calibration activations are kept in (4 in f32, 2 in f16 or bf16).
    pub activation_value_bytes: u64,
    /// Copies of the calibration windows' hidden states held at once: 2 (entering and leaving
    /// a block); `span + 1` for the angular criterion that ranks runs of `span` layers.
    pub activation_copies: u64,
    /// Whether the unquantized block's outputs on every window are held in memory in f32 beside
    /// the activations, spilled or not (SignRound's targets).
    pub targets: bool,
    /// A search's sensitivity and scoring, beside the quantization it verifies.
    pub scoring: Option<Scoring>,
}

/// What a search holds beside the quantizations it verifies: the reference log-probabilities of
/// the scored positions (kept while every mix is verified), and the sensitivity's variants of a
/// block's output (each measured linear's, with the block's input and output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scoring {
    /// Positions whose next-token distributions are compared.
    pub positions: u64,
    /// Tokens of hidden states held at once by the sensitivity: its windows' tokens × copies.
    pub states: u64,
    /// f32 copies of the output head held at once: 1, or 2 when the embedding is searched (its
    /// rounded copy beside it, as the embedding table beside its own before).
    pub head_copies: u64,
}

/// The terms of the peak memory of a block-by-block job, in bytes. The job first writes the token
/// embedding (and an untied head) on its own, then holds one block at a time:
///
/// `work = max(embedding, block + activations + hessians + max(accumulation, factoring))`,
/// `peak = base + work + work / 8`
///
/// - `embedding`: `V·h` values as stored, plus what is written of it (its packed blocks, at most
///   `V·h` bytes, or its f32/f16 values) and the copies of a 64 MB f32 slice being converted
///   (four);
/// - `block`: one block's weights `P_b` at the compute width, plus the copies of its widest
///   linear (`i·h` weights) the technique works on: three f32 copies to quantize (the weights
///   read out, GPTQ's working copy, the dequantized values), 8 bytes a weight for magnitude or
///   Wanda pruning, 16 for SparseGPT (see [`StreamedJob::widest_copies`]);
/// - `activations`: the calibration windows' hidden states entering and leaving the block,
///   `c · T · h · a` with `c = 2` copies (`span + 1` for the angular layer criterion),
///   `T = samples · seq_len` tokens kept in `a` bytes a value (4 in f32, 2 in f16 or bf16;
///   spilled to a scratch file: one batch's, computed in f32, `c · b·s · h · 4`), and the
///   windows' token ids (`4 · T`, held either way);
/// - `hessians`: every input statistic of the block held until it is compressed, in f64:
///   `(3·h² + i²) · 8` (q/k/v, o, gate/up share two `h × h`; down has `i × i`), or four vectors
///   per channel without Hessians;
/// - `accumulation`: a batch's forward pass (`b·s·(3·i + 4·h)` f32 values and the attention scores
///   `b·(h/64)·s²`) and the f32 product `XᵀX` of the widest input with its copy (`2 · i² · 4`);
/// - `factoring`: GPTQ's inverse-Hessian factor of the widest input, two `i × i` f64 matrices at
///   a time (`2 · i² · 8`);
/// - a search ([`Scoring`]): the reference log-probabilities of its `n` scored positions held
///   throughout (`scoring = n·V·4`); the block term's activations are at least the sensitivity's
///   variants (`states · h · 4`); and a third arm, the head: its f32 projection (twice when the
///   embedding is searched: a rounded copy beside it), the variants, and a candidate's
///   log-probabilities with the KL's temporaries (`c·V·h·4 + states·h·4 + 4·n·V·4`), so that
///   `work = max(embedding, blocks, head) + scoring`;
/// - `base`: the program, the tokenizer and the memory-mapped pages in flight (~256 MB);
/// - `work / 8`: what the terms miss: memory the allocator keeps after it was freed, and
///   transient copies as the factorization moves from one matrix to the next (an allowance
///   fitted to a measurement, not derived: the 8B shapes' GPTQ peaked 8.6% above the other
///   terms, with short peaks of ~0.4 GB above the stable levels in an RSS trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StreamedPeak {
    pub base: u64,
    pub embedding: u64,
    pub block: u64,
    pub activations: u64,
    pub hessians: u64,
    pub accumulation: u64,
    pub factoring: u64,
    /// A search's output head at work (0 for other jobs).
    pub head: u64,
    /// A search's reference log-probabilities, held throughout (0 for other jobs).
    pub scoring: u64,
}

impl StreamedPeak {
    /// The formula's peak.
    pub fn total(&self) -> u64 {
        let blocks = self
            .block
            .saturating_add(self.activations)
            .saturating_add(self.hessians)
            .saturating_add(self.accumulation.max(self.factoring));
        let work = self
            .embedding
            .max(blocks)
            .max(self.head)
            .saturating_add(self.scoring);
        self.base.saturating_add(work).saturating_add(work / 8)
    }
}

/// The peak memory of `job` on a model of `shape`, by the formula of [`StreamedPeak`] (in
/// saturating arithmetic: absurd settings give a huge estimate, never a wrapped small one).
pub fn streamed_peak(shape: &ModelShape, job: &StreamedJob) -> StreamedPeak {
    let m = |a: u64, b: u64| a.saturating_mul(b);
    let (h, i) = (shape.hidden, shape.intermediate);
    let widest = m(i, h);
    let embedding = m(
        m(shape.vocab, h),
        job.embedding_value_bytes
            .saturating_add(job.embedding_written_bytes),
    )
    .saturating_add(4 * (64 << 20));
    let block = m(shape.block_parameters, job.block_value_bytes)
        .saturating_add(m(widest, job.widest_copies));
    let (activations, hessians, accumulation) = match job.calibration {
        None => (0, 0, 0),
        Some((samples, seq_len, batch)) => {
            let tokens = m(samples, seq_len);
            let b = batch.min(samples).max(1);
            let forward = m(m(b, seq_len), m(3, i).saturating_add(m(4, h)))
                .saturating_add(m(m(b, h / 64), m(seq_len, seq_len)));
            let stats = if job.hessians {
                m(m(3, m(h, h)).saturating_add(m(i, i)), 8)
            } else {
                m(m(3, h).saturating_add(i), 32)
            };
            let product = if job.hessians { m(m(i, i), 8) } else { 0 };
            let held = match job.spilled {
                true => m(m(b, seq_len), 4),
                false => m(tokens, job.activation_value_bytes),
            };
            (
                // The windows' token ids are held whether or not the states are spilled.
                m(m(held, h), job.activation_copies)
                    .saturating_add(m(tokens, 4))
                    .saturating_add(if job.targets { m(m(tokens, h), 4) } else { 0 }),
                stats,
                m(forward, 4).saturating_add(product),
            )
        }
    };
    let (activations, head, scoring) = match job.scoring {
        None => (activations, 0, 0),
        Some(s) => {
            let states = m(m(s.states, h), 4);
            let log_probs = m(m(s.positions, shape.vocab), 4);
            (
                activations.max(states),
                m(m(m(shape.vocab, h), 4), s.head_copies.max(1))
                    .saturating_add(states)
                    .saturating_add(m(log_probs, 4)),
                log_probs,
            )
        }
    };
    StreamedPeak {
        base: 256 << 20,
        embedding,
        block,
        activations,
        hessians,
        accumulation,
        factoring: if job.factors && job.calibration.is_some() {
            m(m(i, i), 16)
        } else {
            0
        },
        head,
        scoring,
    }
}

/// The peak memory of one of `ranks` processes that split `job`'s calibration (MPI): each holds
/// the activations of its own batches of windows (`⌈batches / ranks⌉` of them), and one batch's
/// f32 statistics of the block until they are exchanged. While the batch runs, the statistics of
/// the inputs before `down_proj`'s (`3·h² · 4`) are held beside the accumulation term (its forward
/// pass and `down_proj`'s product, `2·i² · 4`); the exchange then holds all of them and a buffer to
/// receive the widest (`(3·h² + 2·i²) · 4`), which is no more. One rank is [`streamed_peak`].
pub fn streamed_peak_per_rank(shape: &ModelShape, job: &StreamedJob, ranks: u64) -> StreamedPeak {
    let ranks = ranks.max(1);
    let Some((samples, seq_len, batch)) = job.calibration.filter(|_| ranks > 1) else {
        return streamed_peak(shape, job);
    };
    let batch = batch.max(1);
    let mine = samples
        .div_ceil(batch)
        .div_ceil(ranks)
        .saturating_mul(batch);
    let share = StreamedJob {
        calibration: Some((mine.min(samples), seq_len, batch)),
        ..*job
    };
    let mut peak = streamed_peak(shape, &share);
    let m = |a: u64, b: u64| a.saturating_mul(b);
    // Every rank holds every window's token ids.
    peak.activations = peak
        .activations
        .saturating_add(m(samples.saturating_sub(mine.min(samples)), m(seq_len, 4)));
    let (h, i) = (shape.hidden, shape.intermediate);
    peak.accumulation = if job.hessians {
        peak.accumulation.saturating_add(m(m(3, m(h, h)), 4))
    } else {
        // Three f32 vectors per input, held and received.
        peak.accumulation
            .saturating_add(m(m(3, h).saturating_add(i), 24))
    };
    peak
}

/// The disk one of `ranks` processes needs to spill its calibration activations: the hidden
/// states of its windows (`T·h·a` bytes, `a` a value as kept, written over in place block after
/// block), and as much again for a resumable job's record of the activations leaving the last
/// finished block.
pub fn spilled_disk_bytes(
    shape: &ModelShape,
    calibration: (u64, u64, u64),
    ranks: u64,
    value_bytes: u64,
) -> u64 {
    let (samples, seq_len, batch) = calibration;
    let batch = batch.max(1);
    let mine = samples
        .div_ceil(batch)
        .div_ceil(ranks.max(1))
        .saturating_mul(batch)
        .min(samples);
    mine.saturating_mul(seq_len)
        .saturating_mul(shape.hidden)
        .saturating_mul(2 * value_bytes)
}

/// Whether a block-by-block job spills its calibration activations to a scratch file
/// ([`shrink_calib::Keep`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spill {
    /// When held in memory they would take the job above the memory allowed and spilled they
    /// would not.
    #[default]
    Auto,
    Always,
    Never,
}

/// `job` with its calibration activations kept in `value_bytes` a value and spilled as `spill`
/// decides, on a model of `shape` split across `ranks` under `limit` bytes (per rank); and
/// whether `Auto` chose to spill. `shrink quantize`/`prune` and a pipeline's stages decide alike.
pub fn keep_activations(
    shape: &ModelShape,
    job: &StreamedJob,
    value_bytes: u64,
    spill: Spill,
    ranks: u64,
    limit: u64,
) -> (StreamedJob, bool) {
    let with = |spilled| StreamedJob {
        spilled,
        activation_value_bytes: value_bytes,
        ..*job
    };
    let peak = |spilled| streamed_peak_per_rank(shape, &with(spilled), ranks).total();
    let chosen = spill == Spill::Auto
        && job.calibration.is_some()
        && peak(false) > limit
        && peak(true) <= limit;
    (with(spill == Spill::Always || chosen), chosen)
}

/// Refuses spilling the activations of `job` (split across `ranks`) to `scratch` when its disk
/// has less free space than they need ([`spilled_disk_bytes`]).
pub fn check_spill_disk(
    shape: &ModelShape,
    job: &StreamedJob,
    ranks: u64,
    scratch: &Path,
) -> Result<()> {
    let (true, Some(calibration)) = (job.spilled, job.calibration) else {
        return Ok(());
    };
    // Two copies' worth (the states, and a resumable job's record), or one scratch file per copy
    // of the states held (the angular layer criterion's span + 1).
    let needed = (spilled_disk_bytes(shape, calibration, ranks, job.activation_value_bytes) / 2)
        .saturating_mul(job.activation_copies.max(2));
    let free = crate::free_disk_bytes(scratch).unwrap_or(u64::MAX);
    if needed > free {
        return Err(PipelineError::Invalid(format!(
            "spilling the calibration activations needs an estimated {:.1} GB of disk in {}, \
             which has {:.1} GB free: lower the calibration samples or their length",
            needed as f64 / 1e9,
            scratch.display(),
            free as f64 / 1e9
        )));
    }
    Ok(())
}

/// Refuses a block-by-block job whose estimated peak exceeds `limit` bytes.
pub fn check_streamed_memory(peak: &StreamedPeak, limit: u64) -> Result<()> {
    let estimate = peak.total();
    if estimate > limit {
        let gb = |b: u64| b as f64 / 1e9;
        return Err(PipelineError::Invalid(format!(
            "the job needs an estimated {:.1} GB of memory reading the model block by block \
             (one block {:.1} GB, activations {:.1} GB, statistics {:.1} GB, the largest \
             Hessian's factor {:.1} GB), more than the {:.1} GB allowed (the machine's memory, or \
             --max-memory): lower --samples or --seq-len, or spill the activations to disk \
             (--spill-activations)",
            gb(estimate),
            gb(peak.block),
            gb(peak.activations),
            gb(peak.hessians),
            gb(peak.factoring),
            gb(limit)
        )));
    }
    Ok(())
}

/// The memory a run may use: `max_bytes` if given, else the machine's memory.
pub fn memory_limit(max_bytes: Option<u64>) -> u64 {
    max_bytes.unwrap_or_else(|| crate::sys::machine().memory_bytes)
}

/// Parses a memory size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024, an
/// optional `B`/`iB`): `16G`, `512MiB`, `1.5G`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 16G or 512M"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024f64.powi(2),
        "G" | "GB" | "GIB" => 1024f64.powi(3),
        "T" | "TB" | "TIB" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

impl Pipeline {
    /// Estimated peak memory in bytes of running the pipeline on a model with `parameters`
    /// weights, `hidden` wide with `intermediate` MLP rows and a `vocab`-token vocabulary, every
    /// stage holding its model whole: the checkpoint, the f32 model and the reference model the
    /// evaluation compares against and the two models' logits of an evaluation window, plus,
    /// when a stage calibrates, the calibration activations entering and leaving a block, one
    /// block's Hessians and a batch's working set, and what the stages' jobs hold beside them (a
    /// search's copies of the model) or instead of them (training); with the program's 256 MB
    /// and the streamed formula's allowance of 1/8 ([`StreamedPeak`]).
    pub fn estimated_peak_bytes(
        &self,
        parameters: u64,
        hidden: u64,
        intermediate: u64,
        vocab: u64,
    ) -> u64 {
        self.peak_holding(
            ModelSizes {
                parameters: u128::from(parameters),
                hidden: u128::from(hidden),
                intermediate: u128::from(intermediate),
                vocab: u128::from(vocab),
            },
            &|_| true,
        )
    }

    /// [`Pipeline::estimated_peak_bytes`] counting only the stages `holds` picks (the others
    /// read their input block by block), with the evaluation's models always counted.
    fn peak_holding(&self, sizes: ModelSizes, holds: &dyn Fn(&PlannedStage) -> bool) -> u64 {
        // In u128 and saturated: settings such as `samples = 1000000000000` must give a huge
        // estimate, not a wrapped small one.
        let (hidden, intermediate) = (sizes.hidden, sizes.intermediate);
        let model = 3 * sizes.parameters * 4;
        let held: Vec<&PlannedStage> = self.plan().iter().filter(|s| holds(s)).collect();
        let calibration = if held.iter().any(|s| s.calibrates) {
            let tokens = self.data.samples as u128 * self.data.seq_len as u128;
            let ids = tokens * 4;
            let activations = 2 * tokens * hidden * 4;
            let hessians = (3 * hidden * hidden + intermediate * intermediate) * 8;
            let batch = 8 * self.data.seq_len as u128 * intermediate * 4 * 4;
            ids + activations + hessians + batch
        } else {
            0
        };
        let jobs =
            held.iter()
                .map(|s| s.job.job().memory(&sizes))
                .fold(JobMemory::default(), |a, m| JobMemory {
                    with_calibration: a.with_calibration.max(m.with_calibration),
                    training: a.training.max(m.training),
                });
        let logits = 2 * self.eval.ctx as u128 * sizes.vocab * 4;
        let work = model + logits + (calibration + jobs.with_calibration).max(jobs.training);
        let total = work.saturating_add(work / 8).saturating_add(256 << 20);
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    /// The estimated peak memory for a model of `shape`; without a shape (the model is not
    /// here yet), a lower bound from the settings alone: the calibration windows' token ids.
    ///
    /// With the input's `checkpoint`, a stage that reads it block by block (a quantization of a
    /// Llama-family model) counts as the baseline model the run holds (`4·P`) plus its job's
    /// [`streamed_peak`], instead of a whole copy with the whole-model calibration terms. When
    /// the evaluation too goes block by block (`block_by_block`), no model is held whole: the
    /// peak is the largest of the stages' [`streamed_peak`]s and the evaluation's
    /// [`streamed_eval_peak`] on `eval_chunks` chunks. A streamed stage keeps its activations as
    /// `[data] activations` and `spill` say ([`keep_activations`], against `limit`).
    pub fn estimated_peak_for(
        &self,
        shape: Option<ModelShape>,
        checkpoint: Option<&shrink_io::Checkpoint>,
        block_by_block: bool,
        eval_chunks: u64,
        limit: u64,
    ) -> u64 {
        let Some(shape) = shape else {
            return if self.plan().iter().any(|s| s.calibrates) {
                (self.data.samples as u128 * self.data.seq_len as u128 * 4)
                    .try_into()
                    .unwrap_or(u64::MAX)
            } else {
                0
            };
        };
        let calibration = (self.data.samples as u64, self.data.seq_len as u64);
        // Beside a streamed stage, a run that evaluates whole holds the baseline model (4·P).
        let baseline = match block_by_block {
            true => 0,
            false => shape.parameters.saturating_mul(4),
        };
        let value_bytes = self.data.activations.dtype().size_in_bytes() as u64;
        let streamed = |s: &PlannedStage| {
            let checkpoint = checkpoint.filter(|_| s.input == "model" || block_by_block)?;
            let job = s.job.job();
            if !job.streams(checkpoint) {
                return None;
            }
            let job = job.streamed_job(checkpoint, s.calibrates.then_some(calibration))?;
            let room = limit.saturating_sub(baseline);
            Some(keep_activations(&shape, &job, value_bytes, self.data.spill, 1, room).0)
        };
        let stages = self
            .plan()
            .iter()
            .filter_map(streamed)
            .map(|job| streamed_peak(&shape, &job).total().saturating_add(baseline));
        if block_by_block {
            let eval = streamed_eval_peak(
                &shape,
                &StreamedEval {
                    chunks: eval_chunks,
                    ctx: self.eval.ctx as u64,
                    scored: scored_per_chunk(
                        self.eval
                            .protocol
                            .parse()
                            .unwrap_or(shrink_eval::Protocol::Full),
                        self.eval.ctx,
                    ),
                    batch: EVAL_BATCH as u64,
                    models: 2,
                    widened_head_bytes: checkpoint.map_or(2, |c| widened_head_bytes([c])),
                    packed: false,
                },
            );
            return stages.fold(eval, u64::max);
        }
        let sizes = ModelSizes {
            parameters: u128::from(shape.parameters),
            hidden: u128::from(shape.hidden),
            intermediate: u128::from(shape.intermediate),
            vocab: u128::from(shape.vocab),
        };
        let held = self.peak_holding(sizes, &|s| streamed(s).is_none());
        stages.fold(held, u64::max)
    }

    /// Whether the run can evaluate its models block by block: a Llama-family decoder read as
    /// it is stored, every stage reading its input block by block and writing a model that is
    /// read so too. The reason when not.
    pub fn evaluation_can_stream(
        &self,
        checkpoint: &shrink_io::Checkpoint,
    ) -> std::result::Result<(), String> {
        if !crate::quantize::reads_block_by_block(checkpoint) {
            return Err(
                "only Llama-family decoders without int8 activations (W8A8) are evaluated \
                        block by block"
                    .into(),
            );
        }
        match self.plan().iter().find(|s| {
            let job = s.job.job();
            !job.streams(checkpoint) || !job.writes_streamable()
        }) {
            Some(s) => Err(format!(
                "stage `{}` holds its model whole or writes one that is read whole ({})",
                s.name,
                s.kind.name()
            )),
            None => Ok(()),
        }
    }

    /// Refuses `[data] activations` other than `f32`, or `spill = "always"`, for a `stage` that
    /// calibrates holding its model (read from `input`) whole: the setting would be ignored.
    pub(crate) fn check_kept_activations(
        &self,
        stage: &PlannedStage,
        input: &shrink_io::Checkpoint,
    ) -> Result<()> {
        let data = &self.data;
        let set = data.activations != crate::ActivationsType::F32 || data.spill == Spill::Always;
        if set && stage.calibrates && !stage.job.job().streams(input) {
            return Err(PipelineError::Invalid(format!(
                "stage `{}` ({}) calibrates holding its model whole, where [data] activations = \
                 \"{}\" and spill = \"{}\" do not apply: they apply to stages that calibrate \
                 reading their model block by block (a Llama-family model quantized, or pruned \
                 other than by Taylor importance or the calibration-loss criterion)",
                stage.name,
                stage.kind.name(),
                serde_json::to_value(data.activations)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                serde_json::to_value(data.spill)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            )));
        }
        Ok(())
    }

    /// How the run uses memory: whether it evaluates block by block ([`crate::StreamEval`]:
    /// `auto` does when the models held whole would exceed `limit` and the run can) and the
    /// estimated peak. Refuses, before any work, a run estimated above `limit`, or one set to
    /// evaluate block by block that cannot. `eval_chunks`: the chunks the evaluation scores
    /// (the text's, when it has been read; else the setting, or 64 for every chunk).
    pub fn check_memory(
        &self,
        shape: Option<ModelShape>,
        checkpoint: Option<&shrink_io::Checkpoint>,
        limit: u64,
        eval_chunks: Option<u64>,
    ) -> Result<MemoryPlan> {
        // Judged on the input model, before any work (each stage is checked again on its own
        // input when it runs).
        if let Some(checkpoint) = checkpoint {
            for stage in self.plan() {
                self.check_kept_activations(stage, checkpoint)?;
            }
        }
        let chunks = eval_chunks.unwrap_or(match self.eval.chunks {
            0 => 64,
            n => n as u64,
        });
        let can = checkpoint.map_or(Err("the model is not here yet".to_string()), |c| {
            self.evaluation_can_stream(c)
        });
        let whole = self.estimated_peak_for(shape, checkpoint, false, chunks, limit);
        let block_by_block = match self.eval.stream {
            crate::StreamEval::Never => false,
            crate::StreamEval::Always => match can {
                Ok(()) => true,
                Err(why) => {
                    return Err(PipelineError::Invalid(format!(
                        "[eval] stream = \"always\": {why}"
                    )))
                }
            },
            crate::StreamEval::Auto => can.is_ok() && whole > limit,
        };
        let estimate = match block_by_block {
            true => self.estimated_peak_for(shape, checkpoint, true, chunks, limit),
            false => whole,
        };
        if estimate > limit {
            let gb = |b: u64| b as f64 / 1e9;
            return Err(PipelineError::Invalid(format!(
                "the run needs an estimated {:.1} GB of memory{}, more than the {:.1} GB allowed \
                 (the machine's memory, or --max-memory): lower [data] samples or seq_len, or \
                 the training batch{}",
                gb(estimate),
                if shape.is_none() {
                    " for its calibration token ids alone"
                } else if block_by_block {
                    " evaluating block by block"
                } else {
                    ""
                },
                gb(limit),
                match (&can, block_by_block) {
                    (Ok(()), false) => "; or evaluate block by block ([eval] stream = \"auto\")",
                    _ => "",
                }
            )));
        }
        Ok(MemoryPlan {
            estimate,
            block_by_block,
        })
    }
}

/// The positions of a chunk the evaluation scores: the second half under llama.cpp's protocol,
/// all but the first otherwise.
pub fn scored_per_chunk(protocol: shrink_eval::Protocol, ctx: usize) -> u64 {
    let ctx = ctx as u64;
    match protocol {
        shrink_eval::Protocol::LlamaCpp => ctx.saturating_sub(1 + ctx / 2),
        shrink_eval::Protocol::Full => ctx.saturating_sub(1),
    }
}

/// At most how many chunks an evaluation of `tokens` tokens in chunks of `ctx` scores, `chunks`
/// at most (one more than the text fills, whatever the protocol).
pub fn eval_chunk_bound(tokens: usize, ctx: usize, chunks: Option<usize>) -> u64 {
    (tokens / ctx.max(1) + 1).min(chunks.unwrap_or(usize::MAX)) as u64
}

/// Chunks per forward pass of a run's evaluation.
pub(crate) const EVAL_BATCH: usize = 4;

/// How a run uses memory ([`Pipeline::check_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The estimated peak, in bytes.
    pub estimate: u64,
    /// Whether the models are evaluated block by block.
    pub block_by_block: bool,
}

/// An evaluation read block by block, as [`streamed_eval_peak`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamedEval {
    /// Chunks scored, tokens per chunk, the positions of a chunk that are scored (its second
    /// half under llama.cpp's protocol) and chunks per forward pass.
    pub chunks: u64,
    pub ctx: u64,
    pub scored: u64,
    pub batch: u64,
    /// 1, or 2 with a reference model.
    pub models: u64,
    /// Bytes a value of an output head read in a 16-bit type and then widened (2), which holds
    /// both copies for a moment; 0 for heads read as f32 (or dequantized from GGUF blocks).
    pub widened_head_bytes: u64,
    /// Whether quantized weights are multiplied as llama.cpp does: each is then also held as its
    /// blocks and its codes taken apart, up to [`PACKED_BYTES`] a weight beside the f32 copy.
    pub packed: bool,
}

/// What multiplying by a weight's blocks holds beside its f32 copy, at most, a weight: the blocks
/// (Q8_0's 1.06 bytes at most) and the codes taken apart (1 byte, with their scales).
pub const PACKED_BYTES: u64 = 3;

/// [`StreamedEval::widened_head_bytes`] of the output heads of `checkpoints`: 2 when one of them
/// stores its head (or tied embedding) in f16 or bf16.
pub fn widened_head_bytes<'a>(
    checkpoints: impl IntoIterator<Item = &'a shrink_io::Checkpoint>,
) -> u64 {
    checkpoints
        .into_iter()
        .filter_map(|c| {
            let config = shrink_models::ModelConfig::from_json(&c.config).ok()?;
            let head = match config.ties_embeddings() {
                true => config.embedding_name(),
                false => "lm_head.weight".to_string(),
            };
            c.tensors.dtype(&head)
        })
        .map(|d| match d {
            candle_core::DType::F16 | candle_core::DType::BF16 => 2,
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// The peak memory of evaluating block by block ([`shrink_eval::evaluate_streamed`]): every
/// chunk's hidden states at one depth are held (`S = c·n·h·4` bytes, `c` chunks of `n` tokens),
/// twice while a block runs on them a batch of `b` chunks at a time (its forward pass, `F`, as
/// [`StreamedPeak`]'s accumulation counts it), beside one block in f32 (`4·P_b`) and the
/// normalized states of the scored positions that the models already run keep (`K = c·k·h·4`
/// each, `k` scored positions a chunk, `m·K` for `m` models at most); then the `m` output heads
/// in f32 (`m·V·h·4`; the last one read beside its stored 16-bit copy, `V·h·w`, for a moment) and
/// one chunk's logits of its scored positions (`k·V·4` for each model), one of them also as the
/// tensor it is read from (`2·m − 1` copies). Embedding: the table (`V·h·4` at most) beside `S`.
///
/// `peak = 256 MB + work + work / 4`, `work = max(4·V·h + S, 4·P_b + 2·S + F + m·K,
/// m·V·h·4 + m·K + max(V·h·w, (2m − 1)·k·V·4))`, `F = 4·(b·n·(3i + 4h) + b·(h/64)·n²)`. The
/// allowance `work / 4` is fitted to a measurement, not derived (as [`StreamedPeak`]'s): on the
/// 8B shapes the process held ~0.7 GB more than the terms at the moment the second head was
/// widened (6.28 GB measured; the terms with `work / 8` gave 6.22 GB).
pub fn streamed_eval_peak(shape: &ModelShape, eval: &StreamedEval) -> u64 {
    let m = |a: u64, b: u64| a.saturating_mul(b);
    let (h, v) = (shape.hidden, shape.vocab);
    let states = m(m(eval.chunks, eval.ctx), m(h, 4));
    let scored = m(eval.models, m(m(eval.chunks, eval.scored), m(h, 4)));
    let embedding = m(m(v, h), 4).saturating_add(states);
    let batch = eval.batch.min(eval.chunks).max(1);
    let forward = m(
        m(
            m(batch, eval.ctx),
            m(3, shape.intermediate).saturating_add(m(4, h)),
        )
        .saturating_add(m(m(batch, h / 64), m(eval.ctx, eval.ctx))),
        4,
    );
    let weight_bytes = if eval.packed { 4 + PACKED_BYTES } else { 4 };
    let running = m(shape.block_parameters, weight_bytes)
        .saturating_add(m(states, 2))
        .saturating_add(forward)
        .saturating_add(scored);
    let logits = m(m(2, eval.models).saturating_sub(1), m(eval.scored, m(v, 4)));
    let scoring = m(m(eval.models, v), m(h, weight_bytes))
        .saturating_add(scored)
        .saturating_add(logits.max(m(m(v, h), eval.widened_head_bytes)));
    let work = embedding.max(running).max(scoring);
    (256u64 << 20).saturating_add(work).saturating_add(work / 4)
}

#[cfg(test)]
mod tests;
