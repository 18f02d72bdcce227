//! Scale settings driven from pipelines (issue #19): how a stage that reads its model block by
//! block keeps its calibration activations.

mod common;

use common::{fails, ok, sample_text, shrink, tiny_gguf};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a command that must succeed; returns what it logged (stderr).
fn logged(args: &[&str]) -> String {
    let out = shrink(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "shrink {args:?} failed:\n{stderr}");
    stderr
}

/// `[data] activations` and `spill` keep a GPTQ stage's calibration activations as `shrink
/// quantize --activations-dtype … --spill-activations` keeps them: the same bytes. Rounded
/// activations are part of the stage's key (a run in f32 does not reuse the bf16 stage), spilling
/// is not (the same bytes: `spill = "never"` reuses the spilled stage). A stage that holds its
/// model whole is refused rather than run in f32 regardless.
#[test]
fn pipeline_stages_keep_their_activations_as_the_data_section_says() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let text = sample_text();
    let reference = dir.path().join("reference.gguf");
    ok(&[
        "quantize",
        s(&gguf),
        "--method",
        "gptq",
        "--format",
        "gguf:q4_0",
        "--calib",
        s(&text),
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--activations-dtype",
        "bf16",
        "--spill-activations",
        "-o",
        s(&reference),
    ]);
    let pipeline = |activations: &str, spill: &str, stage: &str| {
        let file = dir.path().join(format!("{activations}-{spill}.toml"));
        std::fs::write(
            &file,
            format!(
                r#"name = "kept"
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 8
seq_len = 64
activations = "{activations}"
spill = "{spill}"
[[stage]]
{stage}
[eval]
ctx = 64
chunks = 2
prompts = []
"#,
                model = gguf.display(),
                text = text.display(),
            ),
        )
        .unwrap();
        file
    };
    let gptq = "kind = \"quantize.gptq\"\nname = \"q\"\nformat = \"q4_0\"";
    let run = dir.path().join("run");
    let artifact = run.join("stages").join("q").join("model.gguf");
    let log = logged(&["run", s(&pipeline("bf16", "always", gptq)), "-o", s(&run)]);
    assert!(log.contains("spilled to a scratch file"), "{log}");
    assert!(std::fs::read(&artifact).unwrap() == std::fs::read(&reference).unwrap());
    // Not spilled: the same stage, reused.
    let log = logged(&["run", s(&pipeline("bf16", "never", gptq)), "-o", s(&run)]);
    assert!(log.contains("q: done before, reused"), "{log}");
    // In f32: another stage, other bytes.
    let log = logged(&["run", s(&pipeline("f32", "auto", gptq)), "-o", s(&run)]);
    assert!(!log.contains("reused"), "{log}");
    assert!(std::fs::read(&artifact).unwrap() != std::fs::read(&reference).unwrap());
    // Layers ranked by the loss without each hold the model whole: the setting would be ignored.
    let whole =
        "kind = \"prune.layers\"\nname = \"shallow\"\nfraction = 0.5\ncriterion = \"perplexity\"";
    let e = fails(&["run", s(&pipeline("f16", "auto", whole)), "-o", s(&run)]);
    assert!(
        e.contains("stage `shallow`") && e.contains("holding its model whole"),
        "{e}"
    );
    assert!(!run.join("stages").join("shallow").exists());
}
