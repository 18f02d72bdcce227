use super::*;
use crate::kquant::KQuant;
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
        assert!((again - kl).abs() <= 1e-4 * kl, "{again} vs {kl}");
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

/// A linear of `dtype` (ggml's quantization of `values`) started as QAT starts it.
fn blocks_linear(
    dtype: GgmlType,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
) -> (QatLinear, GgmlTensor) {
    let dev = Device::Cpu;
    let blocks = GgmlTensor::quantize(&values, rows, cols, dtype, None, "x").unwrap();
    let start = blocks.dequantize().unwrap();
    let latent = Var::from_tensor(&Tensor::from_vec(start, (rows, cols), &dev).unwrap()).unwrap();
    let (quantizer, _) = Quantizer::start(&QuantizedWeight::Blocks(blocks.clone()), &dev).unwrap();
    let l = QatLinear {
        name: "x".into(),
        latent,
        rows,
        cols,
        quantizer,
    };
    (l, blocks)
}

fn sample(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0 * if i % 53 == 0 { 3.0 } else { 1.0 })
        .collect()
}

/// Moves `l`'s weights off its grid, some beyond its range (the sample at `magnitude`, scaled
/// by 0.93, every 11th by 1.7); returns them.
fn move_off_grid(l: &QatLinear, magnitude: f32) -> Vec<f32> {
    let moved: Vec<f32> = sample(l.rows * l.cols)
        .iter()
        .enumerate()
        .map(|(i, &w)| (w * if i % 11 == 0 { 1.7 } else { 0.93 } + 1e-4) * magnitude)
        .collect();
    let t = Tensor::from_vec(moved.clone(), (l.rows, l.cols), &Device::Cpu).unwrap();
    l.latent.set(&t).unwrap();
    moved
}

/// The block types QAT trains with learned scales.
fn learned_types() -> Vec<GgmlType> {
    let mut types: Vec<GgmlType> = KQuant::ALL.iter().map(|k| k.ggml()).collect();
    types.extend([GgmlType::IQ4XS, GgmlType::IQ4NL]);
    types
}

/// Started from a k-quant or IQ4 file, the fake-quantized weight is the file's dequantized
/// weight and the export is the file, byte for byte, in every type whose scales QAT learns
/// (one IQ4 block of zeros among them, and a row whose scales are fp16-subnormal).
#[test]
fn k_quant_qat_starts_on_the_saved_blocks_and_exports_them_bit_for_bit() {
    for kind in learned_types() {
        let mut values = sample(3 * 512);
        // A block of zeros (ggml writes other filler codes in a zero k-quant block: IQ4 only).
        if kind.iquant().is_some() {
            values[512..768].fill(0.0);
        }
        // A row of small weights: fp16-subnormal scales.
        values[1024..].iter_mut().for_each(|v| *v *= 1e-3);
        let (l, blocks) = blocks_linear(kind, values, 3, 512);
        assert!(!matches!(l.quantizer, Quantizer::Refit(_)), "{kind:?}");
        let w = l.weight().unwrap().flatten_all().unwrap();
        assert_eq!(
            w.to_vec1::<f32>().unwrap(),
            blocks.dequantize().unwrap(),
            "{kind:?}"
        );
        let QuantizedWeight::Blocks(out) = l.export().unwrap() else {
            panic!("{kind:?}: not blocks")
        };
        let first = out
            .bytes
            .iter()
            .zip(&blocks.bytes)
            .position(|(a, b)| a != b);
        assert_eq!(out, blocks, "{kind:?}: first differing byte {first:?}");
    }
}

