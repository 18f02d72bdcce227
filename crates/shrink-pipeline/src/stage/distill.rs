//! One distillation job: the options of `shrink distill` and of a `distill` stage resolved into a
//! student initialisation and a [`DistillJob`], trained, and written as a GGUF or a Hugging Face
//! folder. The CLI command and the pipeline stage both go through [`DistillRequest`].

use super::{check_float_keys, Job, JobMemory, KeyResult, ModelSizes, StageContext, StageJob};
use super::{JobResult, StageKind, StageResult, StageType};
use crate::config::{fields, KeyReader};
use crate::quantize::Export;
use crate::{PipelineError, Result};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_distill::{DistillJob, TrainConfig, TrainOutcome};
use shrink_io::{Checkpoint, GgufWriteType};
use shrink_models::Transformer;
use shrink_train::{AdamWConfig, DistillConfig, Divergence, HiddenLoss};
use std::collections::BTreeMap;
use std::path::Path;

fn invalid(message: String) -> PipelineError {
    PipelineError::Invalid(message)
}

/// Optimisation settings, as `shrink distill` flags and a stage's `[stage.train]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainKeys {
    pub steps: u64,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub accumulation: usize,
    /// Tokens per training window.
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub clip: f64,
    /// Evaluate every this many updates (0: at the start and the end only).
    pub eval_every: u64,
    /// Held-out windows (of `seq_len` tokens) evaluated.
    pub eval_windows: usize,
    /// Checkpoint every this many updates (0: never).
    pub checkpoint_every: u64,
    pub seed: u64,
    /// Recompute each block's activations in the backward pass instead of holding the whole
    /// graph (a third of the memory, a second forward pass of the student's blocks).
    pub recompute: bool,
}

impl Default for TrainKeys {
    fn default() -> Self {
        Self {
            steps: 200,
            batch: 4,
            accumulation: 1,
            seq_len: 256,
            lr: 2e-4,
            warmup: 20,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            clip: 1.0,
            eval_every: 50,
            eval_windows: 8,
            checkpoint_every: 50,
            seed: 0,
            recompute: true,
        }
    }
}

impl TrainKeys {
    pub fn config(&self) -> Result<TrainConfig> {
        let c = TrainConfig {
            steps: self.steps,
            batch: self.batch,
            accumulation: self.accumulation,
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            clip_norm: (self.clip > 0.0).then_some(self.clip),
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            recompute: self.recompute,
        };
        c.validate()?;
        if self.seq_len < 2 {
            return Err(invalid("seq_len must be at least 2".into()));
        }
        Ok(c)
    }
}

/// How the student starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StudentInit {
    /// The given model as it is (e.g. a structurally pruned teacher).
    Model,
    /// The teacher's blocks at these positions (`0,2,4`, `0-7`, `every:2`).
    Layers(String),
    /// Random weights with the teacher's config and these shape keys changed.
    Random(BTreeMap<String, usize>),
}

/// What to distil and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistillRequest {
    pub student: StudentInit,
    /// `forward-kl` or `reverse-kl`.
    pub loss: String,
    pub temperature: f64,
    /// Weight of cross-entropy on the text; the KL gets 1 − alpha.
    pub alpha: f64,
    /// `auto` (each kept layer to its source; layer subsets only) or `S:T,S:T`.
    pub hidden: Option<String>,
    /// `mse` or `cosine`.
    pub hidden_loss: String,
    pub hidden_weight: f64,
    /// `S:T`: MiniLM attention transfer between these layers.
    pub attention: Option<String>,
    pub attention_weight: f64,
    pub freeze: Vec<String>,
    pub top_k: Option<usize>,
    pub train: TrainKeys,
    /// `gguf` or `hf`.
    pub format: Option<String>,
    /// `f32` or `f16`.
    pub dtype: Option<String>,
}

