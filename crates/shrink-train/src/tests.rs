use super::*;
use candle_core::{Device, Tensor};
use shrink_core::NoProgress;
use shrink_models::ModelConfig;

fn t(rows: &[&[f32]]) -> Tensor {
    let n = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), n), &Device::Cpu).unwrap()
}

fn scalar(x: Tensor) -> f64 {
    x.to_scalar::<f32>().unwrap() as f64
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() < tol, "{a} vs {b}");
}

// Teacher p = (0.75, 0.25) (logits ln 3, 0), student q = (0.5, 0.5).
#[test]
fn logit_kl_matches_hand_computed_values() {
    let student = t(&[&[0.0, 0.0]]);
    let teacher = t(&[&[3f32.ln(), 0.0]]);
    let kl = |temp: f64, d: Divergence| {
        scalar(loss::kl_divergence(&student, Target::Logits(&teacher), temp, d).unwrap())
    };
    // 0.75·ln(0.75/0.5) + 0.25·ln(0.25/0.5)
    close(kl(1.0, Divergence::Forward), 0.130_812_04, 1e-6);
    // 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25)
    close(kl(1.0, Divergence::Reverse), 0.143_841_04, 1e-6);
    // At T = 2, p = (√3, 1)/(√3 + 1), and the KL is scaled by T² = 4.
    close(kl(2.0, Divergence::Forward), 0.145_363_13, 1e-6);
    close(kl(2.0, Divergence::Reverse), 0.149_009_14, 1e-6);
    // Rows are averaged: a second, identical row leaves the value unchanged.
    let s2 = t(&[&[0.0, 0.0], &[1.0, 1.0]]);
    let t2 = t(&[&[3f32.ln(), 0.0], &[1.0 + 3f32.ln(), 1.0]]);
    let two = loss::kl_divergence(&s2, Target::Logits(&t2), 1.0, Divergence::Forward).unwrap();
    close(scalar(two), 0.130_812_04, 1e-6);
}

// Teacher logits (2, 1, 0) keep their top 1 (p = 0.66524) and a tail bucket (0.33476); the
// uniform student has 1/3 on that token and 2/3 in the tail.
#[test]
fn top_k_targets_use_a_tail_bucket() {
    let teacher = t(&[&[2.0, 1.0, 0.0]]);
    let (indices, log_probs) = loss::top_k_log_probs(&teacher, 1, 1.0).unwrap();
    assert_eq!(indices.to_vec2::<u32>().unwrap(), [[0]]);
    let student = t(&[&[0.0, 0.0, 0.0]]);
    let target = Target::TopK {
        indices: &indices,
        log_probs: &log_probs,
    };
    let f = loss::kl_divergence(&student, target, 1.0, Divergence::Forward).unwrap();
    close(scalar(f), 0.229_077_18, 1e-6);
    let r = loss::kl_divergence(&student, target, 1.0, Divergence::Reverse).unwrap();
    close(scalar(r), 0.228_917_34, 1e-6);
    // With k = vocabulary the tail is empty and the loss equals the full-logit one.
    let student = t(&[&[0.3, -1.0, 2.0, 0.5], &[1.0, 0.0, 0.0, -2.0]]);
    let teacher = t(&[&[1.0, 0.5, 0.0, 2.0], &[0.0, 3.0, -1.0, 0.2]]);
    for temp in [1.0, 2.5] {
        let (i, lp) = loss::top_k_log_probs(&teacher, 4, temp).unwrap();
        let topk = Target::TopK {
            indices: &i,
            log_probs: &lp,
        };
        for d in [Divergence::Forward, Divergence::Reverse] {
            let full = loss::kl_divergence(&student, Target::Logits(&teacher), temp, d).unwrap();
            let cached = loss::kl_divergence(&student, topk, temp, d).unwrap();
            close(scalar(full), scalar(cached), 1e-5);
        }
    }
    // Top-k is ordered by probability, ties by the lower id.
    let (i, _) = loss::top_k_log_probs(&t(&[&[1.0, 3.0, 3.0, 0.0]]), 3, 1.0).unwrap();
    assert_eq!(i.to_vec2::<u32>().unwrap(), [[1, 2, 0]]);
}

