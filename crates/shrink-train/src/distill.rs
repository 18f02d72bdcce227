//! The distillation objective shared by `shrink-distill` (a smaller student) and quantization-aware
//! training in `shrink-quant` (a fake-quantized student): logit KL against a live teacher or its
//! cached top-k, cross-entropy on the text, hidden-state and attention-map losses.

use crate::loss::{self, Divergence, Target};
use crate::trainer::{Batch, Loss, Objective, Parts};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_models::{LinearHook, Transformer};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod recompute;

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
    /// Logit values held per slice of the head when activations are recomputed.
    pub(crate) head_slice_values: usize,
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
            head_slice_values: recompute::HEAD_SLICE_VALUES,
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

/// The teacher's distribution for some rows (flattened positions) of a batch.
pub(crate) enum RowTargets {
    Logits(Tensor),
    TopK {
        indices: Tensor,
        log_probs: Tensor,
        temperature: f64,
    },
}

/// The next token of each of rows `rows` (flattened positions) of windows `ids` `(b, t)`; `None`
/// at a window's last position.
pub(crate) fn next_tokens(ids: &Tensor, rows: std::ops::Range<usize>) -> Result<Vec<Option<u32>>> {
    let t = ids.dim(1)?;
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    Ok(rows.map(|r| (r % t < t - 1).then(|| ids[r + 1])).collect())
}

/// The shares of a batch's mean next-token cross-entropy and of its mean divergence (`kind`:
/// temperature and direction; cached top-k targets bring their own temperature) contributed by
/// rows `rows` (flattened positions), from the student's logits for those rows. Cross-entropy
/// covers the rows with a next token (`None` when there is none), and is differentiable only with
/// `ce_graph`.
pub(crate) fn row_losses(
    logits: &Tensor,
    rows: std::ops::Range<usize>,
    ids: &Tensor,
    target: Option<RowTargets>,
    kind: (f64, Divergence),
    ce_graph: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (b, t) = ids.dims2()?;
    let share = |n: usize, of: usize| (n != of).then_some(n as f64 / of as f64);
    let weigh = |x: Tensor, w: Option<f64>| -> Result<Tensor> {
        Ok(match w {
            Some(w) => (x * w)?,
            None => x,
        })
    };
    let (mut picked, mut next) = (Vec::new(), Vec::new());
    for (i, token) in next_tokens(ids, rows.clone())?.into_iter().enumerate() {
        if let Some(token) = token {
            picked.push(i as u32);
            next.push(token);
        }
    }
    let device = logits.device();
    let ce_logits = if ce_graph {
        logits.clone()
    } else {
        logits.detach()
    };
    let ce = match picked.len() {
        0 => None,
        n => {
            let rows_ce = Tensor::from_vec(picked, n, device)?;
            let targets = Tensor::from_vec(next, n, device)?;
            let ce = loss::cross_entropy(&ce_logits.index_select(&rows_ce, 0)?, &targets)?;
            Some(weigh(ce, share(n, b * (t - 1)))?)
        }
    };
    let (temperature, divergence) = kind;
    let kd = match &target {
        None => None,
        Some(RowTargets::Logits(t_logits)) => Some(loss::kl_divergence(
            logits,
            Target::Logits(t_logits),
            temperature,
            divergence,
        )?),
        Some(RowTargets::TopK {
            indices,
            log_probs,
            temperature,
        }) => Some(loss::kl_divergence(
            logits,
            Target::TopK { indices, log_probs },
            *temperature,
            divergence,
        )?),
    };
    let kd = match kd {
        Some(kd) => Some(weigh(kd, share(rows.end - rows.start, b * t))?),
        None => None,
    };
    Ok((ce, kd))
}

impl Distiller {
    /// The batch's `rows` flattened positions in slices whose logits (`vocab` each) hold about
    /// [`Distiller::head_slice_values`] values.
    pub(crate) fn head_slices(
        &self,
        rows: usize,
        vocab: usize,
    ) -> impl Iterator<Item = std::ops::Range<usize>> {
        let slice = (self.head_slice_values / vocab.max(1)).clamp(1, rows.max(1));
        (0..rows)
            .step_by(slice)
            .map(move |start| start..(start + slice).min(rows))
    }

    /// The teacher's final states and captured pairs on `ids` (none with cached top-k targets).
    pub(crate) fn teacher_forward(&self, ids: &Tensor) -> Result<Option<(Tensor, Capture)>> {
        let c = &self.config;
        let Some(teacher) = self.teacher.model().filter(|_| {
            self.student.arch.is_encoder() || matches!(self.teacher, Teacher::Model(_))
        }) else {
            return Ok(None);
        };
        let mut capture = Capture::new(c.hidden.iter().map(|p| p.1), c.attention.map(|p| p.1));
        let hidden = teacher.forward_hidden(ids, &mut capture)?.detach();
        Ok(Some((hidden, capture)))
    }

