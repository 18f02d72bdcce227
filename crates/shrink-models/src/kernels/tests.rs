use super::*;
use candle_core::Device;

#[test]
fn causal_softmax_matches_mask_then_softmax() {
    let scores = Tensor::randn(0f32, 3.0, (2, 3, 5, 9), &Device::Cpu).unwrap();
    for window in [usize::MAX, 3] {
        let got = causal_softmax(&scores, 0.125, Some(window)).unwrap();
        let want = differentiable_causal_softmax(&scores, 0.125, Some(window)).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "window {window}: {diff}");
    }
}

#[test]
fn causal_attention_is_the_materialised_attention_bit_for_bit() {
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // 6 query heads over 2 key/value heads; query blocks cut at 36 rows; t < s (cached keys), a
    // single query row (a decoding step), and a sliding window.
    for (t, s, window) in [
        (80, 80, None),
        (80, 95, None),
        (1, 40, None),
        (80, 90, Some(20)),
    ] {
        let q = Tensor::randn(0f32, 1.0, (2, 6, t, 8), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, s, 8), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, s, 8), &Device::Cpu).unwrap();
        let got = causal_attention(&q, &k, &v, 3, 0.3, window)
            .unwrap()
            .unwrap();
        let scores = per_head(&q, &k, 3, true).unwrap().unwrap();
        let probs = causal_softmax(&scores, 0.3, window).unwrap();
        let want = per_head(&probs, &v, 3, false).unwrap().unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(
            values(&got),
            values(&want),
            "t {t}, s {s}, window {window:?}"
        );
    }
    let k = Tensor::randn(0f32, 1.0, (1, 2, 4, 8), &Device::Cpu).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, 6, 5, 8), &Device::Cpu).unwrap();
    assert!(
        causal_attention(&q, &k, &k, 3, 0.3, None).is_err(),
        "more queries than keys"
    );
}

#[test]
fn held_cache_attention_is_the_concatenated_attention_bit_for_bit() {
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Steps of 50, 1, 30 and 1 positions: the held cache grows past its first 64 and then 128.
    for window in [None, Some(40)] {
        let mut held = HeldKv::default();
        let (mut ks, mut vs) = (vec![], vec![]);
        for (step, t) in [50, 1, 30, 1, 60].into_iter().enumerate() {
            let seed = |x: Tensor| (x * (1.0 + step as f64)).unwrap();
            let q = seed(Tensor::randn(0f32, 1.0, (2, 6, t, 8), &Device::Cpu).unwrap());
            let k = seed(Tensor::randn(0f32, 1.0, (2, 2, t, 8), &Device::Cpu).unwrap());
            let v = seed(Tensor::randn(0f32, 1.0, (2, 2, t, 8), &Device::Cpu).unwrap());
            let got = causal_attention_cached(&q, &k, &v, &mut held, 3, 0.3, window)
                .unwrap()
                .unwrap();
            ks.push(k);
            vs.push(v);
            let (k, v) = (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap());
            let want = causal_attention(&q, &k, &v, 3, 0.3, window)
                .unwrap()
                .unwrap();
            assert_eq!(held.len(), k.dim(2).unwrap());
            assert_eq!(
                values(&got),
                values(&want),
                "step {step}, window {window:?}"
            );
        }
    }
    // Another shape after the first is refused.
    let mut held = HeldKv::default();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &Device::Cpu).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, 6, 3, 8), &Device::Cpu).unwrap();
    causal_attention_cached(&q, &k, &k, &mut held, 3, 0.3, None).unwrap();
    let k4 = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &Device::Cpu).unwrap();
    let q4 = Tensor::randn(0f32, 1.0, (1, 6, 3, 4), &Device::Cpu).unwrap();
    assert!(causal_attention_cached(&q4, &k4, &k4, &mut held, 3, 0.3, None).is_err());
}

