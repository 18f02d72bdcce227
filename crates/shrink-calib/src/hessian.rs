//! Per-linear input statistics.

use candle_core::{DType, Tensor};

/// Statistics of the rows `x` (length `in_features`) a linear layer received.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearStats {
    pub in_features: usize,
    /// Σ x xᵀ over all rows, row-major `in × in` (GPTQ's and SparseGPT's H, up to a factor 2/rows).
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
            in_features,
            hessian: vec![0.0; in_features * in_features],
            channel_sq: vec![0.0; in_features],
            channel_abs: vec![0.0; in_features],
            channel_max: vec![0.0; in_features],
            rows: 0,
        }
    }

    /// Adds the rows of `x` (any shape ending in `in_features`).
    pub fn accumulate(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let n = self.in_features;
        let x = x.to_dtype(DType::F32)?.reshape(((), n))?;
        let rows = x.dim(0)?;
        // XᵀX in f32 by candle's matmul, summed in f64 across calls.
        let xtx: Vec<f32> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        for (h, v) in self.hessian.iter_mut().zip(&xtx) {
            *h += *v as f64;
        }
        let sq: Vec<f32> = x.sqr()?.sum(0)?.to_vec1()?;
        let absx = x.abs()?;
        let abs: Vec<f32> = absx.sum(0)?.to_vec1()?;
        let max: Vec<f32> = absx.max(0)?.to_vec1()?;
        for j in 0..n {
            self.channel_sq[j] += sq[j] as f64;
            self.channel_abs[j] += abs[j] as f64;
            self.channel_max[j] = self.channel_max[j].max(max[j] as f64);
        }
        self.rows += rows;
        Ok(())
    }

    pub fn is_finite(&self) -> bool {
        self.hessian.iter().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accumulation_equals_direct_sum_of_outer_products() {
        let a = Tensor::new(&[[1f32, 2.0, -1.0], [0.5, 0.0, 3.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[[2f32, -2.0, 1.0]]], &Device::Cpu).unwrap();
        let mut s = LinearStats::new(3);
        s.accumulate(&a).unwrap();
        s.accumulate(&b).unwrap();
        let rows = [[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [2.0, -2.0, 1.0]];
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = rows.iter().map(|r| r[i] * r[j]).sum();
                assert!((s.hessian[i * 3 + j] - want).abs() < 1e-6);
            }
            assert!((s.channel_sq[i] - s.hessian[i * 3 + i]).abs() < 1e-6);
            let abs: f64 = rows.iter().map(|r| f64::abs(r[i])).sum();
            assert!((s.channel_abs[i] - abs).abs() < 1e-6);
            let max = rows.iter().map(|r| f64::abs(r[i])).fold(0.0, f64::max);
            assert_eq!(s.channel_max[i], max);
        }
        assert_eq!(s.rows, 3);
    }
}