    /// The teacher's targets for rows `rows` of the batch (`teacher`: its final states).
    pub(crate) fn row_targets(
        &self,
        batch: &Batch,
        rows: std::ops::Range<usize>,
        teacher: Option<&Tensor>,
    ) -> Result<RowTargets> {
        let n = rows.end - rows.start;
        match (&self.teacher, teacher) {
            (Teacher::TopK(cache, _), _) => {
                let (indices, log_probs) = cache.targets(&batch.windows)?;
                Ok(RowTargets::TopK {
                    indices: indices.narrow(0, rows.start, n)?,
                    log_probs: log_probs.narrow(0, rows.start, n)?,
                    temperature: cache.temperature,
                })
            }
            (Teacher::Model(model), Some(hidden)) => {
                let flat = hidden.flatten_to(1)?.narrow(0, rows.start, n)?;
                Ok(RowTargets::Logits(model.lm_head(&flat)?.detach()))
            }
            (Teacher::Model(_), None) => Err(TrainError::Config(
                "the teacher's states are missing".into(),
            )),
        }
    }

    /// A decoder's logit loss on rows `rows` (flattened positions) of the batch, from the
    /// student's logits for those rows, weighted by the rows' share of the batch:
    /// `(1 − α)·KD + α·CE`. Adds the shares of KD and CE to `parts`.
    pub(crate) fn logit_loss(
        &self,
        logits: &Tensor,
        rows: std::ops::Range<usize>,
        ids: &Tensor,
        target: RowTargets,
        parts: &mut Parts,
    ) -> Result<Tensor> {
        let c = &self.config;
        let kind = (c.temperature, c.divergence);
        let ce_graph = c.alpha > 0.0;
        let (ce, kd) = row_losses(logits, rows, ids, Some(target), kind, ce_graph)?;
        let kd = kd.ok_or_else(|| TrainError::Config("no teacher targets".into()))?;
        let value = |t: &Option<Tensor>| -> Result<f64> {
            Ok(match t {
                Some(t) => t.to_scalar::<f32>()? as f64,
                None => 0.0,
            })
        };
        parts.add("ce", value(&ce)?);
        parts.add("kd", kd.to_scalar::<f32>()? as f64);
        Ok(match ce.filter(|_| ce_graph) {
            Some(ce) => ((&kd * (1.0 - c.alpha))? + (ce * c.alpha)?)?,
            None => kd,
        })
    }

    /// An encoder's loss on the student's final states `hidden`: the states matched to the
    /// teacher's (`t_hidden`), plus the masked-LM logit KL when both have the head.
    pub(crate) fn encoder_loss(
        &self,
        student: &Transformer,
        hidden: &Tensor,
        t_hidden: Option<&Tensor>,
        parts: &mut Parts,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (teacher, t_hidden) = self.teacher.model().zip(t_hidden).ok_or_else(|| {
            TrainError::Config(
                "an encoder is distilled from a teacher model, not a top-k cache".into(),
            )
        })?;
        let out = state_loss(c.hidden_loss, hidden, t_hidden)?;
        parts.add("output", out.to_scalar::<f32>()? as f64);
        if !(student.has_token_head() && teacher.has_token_head()) {
            return Ok(out);
        }
        let logits = student.lm_head(hidden)?.flatten_to(1)?;
        let kd = teacher_kl(&logits, teacher, t_hidden, c)?;
        parts.add("kd", kd.to_scalar::<f32>()? as f64);
        Ok((out + kd)?)
    }

    /// Hidden pair `n`'s loss between the student's state (projected when the widths differ)
    /// and the teacher's.
    pub(crate) fn hidden_term(
        &self,
        n: usize,
        student: &Tensor,
        teacher: &Tensor,
    ) -> Result<Tensor> {
        let hs = match &self.projections[n] {
            Some(p) => student.broadcast_matmul(&p.as_tensor().t()?)?,
            None => student.clone(),
        };
        state_loss(self.config.hidden_loss, &hs, &teacher.detach())
    }

    /// The attention pair's loss between the student's and the teacher's distributions.
    pub(crate) fn attention_term(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        loss::attention_kl(
            &student.to_dtype(DType::F32)?,
            &teacher.detach().to_dtype(DType::F32)?,
        )
    }
}

/// A captured state of layer `layer`, or which pair was not captured.
pub(crate) fn captured<'a>(
    map: &'a BTreeMap<usize, Tensor>,
    layer: usize,
    what: &str,
    pair: (usize, usize),
) -> Result<&'a Tensor> {
    map.get(&layer).ok_or_else(|| {
        TrainError::Config(format!(
            "{what} pair {}:{} was not captured",
            pair.0, pair.1
        ))
    })
}

