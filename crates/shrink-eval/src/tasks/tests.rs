use super::*;
use candle_core::Device;
use shrink_models::{ModelConfig, Transformer};
use std::io::Write;

/// An OLMES request file of `lines` (JSON), gzipped.
fn request_file(dir: &Path, lines: &[serde_json::Value]) -> std::path::PathBuf {
    let path = dir.join("requests.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
    path
}

#[test]
fn documents_are_read_in_the_harness_format() {
    let dir = tempfile::tempdir().unwrap();
    let piqa =
        serde_json::json!({"goal": "Open a jar", "sol1": "twist", "sol2": "bite", "label": 1});
    let lines = vec![
        serde_json::json!({"doc_id": 0, "doc": piqa, "request": {}}),
        serde_json::json!({"doc_id": 0, "doc": piqa, "request": {}}),
        serde_json::json!({"doc_id": 1000000, "doc": piqa, "request": {}}),
        serde_json::json!({"doc_id": 1, "doc": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}}),
    ];
    let path = request_file(dir.path(), &lines);
    let task = McTask::read("piqa", &path, None).unwrap();
    assert_eq!(
        task.docs.len(),
        2,
        "one per document, unconditioned ones skipped"
    );
    assert_eq!(
        task.docs[0],
        McDoc {
            context: "Question: Open a jar\nAnswer:".into(),
            choices: vec!["twist".into(), "bite".into()],
            gold: 1
        }
    );
    assert_eq!(McTask::read("piqa", &path, Some(1)).unwrap().docs.len(), 1);
    let hellaswag = serde_json::json!({"doc_id": 0, "doc": {"query": "A man: He", "choices": ["runs.", "sits."], "gold": 1}});
    let path = request_file(dir.path(), &[hellaswag]);
    let task = McTask::read("hellaswag", &path, None).unwrap();
    assert_eq!(task.docs[0].context, "A man: He");
    assert_eq!(task.docs[0].choices, ["runs.", "sits."]);
    let err = McTask::read("boolq", &path, None).unwrap_err().to_string();
    assert!(err.contains("unknown task 'boolq'"), "{err}");
    let bad = serde_json::json!({"doc_id": 0, "doc": {"query": "q", "choices": ["a"], "gold": 3}});
    let path = request_file(dir.path(), &[bad]);
    let err = McTask::read("arc_easy", &path, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1") && err.contains("gold answer 3 of 1"),
        "{err}"
    );
}

/// Requests as the harness builds them: the context's trailing space moves to the continuation,
/// the whole is encoded at once and the continuation is what follows the context's encoding.
#[test]
fn requests_split_context_and_continuation_as_the_harness() {
    // One id per character; "a " merges into one token, as a BPE merge across the seam would.
    let encode = |s: &str| -> Result<Vec<u32>> {
        let mut ids = vec![0u32]; // BOS
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == 'a' && chars.peek() == Some(&' ') {
                chars.next();
                ids.push(100);
            } else {
                ids.push(c as u32);
            }
        }
        Ok(ids)
    };
    let task = McTask {
        name: "arc_easy".into(),
        docs: vec![McDoc {
            context: "Q: a \n".into(),
            choices: vec!["b".into(), "cd".into()],
            gold: 1,
        }],
    };
    let r = task.requests(&encode).unwrap();
    // Context "Q: a" (its trailing space and newline moved), continuation " \n b": the whole
    // "Q: a \n b" encodes "a " as one token, which counts as context (the harness's split).
    assert_eq!(r[0].ids, encode("Q: a \n b").unwrap());
    assert_eq!(
        r[0].ids,
        vec![
            0,
            'Q' as u32,
            ':' as u32,
            ' ' as u32,
            100,
            '\n' as u32,
            ' ' as u32,
            'b' as u32
        ]
    );
    assert_eq!(r[0].context_len, encode("Q: a").unwrap().len());
    assert_eq!(
        &r[0].ids[r[0].context_len..],
        &['\n' as u32, ' ' as u32, 'b' as u32]
    );
    assert_eq!(r[1].ids.len() - r[1].context_len, 4); // "\n cd"
}

#[test]
fn accuracy_and_normalized_accuracy_by_hand() {
    let task = McTask {
        name: "hellaswag".into(),
        docs: vec![
            McDoc {
                context: "c".into(),
                choices: vec!["a".into(), "bbbb".into()],
                gold: 1,
            },
            McDoc {
                context: "c".into(),
                choices: vec!["xx".into(), "yy".into()],
                gold: 0,
            },
        ],
    };
    let requests: Vec<McRequest> = [(0, 0), (0, 1), (1, 0), (1, 1)]
        .iter()
        .map(|&(doc, choice)| McRequest {
            doc,
            choice,
            context_len: 1,
            ids: vec![1, 2],
        })
        .collect();
    // Doc 0: -2 vs -4 → acc picks "a" (wrong); per char -2 vs -1 → "bbbb" (right).
    // Doc 1: a tie → the first (right) for both.
    let report = task.report(&requests, &[-2.0, -4.0, -3.0, -3.0]);
    assert_eq!((report.acc, report.acc_norm), (0.5, 1.0));
    // Sample std of [0, 1] is √0.5; over √2: 0.5.
    assert!((report.acc_stderr - 0.5).abs() < 1e-12);
    assert_eq!(report.acc_norm_stderr, 0.0);
}

/// Each continuation's log-likelihood equals a plain full forward's log-softmax summed at its
/// positions, however the requests are batched, grouped or read (held whole or block by block).
#[test]
fn log_likelihoods_match_a_plain_forward_held_whole_or_streamed() {
    let cfg = ModelConfig::tiny_for_tests();
    let mut model = Transformer::random(&cfg, 3, &Device::Cpu).unwrap();
    let requests: Vec<McRequest> = (0..7)
        .map(|i| {
            let len = 4 + (i * 3) % 9;
            McRequest {
                doc: i,
                choice: 0,
                context_len: 2 + i % 3,
                ids: (0..len).map(|p| ((p * 7 + i * 5) % 64) as u32).collect(),
            }
        })
        .collect();
    let want: Vec<f64> = requests
        .iter()
        .map(|r| {
            let ids = Tensor::new(&r.ids[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&ids).unwrap().squeeze(0).unwrap();
            let logp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .to_vec2()
                .unwrap();
            (r.context_len - 1..r.ids.len() - 1)
                .map(|p| logp[p][r.ids[p + 1] as usize] as f64)
                .sum()
        })
        .collect();
    for batch in [1, 3, 16] {
        let got =
            choice_log_likelihoods(&mut model, &requests, batch, &shrink_core::NoProgress).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "batch {batch}: {g} vs {w}");
        }
    }
    let mut streamed = shrink_models::testing::streamed_copy(&model);
    let got =
        choice_log_likelihoods(&mut streamed, &requests, 4, &shrink_core::NoProgress).unwrap();
    let whole = choice_log_likelihoods(&mut model, &requests, 4, &shrink_core::NoProgress).unwrap();
    assert_eq!(got, whole, "the same bits held whole or streamed");
    let mut bad = requests.clone();
    bad[2].ids[3] = 64;
    let err = choice_log_likelihoods(&mut model, &bad, 4, &shrink_core::NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 2") && err.contains("vocabulary of 64"),
        "{err}"
    );
}
