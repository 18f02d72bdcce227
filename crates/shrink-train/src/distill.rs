//! The distillation objective shared by `shrink-distill` (a smaller student) and quantization-aware
//! training in `shrink-quant` (a fake-quantized student): logit KL against a live teacher or its
//! cached top-k, cross-entropy on the text, hidden-state and attention-map losses.

use crate::loss::{self, Divergence, Target};
use crate::trainer::{Batch, Loss, Objective};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{LinearHook, Transformer};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How hidden states are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenLoss {
    Mse,
    Cosine,
}

impl HiddenLoss {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mse" => Ok(Self::Mse),
            "cosine" | "cos" => Ok(Self::Cosine),
            other => Err(TrainError::Config(format!(
                "unknown hidden-state loss '{other}': expected mse or cosine"
            ))),
        }
    }
}

/// The loss mix: `(1 − α)·KD + α·CE + hidden_weight·mean(hidden) + attention_weight·attention`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    pub divergence: Divergence,
    pub temperature: f64,
    /// Weight of cross-entropy on the text; the logit KL gets `1 − alpha`.
    pub alpha: f64,
    /// (student layer, teacher layer) pairs whose block outputs are matched.
    pub hidden: Vec<(usize, usize)>,
    pub hidden_loss: HiddenLoss,
    pub hidden_weight: f64,
    /// (student layer, teacher layer) whose attention distributions are matched (MiniLM).
    pub attention: Option<(usize, usize)>,
    pub attention_weight: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            divergence: Divergence::Forward,
            temperature: 1.0,
            alpha: 0.0,
            hidden: Vec::new(),
            hidden_loss: HiddenLoss::Mse,
            hidden_weight: 1.0,
            attention: None,
            attention_weight: 1.0,
        }
    }
}

impl DistillConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(TrainError::Config(format!(
                "alpha (the cross-entropy weight) must be in [0, 1], got {}",
                self.alpha
            )));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::Config(format!(
                "temperature must be positive, got {}",
                self.temperature
            )));
        }
        Ok(())
    }

    fn needs_teacher_states(&self) -> bool {
        !self.hidden.is_empty() || self.attention.is_some()
    }
}

/// Block outputs and attention maps of chosen layers, captured during a forward pass.
#[derive(Debug, Default)]
pub struct Capture {
    hidden_layers: BTreeSet<usize>,
    attention_layers: BTreeSet<usize>,
    pub hidden: BTreeMap<usize, Tensor>,
    pub attention: BTreeMap<usize, Tensor>,
}

impl Capture {
    pub fn new(
        hidden: impl IntoIterator<Item = usize>,
        attention: impl IntoIterator<Item = usize>,
    ) -> Self {
        Self {
            hidden_layers: hidden.into_iter().collect(),
            attention_layers: attention.into_iter().collect(),
            ..Self::default()
        }
    }
}

impl LinearHook for Capture {
    fn observe(&mut self, _: &str, _: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }
    fn wants_attention(&self, layer: usize) -> bool {
        self.attention_layers.contains(&layer)
    }
    fn attention(&mut self, layer: usize, probs: &Tensor) -> candle_core::Result<()> {
        if self.attention_layers.contains(&layer) {
            self.attention.insert(layer, probs.clone());
        }
        Ok(())
    }
    fn block_output(&mut self, layer: usize, hidden: &Tensor) -> candle_core::Result<()> {
        if self.hidden_layers.contains(&layer) {
            self.hidden.insert(layer, hidden.clone());
        }
        Ok(())
    }
}

/// The teacher's top-k log-probabilities for every position of every training window, computed
/// once and cached on disk so that later epochs and runs need no teacher forward.
#[derive(Debug, Clone)]
pub struct TopKCache {
    pub k: usize,
    pub temperature: f64,
    /// `(windows, seq, k)` u32.
    indices: Tensor,
    /// `(windows, seq, k)` f32.
    log_probs: Tensor,
}