impl Objective for Distiller {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn gradients(&mut self, batch: &Batch, scale: f64, recompute: bool) -> Result<crate::Step> {
        if recompute {
            return self.recomputed(batch, scale);
        }
        let loss = self.loss(batch)?;
        crate::trainer::backward(&self.params, loss, scale)
    }

    fn loss(&mut self, batch: &Batch) -> Result<Loss> {
        let c = self.config.clone();
        let mut parts = Parts::default();
        let (b, t) = batch.ids.dims2()?;
        let mut student_states =
            Capture::new(c.hidden.iter().map(|p| p.0), c.attention.map(|p| p.0));
        let student = self.student()?.clone();
        let hidden = student.forward_hidden(&batch.ids, &mut student_states)?;
        let teacher = self.teacher_forward(&batch.ids)?;
        let t_hidden = teacher.as_ref().map(|(h, _)| h);
        let mut total = if student.arch.is_encoder() {
            self.encoder_loss(&student, &hidden, t_hidden, &mut parts)?
        } else {
            let logits = student.lm_head(&hidden)?.flatten_to(1)?;
            let target = self.row_targets(batch, 0..b * t, t_hidden)?;
            self.logit_loss(&logits, 0..b * t, &batch.ids, target, &mut parts)?
        };
        if let Some((_, t)) = &teacher {
            if !c.hidden.is_empty() {
                let mut sum: Option<Tensor> = None;
                for (n, &pair) in c.hidden.iter().enumerate() {
                    let hs = captured(&student_states.hidden, pair.0, "hidden", pair)?;
                    let ht = captured(&t.hidden, pair.1, "hidden", pair)?;
                    let l = self.hidden_term(n, hs, ht)?;
                    sum = Some(match sum {
                        None => l,
                        Some(acc) => (acc + l)?,
                    });
                }
                if let Some(sum) = sum {
                    let mean = (sum / c.hidden.len() as f64)?;
                    parts.add("hidden", mean.to_scalar::<f32>()? as f64);
                    total = (total + (mean * c.hidden_weight)?)?;
                }
            }
            if let Some(pair) = c.attention {
                let a_s = captured(&student_states.attention, pair.0, "attention", pair)?;
                let a_t = captured(&t.attention, pair.1, "attention", pair)?;
                let l = Self::attention_term(a_s, a_t)?;
                parts.add("attention", l.to_scalar::<f32>()? as f64);
                total = (total + (l * c.attention_weight)?)?;
            }
        }
        Ok(Loss {
            total,
            parts: parts.0,
        })
    }

    fn evaluate(&mut self, windows: &[Vec<u32>]) -> Result<Vec<(String, f64)>> {
        let device = self.student.device().clone();
        // Prepared once: QAT's fake quantization does not change during an evaluation. Detached:
        // no graph is built, and the inference kernels run.
        let student = self.student()?.detached();
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
        // The head a slice of rows at a time, as in training with recomputation.
        let (mut ce_sum, mut kl_sum, mut n) = (0.0, 0.0, 0.0);
        let teacher = self.teacher.model();
        let value = |t: Option<Tensor>| -> Result<f64> {
            Ok(match t {
                Some(t) => t.to_scalar::<f32>()? as f64,
                None => 0.0,
            })
        };
        for chunk in windows.chunks(2) {
            let ids = ids_tensor(chunk, &device)?;
            let (b, t) = ids.dims2()?;
            let hidden = student.forward_hidden(&ids, &mut shrink_models::NoHook)?;
            let hidden = hidden.flatten_to(1)?;
            let t_hidden = match teacher {
                Some(m) => Some(
                    m.forward_hidden(&ids, &mut shrink_models::NoHook)?
                        .flatten_to(1)?,
                ),
                None => None,
            };
            let (mut ce, mut kl) = (0.0, 0.0);
            for rows in self.head_slices(b * t, student.config.vocab_size) {
                let start = rows.start;
                let logits = student.lm_head(&hidden.narrow(0, start, rows.len())?)?;
                let target = match (teacher, &t_hidden) {
                    (Some(m), Some(h)) => Some(RowTargets::Logits(m.lm_head(&h.narrow(
                        0,
                        start,
                        rows.len(),
                    )?)?)),
                    _ => None,
                };
                let kind = (1.0, Divergence::Forward);
                let (c, k) = row_losses(&logits, rows, &ids, target, kind, false)?;
                ce += value(c)?;
                kl += value(k)?;
            }
            let w = chunk.len() as f64;
            ce_sum += ce * w;
            kl_sum += kl * w;
            n += w;
        }
        let mut out = vec![("ppl".to_string(), (ce_sum / n).exp())];
        if self.teacher.model().is_some() {
            out.push(("kl".into(), kl_sum / n));
        }
        Ok(out)
    }
}
