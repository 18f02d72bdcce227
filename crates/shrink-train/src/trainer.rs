//! The training loop: seeded epochs over fixed token windows, gradient accumulation and clipping,
//! AdamW on a warmup + cosine schedule, periodic evaluation and checkpoints that resume exactly.

use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::{Result, TrainError};
use candle_core::{Device, Tensor, Var};
use rand::{seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use shrink_core::{AtomicDir, Progress};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One micro-batch: token windows `(batch, seq)` and their indices in the training set (to look
/// up cached teacher targets).
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub windows: Vec<usize>,
}

/// A scalar loss and its named parts (for the log).
#[derive(Debug, Clone)]
pub struct Loss {
    pub total: Tensor,
    pub parts: Vec<(String, f64)>,
}

/// One micro-batch's loss and the gradients of `scale ×` it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The loss (not scaled).
    pub loss: f64,
    pub parts: Vec<(String, f64)>,
    /// In [`Objective::parameters`]' order; `None` for a parameter the loss does not reach.
    pub grads: Vec<Option<Tensor>>,
}

/// Loss terms summed into the training log by name, in the order first added.
#[derive(Debug, Default)]
pub(crate) struct Parts(pub Vec<(String, f64)>);

impl Parts {
    pub fn add(&mut self, name: &str, value: f64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v += value,
            None => self.0.push((name.to_string(), value)),
        }
    }
}

/// What is trained: parameters, a loss per batch and held-out metrics.
pub trait Objective {
    /// The trainable parameters by name, in a fixed order.
    fn parameters(&self) -> Vec<(String, Var)>;
    /// The loss of one micro-batch.
    fn loss(&mut self, batch: &Batch) -> Result<Loss>;
    /// The loss of one micro-batch and the gradients of `scale ×` it. By default the backward
    /// pass of [`Objective::loss`]'s whole graph; with `recompute`, an objective may recompute
    /// activations instead of holding them (see [`crate::Distiller`]).
    fn gradients(&mut self, batch: &Batch, scale: f64, recompute: bool) -> Result<Step> {
        let _ = recompute;
        let loss = self.loss(batch)?;
        backward(&self.parameters(), loss, scale)
    }
    /// Named metrics on held-out windows (the first one is the headline, lower is better).
    fn evaluate(&mut self, windows: &[Vec<u32>]) -> Result<Vec<(String, f64)>>;
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer updates.
    pub steps: u64,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches per update (gradient accumulation).
    pub accumulation: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value.
    pub clip_norm: Option<f64>,
    /// Evaluate every this many updates (and at the end); 0 evaluates only at the start and end.
    pub eval_every: u64,
    /// Save a checkpoint every this many updates; 0 never does.
    pub checkpoint_every: u64,
    /// Seeds the order of the windows in every epoch.
    pub seed: u64,
    /// Recompute each block's activations in the backward pass instead of holding them all
    /// (per-block activation checkpointing; objectives that support it).
    pub recompute: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch: 4,
            accumulation: 1,
            lr: 1e-4,
            warmup: 10,
            min_lr_ratio: 0.1,
            adamw: AdamWConfig::default(),
            clip_norm: Some(1.0),
            eval_every: 0,
            checkpoint_every: 0,
            seed: 0,
            recompute: true,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.steps == 0 || self.batch == 0 || self.accumulation == 0 {
            return bad("steps, batch and accumulation must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!(
                "the learning rate must be positive, got {}",
                self.lr
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        let a = &self.adamw;
        if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) || a.eps <= 0.0 {
            return bad("AdamW needs 0 ≤ beta < 1 and eps > 0".into());
        }
        if let Some(c) = self.clip_norm {
            if c.is_nan() || c <= 0.0 {
                return bad(format!("clip_norm must be positive, got {c}"));
            }
        }
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            peak: self.lr,
            warmup: self.warmup,
            total: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }
}

/// One point of the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogPoint {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub parts: Vec<(String, f64)>,
    pub grad_norm: f64,
}

/// Everything a run learned about itself; saved in checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    pub train: Vec<LogPoint>,
    /// (step, metrics) at every evaluation.
    pub eval: Vec<(u64, Vec<(String, f64)>)>,
    pub tokens: u64,
}

/// The result of [`train`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub steps: u64,
    pub log: TrainLog,
    /// The step this session resumed from, when a checkpoint was found.
    pub resumed_from: Option<u64>,
    /// Wall time and throughput of this session (resumed steps excluded).
    pub wall_s: f64,
    pub tokens_per_s: f64,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    fingerprint: String,
    step: u64,
    optimizer_t: u64,
    log: TrainLog,
}