impl TopKCache {
    /// Runs the teacher over `windows`, `batch` at a time.
    pub fn build(
        teacher: &Transformer,
        windows: &[Vec<u32>],
        k: usize,
        temperature: f64,
        batch: usize,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let seq = windows.first().map(Vec::len).unwrap_or(0);
        let device = teacher.device().clone();
        let (mut indices, mut log_probs) = (Vec::new(), Vec::new());
        progress.start("teacher top-k", windows.len() as u64);
        for chunk in windows.chunks(batch.max(1)) {
            let ids = ids_tensor(chunk, &device)?;
            let logits = teacher.forward(&ids)?;
            let rows = logits.flatten_to(1)?;
            let (i, lp) = loss::top_k_log_probs(&rows, k, temperature)?;
            indices.push(i.reshape((chunk.len(), seq, k))?);
            log_probs.push(lp.reshape((chunk.len(), seq, k))?);
            progress.advance(chunk.len() as u64, None);
        }
        progress.finish();
        Ok(Self {
            k,
            temperature,
            indices: Tensor::cat(&indices, 0)?,
            log_probs: Tensor::cat(&log_probs, 0)?,
        })
    }

    /// Writes the cache atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = std::collections::HashMap::new();
        map.insert("indices".to_string(), self.indices.clone());
        map.insert("log_probs".to_string(), self.log_probs.clone());
        map.insert(
            "config".to_string(),
            Tensor::new(&[self.k as f64, self.temperature], &Device::Cpu)?,
        );
        let err = |e: &dyn std::fmt::Display| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let tmp = path.with_extension("partial");
        candle_core::safetensors::save(&map, &tmp).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
        Ok(())
    }

    /// Reads a cache written by [`TopKCache::save`], checking it covers `windows` × `seq`.
    pub fn load(path: &Path, windows: usize, seq: usize, device: &Device) -> Result<Self> {
        let err = |m: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: m,
        };
        let map = candle_core::safetensors::load(path, device).map_err(|e| err(e.to_string()))?;
        let get = |name: &str| {
            map.get(name)
                .cloned()
                .ok_or_else(|| err(format!("tensor '{name}' is missing")))
        };
        let (indices, log_probs) = (get("indices")?, get("log_probs")?);
        let config = get("config")?.to_vec1::<f64>()?;
        let (w, s, k) = indices.dims3()?;
        if (w, s) != (windows, seq) || log_probs.dims() != indices.dims() || config.len() != 2 {
            return Err(err(format!(
                "it holds {w} windows of {s} tokens, the run has {windows} of {seq}"
            )));
        }
        Ok(Self {
            k,
            temperature: config[1],
            indices: indices.to_dtype(DType::U32)?,
            log_probs,
        })
    }

    /// Targets `(positions, k)` for the given windows, in order.
    fn targets(&self, windows: &[usize]) -> Result<(Tensor, Tensor)> {
        let device = self.indices.device();
        let picked = Tensor::from_vec(
            windows.iter().map(|&w| w as u32).collect::<Vec<_>>(),
            windows.len(),
            device,
        )?;
        let i = self.indices.index_select(&picked, 0)?.flatten_to(1)?;
        let lp = self.log_probs.index_select(&picked, 0)?.flatten_to(1)?;
        Ok((i, lp))
    }
}

/// Where the teacher's targets come from.
#[derive(Debug, Clone)]
pub enum Teacher {
    /// A forward pass of the teacher on every batch.
    Model(Transformer),
    /// Targets cached with [`TopKCache::build`] (logit losses only). The optional model still
    /// serves the held-out KL.
    TopK(TopKCache, Option<Transformer>),
}

impl Teacher {
    fn model(&self) -> Option<&Transformer> {
        match self {
            Teacher::Model(m) => Some(m),
            Teacher::TopK(_, m) => m.as_ref(),
        }
    }
}

/// Rebuilds the student's effective weights from its parameters before each forward pass (QAT's
/// fake quantization); identity for plain distillation.
pub type Prepare = Box<dyn FnMut(&mut Transformer) -> Result<()>>;

/// Distillation of a teacher into a student whose weights are (partly) [`Var`]s.
pub struct Distiller {
    student: Transformer,
    params: Vec<(String, Var)>,
    /// One learned projection per hidden pair (student width → teacher width), when they differ.
    projections: Vec<Option<Var>>,
    teacher: Teacher,
    config: DistillConfig,
    prepare: Option<Prepare>,
}

