//! Artifacts byte-identical whatever runs them (issue #20, item 3): GPTQ (calibration forward,
//! Hessians, factorization, codes) and the evaluation give the same bytes on 1 and 2 threads and
//! on every matrix kernel this CPU has, the portable one among them (`SHRINK_KERNEL`), so a file
//! made on one machine is the file made on another.

mod common;

use common::sample_text;
use std::path::Path;
use std::process::Command;

/// Runs shrink with `RAYON_NUM_THREADS=threads` and, if given, `SHRINK_KERNEL=kernel`; its stdout.
fn run(threads: usize, kernel: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
    cmd.args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env(
            "SHRINK_CACHE_DIR",
            std::env::temp_dir().join("shrink-cli-test-cache"),
        )
        .env_remove("SHRINK_KERNEL");
    if let Some(kernel) = kernel {
        cmd.env("SHRINK_KERNEL", kernel);
    }
    let out = cmd.output().expect("the shrink binary runs");
    assert!(
        out.status.success(),
        "shrink {args:?} ({threads} threads, kernel {kernel:?}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn gptq_and_eval_give_the_same_bytes_on_every_kernel_and_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // 2 blocks of hidden 256 and MLP 768: many column panels and row panels of the products,
    // ragged edges (the kv projections' 128 columns; 4 × 100 rows).
    run(
        2,
        None,
        &["synth", "small-llama", "--layers", "2", "-o", &s(&model)],
    );
    let text = sample_text();
    let mut kernels: Vec<Option<&str>> = vec![None, Some("portable")];
    let cpu = shrink_core::gemm::Kernel::detect();
    if cpu >= shrink_core::gemm::Kernel::Avx2 {
        kernels.push(Some("avx2"));
    }
    let mut first: Option<(Vec<u8>, String)> = None;
    for (threads, kernel) in [(1, None), (2, None)]
        .into_iter()
        .chain(kernels[1..].iter().map(|&k| (2, k)))
    {
        let out = dir
            .path()
            .join(format!("gptq-{threads}-{}.gguf", kernel.unwrap_or("auto")));
        run(
            threads,
            kernel,
            &[
                "quantize",
                &s(&model),
                "--method",
                "gptq",
                "--format",
                "gguf:q4_k",
                "--calib",
                &s(&text),
                "--samples",
                "4",
                "--seq-len",
                "100",
                "-o",
                &s(&out),
            ],
        );
        let report: serde_json::Value = serde_json::from_str(&run(
            threads,
            kernel,
            &[
                "eval",
                &s(&out),
                "--reference",
                &s(&model),
                "--text",
                &s(&text),
                "--ctx",
                "96",
                "--chunks",
                "3",
                "--json",
            ],
        ))
        .unwrap();
        // Every figure of the evaluation, bit for bit (its timings aside).
        let figures = format!("{} {}", report["perplexity"], report["fidelity"]);
        let got = (std::fs::read(&out).unwrap(), figures);
        match &first {
            None => first = Some(got),
            Some(want) => {
                assert!(
                    want.0 == got.0,
                    "GPTQ's file differs with {threads} threads, kernel {kernel:?}"
                );
                assert_eq!(want.1, got.1, "{threads} threads, kernel {kernel:?}");
            }
        }
    }
}

#[test]
fn an_unknown_kernel_is_refused_before_any_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["inspect", "nothing.gguf"])
        .env("SHRINK_KERNEL", "avx1024")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: SHRINK_KERNEL=avx1024: expected portable, avx2 or avx512"),
        "{stderr}"
    );
}
