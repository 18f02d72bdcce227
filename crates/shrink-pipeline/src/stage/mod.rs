//! Stage kinds. Each module owns one technique end to end: the job type the CLI command and the
//! pipeline stage share (`QuantizeRequest`, `PruneRequest`, …), the structs of the stage keys it
//! reads and their translation into a job ([`StageType`]), and how the job plans, estimates its
//! memory and runs ([`Job`]). [`stage_kinds!`] is the one registry: a kind added there without a
//! module the compiler can find does not build.
//!
//! Adding a stage kind: a module here with serde structs of its keys and a unit struct
//! implementing [`StageType`] (and a job type implementing [`Job`], listed in [`StageJob`], when no
//! existing job fits), and one line in `stage_kinds!`.

pub mod distill;
pub mod prune;
pub mod qat;
pub mod quantize;
pub mod search;

use crate::config::{KeyReader, StageKeys, ValueError};
use crate::report::LayerRow;
use crate::{Export, PipelineError, Result};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_io::Checkpoint;
use shrink_models::Transformer;
use std::collections::BTreeMap;
use std::path::Path;

/// Declares the stage kinds once: their `kind = "…"` names and the [`StageType`] serving each.
macro_rules! stage_kinds {
    ($($variant:ident = $name:literal => $ty:expr,)*) => {
        /// The kinds of stage, as `kind = "…"` names them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        pub enum StageKind {
            $(#[serde(rename = $name)] $variant,)*
        }

        impl StageKind {
            /// Every kind, in the order error messages list them.
            pub const ALL: &'static [StageKind] = &[$(StageKind::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(StageKind::$variant => $name,)*
                }
            }

            /// The module serving this kind.
            pub(crate) fn stage_type(self) -> &'static dyn StageType {
                match self {
                    $(StageKind::$variant => &$ty,)*
                }
            }
        }
    };
}

stage_kinds! {
    QuantizeRtn = "quantize.rtn" => quantize::QuantizeStage,
    QuantizeGptq = "quantize.gptq" => quantize::QuantizeStage,
    QuantizeSignRound = "quantize.signround" => quantize::QuantizeStage,
    QuantizeAwq = "quantize.awq" => quantize::QuantizeStage,
    QuantizeSmoothQuant = "quantize.smoothquant" => quantize::QuantizeStage,
    PruneMagnitude = "prune.magnitude" => prune::PruneStage,
    PruneWanda = "prune.wanda" => prune::PruneStage,
    PruneSparseGpt = "prune.sparsegpt" => prune::PruneStage,
    PruneHeads = "prune.heads" => prune::PruneStage,
    PruneChannels = "prune.channels" => prune::PruneStage,
    PruneLayers = "prune.layers" => prune::PruneStage,
    PruneWidth = "prune.width" => prune::PruneStage,
    Distill = "distill" => distill::DistillStage,
    QuantizeQat = "quantize.qat" => qat::QatStage,
    Search = "search" => search::SearchStage,
}

impl StageKind {
    /// The pruning method of a `prune.*` kind.
    pub fn prune_kind(self) -> Option<prune::PruneKind> {
        self.name()
            .strip_prefix("prune.")
            .and_then(|k| prune::PruneKind::parse(k).ok())
    }

    /// The keys a stage of this kind reads (beside `kind`, `name` and `input`).
    pub(crate) fn keys(self) -> Vec<&'static str> {
        self.stage_type().keys(self)
    }
}

