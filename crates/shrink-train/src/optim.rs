//! AdamW (Loshchilov & Hutter: decoupled weight decay) whose moments can be saved and restored,
//! and the warmup + cosine learning-rate schedule.

use crate::Result;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// AdamW hyper-parameters (the learning rate comes from the [`Schedule`] at every step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices only: parameters of rank 2 or more
    /// named `….weight` (not to norms, biases, or other trained values such as QAT's scales).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named f32 parameters. The moments are plain vectors updated in place, one fused
/// pass per parameter over its moments, gradient and weight (in parallel, element by element: the
/// same bits on any thread count).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Updates applied so far (for bias correction).
    t: u64,
}

/// Elements per parallel task of an update.
const CHUNK: usize = 1 << 14;

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if let Some((name, _)) = params.iter().find(|(_, p)| p.dtype() != DType::F32) {
            return Err(crate::TrainError::Config(format!(
                "parameter '{name}' is not f32: AdamW trains f32 parameters"
            )));
        }
        let m: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, p)| vec![0f32; p.elem_count()])
            .collect();
        Ok(Self {
            config,
            v: m.clone(),
            m,
            params,
            t: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Applies one update with learning rate `lr`; `grads[i]` is the gradient of `params()[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, 1.0, lr)
    }

    /// [`AdamW::step`] with the gradients multiplied by `scale` (clipping) as they are read.
    pub fn step_scaled(&mut self, grads: &[Tensor], scale: f64, lr: f64) -> Result<()> {
        let c = self.config;
        self.t += 1;
        let bc1 = (1.0 - c.beta1.powi(self.t as i32)) as f32;
        let bc2 = (1.0 - c.beta2.powi(self.t as i32)) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let (o1, o2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let (scale, lr32) = (scale as f32, lr as f32);
        for (i, ((name, p), g)) in self.params.iter().zip(grads).enumerate() {
            let w = p.as_tensor();
            if g.dims() != w.dims() {
                return Err(crate::TrainError::Shape(format!(
                    "gradient {:?} for a parameter {:?}",
                    g.dims(),
                    w.dims()
                )));
            }
            let decay = if c.weight_decay > 0.0 && w.rank() >= 2 && name.ends_with(".weight") {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            // Read in place; the weight is copied once, updated, then set.
            let g = shrink_models::F32Values::of(g)?;
            let mut new = values(w)?;
            new.par_chunks_mut(CHUNK)
                .zip(self.m[i].par_chunks_mut(CHUNK))
                .zip(self.v[i].par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for j in 0..w.len() {
                        let g = g[j] * scale;
                        m[j] = m[j] * b1 + g * o1;
                        v[j] = v[j] * b2 + g * g * o2;
                        let update = (m[j] / bc1) / ((v[j] / bc2).sqrt() + eps);
                        w[j] = w[j] * decay - update * lr32;
                    }
                });
            p.set(&Tensor::from_vec(new, w.shape(), w.device())?)?;
        }
        Ok(())
    }

    /// The moments under `m.NAME` / `v.NAME`, for a checkpoint.
    pub fn state(&self) -> Result<(u64, HashMap<String, Tensor>)> {
        let mut map = HashMap::new();
        for (i, (name, p)) in self.params.iter().enumerate() {
            let (shape, device) = (p.as_tensor().shape(), p.device());
            map.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.m[i], shape, device)?,
            );
            map.insert(
                format!("v.{name}"),
                Tensor::from_slice(&self.v[i], shape, device)?,
            );
        }
        Ok((self.t, map))
    }

    /// Restores moments saved by [`AdamW::state`]; every parameter's must be present.
    pub fn restore(&mut self, t: u64, map: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let saved = map
                    .get(&key)
                    .ok_or_else(|| crate::TrainError::Shape(format!("missing '{key}'")))?;
                if saved.dims() != p.as_tensor().dims() {
                    return Err(crate::TrainError::Shape(format!(
                        "'{key}' is shaped {:?}, the parameter {:?}",
                        saved.dims(),
                        p.as_tensor().dims()
                    )));
                }
                *slot = values(saved)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Linear warmup to the peak rate, then a cosine decay to `min_ratio · peak` at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}