impl Distiller {
    /// `params` are the student's trainable weights (see [`crate::trainable`]); learned
    /// projections for hidden pairs of different widths are added to them.
    pub fn new(
        student: Transformer,
        params: Vec<(String, Var)>,
        teacher: Teacher,
        config: DistillConfig,
    ) -> Result<Self> {
        config.validate()?;
        let (sc, device) = (&student.config, student.device().clone());
        if let Some(t) = teacher.model() {
            if t.config.vocab_size != sc.vocab_size {
                return Err(TrainError::Config(format!(
                    "the student's vocabulary ({}) differs from the teacher's ({})",
                    sc.vocab_size, t.config.vocab_size
                )));
            }
        }
        let layers = |what: &str, s: usize, t: usize| -> Result<()> {
            let tl = teacher
                .model()
                .map(|m| m.config.num_hidden_layers)
                .unwrap_or(0);
            if s >= sc.num_hidden_layers || t >= tl {
                return Err(TrainError::Config(format!(
                    "{what} pair {s}:{t} is out of range: the student has {} layers, the teacher {tl}",
                    sc.num_hidden_layers
                )));
            }
            Ok(())
        };
        if config.needs_teacher_states() && matches!(teacher, Teacher::TopK(..)) {
            return Err(TrainError::Config(
                "hidden-state and attention losses need a live teacher, not cached top-k logits"
                    .into(),
            ));
        }
        let mut projections = Vec::new();
        let mut params = params;
        for (n, &(s, t)) in config.hidden.iter().enumerate() {
            layers("hidden", s, t)?;
            let dt = teacher.model().map(|m| m.config.hidden_size).unwrap_or(0);
            let ds = sc.hidden_size;
            projections.push(if ds == dt {
                None
            } else {
                // Starts as the identity on the shared leading dimensions.
                let eye: Vec<f32> = (0..dt * ds)
                    .map(|i| if i / ds == i % ds { 1.0 } else { 0.0 })
                    .collect();
                let var = Var::from_tensor(&Tensor::from_vec(eye, (dt, ds), &device)?)?;
                params.push((format!("distill.projection.{n}"), var.clone()));
                Some(var)
            });
        }
        if let Some((s, t)) = config.attention {
            layers("attention", s, t)?;
            let th = teacher
                .model()
                .map(|m| m.config.num_attention_heads)
                .unwrap_or(0);
            if th != sc.num_attention_heads {
                return Err(TrainError::Config(format!(
                    "attention distillation needs as many heads in the student ({}) as in the teacher ({th})",
                    sc.num_attention_heads
                )));
            }
        }
        Ok(Self {
            student,
            params,
            projections,
            teacher,
            config,
            prepare: None,
        })
    }

    /// Runs `prepare` on the student before every forward pass.
    pub fn with_prepare(mut self, prepare: Prepare) -> Self {
        self.prepare = Some(prepare);
        self
    }

    /// The student with its current (prepared) weights.
    pub fn student(&mut self) -> Result<&Transformer> {
        if let Some(p) = self.prepare.as_mut() {
            p(&mut self.student)?;
        }
        Ok(&self.student)
    }

    /// Trains the student with [`crate::train`] and returns it (see
    /// [`Distiller::trained_student`]) with the training log.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        mut self,
        config: &crate::TrainConfig,
        windows: &[Vec<u32>],
        eval: &[Vec<u32>],
        checkpoints: Option<&Path>,
        fingerprint: &str,
        progress: &dyn Progress,
    ) -> Result<(Transformer, crate::TrainOutcome)> {
        let outcome = crate::train(
            &mut self,
            config,
            windows,
            eval,
            checkpoints,
            fingerprint,
            progress,
        )?;
        Ok((self.trained_student()?, outcome))
    }

    /// A plain copy of the student with its current (prepared) weights, detached from training.
    pub fn trained_student(&mut self) -> Result<Transformer> {
        let student = self.student()?;
        let tensors = student
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        Ok(Transformer::from_tensors(
            &student.config,
            tensors,
            DType::F32,
        )?)
    }

    /// Student logits `(b·t, vocab)` and captured states.
    fn student_forward(&mut self, ids: &Tensor) -> Result<(Tensor, Capture)> {
        let mut capture = Capture::new(
            self.config.hidden.iter().map(|p| p.0),
            self.config.attention.map(|p| p.0),
        );
        let student = self.student()?;
        let hidden = student.forward_hidden(ids, &mut capture)?;
        let logits = student.lm_head(&hidden)?.flatten_to(1)?;
        Ok((logits, capture))
    }
}