const CHECKPOINT: &str = "checkpoint";

/// The window order: a seeded permutation per epoch; the position of every update is a pure
/// function of (seed, step), so a resumed run sees the same batches.
struct Order {
    seed: u64,
    count: usize,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    fn window(&mut self, position: usize) -> usize {
        let epoch = position / self.count;
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.count).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            perm.shuffle(&mut rng);
            self.epoch = Some((epoch, perm));
        }
        let perm = self
            .epoch
            .as_ref()
            .map(|(_, p)| p.as_slice())
            .unwrap_or(&[]);
        perm[position % self.count]
    }
}

/// Trains `objective` on `windows` (all of one length). With `checkpoints`, saves the parameters,
/// the optimizer's moments, the step and the log there every `checkpoint_every` updates, and
/// resumes from a checkpoint found there whose `fingerprint` (the caller's identity of the run:
/// config, data, starting weights) matches; the resumed run's weights equal the uninterrupted
/// run's bit for bit. The checkpoint is removed when training completes.
pub fn train(
    objective: &mut dyn Objective,
    config: &TrainConfig,
    windows: &[Vec<u32>],
    eval: &[Vec<u32>],
    checkpoints: Option<&Path>,
    fingerprint: &str,
    progress: &dyn Progress,
) -> Result<TrainOutcome> {
    config.validate()?;
    let seq = windows.first().map(Vec::len).unwrap_or(0);
    if windows.is_empty() {
        return Err(TrainError::Config(
            "no training windows: the training text is shorter than one window".into(),
        ));
    }
    if seq < 2 || windows.iter().any(|w| w.len() != seq) {
        return Err(TrainError::Config(
            "training needs windows of at least 2 tokens, all of one length".into(),
        ));
    }
    let params = objective.parameters();
    if params.is_empty() {
        return Err(TrainError::Config(
            "nothing to train: every parameter is frozen".into(),
        ));
    }
    let device = params[0].1.device().clone();
    let mut optimizer = AdamW::new(params, config.adamw)?;
    let mut log = TrainLog::default();
    let mut start = 0;
    let mut resumed_from = None;
    if let Some(dir) = checkpoints {
        if let Some(state) = load_checkpoint(&dir.join(CHECKPOINT), fingerprint, &mut optimizer)? {
            start = state.step;
            log = state.log;
            resumed_from = Some(start);
        }
    }
    let mut order = Order {
        seed: config.seed,
        count: windows.len(),
        epoch: None,
    };
    if start == 0 && !eval.is_empty() {
        log.eval.push((0, objective.evaluate(eval)?));
    }
    let schedule = config.schedule();
    progress.start("train", config.steps);
    progress.advance(start, None);
    let clock = Instant::now();
    let mut session_tokens = 0u64;
    for step in start..config.steps {
        let lr = schedule.lr(step);
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut parts_sum = Parts::default();
        for micro in 0..config.accumulation {
            let first = (step as usize * config.accumulation + micro) * config.batch;
            let picked: Vec<usize> = (first..first + config.batch)
                .map(|p| order.window(p))
                .collect();
            let batch = make_batch(windows, picked, &device)?;
            let scale = 1.0 / config.accumulation as f64;
            let micro = objective.gradients(&batch, scale, config.recompute)?;
            if !micro.loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    loss: micro.loss,
                });
            }
            loss_sum += micro.loss;
            for (name, v) in micro.parts {
                parts_sum.add(&name, v);
            }
            let mut these = Vec::with_capacity(optimizer.params().len());
            let mut grads = micro.grads.into_iter();
            for (name, _) in optimizer.params() {
                let g = grads.next().flatten().ok_or_else(|| {
                    TrainError::Config(format!(
                        "parameter '{name}' receives no gradient from the loss; freeze it"
                    ))
                })?;
                these.push(g);
            }
            sum = Some(match sum {
                None => these,
                Some(acc) => acc
                    .iter()
                    .zip(&these)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            });
            session_tokens += (config.batch * seq) as u64;
        }
        let grads = sum.unwrap_or_default();
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                loss: grad_norm,
            });
        }
        // Clipping scales each gradient as the optimizer reaches it (no second set held).
        let clip = match config.clip_norm {
            Some(clip) if grad_norm > clip => clip / grad_norm,
            _ => 1.0,
        };
        optimizer.step_scaled(&grads, clip, lr)?;
        let n = config.accumulation as f64;
        log.tokens += (config.accumulation * config.batch * seq) as u64;
        let loss = loss_sum / n;
        log.train.push(LogPoint {
            step: step + 1,
            lr,
            loss,
            parts: parts_sum.0.into_iter().map(|(k, v)| (k, v / n)).collect(),
            grad_norm,
        });
        let done = step + 1;
        if !eval.is_empty()
            && (done == config.steps || (config.eval_every > 0 && done % config.eval_every == 0))
        {
            log.eval.push((done, objective.evaluate(eval)?));
        }
        if let Some(dir) = checkpoints {
            if config.checkpoint_every > 0
                && done % config.checkpoint_every == 0
                && done < config.steps
            {
                save_checkpoint(&dir.join(CHECKPOINT), fingerprint, done, &optimizer, &log)?;
            }
        }
        let rate = session_tokens as f64 / clock.elapsed().as_secs_f64().max(1e-9);
        progress.advance(
            1,
            Some(&format!("loss {loss:.4} · lr {lr:.2e} · {rate:.0} tok/s")),
        );
    }
    progress.finish();
    if let Some(dir) = checkpoints {
        let path = dir.join(CHECKPOINT);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| checkpoint_err(&path, e))?;
        }
    }
    let wall_s = clock.elapsed().as_secs_f64();
    Ok(TrainOutcome {
        steps: config.steps,
        log,
        resumed_from,
        wall_s,
        tokens_per_s: session_tokens as f64 / wall_s.max(1e-9),
    })
}