impl Default for DistillRequest {
    fn default() -> Self {
        Self {
            student: StudentInit::Model,
            loss: "forward-kl".into(),
            temperature: 1.0,
            alpha: 0.0,
            hidden: None,
            hidden_loss: "mse".into(),
            hidden_weight: 1.0,
            attention: None,
            attention_weight: 1.0,
            freeze: Vec::new(),
            top_k: None,
            train: TrainKeys::default(),
            format: None,
            dtype: None,
        }
    }
}

/// A request with every choice made.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDistill {
    pub job: DistillJob,
    pub export: Export,
    pub dtype: GgufWriteType,
    pub seq_len: usize,
    pub eval_windows: usize,
    /// The `auto` hidden pairs wait for the layer list.
    auto_hidden: bool,
}

/// Parses `S:T,S:T` layer pairs.
fn pairs(spec: &str, what: &str) -> Result<Vec<(usize, usize)>> {
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (s, t) = p.split_once(':').ok_or_else(|| {
                invalid(format!(
                    "{what} '{spec}': expected STUDENT:TEACHER layer pairs such as 3:7"
                ))
            })?;
            let n = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("{what} '{spec}': '{x}' is not a layer number")))
            };
            Ok((n(s)?, n(t)?))
        })
        .collect()
}

impl DistillRequest {
    /// Checks the options and makes every choice that does not need the models.
    pub fn resolve(&self) -> Result<ResolvedDistill> {
        let (export, dtype) =
            crate::prune::float_export(self.format.as_deref(), self.dtype.as_deref())?;
        let auto_hidden = self.hidden.as_deref() == Some("auto");
        if auto_hidden && !matches!(self.student, StudentInit::Layers(_)) {
            return Err(invalid(
                "hidden = auto pairs each kept layer with its source: it needs a layer subset (layers = ...)"
                    .into(),
            ));
        }
        let hidden = match self.hidden.as_deref() {
            None | Some("auto") => Vec::new(),
            Some(spec) => pairs(spec, "hidden")?,
        };
        let attention = match self.attention.as_deref() {
            None => None,
            Some(spec) => match pairs(spec, "attention")?.as_slice() {
                [one] => Some(*one),
                _ => {
                    return Err(invalid(format!(
                        "attention '{spec}': expected one S:T pair"
                    )))
                }
            },
        };
        if self.top_k == Some(0) {
            return Err(invalid("top_k must be at least 1".into()));
        }
        for (what, w) in [
            ("hidden_weight", self.hidden_weight),
            ("attention_weight", self.attention_weight),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(invalid(format!(
                    "{what} must be a non-negative number, got {w}"
                )));
            }
        }
        let loss = DistillConfig {
            divergence: Divergence::parse(&self.loss)?,
            temperature: self.temperature,
            alpha: self.alpha,
            hidden,
            hidden_loss: HiddenLoss::parse(&self.hidden_loss)?,
            hidden_weight: self.hidden_weight,
            attention,
            attention_weight: self.attention_weight,
        };
        if !(0.0..=1.0).contains(&loss.alpha) {
            return Err(invalid(format!("alpha = {} is outside [0, 1]", loss.alpha)));
        }
        if loss.temperature.is_nan() || loss.temperature <= 0.0 {
            return Err(invalid(format!(
                "temperature must be positive, got {}",
                loss.temperature
            )));
        }
        Ok(ResolvedDistill {
            job: DistillJob {
                train: self.train.config()?,
                loss,
                frozen: self.freeze.clone(),
                top_k: self.top_k,
            },
            export,
            dtype,
            seq_len: self.train.seq_len,
            eval_windows: self.train.eval_windows,
            auto_hidden,
        })
    }
}