#[test]
fn other_losses_match_hand_computed_values() {
    // ln(e + e² + e³) − 3
    let ce = loss::cross_entropy(
        &t(&[&[1.0, 2.0, 3.0]]),
        &Tensor::new(&[2u32], &Device::Cpu).unwrap(),
    )
    .unwrap();
    close(scalar(ce), 0.407_605_96, 1e-6);
    let mse = loss::hidden_mse(&t(&[&[1.0, 2.0]]), &t(&[&[0.0, 0.0]])).unwrap();
    close(scalar(mse), 2.5, 1e-7);
    let cos = loss::hidden_cosine(&t(&[&[1.0, 0.0]]), &t(&[&[1.0, 1.0]])).unwrap();
    close(scalar(cos), 1.0 - 0.5f64.sqrt(), 1e-6);
    // Row 1 agrees (masked zero included); row 2: 0.5·ln(0.5/0.25) + 0.5·ln(0.5/0.75); mean of 2.
    let teacher = t(&[&[1.0, 0.0], &[0.5, 0.5]])
        .reshape((1, 1, 2, 2))
        .unwrap();
    let student = t(&[&[1.0, 0.0], &[0.25, 0.75]])
        .reshape((1, 1, 2, 2))
        .unwrap();
    let att = loss::attention_kl(&student, &teacher).unwrap();
    close(scalar(att), 0.071_920_52, 1e-6);
    // Shape mismatches are errors, not broadcasts.
    assert!(loss::hidden_mse(&t(&[&[1.0, 2.0]]), &t(&[&[1.0]])).is_err());
    assert!(loss::kl_divergence(
        &t(&[&[0.0]]),
        Target::Logits(&t(&[&[0.0]])),
        0.0,
        Divergence::Forward
    )
    .is_err());
}

#[test]
fn schedule_warms_up_then_follows_a_cosine() {
    let s = Schedule {
        peak: 1.0,
        warmup: 2,
        total: 10,
        min_ratio: 0.1,
    };
    let lr: Vec<f64> = [0, 1, 2, 6, 10].iter().map(|&i| s.lr(i)).collect();
    for (a, b) in lr.iter().zip([0.5, 1.0, 1.0, 0.55, 0.1]) {
        close(*a, b, 1e-12);
    }
}

#[test]
fn adamw_first_step_matches_hand_computed_values() {
    let dev = Device::Cpu;
    let vector = Var::new(&[1.0f32], &dev).unwrap();
    let matrix = Var::new(&[[1.0f32]], &dev).unwrap();
    let scales = Var::new(&[[1.0f32]], &dev).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.1,
        eps: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(
        vec![
            ("norm.weight".into(), vector.clone()),
            ("proj.weight".into(), matrix.clone()),
            ("proj.qat_scale".into(), scales.clone()),
        ],
        config,
    )
    .unwrap();
    let grads = [
        Tensor::new(&[0.5f32], &dev).unwrap(),
        Tensor::new(&[[0.5f32]], &dev).unwrap(),
        Tensor::new(&[[0.5f32]], &dev).unwrap(),
    ];
    opt.step(&grads, 0.1).unwrap();
    // m̂ = g, v̂ = g², so the step is lr·sign(g); decay only on the weight matrix: 1·(1 − 0.01)
    // − 0.1 (not on the norm, nor on QAT's scales, a matrix of another name).
    close(vector.to_vec1::<f32>().unwrap()[0] as f64, 0.9, 1e-6);
    close(matrix.to_vec2::<f32>().unwrap()[0][0] as f64, 0.89, 1e-6);
    close(scales.to_vec2::<f32>().unwrap()[0][0] as f64, 0.9, 1e-6);
}

fn small_student(teacher: &Transformer) -> Transformer {
    // The student keeps the teacher's first block only.
    let mut config = teacher.config.clone();
    config.num_hidden_layers = 1;
    let tensors = teacher
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("model.layers.1."))
        .collect();
    Transformer::from_tensors(&config, tensors, DType::F32).unwrap()
}

fn windows(count: usize, len: usize, seed: u32) -> Vec<Vec<u32>> {
    (0..count as u32)
        .map(|w| {
            (0..len as u32)
                .map(|i| (w * 7 + i * i * 3 + seed) % 64)
                .collect()
        })
        .collect()
}

