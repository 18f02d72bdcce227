use super::*;

fn row_with(ppl_pct: f64, top1: f64, size: u64) -> ModelRow {
    ModelRow {
        name: "q".into(),
        kind: "quantize.rtn".into(),
        input: Some("model".into()),
        artifact: "stages/q/model.gguf".into(),
        format: "gguf".into(),
        cached: false,
        sweep_value: None,
        perplexity: 10.0,
        perplexity_stderr: 0.1,
        ppl_increase_pct: ppl_pct,
        kl_mean: Some(0.01),
        top1_agreement: Some(top1),
        embedding_cosine: None,
        neighbour_agreement: None,
        size_bytes: size,
        bits_per_weight: 4.5,
        parameters: 1000,
        shape: String::new(),
        sparsity: 0.0,
        compression_ratio: 2.0,
        eval_tokens_per_s: 1.0,
        eval_load: None,
        stage_wall_s: 1.0,
        peak_rss_bytes: 0,
        decode: None,
        tasks: vec![],
        acc_norm_drop: None,
    }
}

#[test]
fn gates_say_which_failed_and_by_how_much() {
    let gates = crate::Gates {
        max_ppl_increase_pct: Some(3.0),
        min_top1_agreement: Some(0.9),
        max_kl: None,
        max_size_mb: Some(100.0),
        min_compression_ratio: Some(2.5),
        ..Default::default()
    };
    let results = check_gates(&gates, &row_with(4.25, 0.95, 90_000_000));
    assert_eq!(results.len(), 4);
    let failed: Vec<&GateResult> = results.iter().filter(|g| !g.passed).collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].gate, "max_ppl_increase_pct");
    assert!(
        failed[0].message.contains("4.2500% > 3%") && failed[0].message.contains("off by 1.2500%"),
        "{}",
        failed[0].message
    );
    assert_eq!(failed[1].gate, "min_compression_ratio");
    assert!(
        failed[1].message.contains("2.0000× < 2.5×"),
        "{}",
        failed[1].message
    );
    // A fidelity gate without a measurement fails.
    let mut r = row_with(0.0, 1.0, 1);
    r.top1_agreement = None;
    let g = check_gates(&gates, &r);
    assert!(
        !g.iter()
            .find(|g| g.gate == "min_top1_agreement")
            .unwrap()
            .passed
    );
}

/// The task gates: the lowest task's acc_norm, the largest drop below the baseline in points; a
/// pipeline without tasks fails them (nothing measured).
#[test]
fn task_gates_take_the_worst_task() {
    let gates = crate::Gates {
        min_acc_norm: Some(0.4),
        max_acc_norm_drop: Some(2.0),
        ..Default::default()
    };
    let task = |name: &str, acc_norm: f64| shrink_eval::TaskReport {
        task: name.into(),
        docs: 100,
        acc: acc_norm,
        acc_stderr: 0.0,
        acc_norm,
        acc_norm_stderr: 0.0,
    };
    let mut r = row_with(0.0, 1.0, 1);
    r.tasks = vec![task("piqa", 0.65), task("hellaswag", 0.38)];
    r.acc_norm_drop = Some(1.5);
    let g = check_gates(&gates, &r);
    assert!(
        !g[0].passed && g[0].message.contains("0.3800 < 0.4"),
        "{}",
        g[0].message
    );
    assert!(g[1].passed, "{}", g[1].message);
    let g = check_gates(&gates, &row_with(0.0, 1.0, 1));
    assert!(g.iter().all(|g| !g.passed));
}