/// The student a request starts from: `given` (the stage input, when it is not the teacher) or
/// one built from the teacher.
pub fn build_student(
    request: &DistillRequest,
    resolved: &mut ResolvedDistill,
    teacher: &Transformer,
    given: Option<&Transformer>,
) -> Result<Transformer> {
    match &request.student {
        StudentInit::Model => given.cloned().ok_or_else(|| {
            invalid(
                "no student: give a smaller model (--student, or a pruning stage as input), a layer subset (layers) or a student config"
                    .into(),
            )
        }),
        StudentInit::Layers(spec) => {
            let layers = shrink_distill::parse_layers(spec, teacher.config.num_hidden_layers)
                ?;
            if resolved.auto_hidden {
                resolved.job.loss.hidden = layers.iter().copied().enumerate().collect();
            }
            shrink_distill::layer_subset(teacher, &layers).map_err(PipelineError::from)
        }
        StudentInit::Random(overrides) => {
            let config = shrink_distill::student_config(&teacher.config, overrides)?;
            shrink_distill::random_student(teacher, config, request.train.seed).map_err(PipelineError::from)
        }
    }
}

/// Consecutive non-overlapping windows of `len` tokens (at most `max`, when given).
pub fn chunk_windows(tokens: &[u32], len: usize, max: Option<usize>) -> Vec<Vec<u32>> {
    tokens
        .chunks_exact(len.max(1))
        .take(max.unwrap_or(usize::MAX))
        .map(<[u32]>::to_vec)
        .collect()
}

/// What a distillation run produced.
#[derive(Debug, Clone, Serialize)]
pub struct DistillOutcome {
    pub parameters_student: usize,
    pub parameters_teacher: usize,
    pub train_windows: usize,
    pub training: TrainOutcome,
}

/// Distils `teacher` into `student` and writes the student to `out` (with `checkpoint`'s
/// tokenizer and the student's shape). `workdir` holds checkpoints and the top-k cache, so an
/// interrupted run resumes there; `fingerprint` identifies the run. The student is consumed: its
/// trainable copy replaces it (the caller keeps no second copy through training).
#[allow(clippy::too_many_arguments)]
pub fn distill_and_write(
    checkpoint: &Checkpoint,
    teacher: &Transformer,
    student: Transformer,
    resolved: &ResolvedDistill,
    train: &[Vec<u32>],
    eval: &[Vec<u32>],
    workdir: &Path,
    fingerprint: &str,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(Transformer, DistillOutcome)> {
    shrink_io::check_export(checkpoint, student.arch, resolved.export)?;
    let (trained, training) = shrink_distill::distill(
        teacher,
        student,
        &resolved.job,
        train,
        eval,
        Some(workdir),
        fingerprint,
        progress,
    )?;
    shrink_io::write_model(checkpoint, &trained, resolved.export, resolved.dtype, out)?;
    let outcome = DistillOutcome {
        parameters_student: trained.num_parameters(),
        parameters_teacher: teacher.num_parameters(),
        train_windows: train.len(),
        training,
    };
    Ok((trained, outcome))
}

/// A run identity for resuming: the request, both models' sources and the training tokens.
pub fn fingerprint(request: &impl Serialize, sources: &[&Path], train: &[Vec<u32>]) -> String {
    let mut text = serde_json::to_string(request).unwrap_or_default();
    for s in sources {
        let len = std::fs::metadata(s).map(|m| m.len()).unwrap_or(0);
        text.push_str(&format!("|{}:{len}", s.display()));
    }
    let bytes: Vec<u8> = train
        .iter()
        .flatten()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    text.push('|');
    text.push_str(&shrink_core::sha256_hex(&bytes));
    shrink_core::sha256_hex(text.as_bytes())
}

/// What training holds beyond the models every run has: the teacher, the student with its
/// gradients and AdamW moments (six model sizes in all), and the activations of a micro-batch.
/// Holding the whole graph (`recompute = false`): the logits and their softmaxes (~12 copies of
/// `vocab` per token) and ~10 of `hidden + intermediate` per token and layer (measured 9.1 GB
/// distilling SmolLM2 at 4 × 256 tokens). Recomputed block by block (the default): every block's
/// input, one block's graph (~12 of `hidden + intermediate` per token, and its attention
/// probabilities with heads of 64), a slice of the head (~4 buffers of 2²³ logits) and two
/// head-weight-sized buffers (measured 2.8 GB on the same job).
pub(crate) fn training_memory(t: &TrainKeys, m: &ModelSizes) -> JobMemory {
    let tokens = t.batch as u128 * t.seq_len as u128;
    let layers = m.parameters / (4 * m.hidden * m.hidden + 3 * m.hidden * m.intermediate).max(1);
    let graph = if t.recompute {
        let heads = (m.hidden / 64).max(1);
        let block = 12 * (m.hidden + m.intermediate) + 3 * heads * t.seq_len as u128;
        (tokens * (layers * m.hidden + block) + 4 * (1 << 23) + 2 * m.vocab * m.hidden) * 4
    } else {
        tokens * (12 * m.vocab + 10 * layers * (m.hidden + m.intermediate)) * 4
    };
    JobMemory {
        training: 6 * m.parameters * 4 + graph,
        ..JobMemory::default()
    }
}

/// The `distill` stage.
pub(crate) struct DistillStage;

/// The training keys of a `distill` or `quantize.qat` stage.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrainingKeys {
    /// `forward-kl` or `reverse-kl`.
    pub loss: Option<String>,
    pub temperature: Option<f64>,
    /// The weight of the distillation loss against the cross-entropy on the text.
    pub alpha: Option<f64>,
    /// Tensor name patterns kept frozen.
    pub freeze: Option<Vec<String>>,
    /// Steps, batch, learning rate… (`[stage.train]`).
    pub train: Option<TrainKeys>,
}