#[test]
fn gradients_reach_every_trainable_parameter() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    // A narrower random student: the hidden pair needs a learned projection.
    let mut config = ModelConfig::tiny_for_tests();
    config.hidden_size = 16;
    config.head_dim = Some(8);
    let student = Transformer::random(&config, 1, &dev).unwrap();
    let (student, params) = trainable(&student, &[]).unwrap();
    let expected = student.named_tensors().len() + 1;
    let distill = DistillConfig {
        alpha: 0.3,
        hidden: vec![(0, 1), (1, 1)],
        attention: Some((1, 1)),
        ..DistillConfig::default()
    };
    let mut obj = Distiller::new(student, params, Teacher::Model(teacher), distill).unwrap();
    let params = obj.parameters();
    assert_eq!(params.len(), expected - 1 + 2, "two projections");
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &dev).unwrap();
    let loss = obj
        .loss(&Batch {
            ids,
            windows: vec![0],
        })
        .unwrap();
    let names: Vec<&str> = loss.parts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ce", "kd", "hidden", "attention"]);
    let grads = loss.total.backward().unwrap();
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = scalar(g.sqr().unwrap().sum_all().unwrap());
        assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
    }
}

#[test]
fn distilling_a_tiny_teacher_lowers_the_kl() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    // A randomly initialised student with half the layers.
    let mut half = ModelConfig::tiny_for_tests();
    half.num_hidden_layers = 1;
    let (student, params) = trainable(&Transformer::random(&half, 7, &dev).unwrap(), &[]).unwrap();
    let mut obj = Distiller::new(
        student,
        params,
        Teacher::Model(teacher),
        DistillConfig::default(),
    )
    .unwrap();
    let config = TrainConfig {
        steps: 40,
        batch: 4,
        lr: 3e-3,
        warmup: 4,
        eval_every: 4,
        ..TrainConfig::default()
    };
    let train_set = windows(16, 12, 0);
    let held_out = windows(4, 12, 5);
    let out = train(
        &mut obj,
        &config,
        &train_set,
        &held_out,
        None,
        "t",
        &NoProgress,
    )
    .unwrap();
    let kl: Vec<f64> = out.log.eval.iter().map(|(_, m)| m[1].1).collect();
    assert_eq!(kl.len(), 11);
    // Lower on average from one third of the run to the next, and well below the start.
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (a, b, c) = (mean(&kl[0..4]), mean(&kl[4..8]), mean(&kl[8..]));
    assert!(a > b && b > c, "{kl:?}");
    assert!(kl[10] < 0.7 * kl[0], "{kl:?}");
    assert_eq!(out.log.tokens, 40 * 4 * 12);
}

/// Wraps an objective and fails at a given call of `loss`, like a killed process.
struct Crashing<'a> {
    inner: &'a mut Distiller,
    calls: usize,
    crash_at: usize,
}

impl Objective for Crashing<'_> {
    fn parameters(&self) -> Vec<(String, Var)> {
        self.inner.parameters()
    }
    fn loss(&mut self, batch: &Batch) -> Result<Loss> {
        self.inner.loss(batch)
    }
    fn gradients(&mut self, batch: &Batch, scale: f64, recompute: bool) -> Result<crate::Step> {
        self.calls += 1;
        if self.calls == self.crash_at {
            return Err(TrainError::Config("killed".into()));
        }
        self.inner.gradients(batch, scale, recompute)
    }
    fn evaluate(&mut self, w: &[Vec<u32>]) -> Result<Vec<(String, f64)>> {
        self.inner.evaluate(w)
    }
}

