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

/// A tiny QAT run's inputs: the teacher, its RTN quantization to one format and the windows.
struct Run {
    teacher: Transformer,
    start: Transformer,
    initial: QuantizedModel,
    data: Vec<Vec<u32>>,
}

impl Run {
    fn new(config: &shrink_models::ModelConfig, seed: u64, format: crate::Format) -> Self {
        let teacher = Transformer::random(config, seed, &Device::Cpu).unwrap();
        let mut start = teacher.clone();
        let initial = crate::quantize_model(
            &mut start,
            crate::Method::Rtn,
            &crate::QuantPlan::uniform(format),
            None,
            1,
            &shrink_core::NoProgress,
        )
        .unwrap();
        let data = windows(12, 12, seed as u32 * 3);
        Self {
            teacher,
            start,
            initial,
            data,
        }
    }

    /// `steps` updates, evaluated on the first three windows before and after.
    fn train(&self, steps: u64, learn_scales: bool) -> (Transformer, QuantizedModel, TrainOutcome) {
        let job = QatJob {
            train: TrainConfig {
                steps,
                batch: 4,
                lr: 5e-4,
                warmup: 2,
                ..TrainConfig::default()
            },
            frozen: vec![],
            learn_scales,
            ..QatJob::default()
        };
        qat(
            &self.teacher,
            &self.start,
            &self.initial,
            &job,
            &self.data,
            &self.data[..3],
            None,
            "t",
            &shrink_core::NoProgress,
        )
        .unwrap()
    }

    /// The KL on the held-out windows training measured last, checked against the exported
    /// model's (its codes and scales as stored).
    fn final_kl(&self, model: &Transformer, out: &TrainOutcome) -> f64 {
        let kl = out.log.eval.last().unwrap().1[1].1;
        let ids = Tensor::new(self.data[..3].to_vec(), &Device::Cpu).unwrap();
        let t = self.teacher.forward(&ids).unwrap().flatten_to(1).unwrap();
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
        assert!((again - kl).abs() < 1e-5 * kl.max(1.0), "{again} vs {kl}");
        kl
    }
}

