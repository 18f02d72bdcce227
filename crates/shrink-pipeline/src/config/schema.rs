//! The pipeline file's schema: what each table and key means and its default. Validation, with
//! positions, is in the parent module; the stage keys' meaning per kind is in `crate::stage`.

use super::keys::{Located, StageKeys};
use crate::quantize::Export;
use crate::stage::{StageJob, StageKind};
use serde::{Deserialize, Serialize};

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// The run's name: its folder is `runs/NAME`.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    /// The `[[stage]]` tables as written; validation reads them into `stages`.
    #[serde(default, rename = "stage")]
    pub(super) stage_tables: Vec<Located>,
    #[serde(skip)]
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub export: ExportConfig,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub sweep: Option<Sweep>,
    /// Filled by validation.
    #[serde(skip)]
    pub(super) planned: Vec<PlannedStage>,
}

/// Runs a stage once per value of one of its keys; the stages before it are shared.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// The swept stage's name.
    pub stage: String,
    /// `bits`, `group`, `format`, `preset`, `damp` or `alpha`.
    pub key: String,
    pub values: Vec<toml::Value>,
}

/// The stage keys a sweep can vary.
pub const SWEEP_KEYS: &[&str] = &[
    "bits", "group", "format", "preset", "damp", "alpha", "sparsity", "fraction",
];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A demo model name (`smollm2`), a GGUF file or a Hugging Face folder.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Calibration text: `DATASET:SPLIT` or a file.
    #[serde(default = "default_calib")]
    pub calib: String,
    /// Evaluation text.
    #[serde(default = "default_eval")]
    pub eval: String,
    /// Calibration windows and their length in tokens.
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Training text for distillation and QAT.
    #[serde(default = "default_train")]
    pub train: String,
    /// The type a stage that calibrates reading its model block by block keeps the calibration
    /// activations in: `f32` (exact), `bf16` or `f16` (half the memory; the statistics see the
    /// rounded values).
    #[serde(default)]
    pub activations: ActivationsType,
    /// Whether such a stage spills the activations to a scratch file in the run folder (one
    /// batch in memory): `auto` when in memory they would exceed the memory allowed and spilled
    /// they would not, `always` or `never`. The same bytes either way.
    #[serde(default)]
    pub spill: crate::memory::Spill,
}

/// The type calibration activations are kept in ([`DataConfig::activations`]).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActivationsType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ActivationsType {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

fn default_train() -> String {
    "shakespeare:train".into()
}

fn default_calib() -> String {
    shrink_data::DEFAULT_CALIB.into()
}
fn default_eval() -> String {
    "shakespeare:eval".into()
}
fn default_samples() -> usize {
    128
}
fn default_seq_len() -> usize {
    512
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            calib: default_calib(),
            eval: default_eval(),
            samples: default_samples(),
            seq_len: default_seq_len(),
            train: default_train(),
            activations: ActivationsType::default(),
            spill: crate::memory::Spill::default(),
        }
    }
}

/// One step of the pipeline: its kind, name and input, and the keys its kind reads (each kind's
/// module in `crate::stage` owns the structs they are read into).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub kind: StageKind,
    /// Defaults to the kind; must be unique.
    pub name: Option<String>,
    /// `model` or an earlier stage's name; defaults to the previous stage (or the model).
    pub input: Option<String>,
    /// The kind's own keys, each with its place in the file.
    pub keys: StageKeys,
}

impl Stage {
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.name().to_string())
    }

    /// This stage with `key` set to `value` (a sweep variant).
    pub fn with_value(&self, key: &str, value: &toml::Value) -> Stage {
        Stage {
            keys: self.keys.with_value(key, value),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// `llama-cpp` or `full`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    /// 0 = every chunk.
    #[serde(default = "default_chunks")]
    pub chunks: usize,
    /// Prompts whose greedy continuations the report shows side by side.
    #[serde(default = "default_prompts")]
    pub prompts: Vec<String>,
    /// Tokens generated per prompt.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Wrap prompts in the model's chat template when it has one.
    #[serde(default = "default_true")]
    pub chat: bool,
    /// Decode-speed measurement: a prompt of this many evaluation-text tokens, then this many
    /// greedy steps.
    #[serde(default = "default_prefill_tokens")]
    pub prefill_tokens: usize,
    #[serde(default = "default_decode_tokens")]
    pub decode_tokens: usize,
    /// Timed runs of the decode-speed measurement: the report gives their median and spread.
    #[serde(default = "default_speed_repeats")]
    pub speed_repeats: usize,
    /// Encoders: held-out sentences of the evaluation text whose embeddings are compared.
    #[serde(default = "default_sentences")]
    pub sentences: usize,
    /// Whether the models are evaluated block by block: the same perplexity, KL and top-1 with
    /// one block in memory at a time, without generations or decode speed (they need the model
    /// whole).
    #[serde(default)]
    pub stream: StreamEval,
    /// Zero-shot multiple-choice tasks scored on every model, as `shrink eval --task` takes them
    /// (`hellaswag:500`, `piqa`): accuracy and length-normalized accuracy beside the perplexity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
}

/// When a run evaluates its models block by block ([`EvalConfig::stream`]).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamEval {
    /// When the run, holding its models whole, would need more than the memory allowed, and
    /// every stage reads its input block by block.
    #[default]
    Auto,
    /// Always; a pipeline that cannot (an encoder, a stage that holds the model whole) is
    /// refused.
    Always,
    /// Never: the models are built whole.
    Never,
}

