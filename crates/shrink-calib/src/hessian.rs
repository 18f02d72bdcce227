//! Per-linear input statistics.

use candle_core::{DType, Tensor};

/// Statistics of the rows `x` (length `in_features`) a linear layer received.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearStats {
    pub in_features: usize,
    /// Σ x xᵀ over all rows, row-major `in × in` (GPTQ's and SparseGPT's H, up to a factor 2/rows);
    /// empty for per-channel statistics only ([`LinearStats::diagonal`]).
    pub hessian: Vec<f64>,
    /// Σ x_j² per input channel (the diagonal of `hessian`; Wanda's ‖X_j‖²).
    pub channel_sq: Vec<f64>,
    /// Σ |x_j| per input channel (AWQ's activation magnitude, once divided by `rows`).
    pub channel_abs: Vec<f64>,
    /// max |x_j| per input channel (SmoothQuant's activation range).
    pub channel_max: Vec<f64>,
    pub rows: usize,
}

impl LinearStats {
    pub fn new(in_features: usize) -> Self {
        Self {
            hessian: vec![0.0; in_features * in_features],
            ..Self::diagonal(in_features)
        }
    }

    /// Per-channel statistics only, without the `in × in` Hessian (Wanda needs no more; the
    /// Hessian's product dominates calibration time on wide layers). The Hessian is never
    /// allocated: zeroing `in²` f64s of reused memory for nothing raised the peak of a Wanda or
    /// structured pruning of the 8B shapes by ~1.1 GB.
    pub fn diagonal(in_features: usize) -> Self {
        Self {
            in_features,
            hessian: Vec::new(),
            channel_sq: vec![0.0; in_features],
            channel_abs: vec![0.0; in_features],
            channel_max: vec![0.0; in_features],
            rows: 0,
        }
    }

    /// Whether the full Hessian is accumulated.
    pub fn has_hessian(&self) -> bool {
        !self.hessian.is_empty()
    }

    /// Adds the rows of `x` (any shape ending in `in_features`).
    pub fn accumulate(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let partial = self.partial(x)?;
        self.add(&partial);
        Ok(())
    }

    /// One batch's contribution: the statistics of the rows of `x` alone, in f32, as
    /// [`LinearStats::add`] takes them.
    pub fn partial(&self, x: &Tensor) -> candle_core::Result<Partial> {
        let n = self.in_features;
        let x = x.to_dtype(DType::F32)?.reshape(((), n))?;
        let rows = x.dim(0)?;
        // XᵀX in f32, each entry one chain over the rows in order (the same bits on any CPU),
        // summed in f64 across batches.
        let xtx = if self.has_hessian() {
            let mut xtx = vec![0f32; n * n];
            shrink_core::gemm::gram(&shrink_models::F32Values::of(&x)?, rows, n, &mut xtx);
            xtx
        } else {
            Vec::new()
        };
        let absx = x.abs()?;
        let mut channels = x.sqr()?.sum(0)?.to_vec1::<f32>()?;
        channels.extend(absx.sum(0)?.to_vec1::<f32>()?);
        channels.extend(absx.max(0)?.to_vec1::<f32>()?);
        Ok(Partial {
            xtx,
            channels,
            rows: rows as u64,
        })
    }

    /// Adds one batch's [`Partial`]: batches added in the same order give the same bits however
    /// they were computed.
    pub fn add(&mut self, partial: &Partial) {
        let n = self.in_features;
        for (h, v) in self.hessian.iter_mut().zip(&partial.xtx) {
            *h += *v as f64;
        }
        let (sq, rest) = partial.channels.split_at(n);
        let (abs, max) = rest.split_at(n);
        for j in 0..n {
            self.channel_sq[j] += sq[j] as f64;
            self.channel_abs[j] += abs[j] as f64;
            self.channel_max[j] = self.channel_max[j].max(max[j] as f64);
        }
        self.rows += partial.rows as usize;
    }

    /// An empty [`Partial`] of these statistics' size, to receive one into.
    pub fn empty_partial(&self) -> Partial {
        Partial {
            xtx: vec![0.0; self.hessian.len()],
            channels: vec![0.0; 3 * self.in_features],
            rows: 0,
        }
    }

    pub fn is_finite(&self) -> bool {
        self.hessian.iter().all(|v| v.is_finite()) && self.channel_sq.iter().all(|v| v.is_finite())
    }
}

/// The statistics of one batch of rows in f32, as [`LinearStats::partial`] computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// `XᵀX`, row-major; empty without the Hessian.
    pub xtx: Vec<f32>,
    /// `Σ x²`, `Σ |x|` and `max |x|` per channel, one after the other.
    pub channels: Vec<f32>,
    pub rows: u64,
}

impl LinearStats {
    /// The Hessian `Σ x xᵀ` as an f32 tensor on the CPU.
    pub fn hessian_tensor(&self) -> candle_core::Result<Tensor> {
        if !self.has_hessian() {
            candle_core::bail!("these statistics were gathered without the Hessian");
        }
        let h: Vec<f32> = self.hessian.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(
            h,
            (self.in_features, self.in_features),
            &candle_core::Device::Cpu,
        )
    }

    /// The layer objective of replacing `w` (`rows × in_features`) by `approx`:
    /// ‖(W − Ŵ) X‖² relative to ‖W X‖², computed from the Hessian as Σ_rows δᵀ H δ / Σ_rows wᵀ H w.
    pub fn relative_output_error(&self, w: &[f32], approx: &[f32]) -> candle_core::Result<f64> {
        let h = self.hessian_tensor()?;
        let n = self.in_features;
        let delta: Vec<f32> = w.iter().zip(approx).map(|(a, b)| a - b).collect();
        let den = quadratic(w, n, &h)?;
        Ok(if den > 0.0 {
            quadratic(&delta, n, &h)? / den
        } else {
            0.0
        })
    }
}

/// Σ_rows vᵀ H v for the rows of `v` (`rows × n`), by one matrix product.
pub fn quadratic(v: &[f32], n: usize, h: &Tensor) -> candle_core::Result<f64> {
    use shrink_core::gemm::{gemm, Operand};
    let rows = v.len() / n;
    let mut vh = vec![0f32; rows * n];
    let h = shrink_models::F32Values::of(h)?;
    gemm(
        rows,
        n,
        n,
        Operand::row_major(v, n),
        Operand::row_major(&h, n),
        &mut vh,
        false,
    );
    Ok(vh.iter().zip(v).map(|(a, b)| a * b).sum::<f32>() as f64)
}

#[cfg(test)]
mod tests;
