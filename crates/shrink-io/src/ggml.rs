//! Between shrink's [`GgmlType`] and candle's `GgmlDType`, for the types candle has kernels for
//! (its quantizers for the legacy and k-quant blocks, its dequantizers, its quantized matmul).
//! The i-quants have no candle type: shrink dequantizes them itself ([`dequantize`]).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};
pub use shrink_core::ggml::GgmlType;

/// candle's type of `t`, if candle has it.
pub fn to_candle(t: GgmlType) -> Option<GgmlDType> {
    Some(match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
        GgmlType::IQ4NL
        | GgmlType::IQ4XS
        | GgmlType::IQ3XXS
        | GgmlType::IQ3S
        | GgmlType::IQ2XXS
        | GgmlType::IQ2XS
        | GgmlType::IQ2S => return None,
    })
}

/// shrink's type of candle's `t` (every candle type is one).
pub fn from_candle(t: GgmlDType) -> GgmlType {
    GgmlType::all()
        .find(|&s| to_candle(s) == Some(t))
        .unwrap_or(GgmlType::F32)
}

/// The f32 values of `bytes` holding a tensor of type `t` and PyTorch-order `shape` (rows of the
/// last dimension), as ggml's `to_float` computes them.
pub fn dequantize(t: GgmlType, bytes: &[u8], shape: &[usize]) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    if t.row_bytes(n) != Some(bytes.len()) {
        candle_core::bail!("{} bytes do not hold {n} {t:?} values", bytes.len());
    }
    if let Some(q) = t.iquant() {
        let row = shape.last().copied().unwrap_or(1).max(1);
        let row_bytes = t.row_bytes(row).unwrap_or(0);
        if row_bytes == 0 {
            candle_core::bail!("rows of {row} values are not whole {t:?} blocks");
        }
        let mut out = vec![0f32; n];
        for (b, y) in bytes.chunks(row_bytes).zip(out.chunks_mut(row)) {
            q.dequantize_row(b, y);
        }
        return Tensor::from_vec(out, shape, &Device::Cpu);
    }
    let candle = to_candle(t).ok_or_else(|| candle_core::Error::Msg(format!("{t:?}")))?;
    qtensor_from_ggml(candle, bytes, shape.to_vec(), &Device::Cpu)?.dequantize(&Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_types_round_trip() {
        for t in GgmlType::all() {
            match to_candle(t) {
                Some(c) => {
                    assert_eq!(from_candle(c), t);
                    assert_eq!(
                        (c.block_size(), c.type_size()),
                        (t.block_size(), t.type_size())
                    );
                }
                None => assert!(t.iquant().is_some()),
            }
        }
    }
}