/// The backward pass of `scale × loss` (nothing when the loss is not finite: the caller stops).
pub(crate) fn backward(params: &[(String, Var)], loss: Loss, scale: f64) -> Result<Step> {
    let value = loss.total.to_scalar::<f32>()? as f64;
    let grads = if value.is_finite() {
        let store = (loss.total * scale)?.backward()?;
        params
            .iter()
            .map(|(_, p)| store.get(p.as_tensor()).cloned())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Step {
        loss: value,
        parts: loss.parts,
        grads,
    })
}

fn make_batch(windows: &[Vec<u32>], picked: Vec<usize>, device: &Device) -> Result<Batch> {
    let seq = windows[0].len();
    let flat: Vec<u32> = picked
        .iter()
        .flat_map(|&i| windows[i].iter().copied())
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(flat, (picked.len(), seq), device)?,
        windows: picked,
    })
}

/// `sqrt(Σ g²)` over every gradient, accumulated in f64.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

fn checkpoint_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn save_checkpoint(
    path: &Path,
    fingerprint: &str,
    step: u64,
    optimizer: &AdamW,
    log: &TrainLog,
) -> Result<()> {
    let dir = AtomicDir::new(path)?;
    let params: HashMap<String, Tensor> = optimizer
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let (t, moments) = optimizer.state()?;
    let staged: PathBuf = dir.path().to_path_buf();
    candle_core::safetensors::save(&params, staged.join("params.safetensors"))
        .map_err(|e| checkpoint_err(path, e))?;
    candle_core::safetensors::save(&moments, staged.join("optimizer.safetensors"))
        .map_err(|e| checkpoint_err(path, e))?;
    let state = SavedState {
        fingerprint: fingerprint.to_string(),
        step,
        optimizer_t: t,
        log: log.clone(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| checkpoint_err(path, e))?;
    std::fs::write(staged.join("state.json"), json).map_err(|e| checkpoint_err(path, e))?;
    dir.commit()?;
    Ok(())
}

fn load_checkpoint(
    path: &Path,
    fingerprint: &str,
    optimizer: &mut AdamW,
) -> Result<Option<SavedState>> {
    let state_path = path.join("state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&state_path).map_err(|e| checkpoint_err(&state_path, e))?;
    let state: SavedState =
        serde_json::from_slice(&bytes).map_err(|e| checkpoint_err(&state_path, e))?;
    if state.fingerprint != fingerprint {
        return Err(checkpoint_err(
            path,
            "it belongs to a different run (model, data or settings changed); delete it to start over",
        ));
    }
    let device = optimizer
        .params()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let params = candle_core::safetensors::load(path.join("params.safetensors"), &device)
        .map_err(|e| checkpoint_err(path, e))?;
    let moments = candle_core::safetensors::load(path.join("optimizer.safetensors"), &device)
        .map_err(|e| checkpoint_err(path, e))?;
    for (name, var) in optimizer.params() {
        let saved = params
            .get(name)
            .ok_or_else(|| checkpoint_err(path, format!("parameter '{name}' is missing")))?;
        if saved.dims() != var.as_tensor().dims() {
            return Err(checkpoint_err(
                path,
                format!("parameter '{name}' has the wrong shape {:?}", saved.dims()),
            ));
        }
        var.set(saved)?;
    }
    optimizer
        .restore(state.optimizer_t, &moments)
        .map_err(|e| checkpoint_err(path, e))?;
    Ok(Some(state))
}
