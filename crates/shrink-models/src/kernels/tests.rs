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