/// A `distill` stage's own keys: the student, the hidden-state and attention losses, the output.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DistillKeys {
    /// The teacher, `model` (the default) or an earlier stage's name. Its type is checked here;
    /// the pipeline reads it when it plans the stage's inputs.
    #[allow(dead_code)]
    pub teacher: Option<String>,
    /// A student made of these teacher layers (`0,2,4`, `0-7`, `every:2`).
    pub layers: Option<String>,
    /// A random student with the teacher's config and these shape keys changed.
    #[serde(default)]
    pub student: BTreeMap<String, usize>,
    /// Hidden-state pairs `S:T,S:T`, or `auto` with `layers`.
    pub hidden: Option<String>,
    /// `mse` or `cosine`.
    pub hidden_loss: Option<String>,
    pub hidden_weight: Option<f64>,
    /// MiniLM attention transfer `S:T`.
    pub attention: Option<String>,
    pub attention_weight: Option<f64>,
    /// Cache the teacher's top-k log-probabilities.
    pub top_k: Option<usize>,
    /// `gguf` or `hf`.
    pub format: Option<String>,
    /// `f32` or `f16` storage.
    pub dtype: Option<String>,
}

impl StageType for DistillStage {
    fn keys(&self, _kind: StageKind) -> Vec<&'static str> {
        [fields::<TrainingKeys>(), fields::<DistillKeys>()].concat()
    }

    fn job(&self, _kind: StageKind, keys: &mut KeyReader) -> JobResult {
        let training: TrainingKeys = keys.take()?;
        let own: DistillKeys = keys.take()?;
        training.check()?;
        own.check()?;
        Ok(StageJob::Distill(distill_request(&training, own)))
    }
}

impl TrainingKeys {
    /// The checks of the training keys, each error pointing at its key.
    pub(crate) fn check(&self) -> KeyResult<()> {
        if let Some(l) = &self.loss {
            Divergence::parse(l).map_err(|e| (Some("loss"), e.to_string()))?;
        }
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return Err((
                    Some("temperature"),
                    format!("temperature = {t} must be positive"),
                ));
            }
        }
        if let Some(a) = self.alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err((Some("alpha"), format!("alpha = {a} is outside 0..=1")));
            }
        }
        if let Some(t) = &self.train {
            t.config().map_err(|e| (Some("train"), e.to_string()))?;
        }
        Ok(())
    }
}