/// The gradients of the blocks' learned scales, against a scalar implementation of the
/// formulas: LSQ for each group scale (`round(x) − x` inside the code range, the bound outside,
/// `x` clipped before it is rounded; a group of zero scale at the bound on each weight's side)
/// and the group minimum (0 inside, −1 outside, as `−dmin·mn` is subtracted), straight through
/// the integer scales' rounding to the super-block scales (LSQ again: `sc − a/d` times the group
/// scale's gradient, times the variable's unit; a group scale out of its range passes the
/// gradient that moves it back). Moved weights stay on the saved grid: the export decodes to
/// exactly the forward pass's values. IQ4_XS the same way, its codes IQ4_NL's levels (the
/// nearest level in place of the rounded code, the outermost levels as the bounds).
#[test]
fn k_quant_block_scales_get_lsq_gradients_through_both_roundings() {
    let (rows, cols) = (2, 512);
    let n = rows * cols;
    let kinds = KQuant::ALL.map(Saved::K).into_iter().chain([Saved::IQ4XS]);
    // At 0.02 the super-block scales are subnormal in fp16 (held ×128 in IQ4_XS, they are not).
    for (kind, magnitude) in kinds.flat_map(|k| [(k, 1.0f32), (k, 0.02)]) {
        let sample = |n| -> Vec<f32> { sample(n).iter().map(|v| v * magnitude).collect() };
        let (l, _) = blocks_linear(kind.ggml(), sample(n), rows, cols);
        let Quantizer::K(k) = &l.quantizer else {
            unreachable!()
        };
        // Move the weights off the grid and the scales off their integers (some beyond their
        // range, one to zero), then weight each value's gradient differently.
        let moved = move_off_grid(&l, magnitude);
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
        // The super-block scales off their fp16 values.
        set(&k.sup, vals(&k.sup).iter().map(|s| s * 1.0013).collect());
        if let Some((sup, min)) = &k.min {
            set(min, vals(min).iter().map(|m| m * 0.95).collect());
            set(sup, vals(sup).iter().map(|s| s * 0.9987).collect());
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
        let per = kind.groups();
        // What the stored fp16 `d` decodes to, times what QAT holds it times.
        let held = kind.held();
        let stored = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| held * f16::from_f32(x * unit / held).to_f32())
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
        let (clo, chi, levels) = kind.codes();
        let snap = |r: f32| {
            if levels {
                KVALUES_IQ4NL[crate::iquant::best_index(&KVALUES_IQ4NL, r * 128.0) as usize] as f32
                    / 128.0
            } else {
                r.clamp(clo, chi).round()
            }
        };
        let g = kind.group();
        let (mut ga, mut gm) = (vec![0f32; alpha.len()], vec![0f32; alpha.len()]);
        let mut values = vec![0f32; n];
        for i in 0..n {
            let j = i / g;
            let (a, m) = (d[j / per] * sc[j], dmin[j / per] * mn[j]);
            let r = (moved[i] + m) / a;
            let q = snap(r);
            values[i] = a * q - m;
            if !(clo..=chi).contains(&r) {
                ga[j] += weights[i] * q;
                gm[j] -= weights[i];
            } else {
                ga[j] += weights[i] * (q - r);
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

/// IQ4_NL's block scales: each weight the nearest level times the block's fp16 `d`; LSQ's
/// gradient with the nearest level (`v − x` inside the levels' span, the outer level outside,
/// each weight's outer level for a zero `d`), the weights' gradient straight through inside the
/// span and zero outside; the export decodes to the forward pass's values.
/// At a thousandth of the magnitude the scales are fp16-subnormal.
#[test]
fn iq4_nl_scales_get_lsq_gradients_with_the_nearest_level() {
    iq4_nl_gradients(1.0);
    iq4_nl_gradients(1e-3);
}

fn iq4_nl_gradients(magnitude: f32) {
    let (rows, cols, dev) = (2, 256, Device::Cpu);
    let n = rows * cols;
    let sample = |n| -> Vec<f32> { sample(n).iter().map(|v| v * magnitude).collect() };
    let (l, _) = blocks_linear(GgmlType::IQ4NL, sample(n), rows, cols);
    let Quantizer::Levels(dv) = &l.quantizer else {
        panic!("IQ4_NL: {:?}", l.quantizer)
    };
    let moved = move_off_grid(&l, magnitude);
    let mut d: Vec<f32> = dv.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for (j, x) in d.iter_mut().enumerate() {
        *x *= [1.09, 0.8, 0.6][j % 3];
    }
    d[1] = 0.0;
    dv.set(&Tensor::from_vec(d.clone(), (d.len(), 1), &dev).unwrap())
        .unwrap();
    let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
    let out = l.weight().unwrap();
    let grads = out
        .flatten_all()
        .unwrap()
        .mul(&Tensor::new(weights.as_slice(), &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let get = |t: &Tensor| -> Vec<f32> {
        let g = grads.get(t).unwrap();
        g.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (gw, gd) = (get(l.latent.as_tensor()), get(dv.as_tensor()));
    // The scales are held as 128·d, the levels over 128.
    let levels = &KVALUES_IQ4NL;
    let (lo, hi) = (levels[0] as f32 / 128.0, levels[15] as f32 / 128.0);
    let (mut values, mut want_gw, mut want_gd) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; d.len()]);
    let mut outside = 0;
    for i in 0..n {
        let (j, w, g) = (i / 32, moved[i], weights[i]);
        let s = 128.0 * f16::from_f32(d[j] / 128.0).to_f32();
        if s == 0.0 {
            want_gd[j] += g * if w > 0.0 { hi } else { lo };
            continue;
        }
        let r = w / s;
        let q = levels[crate::iquant::best_index(levels, r * 128.0) as usize] as f32 / 128.0;
        values[i] = s * q;
        if (lo..=hi).contains(&r) {
            want_gw[i] = g;
            want_gd[j] += g * (q - r);
        } else {
            want_gd[j] += g * q;
            outside += 1;
        }
    }
    assert!(outside > 0, "some weights beyond the outer levels");
    let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, values);
    assert_eq!(gw, want_gw);
    for (j, (a, b)) in gd.iter().zip(&want_gd).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "block {j}: {a} vs {b}"
        );
    }
    assert_eq!(l.export().unwrap().dequantize().unwrap(), got);
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

/// A block's learned scales as stored: its fp16 scales (`d`, `dmin`) and its integer ones.
fn block_scales(dtype: GgmlType, block: &[u8]) -> (Vec<f16>, Vec<i32>) {
    match Saved::of(dtype) {
        Some(kind) => {
            let s = kind.scales(block);
            (vec![s.d, s.dmin], [s.sc, s.mn].concat())
        }
        None => (vec![f16::from_le_bytes([block[0], block[1]])], vec![]),
    }
}

/// QAT in Q2_K, IQ4_XS and IQ4_NL trains the blocks that are written: the KL falls (in Q2_K
/// further than with the start's scales kept), the exported blocks score what training
/// measured, and the super-block and group scales moved.
#[test]
fn qat_learns_block_scales_and_exports_what_it_trained() {
    let config = shrink_models::ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 1,
        ..shrink_models::ModelConfig::tiny_for_tests()
    };
    for (format, dtype) in [
        (crate::Format::K(KQuant::Q2K), GgmlType::Q2K),
        (crate::Format::I(IQuant::IQ4XS), GgmlType::IQ4XS),
        (crate::Format::I(IQuant::IQ4NL), GgmlType::IQ4NL),
    ] {
        let run = Run::new(&config, 1, format);
        let (model, stored, out) = run.train(20, true);
        let kl = run.final_kl(&model, &out);
        let start = out.log.eval[0].1[1].1;
        // Against training the weights under the start's scales.
        let (kept_model, kept_stored, kept) = run.train(20, false);
        let kept_kl = run.final_kl(&kept_model, &kept);
        eprintln!("{dtype:?}: KL {start:.4} → {kl:.4} (scales kept: {kept_kl:.4})");
        assert!(kl < 0.8 * start, "{dtype:?}: {:?}", out.log.eval);
        // Q2_K: observed 0.102 against 0.145 from 0.366. At 4 bits the weights alone recover
        // nearly all (IQ4_XS 0.0051 against 0.0049 from 0.0283): learning the scales must not
        // cost more than 10% there.
        let bound = if dtype == GgmlType::Q2K { 0.9 } else { 1.1 };
        assert!(kl < bound * kept_kl, "{dtype:?}: {:?}", kept.log.eval);
        let size = dtype.type_size();
        let blocks = |q: &QuantizedWeight| match q {
            QuantizedWeight::Blocks(b) if b.dtype == dtype => b.bytes.clone(),
            other => panic!("{dtype:?}: {other:?}"),
        };
        // With fixed scales the weights train on the start's grids: every block's scales kept.
        for (name, q) in &kept_stored.tensors {
            let (a, b) = (blocks(q), blocks(&run.initial.tensors[name]));
            for (x, y) in a.chunks(size).zip(b.chunks(size)) {
                assert_eq!(block_scales(dtype, x), block_scales(dtype, y), "{name}");
            }
        }
        let (mut supers, mut groups) = (0, 0);
        for (name, q) in &stored.tensors {
            let (a, b) = (blocks(q), blocks(&run.initial.tensors[name]));
            for (x, y) in a.chunks(size).zip(b.chunks(size)) {
                let (x, y) = (block_scales(dtype, x), block_scales(dtype, y));
                supers += usize::from(x.0 != y.0);
                groups += usize::from(x.1 != y.1);
            }
        }
        assert!(supers > 0, "{dtype:?}");
        assert!(groups > 0 || dtype == GgmlType::IQ4NL, "{dtype:?}");
    }
}