#[test]
fn a_resumed_run_ends_with_bit_identical_weights() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    let start = small_student(&teacher);
    let config = TrainConfig {
        steps: 7,
        batch: 3,
        accumulation: 2,
        lr: 2e-3,
        warmup: 2,
        eval_every: 3,
        checkpoint_every: 2,
        seed: 9,
        ..TrainConfig::default()
    };
    // 5 windows and 6 per update: epochs end mid-update.
    let data = windows(5, 10, 1);
    let held_out = windows(2, 10, 3);
    let fresh = || {
        let (student, params) = trainable(&start, &["norm".to_string()]).unwrap();
        Distiller::new(
            student,
            params,
            Teacher::Model(teacher.clone()),
            DistillConfig {
                alpha: 0.5,
                hidden: vec![(0, 1)],
                ..DistillConfig::default()
            },
        )
        .unwrap()
    };
    let weights = |obj: &Distiller| -> Vec<Vec<u32>> {
        obj.parameters()
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let mut straight = fresh();
    let a = train(
        &mut straight,
        &config,
        &data,
        &held_out,
        None,
        "run",
        &NoProgress,
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut resumed = fresh();
    // Killed in the 6th update (after the checkpoint at 4).
    let mut crashing = Crashing {
        inner: &mut resumed,
        calls: 0,
        crash_at: 11,
    };
    let err = train(
        &mut crashing,
        &config,
        &data,
        &held_out,
        Some(dir.path()),
        "run",
        &NoProgress,
    );
    assert!(err.is_err());
    assert!(dir.path().join("checkpoint/state.json").exists());
    // A different run refuses the checkpoint instead of mixing states.
    let mut other = fresh();
    let refused = train(
        &mut other,
        &config,
        &data,
        &held_out,
        Some(dir.path()),
        "other",
        &NoProgress,
    );
    assert!(matches!(refused, Err(TrainError::Checkpoint { .. })));

    let mut resumed = fresh();
    let b = train(
        &mut resumed,
        &config,
        &data,
        &held_out,
        Some(dir.path()),
        "run",
        &NoProgress,
    )
    .unwrap();
    assert_eq!(b.resumed_from, Some(4));
    assert_eq!(weights(&straight), weights(&resumed));
    assert_eq!(a.log, b.log);
    assert!(!dir.path().join("checkpoint").exists(), "removed when done");
}

#[test]
fn frozen_parameters_do_not_move() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    let start = small_student(&teacher);
    let frozen = [
        "embed_tokens".to_string(),
        "model.layers.*.mlp.*".to_string(),
    ];
    let (student, params) = trainable(&start, &frozen).unwrap();
    assert!(params
        .iter()
        .all(|(n, _)| !n.contains("embed_tokens") && !n.contains(".mlp.")));
    let mut obj = Distiller::new(
        student,
        params,
        Teacher::Model(teacher),
        DistillConfig::default(),
    )
    .unwrap();
    let config = TrainConfig {
        steps: 3,
        batch: 2,
        lr: 1e-2,
        ..TrainConfig::default()
    };
    train(
        &mut obj,
        &config,
        &windows(4, 8, 0),
        &[],
        None,
        "f",
        &NoProgress,
    )
    .unwrap();
    let after = obj.student().unwrap().named_tensors();
    let before = start.named_tensors();
    for (name, t0) in &before {
        let diff = scalar(
            (t0 - &after[name])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap(),
        );
        let moved = diff > 0.0;
        let should = !frozen.iter().any(|p| shrink_models::name_matches(p, name));
        assert_eq!(moved, should, "{name}");
    }
}

#[test]
fn cached_top_k_targets_round_trip_and_train() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    let data = windows(6, 8, 2);
    let cache = TopKCache::build(&teacher, &data, 8, 2.0, 4, &NoProgress).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topk.safetensors");
    cache.save(&path).unwrap();
    let loaded = TopKCache::load(&path, 6, 8, &dev).unwrap();
    assert_eq!((loaded.k, loaded.temperature), (8, 2.0));
    assert!(
        TopKCache::load(&path, 7, 8, &dev).is_err(),
        "wrong window count"
    );
    let (student, params) = trainable(&small_student(&teacher), &[]).unwrap();
    let mut obj = Distiller::new(
        student,
        params,
        Teacher::TopK(loaded, Some(teacher.clone())),
        DistillConfig::default(),
    )
    .unwrap();
    let config = TrainConfig {
        steps: 20,
        lr: 3e-3,
        warmup: 2,
        ..TrainConfig::default()
    };
    let out = train(&mut obj, &config, &data, &data[..2], None, "c", &NoProgress).unwrap();
    let kl = |i: usize| out.log.eval[i].1[1].1;
    assert!(kl(1) < kl(0), "{:?}", out.log.eval);
    // Hidden-state losses need the live teacher.
    let (student, params) = trainable(&small_student(&teacher), &[]).unwrap();
    let hidden = DistillConfig {
        hidden: vec![(0, 0)],
        ..DistillConfig::default()
    };
    assert!(Distiller::new(student, params, Teacher::TopK(cache, None), hidden).is_err());
}