#[test]
fn qat_lowers_the_kl_of_a_quantized_start_and_exports_exactly_what_it_trained() {
    let run = Run::new(
        &shrink_models::ModelConfig::tiny_for_tests(),
        0,
        scheme(2, Grid::SymmetricFull, 16).into(),
    );
    let (model, stored, out) = run.train(30, true);
    // The exported model (codes and fp16 scales as stored) scores what training measured.
    let kl = run.final_kl(&model, &out);
    assert!(kl < 0.8 * out.log.eval[0].1[1].1, "{:?}", out.log.eval);
    // LSQ moved scales; codes stay in the 2-bit range.
    let moved = stored
        .tensors
        .iter()
        .any(|(name, q)| match (q, &run.initial.tensors[name]) {
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

fn k_linear(kind: KQuant, values: Vec<f32>, rows: usize, cols: usize) -> (QatLinear, GgmlTensor) {
    let dev = Device::Cpu;
    let blocks = GgmlTensor::quantize(&values, rows, cols, kind.ggml(), None, "x").unwrap();
    let start = blocks.dequantize().unwrap();
    let latent = Var::from_tensor(&Tensor::from_vec(start, (rows, cols), &dev).unwrap()).unwrap();
    let l = QatLinear {
        name: "x".into(),
        latent,
        rows,
        cols,
        quantizer: Quantizer::K(KGrid::new(kind, &blocks.bytes, &dev).unwrap()),
    };
    (l, blocks)
}

fn sample(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0 * if i % 53 == 0 { 3.0 } else { 1.0 })
        .collect()
}

/// Started from a k-quant file, the fake-quantized weight is the file's dequantized weight and
/// the export is the file, byte for byte, in every k-quant type.
#[test]
fn k_quant_qat_starts_on_the_saved_blocks_and_exports_them_bit_for_bit() {
    for kind in KQuant::ALL {
        let (l, blocks) = k_linear(kind, sample(3 * 512), 3, 512);
        let w = l.weight().unwrap().flatten_all().unwrap();
        assert_eq!(
            w.to_vec1::<f32>().unwrap(),
            blocks.dequantize().unwrap(),
            "{kind:?}"
        );
        let QuantizedWeight::Blocks(out) = l.export().unwrap() else {
            panic!("{kind:?}: not blocks")
        };
        assert_eq!(out, blocks, "{kind:?}");
    }
}

/// The gradients of the blocks' learned scales, against a scalar implementation of the
/// formulas: LSQ for each group scale (`round(x) − x` inside the code range, the bound outside,
/// `x` clipped before it is rounded; a group of zero scale at the bound on each weight's side)
/// and the group minimum (0 inside, −1 outside, as `−dmin·mn` is subtracted), straight through
/// the integer scales' rounding to the super-block scales (LSQ again: `sc − a/d` times the group
/// scale's gradient, times the variable's unit; a group scale out of its range passes the
/// gradient that moves it back). Moved weights stay on the saved grid: the export decodes to
/// exactly the forward pass's values.
#[test]
fn k_quant_block_scales_get_lsq_gradients_through_both_roundings() {
    let (rows, cols) = (2, 512);
    let n = rows * cols;
    for kind in KQuant::ALL {
        let (l, _) = k_linear(kind, sample(n), rows, cols);
        let Quantizer::K(k) = &l.quantizer else {
            unreachable!()
        };
        // Move the weights off the grid (some beyond its range) and the scales off their
        // integers (some beyond their range, one to zero), then weight each value's gradient
        // differently.
        let moved: Vec<f32> = sample(n)
            .iter()
            .enumerate()
            .map(|(i, &w)| w * if i % 11 == 0 { 1.7 } else { 0.93 } + 1e-4)
            .collect();
        l.latent
            .set(&Tensor::from_vec(moved.clone(), (rows, cols), &Device::Cpu).unwrap())
            .unwrap();
        let vals =
            |v: &Var| -> Vec<f32> { v.as_tensor().flatten_all().unwrap().to_vec1().unwrap() };
        let set = |v: &Var, x: Vec<f32>| {
            v.set(&Tensor::from_vec(x, v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        };
        let mut alpha = vals(&k.scale);
        for (j, a) in alpha.iter_mut().enumerate() {
            *a *= [1.09, 0.8, 1.3, -0.2][j % 4];
        }
        alpha[1] = 0.0;
        set(&k.scale, alpha.clone());
        if let Some((_, min)) = &k.min {
            set(min, vals(min).iter().map(|m| m * 0.95).collect());
        }
        let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let out = l.weight().unwrap();
        let loss = out
            .flatten_all()
            .unwrap()
            .mul(&Tensor::new(weights.as_slice(), &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let get = |v: &Var| -> Vec<f32> {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // The scalar reference.
        let unit = KGrid::unit(kind);
        let (lo, hi) = kind.scale_range();
        let (lo, hi) = (lo as f32, hi as f32);
        let per = QK_K / kind.group();
        let stored = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| f16::from_f32(x * unit).to_f32())
                .collect()
        };
        let d = stored(&vals(&k.sup));
        let (dmin, mu) = match &k.min {
            Some((s, m)) => (stored(&vals(s)), vals(m)),
            None => (vec![0.0; d.len()], vec![0.0; alpha.len()]),
        };
        let top = kind.min_max().unwrap_or(0) as f32;
        let int = |x: f32, d: f32, lo: f32, hi: f32| {
            if d == 0.0 {
                0.0
            } else {
                (x / d).clamp(lo, hi).round()
            }
        };
        let sc: Vec<f32> = (0..alpha.len())
            .map(|j| int(alpha[j], d[j / per], lo, hi))
            .collect();
        let mn: Vec<f32> = (0..mu.len())
            .map(|j| int(mu[j], dmin[j / per], 0.0, top))
            .collect();
        assert!(sc.contains(&0.0), "{kind:?}: a zero group scale");
        let offset = kind.offset();
        let qmax = ((1u32 << kind.bits()) - 1) as f32;
        let g = kind.group();
        let (mut ga, mut gm) = (vec![0f32; alpha.len()], vec![0f32; alpha.len()]);
        let mut values = vec![0f32; n];
        for i in 0..n {
            let j = i / g;
            let (a, m) = (d[j / per] * sc[j], dmin[j / per] * mn[j]);
            let x = (moved[i] + m) / a + offset;
            let q = x.round().clamp(0.0, qmax);
            values[i] = a * (q - offset) - m;
            if !(0.0..=qmax).contains(&x) {
                ga[j] += weights[i] * (q - offset);
                gm[j] -= weights[i];
            } else {
                ga[j] += weights[i] * (x.round() - x);
            }
        }
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            assert!(
                (got[i] - values[i]).abs() <= 1e-6 * values[i].abs().max(1e-3),
                "{kind:?} {i}"
            );
        }
        let close = |a: f32, b: f32, scale: f32| (a - b).abs() <= 1e-4 * scale;
        // One group scale's gradient and its share of its super-block's.
        let expect = |x: f32, d: f32, code: f32, g: f32, lo: f32, hi: f32| -> (f32, f32) {
            let r = x / d;
            if (lo..=hi).contains(&r) {
                (g, g * (code - r))
            } else {
                let back = (r < lo) == (g * d < 0.0);
                (if back { g } else { 0.0 }, g * code)
            }
        };
        let check = |name: &str,
                     sup: &Var,
                     v: &Var,
                     x: &[f32],
                     d: &[f32],
                     codes: &[f32],
                     gx: &[f32],
                     lo: f32,
                     hi: f32| {
            let (g_v, g_sup) = (get(v), get(sup));
            let mut want_sup = vec![0f32; d.len()];
            for j in 0..x.len() {
                let (want, share) = expect(x[j], d[j / per], codes[j], gx[j], lo, hi);
                let scale = gx.iter().map(|g| g.abs()).fold(1e-3, f32::max);
                assert!(
                    close(g_v[j], want, scale),
                    "{kind:?} {name} {j}: {} vs {want}",
                    g_v[j]
                );
                want_sup[j / per] += share;
            }
            for (b, want) in want_sup.iter().enumerate() {
                let want = unit * want;
                let scale = want.abs().max(1e-6);
                assert!(
                    close(g_sup[b], want, scale * 10.0),
                    "{kind:?} {name} block {b}: {} vs {want}",
                    g_sup[b]
                );
            }
        };
        check("scale", &k.sup, &k.scale, &alpha, &d, &sc, &ga, lo, hi);
        if let Some((sup, min)) = &k.min {
            // `gm` is the gradient of the subtracted minimum `dmin·mn`.
            check("min", sup, min, &mu, &dmin, &mn, &gm, 0.0, top);
        }
        // The export decodes to the forward pass's values.
        assert_eq!(l.export().unwrap().dequantize().unwrap(), got, "{kind:?}");
    }
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

/// QAT in Q2_K trains the blocks that are written: the KL falls, further than with the start's
/// scales kept, the exported blocks score what training measured, and the super-block and group
/// scales moved.
#[test]
fn q2_k_qat_learns_block_scales_and_exports_what_it_trained() {
    let config = shrink_models::ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 1,
        ..shrink_models::ModelConfig::tiny_for_tests()
    };
    let run = Run::new(&config, 1, crate::Format::K(KQuant::Q2K));
    let (model, stored, out) = run.train(20, true);
    let kl = run.final_kl(&model, &out);
    assert!(kl < 0.8 * out.log.eval[0].1[1].1, "{:?}", out.log.eval);
    // Learning the block scales beats training the weights under the start's scales (observed
    // 0.102 against 0.145 from 0.366).
    let (kept_model, kept_stored, kept) = run.train(20, false);
    assert!(
        kl < 0.9 * run.final_kl(&kept_model, &kept),
        "{:?}",
        kept.log.eval
    );
    // With fixed scales the weights train on the start's grids: every block's scales kept.
    for (name, q) in &kept_stored.tensors {
        let (QuantizedWeight::Blocks(a), QuantizedWeight::Blocks(b)) =
            (q, &run.initial.tensors[name])
        else {
            panic!("{name}: not blocks")
        };
        for (x, y) in a.bytes.chunks(84).zip(b.bytes.chunks(84)) {
            assert_eq!(KQuant::Q2K.scales(x), KQuant::Q2K.scales(y), "{name}");
        }
    }
    let (mut supers, mut groups) = (0, 0);
    for (name, q) in &stored.tensors {
        let (QuantizedWeight::Blocks(a), QuantizedWeight::Blocks(b)) =
            (q, &run.initial.tensors[name])
        else {
            panic!("{name}: not Q2_K blocks")
        };
        assert_eq!(a.dtype, shrink_io::ggml::GgmlType::Q2K);
        for (x, y) in a.bytes.chunks(84).zip(b.bytes.chunks(84)) {
            let (x, y) = (KQuant::Q2K.scales(x), KQuant::Q2K.scales(y));
            supers += usize::from(x.d != y.d || x.dmin != y.dmin);
            groups += usize::from(x.sc != y.sc || x.mn != y.mn);
        }
    }
    assert!(supers > 0 && groups > 0, "{supers} {groups}");
}