/// The logit divergence from the teacher's head on its final states `hidden`.
fn teacher_kl(
    logits: &Tensor,
    teacher: &Transformer,
    hidden: &Tensor,
    c: &DistillConfig,
) -> Result<Tensor> {
    let t_logits = teacher.lm_head(hidden)?.flatten_to(1)?.detach();
    loss::kl_divergence(
        logits,
        Target::Logits(&t_logits),
        c.temperature,
        c.divergence,
    )
}

/// The hidden-state loss chosen for a pair of states.
fn state_loss(kind: HiddenLoss, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    match kind {
        HiddenLoss::Mse => loss::hidden_mse(student, teacher),
        HiddenLoss::Cosine => loss::hidden_cosine(student, teacher),
    }
}

fn ids_tensor(windows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let seq = windows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<u32> = windows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (windows.len(), seq), device)?)
}

/// Cross-entropy of next-token prediction for logits `(b·t, vocab)` of windows `ids` `(b, t)`.
fn next_token_ce(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let v = logits.dim(D::Minus1)?;
    let logits = logits
        .reshape((b, t, v))?
        .narrow(1, 0, t - 1)?
        .flatten_to(1)?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    loss::cross_entropy(&logits, &targets)
}

impl Objective for Distiller {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn loss(&mut self, batch: &Batch) -> Result<Loss> {
        let c = self.config.clone();
        let mut parts = vec![];
        let (total, captured, teacher_states) = if self.student.arch.is_encoder() {
            // Encoders have no next token to predict: the student's final states (what sentence
            // embeddings pool) are matched to the teacher's, as DistilBERT's cosine loss does.
            // With masked-LM heads on both sides, DistilBERT's logit KL is added.
            let mut capture = Capture::new(c.hidden.iter().map(|p| p.0), c.attention.map(|p| p.0));
            let (s_hidden, s_logits) = {
                let student = self.student()?;
                let h = student.forward_hidden(&batch.ids, &mut capture)?;
                let logits = if student.has_token_head() {
                    Some(student.lm_head(&h)?.flatten_to(1)?)
                } else {
                    None
                };
                (h, logits)
            };
            let teacher = self.teacher.model().ok_or_else(|| {
                TrainError::Config(
                    "an encoder is distilled from a teacher model, not a top-k cache".into(),
                )
            })?;
            let mut t_capture =
                Capture::new(c.hidden.iter().map(|p| p.1), c.attention.map(|p| p.1));
            let t_hidden = teacher.forward_hidden(&batch.ids, &mut t_capture)?.detach();
            let out = state_loss(c.hidden_loss, &s_hidden, &t_hidden)?;
            parts.push(("output".to_string(), out.to_scalar::<f32>()? as f64));
            let total = match s_logits.filter(|_| teacher.has_token_head()) {
                Some(logits) => {
                    let kd = teacher_kl(&logits, teacher, &t_hidden, &c)?;
                    parts.push(("kd".into(), kd.to_scalar::<f32>()? as f64));
                    (out + kd)?
                }
                None => out,
            };
            (total, capture, Some(t_capture))
        } else {
            let (logits, captured) = self.student_forward(&batch.ids)?;
            let ce = next_token_ce(&logits, &batch.ids)?;
            parts.push(("ce".to_string(), ce.to_scalar::<f32>()? as f64));
            let (kd, teacher_states) = match &self.teacher {
                Teacher::Model(teacher) => {
                    let mut capture =
                        Capture::new(c.hidden.iter().map(|p| p.1), c.attention.map(|p| p.1));
                    let hidden = teacher.forward_hidden(&batch.ids, &mut capture)?;
                    (teacher_kl(&logits, teacher, &hidden, &c)?, Some(capture))
                }
                Teacher::TopK(cache, _) => {
                    let (indices, log_probs) = cache.targets(&batch.windows)?;
                    let kd = loss::kl_divergence(
                        &logits,
                        Target::TopK {
                            indices: &indices,
                            log_probs: &log_probs,
                        },
                        cache.temperature,
                        c.divergence,
                    )?;
                    (kd, None)
                }
            };
            parts.push(("kd".into(), kd.to_scalar::<f32>()? as f64));
            let total = if c.alpha > 0.0 {
                ((&kd * (1.0 - c.alpha))? + (&ce * c.alpha)?)?
            } else {
                kd
            };
            (total, captured, teacher_states)
        };
        let mut total = total;
        if let Some(t) = &teacher_states {
            if !c.hidden.is_empty() {
                let mut sum: Option<Tensor> = None;
                for (n, &(s, tl)) in c.hidden.iter().enumerate() {
                    let missing =
                        || TrainError::Config(format!("hidden pair {s}:{tl} was not captured"));
                    let hs = captured.hidden.get(&s).ok_or_else(missing)?;
                    let ht = t.hidden.get(&tl).ok_or_else(missing)?.detach();
                    let hs = match &self.projections[n] {
                        Some(p) => hs.broadcast_matmul(&p.as_tensor().t()?)?,
                        None => hs.clone(),
                    };
                    let l = state_loss(c.hidden_loss, &hs, &ht)?;
                    sum = Some(match sum {
                        None => l,
                        Some(acc) => (acc + l)?,
                    });
                }
                if let Some(sum) = sum {
                    let mean = (sum / c.hidden.len() as f64)?;
                    parts.push(("hidden".into(), mean.to_scalar::<f32>()? as f64));
                    total = (total + (mean * c.hidden_weight)?)?;
                }
            }
            if let Some((s, tl)) = c.attention {
                let missing =
                    || TrainError::Config(format!("attention pair {s}:{tl} was not captured"));
                let a_s = captured.attention.get(&s).ok_or_else(missing)?;
                let a_t = t.attention.get(&tl).ok_or_else(missing)?.detach();
                let l = loss::attention_kl(&a_s.to_dtype(DType::F32)?, &a_t.to_dtype(DType::F32)?)?;
                parts.push(("attention".into(), l.to_scalar::<f32>()? as f64));
                total = (total + (l * c.attention_weight)?)?;
            }
        }
        Ok(Loss { total, parts })
    }