#[test]
fn bad_settings_are_refused() {
    let dev = Device::Cpu;
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    let (student, params) = trainable(&small_student(&teacher), &[]).unwrap();
    let bad_pair = DistillConfig {
        hidden: vec![(3, 0)],
        ..DistillConfig::default()
    };
    let err = Distiller::new(student, params, Teacher::Model(teacher.clone()), bad_pair).err();
    assert!(err.unwrap().to_string().contains("3:0"));
    let (student, params) = trainable(&small_student(&teacher), &[]).unwrap();
    let mut obj = Distiller::new(
        student,
        params,
        Teacher::Model(teacher),
        DistillConfig::default(),
    )
    .unwrap();
    let zero = TrainConfig {
        steps: 0,
        ..TrainConfig::default()
    };
    assert!(train(
        &mut obj,
        &zero,
        &windows(2, 8, 0),
        &[],
        None,
        "z",
        &NoProgress
    )
    .is_err());
    let nan_lr = TrainConfig {
        lr: f64::NAN,
        ..TrainConfig::default()
    };
    assert!(train(
        &mut obj,
        &nan_lr,
        &windows(2, 8, 0),
        &[],
        None,
        "z",
        &NoProgress
    )
    .is_err());
}

/// The largest difference between two lists of gradients, relative to the largest magnitude.
fn max_relative_difference(a: &[Option<Tensor>], b: &[Option<Tensor>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut size) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            diff = diff.max((p - q).abs() as f64);
            size = size.max(p.abs() as f64);
        }
    }
    diff / size
}

#[test]
fn recomputed_gradients_equal_the_whole_graphs() {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 4], [8, 6, 0, 2, 63, 11, 5]], &dev).unwrap();
    let batch = Batch {
        ids,
        windows: vec![0, 1],
    };
    let check = |mut obj: Distiller, what: &str| {
        let whole = obj.gradients(&batch, 0.5, false).unwrap();
        // Slices of 3 rows of the head (14 rows: 5 slices, the last one short).
        obj.head_slice_values = 3 * 64;
        let again = obj.gradients(&batch, 0.5, true).unwrap();
        close(again.loss, whole.loss, 1e-5 * whole.loss.abs());
        let names = |s: &crate::Step| s.parts.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&again), names(&whole), "{what}");
        for ((_, a), (_, b)) in again.parts.iter().zip(&whole.parts) {
            close(*a, *b, 1e-5 * b.abs().max(1e-3));
        }
        assert!(whole.grads.iter().all(Option::is_some), "{what}");
        let d = max_relative_difference(&again.grads, &whole.grads);
        assert!(d < 1e-5, "{what}: gradients differ by {d}");
    };
    let teacher = Transformer::random(&ModelConfig::tiny_for_tests(), 0, &dev).unwrap();
    // A narrower student: hidden pairs with learned projections, an attention pair, CE.
    let mut narrow = ModelConfig::tiny_for_tests();
    narrow.hidden_size = 16;
    narrow.head_dim = Some(8);
    let student = Transformer::random(&narrow, 1, &dev).unwrap();
    let (student, params) = trainable(&student, &[]).unwrap();
    let distill = DistillConfig {
        alpha: 0.3,
        hidden: vec![(0, 1), (1, 1), (1, 0)],
        attention: Some((0, 1)),
        ..DistillConfig::default()
    };
    let teach = Teacher::Model(teacher.clone());
    check(
        Distiller::new(student, params, teach, distill).unwrap(),
        "pairs",
    );
    // Reverse KL at T = 2 with the embeddings and the head frozen.
    let frozen = ["embed".to_string(), "lm_head".to_string()];
    let (student, params) = trainable(&small_student(&teacher), &frozen).unwrap();
    let reverse = DistillConfig {
        divergence: Divergence::Reverse,
        temperature: 2.0,
        ..DistillConfig::default()
    };
    let teach = Teacher::Model(teacher.clone());
    check(
        Distiller::new(student, params, teach, reverse).unwrap(),
        "frozen",
    );
    // Cached top-k targets.
    let data: Vec<Vec<u32>> = batch.ids.to_vec2().unwrap();
    let cache = TopKCache::build(&teacher, &data, 5, 1.0, 2, &NoProgress).unwrap();
    let (student, params) = trainable(&small_student(&teacher), &[]).unwrap();
    let teach = Teacher::TopK(cache, None);
    let obj = Distiller::new(student, params, teach, DistillConfig::default()).unwrap();
    check(obj, "top-k");
    // GPT-2: the head tied to the token embedding, learned positions, LayerNorm.
    let gpt2 = Transformer::random(&ModelConfig::tiny_gpt2_for_tests(), 3, &dev).unwrap();
    let (student, params) = trainable(&gpt2.keep_layers(&[0]).unwrap(), &[]).unwrap();
    let mixed = DistillConfig {
        alpha: 0.5,
        ..DistillConfig::default()
    };
    let teach = Teacher::Model(gpt2.clone());
    check(
        Distiller::new(student, params, teach, mixed).unwrap(),
        "tied",
    );
    // An encoder with a masked-LM head, a hidden pair and attention transfer.
    let bert = Transformer::random(&ModelConfig::tiny_bert_for_tests(), 2, &dev).unwrap();
    let (student, params) = trainable(&bert.keep_layers(&[1]).unwrap(), &[]).unwrap();
    let encoder = DistillConfig {
        hidden: vec![(0, 1)],
        attention: Some((0, 0)),
        hidden_loss: HiddenLoss::Cosine,
        ..DistillConfig::default()
    };
    let teach = Teacher::Model(bert.clone());
    check(
        Distiller::new(student, params, teach, encoder).unwrap(),
        "encoder",
    );
}

