use super::*;
use candle_core::Tensor;
use shrink_core::NoProgress;

fn teacher() -> Transformer {
    let mut c = ModelConfig::tiny_for_tests();
    c.num_hidden_layers = 4;
    Transformer::random(&c, 0, &Device::Cpu).unwrap()
}

#[test]
fn layer_lists_parse_and_bad_ones_are_named() {
    assert_eq!(parse_layers("0,2,3", 4).unwrap(), [0, 2, 3]);
    assert_eq!(parse_layers("0-2, 5", 6).unwrap(), [0, 1, 2, 5]);
    assert_eq!(parse_layers("every:2", 5).unwrap(), [0, 2, 4]);
    for bad in ["", "1,1", "3,1", "7", "every:0", "a", "4-2"] {
        let e = parse_layers(bad, 5).unwrap_err().to_string();
        assert!(e.contains(&format!("'{bad}'")), "{e}");
    }
}

#[test]
fn a_layer_subset_computes_what_the_teacher_does_without_the_other_blocks() {
    let t = teacher();
    let all = layer_subset(&t, &[0, 1, 2, 3]).unwrap();
    let ids = Tensor::new(&[[3u32, 9, 1, 4, 2]], &Device::Cpu).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        diff(&all.forward(&ids).unwrap(), &t.forward(&ids).unwrap()),
        0.0
    );
    // Blocks 1 and 3 of the teacher, run by hand.
    let sub = layer_subset(&t, &[1, 3]).unwrap();
    assert_eq!(sub.config.num_hidden_layers, 2);
    let ctx = t.attention_context(5, 0).unwrap();
    let mut x = t.embed(&ids).unwrap();
    for i in [1, 3] {
        x = t.blocks[i]
            .forward(&x, &ctx, None, &mut shrink_models::NoHook)
            .unwrap();
    }
    let by_hand = t.lm_head(&t.final_hidden(&x).unwrap()).unwrap();
    assert!(diff(&sub.forward(&ids).unwrap(), &by_hand) < 1e-6);
}

#[test]
fn random_students_take_the_teachers_vocabulary_and_checked_shapes() {
    let t = teacher();
    let mut o = BTreeMap::new();
    o.insert("num_hidden_layers".to_string(), 1);
    o.insert("hidden_size".to_string(), 16);
    let c = student_config(&t.config, &o).unwrap();
    let s = random_student(&t, c, 3).unwrap();
    assert_eq!(s.config.vocab_size, t.config.vocab_size);
    assert_eq!((s.config.hidden_size, s.blocks.len()), (16, 1));
    o.insert("num_attention_heads".to_string(), 3);
    assert!(student_config(&t.config, &o).is_err());
    let mut unknown = BTreeMap::new();
    unknown.insert("depth".to_string(), 2);
    let e = student_config(&t.config, &unknown).unwrap_err().to_string();
    assert!(e.contains("'depth'"), "{e}");
}

#[test]
fn distillation_lowers_the_held_out_kl_and_caches_the_teacher() {
    let t = teacher();
    let student = layer_subset(&t, &[0, 3]).unwrap();
    let windows: Vec<Vec<u32>> = (0..8)
        .map(|w| (0..12).map(|i| (w * 5 + i * i * 7) % 64).collect())
        .collect();
    let mut job = DistillJob::default();
    job.train.steps = 12;
    job.train.batch = 2;
    job.train.lr = 2e-3;
    job.train.warmup = 2;
    job.top_k = Some(16);
    job.loss.temperature = 2.0;
    let dir = tempfile::tempdir().unwrap();
    let (trained, out) = distill(
        &t,
        student.clone(),
        &job,
        &windows,
        &windows[..2],
        Some(dir.path()),
        "fp",
        &NoProgress,
    )
    .unwrap();
    let kl = |i: usize| out.log.eval[i].1[1].1;
    assert!(kl(1) < kl(0), "{:?}", out.log.eval);
    assert!(dir.path().join("teacher-top-k.safetensors").exists());
    // The input student is untouched; the trained one differs.
    let a = student.named_tensors();
    let b = trained.named_tensors();
    let moved = a.iter().any(|(n, x)| {
        (x - &b[n])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved);
}

/// An encoder student (two of a BERT teacher's four layers) learns the teacher's final token
/// states (cosine) and one layer's attention maps: the held-out cosine to the teacher rises, the
/// pooler is carried through untouched, and a top-k cache (logits only) is refused.
#[test]
fn an_encoder_student_learns_the_teachers_states_and_attention() {
    let mut c = ModelConfig::tiny_bert_for_tests();
    c.num_hidden_layers = 4;
    let mut t = Transformer::random(&c, 1, &Device::Cpu).unwrap();
    let pooler = Tensor::ones((32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    t.extra.insert("pooler.dense.weight".into(), pooler);
    let student = layer_subset(&t, &[0, 3]).unwrap();
    let windows: Vec<Vec<u32>> = (0..8)
        .map(|w| (0..12).map(|i| (w * 5 + i * i * 7) % 64).collect())
        .collect();
    let mut job = DistillJob::default();
    job.train.steps = 16;
    job.train.batch = 2;
    job.train.lr = 3e-3;
    job.train.warmup = 2;
    job.loss.hidden_loss = shrink_train::HiddenLoss::Cosine;
    job.loss.attention = Some((1, 3));
    let (trained, out) = distill(
        &t,
        student.clone(),
        &job,
        &windows,
        &windows[..2],
        None,
        "enc",
        &NoProgress,
    )
    .unwrap();
    let cosine = |i: usize| out.log.eval[i].1[0].1;
    assert_eq!(out.log.eval[0].1[0].0, "cosine");
    assert!(cosine(1) > cosine(0), "{:?}", out.log.eval);
    let parts: Vec<&str> = out.log.train[0]
        .parts
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(parts, ["output", "attention"]);
    assert_eq!(
        trained.extra["pooler.dense.weight"]
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        32.0 * 32.0
    );
    job.top_k = Some(8);
    let err = distill(
        &t,
        student.clone(),
        &job,
        &windows,
        &windows[..2],
        None,
        "enc",
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("top-k"), "{err}");
}

/// With masked-LM heads on teacher and student (BertForMaskedLM), DistilBERT's logit KL joins the
/// state loss, and the MLM head is trained too.
#[test]
fn masked_lm_encoders_add_the_logit_kl() {
    let mut c = ModelConfig::tiny_bert_for_tests();
    c.architectures = vec!["BertForMaskedLM".into()];
    let t = Transformer::random(&c, 2, &Device::Cpu).unwrap();
    let student = layer_subset(&t, &[1]).unwrap();
    let windows: Vec<Vec<u32>> = (0..4)
        .map(|w| (0..10).map(|i| (w * 3 + i * 11) % 64).collect())
        .collect();
    let mut job = DistillJob::default();
    job.train.steps = 4;
    job.train.batch = 2;
    job.train.lr = 3e-3;
    let (trained, out) = distill(
        &t,
        student.clone(),
        &job,
        &windows,
        &windows[..2],
        None,
        "mlm",
        &NoProgress,
    )
    .unwrap();
    let parts: Vec<&str> = out.log.train[0]
        .parts
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(parts, ["output", "kd"]);
    let moved = |name: &str| {
        (&student.named_tensors()[name] - &trained.named_tensors()[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    };
    assert!(moved("cls.predictions.transform.dense.weight"));
}