#[test]
fn fixed_order_products_are_candles_products() {
    let close = |a: &Tensor, b: &Tensor| {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap()
    };
    let x = Tensor::randn(0f32, 1.0, (37, 70), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (45, 70), &Device::Cpu).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    assert!(close(&linear(&x, &w).unwrap(), &want) < 1e-4);
    // Grouped-query attention: 6 heads of q over 2 heads of k and v (groups of 3).
    let q = Tensor::randn(0f32, 1.0, (2, 6, 5, 8), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (2, 2, 7, 8), &Device::Cpu).unwrap();
    let kr = k
        .unsqueeze(2)
        .unwrap()
        .expand((2, 2, 3, 7, 8))
        .unwrap()
        .reshape((2, 6, 7, 8))
        .unwrap();
    let scores = per_head(&q, &k, 3, true).unwrap().unwrap();
    let want = q.matmul(&kr.t().unwrap()).unwrap();
    assert!(close(&scores, &want) < 1e-5);
    let v = k;
    let attn = per_head(&scores, &v, 3, false).unwrap().unwrap();
    assert!(close(&attn, &scores.matmul(&kr).unwrap()) < 1e-4);
    // Under a gradient, candle's product.
    let var = candle_core::Var::from_tensor(&q).unwrap();
    assert!(per_head(var.as_tensor(), &v, 3, true).unwrap().is_none());
}

#[test]
fn silu_mul_matches_separate_ops() {
    let a = Tensor::randn(0f32, 2.0, (3, 5000), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 2.0, (3, 5000), &Device::Cpu).unwrap();
    let want = (a.silu().unwrap() * &b).unwrap();
    let diff = (silu_mul(&a, &b).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}

/// Every block type through candle's quantizer: shrink's decoding of the blocks gives candle's
/// (an independent implementation of ggml's) dequantized values exactly.
#[test]
fn packed_blocks_decode_as_candle_dequantizes_them() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use shrink_core::qmatmul::{BlockType, QMatrix};
    let types = [
        (GgmlDType::Q4_0, BlockType::Q4_0),
        (GgmlDType::Q4_1, BlockType::Q4_1),
        (GgmlDType::Q5_0, BlockType::Q5_0),
        (GgmlDType::Q5_1, BlockType::Q5_1),
        (GgmlDType::Q8_0, BlockType::Q8_0),
        (GgmlDType::Q2K, BlockType::Q2K),
        (GgmlDType::Q3K, BlockType::Q3K),
        (GgmlDType::Q4K, BlockType::Q4K),
        (GgmlDType::Q5K, BlockType::Q5K),
        (GgmlDType::Q6K, BlockType::Q6K),
    ];
    let w = Tensor::randn(0f32, 1.0, (6, 512), &Device::Cpu).unwrap();
    for (ggml, ty) in types {
        let q = QTensor::quantize(&w, ggml).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let packed = QMatrix::new(ty, 6, 512, q.data().unwrap().to_vec()).unwrap();
        assert_eq!(packed.dequantize(), want, "{ty:?}");
    }
}

/// A linear given packed blocks multiplies by them (as `QMatrix::matmul`, plus its bias); any
/// change to its weight drops them; blocks of another shape are refused.
#[test]
fn packed_linear_multiplies_by_its_blocks_until_the_weight_changes() {
    use crate::Linear;
    use candle_core::quantized::{GgmlDType, QTensor};
    use shrink_core::qmatmul::{BlockType, QMatrix};
    let w = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let packed = QMatrix::new(BlockType::Q8_0, 5, 64, q.data().unwrap().to_vec()).unwrap();
    let dequantized = Tensor::from_vec(packed.dequantize(), (5, 64), &Device::Cpu).unwrap();
    let bias = Tensor::new(&[1f32, 2.0, 3.0, 4.0, 5.0], &Device::Cpu).unwrap();
    let mut linear = Linear::new(dequantized, Some(bias));
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64), &Device::Cpu).unwrap();
    let float = linear.forward(&x).unwrap();
    linear
        .set_packed(Some(std::sync::Arc::new(packed.clone())))
        .unwrap();
    let y: Vec<f32> = linear
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = packed
        .matmul(&xs, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v + (i % 5 + 1) as f32)
        .collect();
    assert_eq!(y, want);
    assert_ne!(y, float.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    linear.scale_columns(&[1.0; 64]).unwrap();
    assert!(linear.packed().is_none());
    assert_eq!(
        linear.forward(&x).unwrap().to_vec3::<f32>().unwrap(),
        float.to_vec3::<f32>().unwrap()
    );
    let other = QMatrix::new(BlockType::Q8_0, 4, 64, vec![0; 4 * 2 * 34]).unwrap();
    assert!(linear.set_packed(Some(std::sync::Arc::new(other))).is_err());
}

#[test]
fn max_of_is_the_largest_value_at_every_length() {
    let x: Vec<f32> = (0..70).map(|i| ((i * 37) % 71) as f32 - 35.0).collect();
    for n in [0, 1, 15, 16, 17, 33, 70] {
        let want = x[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        assert_eq!(max_of(&x[..n]), want, "{n} values");
    }
}
