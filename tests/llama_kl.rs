//! llama.cpp's KL-divergence protocol on the demo model: base log-probabilities saved by
//! `shrink eval --save-kl-base` and by `llama-perplexity --kl-divergence-base` are the same file
//! format, each tool reads the other's, and `shrink eval --kl-base` prints the statistics
//! `llama-perplexity --kl-divergence` prints from the same logits.

mod common;

use common::real::*;
use std::path::Path;
use std::process::Command;

const CHUNKS: &str = "4";

/// `llama-perplexity` on the first chunks of hamlet with `args`; its log.
fn llama(tool: &Path, model: &Path, args: &[&str]) -> String {
    let hamlet = asset("shakespeare").unwrap().join("hamlet");
    let out = Command::new(tool)
        .args(["-m", model.to_str().unwrap(), "-c", "512", "-t", "2"])
        .args(["-f", hamlet.to_str().unwrap(), "--chunks", CHUNKS])
        .args(args)
        .output()
        .unwrap();
    // The statistics go to standard output, the rest of the log to standard error.
    let log = String::from_utf8_lossy(&[out.stderr, out.stdout].concat()).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

/// The first number after `label` in llama.cpp's log.
fn figure(log: &str, label: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no '{label}' in\n{log}"));
    line[label.len()..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

/// `shrink eval MODEL --kl-base BASE --json`: its `kl_base` statistics.
fn shrink_kl(model: &Path, base: &Path) -> serde_json::Value {
    let out = run_shrink(&[
        "eval",
        model.to_str().unwrap(),
        "--kl-base",
        base.to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    report["kl_base"].clone()
}

#[test]
fn kl_divergence_files_and_statistics_are_llama_cpp_s() {
    let (Some(model), Some(_)) = (model_path(), text("hamlet")) else {
        return;
    };
    let (Some(tool), Some(f32)) = (llama_tool("llama-perplexity"), f32_reference(&model)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (theirs, ours) = (dir.path().join("llama.kld"), dir.path().join("shrink.kld"));
    let saved = llama(
        &tool,
        &f32,
        &["--kl-divergence-base", theirs.to_str().unwrap()],
    );
    let base_ppl: f64 = saved
        .split("Final estimate: PPL =")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no final estimate in\n{saved}"));
    run_shrink(&[
        "eval",
        f32.to_str().unwrap(),
        "--text",
        "shakespeare:eval",
        "--chunks",
        CHUNKS,
        "--save-kl-base",
        ours.to_str().unwrap(),
    ]);
    // The same header and tokens, the same size; rows within the two tools' f32 differences.
    let (a, b) = (
        std::fs::read(&theirs).unwrap(),
        std::fs::read(&ours).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let header = 20 + 4 * 512 * 4;
    assert!(a[..header] == b[..header], "header and tokens");
    let row = 2 * (49_152 + 4);
    let mut steps = 0usize;
    for (x, y) in a[header..].chunks(row).zip(b[header..].chunks(row)) {
        let word = |r: &[u8], at: usize| f32::from_le_bytes(r[at..at + 4].try_into().unwrap());
        assert_eq!(word(x, 0), word(y, 0), "scale");
        assert!(
            (word(x, 4) - word(y, 4)).abs() < 0.02,
            "minimum log-probability"
        );
        for (p, q) in x[8..].chunks(2).zip(y[8..].chunks(2)) {
            let (p, q) = (
                u16::from_le_bytes([p[0], p[1]]),
                u16::from_le_bytes([q[0], q[1]]),
            );
            steps = steps.max(p.abs_diff(q) as usize);
        }
    }
    assert!(steps < 400, "a code differs by {steps} steps of 16/65535");
    // Each tool against the other's base from the same F32 model: no divergence.
    let kl = shrink_kl(&f32, &theirs);
    assert!(kl["kld"]["value"].as_f64().unwrap().abs() < 1e-5, "{kl}");
    assert_eq!(kl["same_top"]["value"], 1.0);
    let ppl_base = kl["ppl_base"]["value"].as_f64().unwrap();
    assert!(
        (ppl_base / base_ppl - 1.0).abs() < 1e-4,
        "{ppl_base} vs {base_ppl}"
    );
    let log = llama(
        &tool,
        &f32,
        &[
            "--kl-divergence",
            "--kl-divergence-base",
            ours.to_str().unwrap(),
        ],
    );
    assert!(figure(&log, "Mean    KLD:").abs() < 1e-5, "{log}");
    assert_eq!(figure(&log, "Same top p:"), 100.0);
    // llama.cpp scores the packaged Q4_1 file against either base alike (the format).
    let kld = |base: &Path| {
        let log = llama(
            &tool,
            &model,
            &[
                "--kl-divergence",
                "--kl-divergence-base",
                base.to_str().unwrap(),
            ],
        );
        figure(&log, "Mean    KLD:")
    };
    let (on_theirs, on_ours) = (kld(&theirs), kld(&ours));
    assert!(
        on_theirs > 1e-3 && (on_ours / on_theirs - 1.0).abs() < 0.01,
        "{on_ours} vs {on_theirs}"
    );
    // The statistics: both tools score the F32 model against a Q4_1 base saved by llama.cpp.
    let q41 = dir.path().join("q4_1.kld");
    llama(
        &tool,
        &model,
        &["--kl-divergence-base", q41.to_str().unwrap()],
    );
    let log = llama(
        &tool,
        &f32,
        &[
            "--kl-divergence",
            "--kl-divergence-base",
            q41.to_str().unwrap(),
        ],
    );
    let kl = shrink_kl(&f32, &q41);
    let value = |k: &str| kl[k]["value"].as_f64().unwrap();
    let close = |ours: f64, theirs: f64, tolerance: f64, what: &str| {
        assert!(
            (ours - theirs).abs() <= tolerance * theirs.abs().max(1e-9),
            "{what}: shrink {ours} vs llama.cpp {theirs}"
        )
    };
    close(value("kld"), figure(&log, "Mean    KLD:"), 0.01, "mean KL");
    close(value("ppl"), figure(&log, "Mean PPL(Q)"), 1e-4, "PPL(Q)");
    close(
        value("ppl_base"),
        figure(&log, "Mean PPL(base)"),
        1e-6,
        "PPL(base)",
    );
    close(
        100.0 * value("same_top"),
        figure(&log, "Same top p:"),
        0.005,
        "same top",
    );
    close(
        100.0 * value("p_diff_rms"),
        figure(&log, "RMS Δp"),
        0.01,
        "RMS Δp",
    );
    let median = kl["kld_percentiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == "median")
        .unwrap()[1]
        .as_f64()
        .unwrap();
    close(median, figure(&log, "Median  KLD:"), 0.02, "median KL");
}
