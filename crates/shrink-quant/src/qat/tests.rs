use super::*;
use candle_core::Device;

fn scheme(bits: u8, grid: Grid, group: usize) -> QuantScheme {
    QuantScheme {
        bits,
        grid,
        granularity: Granularity::Group(group),
        search: false,
    }
}

#[test]
fn ste_gradient_is_identity_inside_the_clip_range_and_zero_outside() {
    let dev = Device::Cpu;
    // Q4_0-like: codes −8..=7 at scale 0.5, so the range is [−4, 3.5].
    let w = Var::new(&[[-5.0f32, -3.9, -0.26, 0.0, 1.3, 3.4, 3.9, 9.0]], &dev).unwrap();
    let s = Var::new(&[[0.5f32]], &dev).unwrap();
    let q = fake_quantize(
        w.as_tensor(),
        s.as_tensor(),
        None,
        &scheme(4, Grid::SymmetricFull, 8),
    )
    .unwrap();
    assert_eq!(
        q.to_vec2::<f32>().unwrap()[0],
        [-4.0, -4.0, -0.5, 0.0, 1.5, 3.5, 3.5, 3.5]
    );
    let grads = q.sum_all().unwrap().backward().unwrap();
    let gw = grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(gw[0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    // LSQ: d/ds = round(w/s) − w/s inside, the clip bound outside.
    let gs = grads.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap()[0][0];
    let inside: f32 = [-3.9f32, -0.26, 0.0, 1.3, 3.4]
        .iter()
        .map(|w| (w / 0.5).round() - w / 0.5)
        .sum();
    let expected = inside + (-8.0) + 7.0 + 7.0;
    assert!((gs - expected).abs() < 1e-5, "{gs} vs {expected}");
}

#[test]
fn asymmetric_fake_quantization_learns_the_minimum() {
    let dev = Device::Cpu;
    let w = Var::new(&[[0.1f32, 0.35, 0.8, 1.6]], &dev).unwrap();
    let s = Var::new(&[[0.1f32]], &dev).unwrap();
    let m = Var::new(&[[0.0f32]], &dev).unwrap();
    // 2 bits: codes 0..=3, values 0, 0.1, 0.2, 0.3 (fp16-rounded scale).
    let q = fake_quantize(
        w.as_tensor(),
        s.as_tensor(),
        Some(m.as_tensor()),
        &scheme(2, Grid::Asymmetric, 4),
    )
    .unwrap();
    let d = f16::from_f32(0.1).to_f32();
    let got = q.to_vec2::<f32>().unwrap()[0].clone();
    for (a, b) in got.iter().zip([1.0 * d, 3.0 * d, 3.0 * d, 3.0 * d]) {
        assert!((a - b).abs() < 1e-6, "{got:?}");
    }
    let grads = q.sum_all().unwrap().backward().unwrap();
    // d/dm is s·(−1/s) + 1 = 0 inside the range and 1 outside (value = 3s + m): 3 clipped.
    let gm = grads.get(m.as_tensor()).unwrap().to_vec2::<f32>().unwrap()[0][0];
    assert!((gm - 3.0).abs() < 1e-5, "{gm}");
}

fn windows(count: u32, len: u32, seed: u32) -> Vec<Vec<u32>> {
    (0..count)
        .map(|w| (0..len).map(|i| (w * 11 + i * i * 5 + seed) % 64).collect())
        .collect()
}

#[test]
fn qat_lowers_the_kl_of_a_quantized_start_and_exports_exactly_what_it_trained() {
    use shrink_models::ModelConfig;
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    let mut start = teacher.clone();
    let plan = crate::QuantPlan::uniform(scheme(2, Grid::SymmetricFull, 16));
    let initial = crate::quantize_model(
        &mut start,
        crate::Method::Rtn,
        &plan,
        None,
        1,
        &shrink_core::NoProgress,
    )
    .unwrap();
    let job = QatJob {
        train: TrainConfig {
            steps: 30,
            batch: 4,
            lr: 5e-4,
            warmup: 2,
            ..TrainConfig::default()
        },
        frozen: vec![],
        ..QatJob::default()
    };
    let data = windows(12, 12, 0);
    let held_out = data[..3].to_vec();
    let (model, stored, out) = qat(
        &teacher,
        &start,
        &initial,
        &job,
        &data,
        &held_out,
        None,
        "t",
        &shrink_core::NoProgress,
    )
    .unwrap();
    let kl = |i: usize| out.log.eval[i].1[1].1;
    assert!(kl(1) < 0.8 * kl(0), "{:?}", out.log.eval);
    // The exported model (codes and fp16 scales as stored) scores what training measured.
    let ids = Tensor::new(held_out.clone(), &dev).unwrap();
    let t = teacher.forward(&ids).unwrap().flatten_to(1).unwrap();
    let s = model.forward(&ids).unwrap().flatten_to(1).unwrap();
    let again = shrink_train::loss::kl_divergence(
        &s,
        shrink_train::Target::Logits(&t),
        1.0,
        shrink_train::Divergence::Forward,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    assert!(
        (again - kl(1)).abs() < 1e-5 * kl(1).max(1.0),
        "{again} vs {}",
        kl(1)
    );
    // LSQ moved scales; codes stay in the 2-bit range.
    let moved = stored
        .tensors
        .iter()
        .any(|(name, q)| match (q, &initial.tensors[name]) {
            (QuantizedWeight::Packed(a), QuantizedWeight::Packed(b)) => a.scales != b.scales,
            _ => false,
        });
    assert!(moved);
    for q in stored.tensors.values() {
        if let QuantizedWeight::Packed(t) = q {
            assert!(t.codes().iter().all(|&c| c < 4));
        }
    }
}

#[test]
fn k_quant_weights_pass_a_straight_through_gradient() {
    let dev = Device::Cpu;
    let values: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let latent =
        Var::from_tensor(&Tensor::from_vec(values.clone(), (1, 256), &dev).unwrap()).unwrap();
    let l = QatLinear {
        name: "x".into(),
        latent: latent.clone(),
        rows: 1,
        cols: 256,
        quantizer: Quantizer::K(shrink_io::ggml::GgmlType::Q4K),
    };
    let w = l.weight().unwrap();
    let expected = GgmlTensor::quantize(&values, 1, 256, shrink_io::ggml::GgmlType::Q4K, None, "x")
        .unwrap()
        .dequantize()
        .unwrap();
    assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    let g = w.sum_all().unwrap().backward().unwrap();
    let g = g
        .get(latent.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(g.iter().all(|&x| x == 1.0));
    assert_eq!(l.export().unwrap().dequantize().unwrap(), expected);
}

#[test]
fn activation_fake_quantization_passes_a_straight_through_gradient() {
    let dev = Device::Cpu;
    let x = Var::new(&[[0.5f32, -1.27, 0.013], [2.0, 0.0, -0.3]], &dev).unwrap();
    let q = shrink_models::ActQuant::Int8PerToken
        .fake_quantize(x.as_tensor())
        .unwrap();
    // Row 1: scale 1.27/127 = 0.01, so 0.013 rounds to 0.01; row 2 keeps its grid.
    let got = q.to_vec2::<f32>().unwrap();
    assert!((got[0][2] - 0.01).abs() < 1e-6, "{got:?}");
    let g = q.sum_all().unwrap().backward().unwrap();
    let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g, [[1.0; 3], [1.0; 3]]);
}
