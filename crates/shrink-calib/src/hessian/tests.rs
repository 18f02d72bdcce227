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