impl DistillKeys {
    /// The checks of the student, loss and output keys, each error pointing at its key.
    fn check(&self) -> KeyResult<()> {
        if let Some(h) = &self.hidden_loss {
            HiddenLoss::parse(h).map_err(|e| (Some("hidden_loss"), e.to_string()))?;
        }
        if let Some(l) = &self.layers {
            // The count is checked against the teacher when the stage runs.
            shrink_distill::parse_layers(l, 4096).map_err(|e| (Some("layers"), e.to_string()))?;
        }
        if self.layers.is_some() && !self.student.is_empty() {
            return Err((
                Some("student"),
                "give `layers` (a subset of the teacher) or `[stage.student]` (a random config), not both".into(),
            ));
        }
        check_float_keys(&self.format, &self.dtype)
    }
}

/// The distillation a `distill` stage describes (QAT reads its training keys too).
pub(crate) fn distill_request(t: &TrainingKeys, s: DistillKeys) -> DistillRequest {
    let d = DistillRequest::default();
    DistillRequest {
        student: match (s.layers, s.student.is_empty()) {
            (Some(l), _) => StudentInit::Layers(l),
            (None, false) => StudentInit::Random(s.student),
            (None, true) => StudentInit::Model,
        },
        loss: t.loss.clone().unwrap_or(d.loss),
        temperature: t.temperature.unwrap_or(d.temperature),
        alpha: t.alpha.unwrap_or(d.alpha),
        hidden: s.hidden,
        hidden_loss: s.hidden_loss.unwrap_or(d.hidden_loss),
        hidden_weight: s.hidden_weight.unwrap_or(d.hidden_weight),
        attention: s.attention,
        attention_weight: s.attention_weight.unwrap_or(d.attention_weight),
        freeze: t.freeze.clone().unwrap_or_default(),
        top_k: s.top_k,
        train: t.train.clone().unwrap_or_default(),
        format: s.format,
        dtype: s.dtype,
    }
}

impl Job for DistillRequest {
    fn plan(&self) -> Result<(bool, Export)> {
        self.resolve().map(|r| (false, r.export))
    }

    fn trains(&self) -> bool {
        true
    }

    fn memory(&self, sizes: &ModelSizes) -> JobMemory {
        training_memory(&self.train, sizes)
    }

    fn keeps_shapes(&self) -> bool {
        false
    }

    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult> {
        let mut resolved = self.resolve()?;
        let teacher = cx
            .teacher
            .ok_or_else(|| PipelineError::Invalid("a distill stage needs a teacher".into()))?;
        let student = build_student(self, &mut resolved, teacher, Some(model))?;
        let [train, eval] = cx.windows(resolved.seq_len, resolved.eval_windows)?;
        let (trained, outcome) = distill_and_write(
            cx.checkpoint,
            teacher,
            student,
            &resolved,
            &train,
            &eval,
            cx.workdir,
            cx.key,
            out,
            cx.progress,
        )?;
        let (format, bits) = crate::prune::float_storage(resolved.dtype);
        let d = &resolved.job.loss;
        let objective = if teacher.arch.is_encoder() {
            // Encoders match final states (and the MLM logits only when both have the head).
            format!("{:?} on the final states", d.hidden_loss).to_lowercase()
        } else {
            format!(
                "{:?} KL, T = {}, α = {}",
                d.divergence, d.temperature, d.alpha
            )
        };
        let method = format!(
            "distill: {objective}{}{} ({} steps)",
            if d.hidden.is_empty() {
                ""
            } else {
                ", hidden states"
            },
            if d.attention.is_some() {
                ", attention"
            } else {
                ""
            },
            resolved.job.train.steps
        )
        .to_lowercase();
        Ok(StageResult {
            method,
            types: [(format.to_string(), trained.blocks.len() * 7)].into(),
            linear_bits_per_weight: bits,
            pruning: Some(serde_json::json!({
                "parameters_before": outcome.parameters_teacher,
                "parameters_after": outcome.parameters_student,
                "config": shrink_prune::shape_keys(&trained.config),
            })),
            training: Some(outcome.training),
            ..StageResult::default()
        })
    }
}