/// A key check's failure: the key at fault (when one is) and why.
pub(crate) type KeyResult<T> = std::result::Result<T, (Option<&'static str>, String)>;

/// Why a stage's keys make no job: a key check's failure, or a value that does not fit its key
/// (placed in the file).
#[derive(Debug)]
pub(crate) enum KeyError {
    Key(Option<&'static str>, String),
    Value(ValueError),
}

impl From<(Option<&'static str>, String)> for KeyError {
    fn from((key, message): (Option<&'static str>, String)) -> Self {
        KeyError::Key(key, message)
    }
}

impl KeyError {
    pub fn message(&self) -> &str {
        match self {
            KeyError::Key(_, m) => m,
            KeyError::Value(e) => &e.message,
        }
    }
}

/// A kind's job made from a stage's keys, or why not.
pub(crate) type JobResult = std::result::Result<StageJob, KeyError>;

/// What a kind makes of a stage's keys. Each kind's module owns serde structs of its keys; a key
/// that no struct of the kind has is refused before [`StageType::job`] runs.
pub(crate) trait StageType: Sync {
    /// The keys a stage of `kind` reads (beside `kind`, `name` and `input`): fields of its keys
    /// structs (see [`crate::config::fields`]).
    fn keys(&self, kind: StageKind) -> Vec<&'static str>;
    /// Reads the stage's keys into the kind's structs, checks them, each error naming its key,
    /// and makes its job.
    fn job(&self, kind: StageKind, keys: &mut KeyReader)
        -> std::result::Result<StageJob, KeyError>;
}

/// The memory a job needs beyond the models every run holds (bytes).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JobMemory {
    /// Held at the same time as the calibration activations.
    pub with_calibration: u128,
    /// Held while training (instead of calibrating).
    pub training: u128,
}

/// The model a memory estimate is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelSizes {
    pub parameters: u128,
    pub hidden: u128,
    pub intermediate: u128,
    pub vocab: u128,
}

/// What a stage reads when it runs.
pub(crate) struct StageContext<'a> {
    /// The input model's checkpoint (the model built from it is passed beside).
    pub checkpoint: &'a Checkpoint,
    /// The identity of the input (its stage key or the model's hash).
    pub input_key: &'a str,
    /// The stage's own key: training resumes only a run with the same key.
    pub key: &'a str,
    /// Calibration windows, for jobs that calibrate.
    pub calibration: Option<&'a [Vec<u32>]>,
    /// Distillation's teacher.
    pub teacher: Option<&'a Transformer>,
    pub training: Option<&'a TrainingText>,
    /// Where training keeps its checkpoints (outside the staging folder, so a rerun resumes).
    pub workdir: &'a Path,
    pub progress: &'a dyn Progress,
    /// How a stage that calibrates block by block keeps its activations.
    pub keep: shrink_calib::Keep<'a>,
    /// The ranks a stage that calibrates block by block splits its work across (MPI), or
    /// [`shrink_core::Alone`]; rank 0 writes.
    pub world: &'a dyn shrink_core::Collective,
}

/// The training and held-out text of training stages, tokenized.
pub(crate) struct TrainingText {
    pub train: Vec<u32>,
    pub eval: Vec<u32>,
    pub key: String,
}

impl StageContext<'_> {
    /// Training and held-out windows of `seq_len` tokens.
    pub fn windows(&self, seq_len: usize, eval_windows: usize) -> Result<[Vec<Vec<u32>>; 2]> {
        let t = self
            .training
            .ok_or_else(|| PipelineError::Invalid("no training text was read".into()))?;
        Ok([
            crate::encoder::training_windows(self.checkpoint, &t.train, seq_len, None)?,
            crate::encoder::training_windows(
                self.checkpoint,
                &t.eval,
                seq_len,
                Some(eval_windows),
            )?,
        ])
    }
}

/// What a stage's run reports (its record adds the stage's name, key, timing and memory).
#[derive(Debug, Default)]
pub(crate) struct StageResult {
    pub method: String,
    /// Stored type → number of tensors.
    pub types: BTreeMap<String, usize>,
    pub linear_bits_per_weight: f64,
    pub layers: Vec<LayerRow>,
    /// Parameters before and after, and for structured pruning what was removed and the shape.
    pub pruning: Option<serde_json::Value>,
    pub training: Option<shrink_train::TrainOutcome>,
    pub search: Option<search::SearchSummary>,
}

