//! AdamW (Loshchilov & Hutter: decoupled weight decay) whose moments can be saved and restored,
//! and the warmup + cosine learning-rate schedule.

use crate::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// AdamW hyper-parameters (the learning rate comes from the [`Schedule`] at every step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms or biases).
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

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    t: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
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
        let c = self.config;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let w = p.as_tensor();
            let decayed = if c.weight_decay > 0.0 && w.rank() >= 2 {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments under `m.NAME` / `v.NAME`, for a checkpoint.
    pub fn state(&self) -> (u64, HashMap<String, Tensor>) {
        let mut map = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        (self.t, map)
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
                *slot = saved.clone();
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