#[test]
fn fused_logit_rows_equal_the_reference_losses_and_gradients() {
    let dev = Device::Cpu;
    let (rows, vocab) = (5, 37);
    let gen = |seed: u32| -> Vec<f32> {
        (0..rows * vocab)
            .map(|i| (((i as u32 * 2654435761u32) ^ seed) % 1000) as f32 / 150.0 - 3.0)
            .collect()
    };
    let (s, t) = (gen(1), gen(7));
    // The last row has no next token.
    let targets = [Some(3u32), Some(36), Some(0), Some(17), None];
    for (temperature, divergence, alpha) in [
        (1.0, Divergence::Forward, 0.0),
        (2.0, Divergence::Forward, 0.4),
        (0.5, Divergence::Reverse, 0.25),
    ] {
        let (kd_w, ce_w) = ((1.0 - alpha) / rows as f64, alpha / 4.0);
        let mut grad = vec![0f32; rows * vocab];
        let sums = loss::logit_rows(
            &s,
            &t,
            vocab,
            &targets,
            temperature,
            divergence,
            (kd_w, ce_w),
            &mut grad,
        )
        .unwrap();
        // The reference: candle's graph over the same rows.
        let student = candle_core::Var::from_vec(s.clone(), (rows, vocab), &dev).unwrap();
        let teacher = Tensor::from_vec(t.clone(), (rows, vocab), &dev).unwrap();
        let kd = loss::kl_divergence(
            student.as_tensor(),
            Target::Logits(&teacher),
            temperature,
            divergence,
        )
        .unwrap();
        let picked = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
        let next = Tensor::new(&[3u32, 36, 0, 17], &dev).unwrap();
        let with_next = student.as_tensor().index_select(&picked, 0).unwrap();
        let ce = loss::cross_entropy(&with_next, &next).unwrap();
        close(sums.kd / rows as f64, scalar(kd.clone()), 1e-5);
        close(sums.ce / 4.0, scalar(ce.clone()), 1e-5);
        let total = ((kd * (1.0 - alpha)).unwrap() + (ce * alpha).unwrap()).unwrap();
        let reference = total.backward().unwrap();
        let reference = reference.get(student.as_tensor()).unwrap();
        let fused = Tensor::from_vec(grad, (rows, vocab), &dev).unwrap();
        // q − p cancels: the f32 graph's own rounding is ~1e-5 of the largest gradient here.
        let d = max_relative_difference(&[Some(fused)], &[Some(reference.clone())]);
        assert!(
            d < 1e-4,
            "T = {temperature}, {divergence:?}: gradients differ by {d}"
        );
    }
    // Wrong sizes and a target outside the vocabulary are refused.
    let mut grad = vec![0f32; rows * vocab];
    let run = |t: &[f32], targets: &[Option<u32>], grad: &mut [f32]| {
        loss::logit_rows(
            &s,
            t,
            vocab,
            targets,
            1.0,
            Divergence::Forward,
            (1.0, 0.0),
            grad,
        )
    };
    assert!(run(&t[1..], &targets, &mut grad).is_err());
    assert!(run(&t, &[Some(37), None, None, None, None], &mut grad).is_err());
}