/// A job: what a stage does, as the CLI commands also describe it.
pub(crate) trait Job {
    /// Whether the job calibrates, and what it writes.
    fn plan(&self) -> Result<(bool, Export)>;
    /// Whether the job reads the training text.
    fn trains(&self) -> bool {
        false
    }
    /// Its memory beyond the models, on a model of `sizes`.
    fn memory(&self, _sizes: &ModelSizes) -> JobMemory {
        JobMemory::default()
    }
    /// Whether its output has its input's shapes.
    fn keeps_shapes(&self) -> bool {
        true
    }
    /// Refuses, before any work, an input model whose shapes the job cannot take.
    fn check_shapes(&self, _config: &shrink_models::ModelConfig) -> Result<()> {
        Ok(())
    }
    /// Whether what it writes can be read block by block (not a model whose linears quantize
    /// their activations to int8, which only a model built whole applies).
    fn writes_streamable(&self) -> bool {
        true
    }
    /// Whether its output holds a pruning mask (exact zeros) that a later quantization keeps.
    fn leaves_mask(&self) -> bool {
        false
    }
    /// Keeps the input's pruning mask, unless the stage set `keep_sparsity` itself.
    fn keep_mask(&mut self, _keys: &StageKeys, _input_has_mask: bool) {}
    /// Runs the job on `model` (built in f32 from the input) and writes `out`.
    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult>;
    /// Whether the job reads its input block by block ([`Job::run_streamed`]) instead of a model
    /// built whole: the same bytes in the memory of one block ([`Compress::streams`]).
    fn streams(&self, _checkpoint: &Checkpoint) -> bool {
        false
    }
    /// What the memory formula needs to know of the job when it streams `checkpoint`, with
    /// `calibration` windows and tokens per window when the stage calibrates.
    fn streamed_job(
        &self,
        _checkpoint: &Checkpoint,
        _calibration: Option<(u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        None
    }
    /// Runs the job on the model read block by block from `cx.checkpoint` and writes `out`; only
    /// called when [`Job::streams`] says so.
    fn run_streamed(&self, _cx: &StageContext, _out: &Path) -> Result<StageResult> {
        Err(PipelineError::Invalid(
            "this stage holds the model whole; it does not stream".into(),
        ))
    }
}

/// What a compression job reads besides the model.
#[derive(Clone, Copy)]
pub struct JobInput<'a> {
    /// The checkpoint the model was built from (its tokenizer and metadata are written along).
    pub checkpoint: &'a Checkpoint,
    /// Calibration windows, for jobs that calibrate.
    pub windows: Option<&'a [Vec<u32>]>,
    /// Windows per forward pass.
    pub batch: usize,
    /// The ranks calibration is split across (MPI), or [`shrink_core::Alone`]; rank 0 writes.
    pub world: &'a dyn shrink_core::Collective,
    /// Where and in what type a streamed job keeps its calibration activations
    /// ([`shrink_calib::Keep`]): in memory or spilled to a scratch file in a folder, one batch in
    /// memory at a time; in f32, or f16/bf16.
    pub keep: shrink_calib::Keep<'a>,
    pub progress: &'a dyn Progress,
}

/// A resolved job that changes one model and writes it: quantization or pruning. `shrink quantize`,
/// `shrink prune`, the pipeline's stages and the search run these jobs through this one interface.
pub trait Compress {
    type Outcome;
    /// Whether the job needs calibration windows.
    fn calibrates(&self) -> bool;
    /// Refuses, before anything is calibrated, a model that the job or its output cannot take.
    fn check(&self, checkpoint: &Checkpoint, model: &Transformer) -> Result<()>;
    /// Compresses `model` and writes it to `out` (a GGUF file or a Hugging Face folder,
    /// atomically).
    fn write(&self, input: &JobInput, model: &mut Transformer, out: &Path)
        -> Result<Self::Outcome>;
    /// Whether the job can read `checkpoint`'s model block by block
    /// ([`Compress::write_streamed`]) rather than hold it whole: the same method and the same
    /// bytes, in the memory of one block.
    fn streams(&self, _checkpoint: &Checkpoint) -> bool {
        false
    }
    /// [`Compress::check`] for a model read block by block: refuses, before anything is
    /// calibrated, what the job or its output cannot take.
    fn check_streamed(&self, _checkpoint: &Checkpoint) -> Result<()> {
        Ok(())
    }
    /// What the memory formula ([`crate::memory::streamed_peak`]) needs to know of the job when
    /// it streams `checkpoint` with `calibration` (windows, tokens per window, windows per pass).
    fn streamed_job(
        &self,
        _checkpoint: &Checkpoint,
        _calibration: Option<(u64, u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        None
    }
    /// Checks, compresses and writes the model read block by block from `input.checkpoint`; only
    /// called when [`Compress::streams`] says so.
    fn write_streamed(&self, _input: &JobInput, _out: &Path) -> Result<Self::Outcome> {
        Err(PipelineError::Invalid(
            "this job holds the model whole; it does not stream".into(),
        ))
    }
}

impl StageContext<'_> {
    /// Runs a compression job on `model` with this stage's calibration and writes `out`.
    pub(crate) fn compress<C: Compress>(
        &self,
        job: &C,
        model: &mut Transformer,
        batch: usize,
        out: &Path,
    ) -> Result<C::Outcome> {
        job.write(&self.job_input(batch), model, out)
    }