    fn evaluate(&mut self, windows: &[Vec<u32>]) -> Result<Vec<(String, f64)>> {
        let device = self.student.device().clone();
        // Prepared once: QAT's fake quantization does not change during an evaluation.
        let student = self.student()?.clone();
        if student.arch.is_encoder() {
            // Mean cosine between the student's and the teacher's final token states.
            let teacher = self.teacher.model().ok_or_else(|| {
                TrainError::Config("an encoder is evaluated against its teacher model".into())
            })?;
            let (mut sum, mut n) = (0.0, 0.0);
            for chunk in windows.chunks(2) {
                let ids = ids_tensor(chunk, &device)?;
                let s = student.forward_hidden(&ids, &mut shrink_models::NoHook)?;
                let t = teacher.forward_hidden(&ids, &mut shrink_models::NoHook)?;
                let dissimilarity = loss::hidden_cosine(&s, &t)?.to_scalar::<f32>()? as f64;
                sum += (1.0 - dissimilarity) * chunk.len() as f64;
                n += chunk.len() as f64;
            }
            return Ok(vec![("cosine".to_string(), sum / n.max(1.0))]);
        }
        let (mut ce_sum, mut kl_sum, mut n) = (0.0, 0.0, 0.0);
        for chunk in windows.chunks(2) {
            let ids = ids_tensor(chunk, &device)?;
            let logits = student.forward(&ids)?.flatten_to(1)?.detach();
            let w = chunk.len() as f64;
            ce_sum += next_token_ce(&logits, &ids)?.to_scalar::<f32>()? as f64 * w;
            if let Some(teacher) = self.teacher.model() {
                let t = teacher.forward(&ids)?.flatten_to(1)?;
                let kl =
                    loss::kl_divergence(&logits, Target::Logits(&t), 1.0, Divergence::Forward)?;
                kl_sum += kl.to_scalar::<f32>()? as f64 * w;
            }
            n += w;
        }
        let mut out = vec![("ppl".to_string(), (ce_sum / n).exp())];
        if self.teacher.model().is_some() {
            out.push(("kl".into(), kl_sum / n));
        }
        Ok(out)
    }
}