fn default_sentences() -> usize {
    512
}

fn default_prompts() -> Vec<String> {
    vec![
        "What is the capital of France?".into(),
        "Write a short poem about the sea.".into(),
        "Explain in one sentence why the sky is blue.".into(),
    ]
}
fn default_max_new_tokens() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_prefill_tokens() -> usize {
    128
}
fn default_decode_tokens() -> usize {
    32
}
fn default_speed_repeats() -> usize {
    5
}

fn default_protocol() -> String {
    "llama-cpp".into()
}
fn default_ctx() -> usize {
    512
}
fn default_chunks() -> usize {
    32
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            protocol: default_protocol(),
            ctx: default_ctx(),
            chunks: default_chunks(),
            prompts: default_prompts(),
            max_new_tokens: default_max_new_tokens(),
            chat: true,
            prefill_tokens: default_prefill_tokens(),
            decode_tokens: default_decode_tokens(),
            speed_repeats: default_speed_repeats(),
            sentences: default_sentences(),
            stream: StreamEval::Auto,
            tasks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `gguf` and/or `hf`.
    #[serde(default = "default_formats")]
    pub formats: Vec<String>,
}

fn default_formats() -> Vec<String> {
    vec!["gguf".into()]
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            formats: default_formats(),
        }
    }
}

/// Quality gates: a run whose final model misses one fails.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    pub max_ppl_increase_pct: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    pub max_kl: Option<f64>,
    /// Encoders: mean sentence-embedding cosine with the input model.
    pub min_embedding_cosine: Option<f64>,
    /// Encoders: mean top-10 nearest-neighbour overlap with the input model.
    pub min_neighbour_agreement: Option<f64>,
    pub max_size_mb: Option<f64>,
    pub min_compression_ratio: Option<f64>,
    /// Every `[eval] tasks` task's length-normalized accuracy (a fraction) at least this.
    pub min_acc_norm: Option<f64>,
    /// No task's length-normalized accuracy more than this many percentage points below the
    /// baseline's.
    pub max_acc_norm_drop: Option<f64>,
}

/// A stage ready to run: its input resolved, its quantization job made, its output format known.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStage {
    pub name: String,
    pub kind: StageKind,
    /// `model` or an earlier planned stage's name.
    pub input: String,
    pub calibrates: bool,
    pub export: Export,
    pub job: StageJob,
    /// Distillation: the teacher (`model` or an earlier stage).
    pub teacher: Option<String>,
    /// For a sweep variant: `key=value`.
    pub sweep_value: Option<String>,
}

/// A valid pipeline's plan as `shrink validate --json` and `shrink run --dry-run --json` print it
/// (schema `shrink.plan/v1`).
#[derive(Debug, Serialize)]
pub struct PlanSummary<'a> {
    pub schema: &'static str,
    pub file: String,
    pub name: &'a str,
    pub model: &'a str,
    pub run_dir: String,
    pub stages: Vec<StagePlan<'a>>,
    pub export: &'a [String],
    pub sweep: &'a Option<Sweep>,
    pub gates: &'a Gates,
    pub estimated_peak_bytes: Option<u64>,
    /// Whether the run will evaluate its models block by block ([`EvalConfig::stream`]).
    pub eval_block_by_block: bool,
}

/// One stage of a [`PlanSummary`].
#[derive(Debug, Serialize)]
pub struct StagePlan<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    pub input: &'a str,
    /// The stage's folder in the run folder.
    pub output: String,
    pub format: Export,
    pub calibrates: bool,
    pub sweep_value: &'a Option<String>,
}

impl Pipeline {
    /// Stages in the order they run (sweep variants after the stages they branch from), with
    /// their inputs resolved.
    pub fn plan(&self) -> &[PlannedStage] {
        &self.planned
    }

    /// The plan of a run in `run_dir`, with the estimated peak memory where the model's shape
    /// was known.
    pub fn plan_summary(
        &self,
        file: &std::path::Path,
        run_dir: &std::path::Path,
        estimated_peak_bytes: Option<u64>,
        eval_block_by_block: bool,
    ) -> PlanSummary<'_> {
        let stages = self
            .planned
            .iter()
            .map(|s| StagePlan {
                name: &s.name,
                kind: s.kind.name(),
                input: &s.input,
                output: run_dir.join("stages").join(&s.name).display().to_string(),
                format: s.export,
                calibrates: s.calibrates,
                sweep_value: &s.sweep_value,
            })
            .collect();
        PlanSummary {
            schema: "shrink.plan/v1",
            file: file.display().to_string(),
            name: &self.name,
            model: &self.model.source,
            run_dir: run_dir.display().to_string(),
            stages,
            export: &self.export.formats,
            sweep: &self.sweep,
            gates: &self.gates,
            estimated_peak_bytes,
            eval_block_by_block,
        }
    }

    /// The planned stages of the pipeline as written, without sweep variants.
    pub fn main_chain(&self) -> impl Iterator<Item = &PlannedStage> {
        self.planned.iter().filter(|s| s.sweep_value.is_none())
    }
}