    /// What a compression job reads besides the model: this stage's input and calibration.
    pub(crate) fn job_input(&self, batch: usize) -> JobInput<'_> {
        JobInput {
            checkpoint: self.checkpoint,
            windows: self.calibration,
            batch,
            world: self.world,
            keep: self.keep,
            progress: self.progress,
        }
    }
}

/// What a stage does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageJob {
    Quantize(quantize::QuantizeRequest),
    Prune(prune::PruneRequest),
    Distill(distill::DistillRequest),
    Qat(qat::QatRequest),
    Search(search::SearchRequest),
}

/// `$body` on the job inside every variant of a [`StageJob`], bound to `$r`.
macro_rules! each_job {
    ($job:expr, $r:ident => $body:expr) => {
        match $job {
            StageJob::Quantize($r) => $body,
            StageJob::Prune($r) => $body,
            StageJob::Distill($r) => $body,
            StageJob::Qat($r) => $body,
            StageJob::Search($r) => $body,
        }
    };
}

impl StageJob {
    pub(crate) fn job(&self) -> &dyn Job {
        each_job!(self, r => r)
    }

    pub(crate) fn job_mut(&mut self) -> &mut dyn Job {
        each_job!(self, r => r)
    }

    /// Whether the job calibrates and where it writes.
    pub fn resolve(&self) -> Result<(bool, Export)> {
        self.job().plan()
    }

    /// Whether the job trains (and reads the training text).
    pub fn trains(&self) -> bool {
        self.job().trains()
    }
}

/// A value written as a string or a number, as text.
pub(crate) fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `format` (gguf | hf) and `dtype` (f32 | f16) of a stage that writes float weights.
pub(crate) fn check_float_keys(format: &Option<String>, dtype: &Option<String>) -> KeyResult<()> {
    for (key, value, allowed) in [
        ("format", format, ["gguf", "hf"]),
        ("dtype", dtype, ["f32", "f16"]),
    ] {
        if let Some(v) = value {
            if !allowed.contains(&v.as_str()) {
                return Err((
                    Some(key),
                    format!("{key} `{v}` is not one of: {}", allowed.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// A key check of a stage's `damp` (every kind that has one).
pub(crate) fn check_damp(damp: Option<f64>) -> KeyResult<()> {
    check_unit("damp", damp)
}

/// `blend` (GPTQ's Hessian toward its diagonal) is a fraction.
pub(crate) fn check_blend(blend: Option<f64>) -> KeyResult<()> {
    check_unit("blend", blend)
}

/// A key whose value must lie in 0..=1.
fn check_unit(key: &'static str, value: Option<f64>) -> KeyResult<()> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => {
            Err((Some(key), format!("{key} = {v} is outside 0..=1")))
        }
        _ => Ok(()),
    }
}

/// `weights` (rtn | gptq): how AWQ, SmoothQuant, QAT and the search pick codes.
pub(crate) fn check_weights(weights: &Option<String>) -> KeyResult<()> {
    if let Some(w) = weights {
        if !["rtn", "gptq"].contains(&w.as_str()) {
            return Err((
                Some("weights"),
                format!("weights `{w}` is not one of: rtn, gptq"),
            ));
        }
    }
    Ok(())
}

/// A job error as a key check's failure (no key at fault).
pub(crate) fn whole<T>(r: Result<T>) -> KeyResult<T> {
    r.map_err(|e| (None, e.to_string()))
}

#[cfg(test)]
mod tests;
