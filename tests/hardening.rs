//! Hostile inputs, one test per case: nothing outside the output is touched, the input model is
//! never overwritten, files whose layout lies are refused with the tensor or key named, and
//! settings that cannot work are refused before any work. Each of these failed before the
//! hardening (data lost, a panic, wrong results with exit 0, or memory growing without bound).

mod common;

use common::{fails, ok, sample_text, shrink, tiny_gguf};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the tensor info of `name` keeps its type id and its data offset in a GGUF header.
fn tensor_info_at(bytes: &[u8], name: &str) -> (usize, usize) {
    let key = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let start = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("tensor in header")
        + key.len();
    let n_dims = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()) as usize;
    let type_at = start + 4 + 8 * n_dims;
    (type_at, type_at + 4)
}

/// Where the value of metadata `key` (after its type id) is.
fn metadata_value_at(bytes: &[u8], key: &str) -> usize {
    let needle = [&(key.len() as u64).to_le_bytes()[..], key.as_bytes()].concat();
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("key in header")
        + needle.len()
        + 4
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn variant(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(tiny_gguf(dir)).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_pipeline(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

fn pipeline_text(model: &Path, name: &str, stage_extra: &str, data_extra: &str) -> String {
    let text = sample_text();
    format!(
        r#"name = "{name}"
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 4
seq_len = 32
{data_extra}
[[stage]]
kind = "quantize.rtn"
format = "gguf:q8_0"
{stage_extra}
[eval]
ctx = 32
chunks = 2
prompts = []
decode_tokens = 2
prefill_tokens = 8
"#,
        model = model.display(),
        text = text.display(),
    )
}

// 1. Stage and run names are plain folder names, checked by `validate` with the position.
#[test]
fn stage_and_run_names_cannot_leave_the_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("keep.txt"), "precious").unwrap();
    for (i, (name, stage_name)) in [
        ("ok", format!("name = \"{}\"", victim.display())),
        ("ok", "name = \"../../x\"".to_string()),
        ("ok", "name = \"\"".to_string()),
        ("..", String::new()),
        (".hidden", String::new()),
    ]
    .iter()
    .enumerate()
    {
        let file = write_pipeline(
            dir.path(),
            &format!("p{i}.toml"),
            &pipeline_text(&gguf, name, stage_name, ""),
        );
        let e = fails(&["validate", s(&file)]);
        assert!(e.contains("plain folder name") && e.contains(":"), "{e}");
        let run = dir.path().join(format!("run{i}"));
        let e = fails(&["run", s(&file), "-o", s(&run)]);
        assert!(e.contains("plain folder name"), "{e}");
    }
    assert_eq!(
        std::fs::read_to_string(victim.join("keep.txt")).unwrap(),
        "precious"
    );
    assert!(!dir.path().join("x").exists());
}

// 2. `-o` equal to the input, or a folder holding it, is refused before any work.
#[test]
fn the_input_model_is_never_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let before = std::fs::read(&gguf).unwrap();
    let link = dir.path().join("link.gguf");
    std::fs::hard_link(&gguf, &link).unwrap();
    let g = s(&gguf);
    for args in [
        vec![
            "quantize",
            g,
            "--method",
            "rtn",
            "--format",
            "gguf:q8_0",
            "-o",
            g,
        ],
        vec!["convert", g, "--to", "gguf", s(&link)],
        vec![
            "prune",
            g,
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "-o",
            g,
        ],
        // A folder output that holds the input would replace it.
        vec!["convert", g, "--to", "hf", s(dir.path())],
    ] {
        let e = fails(&args);
        assert!(e.contains("input model"), "{args:?}: {e}");
    }
    assert_eq!(std::fs::read(&gguf).unwrap(), before);

    // A pipeline whose source lies inside the run's own model/ folder.
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("model")).unwrap();
    let inside = run.join("model/model.gguf");
    std::fs::copy(&gguf, &inside).unwrap();
    let file = write_pipeline(
        dir.path(),
        "inside.toml",
        &pipeline_text(&inside, "inside", "", ""),
    );
    let e = fails(&["run", s(&file), "-o", s(&run)]);
    assert!(e.contains("input model"), "{e}");
    assert_eq!(std::fs::read(&inside).unwrap(), before);
    assert!(!run.join("baseline").exists(), "no work was done");
}

// 3. Shard names cannot leave the model folder; a file that is not a preset is not echoed.
#[test]
fn shard_paths_stay_inside_and_presets_are_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let hf = dir.path().join("hf");
    ok(&["convert", s(&gguf), "--to", "hf", s(&hf)]);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "root:x:0:0:secret-line\n").unwrap();
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "../secret.txt"}}"#,
    )
    .unwrap();
    let e = fails(&["inspect", s(&hf)]);
    assert!(
        e.contains("weight_map.model.embed_tokens.weight") && e.contains("inside the model folder"),
        "{e}"
    );
    let e = fails(&["eval", s(&hf), "--text", s(&sample_text()), "--ctx", "32"]);
    assert!(!e.contains("secret-line"), "{e}");

    let e = fails(&[
        "quantize",
        s(&gguf),
        "--preset",
        s(&secret),
        "-o",
        s(&dir.path().join("q.gguf")),
    ]);
    assert!(!e.contains("secret-line") && !e.contains("root:x"), "{e}");
    assert!(e.contains("line 1"), "{e}");
}

// 4. A killed write's temporary is removed by the next write to that folder.
#[test]
fn stale_temporaries_are_cleaned_on_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(".shrink-tmp-killed"), vec![0u8; 1000]).unwrap();
    std::fs::create_dir_all(out.join(".shrink-staging-killed/x")).unwrap();
    std::fs::write(out.join(".hidden-not-ours"), "mine").unwrap();
    ok(&["convert", s(&gguf), "--to", "gguf", s(&out.join("m.gguf"))]);
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [".hidden-not-ours", "m.gguf"]);
}

/// `head` (a streamed command and its settings) calibrating on 32 × 64 tokens of `text`, its
/// summary as JSON, into `out`; with `spill`, its activations in a scratch file.
fn streamed_args(head: &[&str], text: &Path, out: &Path, spill: bool) -> Vec<String> {
    let tail = [
        "--calib",
        s(text),
        "--samples",
        "32",
        "--seq-len",
        "64",
        "--json",
        "-o",
        s(out),
    ];
    let spilled = spill.then_some("--spill-activations");
    head.iter()
        .chain(&tail)
        .chain(&spilled)
        .map(|a| a.to_string())
        .collect()
}

/// Runs shrink with `args` and reads its JSON summary.
fn run_json(args: &[String]) -> serde_json::Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&ok(&args)).unwrap()
}

/// Starts shrink with `args` in the background, its output discarded (to be killed).
fn spawn_quiet(args: &[String]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The bytes of the file at `path`, or of every file in the folder at `path`, by name.
fn contents(path: &Path) -> BTreeMap<String, Vec<u8>> {
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect(),
        Err(_) => [(String::new(), std::fs::read(path).unwrap())].into(),
    }
}

/// Removes the file or folder at `path`.
fn remove(path: &Path) {
    match path.is_dir() {
        true => std::fs::remove_dir_all(path).unwrap(),
        false => std::fs::remove_file(path).unwrap(),
    }
}

/// Runs the streamed job `args` gives for an output into `dir/whole{suffix}` (`.gguf`, or `""`
/// for a folder), then into `dir/out{suffix}` until its resume record shows a finished block,
/// kills it (SIGKILL: nothing is cleaned up; a run that finishes first, a stalled test thread,
/// does not count and the next attempt starts afresh), runs it again and checks that it resumed
/// where the record says, wrote the uninterrupted run's bytes (every file of a folder) and
/// removed its resume folder. Returns both runs' summaries.
fn killed_and_resumed(
    dir: &Path,
    suffix: &str,
    args: &dyn Fn(&Path) -> Vec<String>,
    blocks: u64,
) -> (serde_json::Value, serde_json::Value) {
    let whole = dir.join(format!("whole{suffix}"));
    let uninterrupted = run_json(&args(&whole));
    assert!(uninterrupted.get("resumed_at_block").is_none());
    let out = dir.join(format!("out{suffix}"));
    let state = dir.join(format!(".shrink-resume-out{suffix}/state.json"));
    let recorded = || -> Option<u64> {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        // A structured pruning's writing records name block `blocks + 1`: it resumes at `blocks`.
        json["blocks"].as_u64().map(|b| b.min(blocks))
    };
    let mut killed_at = None;
    for _ in 0..5 {
        let mut child = spawn_quiet(&args(&out));
        let finished = loop {
            if let Some(blocks) = recorded().filter(|&b| b >= 1) {
                child.kill().unwrap();
                break Some(blocks);
            }
            if child.try_wait().unwrap().is_some() {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let status = child.wait().unwrap();
        if !status.success() {
            killed_at = finished;
            break;
        }
        remove(&out);
    }
    let killed_at = killed_at.expect("a run killed mid-model");
    assert!(!out.exists(), "a killed run leaves no output");
    // The kill may land after a later record: the state says where the run resumes.
    let resume_at = recorded().unwrap();
    assert!(
        (killed_at..=blocks).contains(&resume_at),
        "{killed_at} {resume_at}"
    );
    eprintln!(
        "killed after block {killed_at} was recorded; resuming at block {resume_at} of {blocks}"
    );
    let resumed = run_json(&args(&out));
    assert_eq!(resumed["resumed_at_block"], resume_at);
    assert!(
        contents(&out) == contents(&whole),
        "the resumed output differs from the uninterrupted one"
    );
    assert!(
        !state.parent().unwrap().exists(),
        "the resume folder is removed"
    );
    (uninterrupted, resumed)
}

// 4b. A streaming quantization killed mid-model (SIGKILL: nothing is cleaned up) resumes at the
// block after the last one it recorded and ends with the bytes of a run never interrupted.
#[test]
fn a_killed_streaming_quantization_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small");
    ok(&["synth", "small-llama", "--layers", "12", "-o", s(&model)]);
    let text = sample_text();
    // Runs into `out.gguf` keep their activations in a scratch file (`--spill-activations`):
    // killed, resumed from the recorded activations, they still end with the bytes of a run
    // that held them in memory.
    let head = [
        "quantize",
        s(&model),
        "--method",
        "gptq",
        "--format",
        "gguf:q4_0",
    ];
    let args = |out: &Path| streamed_args(&head, &text, out, out.ends_with("out.gguf"));
    let run = |out: &Path| run_json(&args(out));
    let spawn = |out: &Path| spawn_quiet(&args(out));
    let (uninterrupted, resumed) = killed_and_resumed(dir.path(), ".gguf", &args, 12);
    let (whole, out) = (dir.path().join("whole.gguf"), dir.path().join("out.gguf"));
    // Every layer is reported, with the errors measured before the kill.
    let facts = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].to_string(),
                    l["relative_output_error"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(facts(&resumed), facts(&uninterrupted));
    assert_eq!(facts(&resumed).len(), 12 * 7);

    // A record whose partial file is gone (a kill after the rename, before the clean-up) is
    // dropped: the job starts over.
    std::fs::remove_file(&out).unwrap();
    let partial = dir.path().join(".shrink-resume-out.gguf");
    std::fs::create_dir_all(&partial).unwrap();
    let job = {
        // The job file of this very job: run it, keep its resume folder's `job` from a kill.
        let mut child = spawn(&out);
        while !partial.join("job").exists() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::read(partial.join("job")).unwrap()
    };
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("job"), job).unwrap();
    std::fs::write(
        partial.join("state.json"),
        r#"{"blocks": 3, "tensors": 40, "bytes": 1000000, "layers": [], "extra_types": {}}"#,
    )
    .unwrap();
    let again = run(&out);
    assert!(again.get("resumed_at_block").is_none());
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&whole).unwrap());

    // A different job into the same output starts over rather than resuming another's blocks.
    let partial = dir.path().join(".shrink-resume-out.gguf");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("job"), "another job").unwrap();
    std::fs::write(partial.join("state.json"), "{\"blocks\": 5}").unwrap();
    let fresh = run(&out);
    assert!(fresh.get("resumed_at_block").is_none());
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&whole).unwrap());
    assert_eq!(fresh["memory"]["spilled_activations"], true);
    assert_eq!(uninterrupted["memory"]["spilled_activations"], false);
    // No scratch file is left beside the output.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| ["small", "sample.txt", "whole.gguf", "out.gguf"].contains(&n.as_str())),
        "{names:?}"
    );
    // A compressed-tensors folder (GPTQ W4, group 64) resumes the same way: its shards are
    // cut after the recorded tensors and continued.
    let folder = [
        "quantize",
        s(&model),
        "--method",
        "gptq",
        "--format",
        "hf",
        "--bits",
        "4",
        "--group",
        "64",
    ];
    let args = |out: &Path| streamed_args(&folder, &text, out, false);
    let (uninterrupted, resumed) = killed_and_resumed(dir.path(), "", &args, 12);
    assert_eq!(facts(&resumed), facts(&uninterrupted));
    assert!(contents(&dir.path().join("out")).contains_key("config.json"));
    // Spilling is refused where it means nothing, not ignored.
    let e = fails(&[
        "quantize",
        s(&model),
        "--method",
        "rtn",
        "--spill-activations",
        "-o",
        s(&dir.path().join("rtn.gguf")),
    ]);
    assert!(e.contains("does not calibrate"), "{e}");
    // And so is keeping activations in 16 bits.
    let e = fails(&[
        "quantize",
        s(&model),
        "--method",
        "rtn",
        "--activations-dtype",
        "bf16",
        "-o",
        s(&dir.path().join("rtn.gguf")),
    ]);
    assert!(
        e.contains("--activations-dtype") && e.contains("does not calibrate"),
        "{e}"
    );
}

// 4c. A streaming pruning killed mid-model resumes the same way (the resume record and the partial
// GGUF or folder are the quantization's, below both: shrink_calib::BlockJob): SparseGPT
// calibrating with spilled activations, and magnitude, which does not calibrate; to a GGUF and to
// a folder.
#[test]
fn a_killed_streaming_pruning_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small");
    ok(&["synth", "small-llama", "--layers", "12", "-o", s(&model)]);
    let text = sample_text();
    // Wanda keeps its activations in bf16: the uninterrupted run in memory, the killed and
    // resumed one spilled to disk and read back from its record, in bf16 too.
    // The last: to a Hugging Face folder, its shards continued after the recorded tensors.
    for (method, dtype, suffix) in [
        ("sparsegpt", "f32", ".gguf"),
        ("magnitude", "f32", ".gguf"),
        ("wanda", "bf16", ".gguf"),
        ("sparsegpt", "f32", ""),
        ("channels", "activation", ".gguf"),
        ("channels", "magnitude", ".gguf"),
    ] {
        let format = if suffix.is_empty() { "hf" } else { "gguf" };
        // Channels by activation (the scoring resumed) or magnitude (the writing resumed).
        let (amount, dtype): (&[&str], _) = match method {
            "channels" => (&["--fraction", "0.25", "--importance", dtype], "f32"),
            _ => (&["--sparsity", "0.5"], dtype),
        };
        let head = [&["prune", s(&model), "--method", method], amount].concat();
        let head = [
            &head[..],
            &["--activations-dtype", dtype, "--format", format],
        ]
        .concat();
        let spill =
            |out: &Path| !head.contains(&"magnitude") && out.ends_with(format!("out{suffix}"));
        let args = |out: &Path| streamed_args(&head, &text, out, spill(out));
        let (uninterrupted, resumed) = killed_and_resumed(dir.path(), suffix, &args, 12);
        let facts = |v: &serde_json::Value| -> Vec<String> {
            v["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    format!(
                        "{} {} {}",
                        l["name"], l["sparsity"], l["relative_output_error"]
                    )
                })
                .collect()
        };
        assert_eq!(facts(&resumed), facts(&uninterrupted), "{method}");
        assert_eq!(resumed["config"], uninterrupted["config"], "{method}");
        let linears = if method == "channels" { 0 } else { 12 * 7 };
        assert_eq!(facts(&resumed).len(), linears);
        assert_eq!(resumed["memory"]["activations_dtype"], dtype);
        remove(&dir.path().join(format!("out{suffix}")));
        remove(&dir.path().join(format!("whole{suffix}")));
    }
}

// 5. Two runs into one folder: the second stops with a clear message.
#[test]
fn a_second_run_into_a_locked_run_folder_stops() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let file = write_pipeline(dir.path(), "p.toml", &pipeline_text(&gguf, "lock", "", ""));
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let held = shrink_core::lock_dir(&run, false).unwrap().expect("free");
    let e = fails(&["run", s(&file), "-o", s(&run)]);
    assert!(e.contains("in use by another shrink run"), "{e}");
    drop(held);
    assert!(!run.join("stages").read_dir().unwrap().any(|_| true));
}

// 6–8. GGUF layouts that lie: alignment 0, overlapping tensors, a changed type, huge dims,
// an unknown type id. Each refused with the key or tensor named, no panic.
#[test]
fn gguf_files_whose_layout_lies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant(d, "align0.gguf", |b| {
                // One more metadata key, first: general.alignment = 0.
                let mut out = b[..24].to_vec();
                let count = u64::from_le_bytes(b[16..24].try_into().unwrap());
                put_u64(&mut out, 16, count + 1);
                let key = "general.alignment";
                out.extend((key.len() as u64).to_le_bytes());
                out.extend(key.as_bytes());
                out.extend(4u32.to_le_bytes());
                out.extend(0u32.to_le_bytes());
                out.extend(&b[24..]);
                *b = out;
            }),
            "general.alignment",
        ),
        (
            variant(d, "overlap.gguf", |b| {
                let (_, off) = tensor_info_at(b, "blk.0.ffn_norm.weight");
                let (_, first) = tensor_info_at(b, "blk.0.attn_norm.weight");
                let v = u64::from_le_bytes(b[first..first + 8].try_into().unwrap());
                put_u64(b, off, v);
            }),
            "blk.0.ffn_norm.weight",
        ),
        (
            variant(d, "retyped.gguf", |b| {
                let (ty, _) = tensor_info_at(b, "blk.0.attn_q.weight");
                put_u32(b, ty, 1); // F32 → F16: the data no longer tiles the section
            }),
            "blk.0.attn_",
        ),
        (
            variant(d, "huge.gguf", |b| {
                let (ty, _) = tensor_info_at(b, "output_norm.weight");
                put_u64(b, ty - 8, 1 << 63);
            }),
            "output_norm.weight",
        ),
        (
            variant(d, "type9999.gguf", |b| {
                let (ty, _) = tensor_info_at(b, "output_norm.weight");
                put_u32(b, ty, 9999);
            }),
            "output_norm.weight",
        ),
    ];
    for (path, named) in &cases {
        for cmd in ["inspect", "eval"] {
            let mut args = vec![cmd, s(path)];
            if cmd == "eval" {
                args.extend(["--text", "x"]);
            }
            let e = fails(&args);
            assert!(e.contains(named), "{path:?} {cmd}: {e}");
        }
    }
}

// 9. A block count that the tensors cannot hold is refused before allocating for it.
#[test]
fn huge_layer_counts_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = variant(dir.path(), "layers.gguf", |b| {
        let at = metadata_value_at(b, "llama.block_count");
        put_u32(b, at, 1 << 31);
    });
    let e = fails(&["eval", s(&gguf), "--text", s(&sample_text()), "--ctx", "32"]);
    assert!(e.contains("num_hidden_layers"), "{e}");
    let hf = dir.path().join("hf");
    ok(&["convert", s(&tiny_gguf(dir.path())), "--to", "hf", s(&hf)]);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(1u64 << 40);
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let e = fails(&["eval", s(&hf), "--text", s(&sample_text()), "--ctx", "32"]);
    assert!(e.contains("num_hidden_layers"), "{e}");
}

// 10. Non-finite weights are refused when loading for compression, the tensor named.
#[test]
fn infinite_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = variant(dir.path(), "inf.gguf", |b| {
        let layout = shrink_io::check_gguf_layout(Path::new("x"), b).unwrap();
        let t = layout
            .tensors
            .iter()
            .find(|t| t.name == "blk.1.attn_norm.weight")
            .unwrap();
        let at = (layout.data_offset + t.offset) as usize + 4;
        b[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let out = dir.path().join("q.gguf");
    let e = fails(&[
        "quantize",
        s(&gguf),
        "--method",
        "rtn",
        "--format",
        "gguf:q8_0",
        "-o",
        s(&out),
    ]);
    assert!(
        e.contains("model.layers.1.input_layernorm.weight") && e.contains("NaN or infinite"),
        "{e}"
    );
    assert!(!out.exists());
}

// 11–13. Settings that cannot work are refused by validate and before any work.
#[test]
fn settings_that_cannot_work_never_start() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = s(&gguf);
    // 11. The estimate uses the real settings; above the machine (or --max-memory): refused.
    let huge = write_pipeline(
        dir.path(),
        "huge.toml",
        &pipeline_text(&gguf, "huge", "", "")
            .replace("samples = 4", "samples = 1000000000000")
            .replace("kind = \"quantize.rtn\"", "kind = \"quantize.gptq\""),
    );
    let e = fails(&["validate", s(&huge)]);
    assert!(e.contains("estimated") && e.contains("GB"), "{e}");
    let e = fails(&["run", s(&huge), "-o", s(&dir.path().join("r"))]);
    assert!(e.contains("estimated"), "{e}");
    let small = write_pipeline(dir.path(), "small.toml", &pipeline_text(&gguf, "s", "", ""));
    ok(&["validate", s(&small)]);
    let e = fails(&["validate", s(&small), "--max-memory", "1M"]);
    assert!(e.contains("estimated"), "{e}");
    // `shrink quantize` reading the model block by block: the formula's estimate, refused above
    // --max-memory before anything is written, and reported beside the measured peak.
    let calib = sample_text();
    let q = dir.path().join("q.gguf");
    let quantize = |samples: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["quantize", g, "--method", "gptq", "--format", "gguf:q4_0"];
        args.extend(["--calib", s(&calib), "--samples", samples, "-o", s(&q)]);
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    };
    fn strs(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    // A billion windows: their token ids alone (2 TB) do not fit in memory, spilled or not; with
    // memory enough, their activations do not fit, spilled, on any disk (131 PB).
    let e = fails(&strs(&quantize("1000000000", &[])));
    assert!(e.contains("estimated") && e.contains("--samples"), "{e}");
    let e = fails(&strs(&quantize(
        "1000000000",
        &["--spill-activations", "--max-memory", "1000T"],
    )));
    assert!(
        e.contains("spilling the calibration activations") && e.contains("samples"),
        "{e}"
    );
    assert!(!q.exists());
    let e = fails(&strs(&quantize("4", &["--max-memory", "300M"])));
    assert!(
        e.contains("estimated") && e.contains("0.3 GB allowed"),
        "{e}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&strs(&quantize("4", &["--seq-len", "32", "--json"])))).unwrap();
    let memory = &summary["memory"];
    assert!(memory["estimated_peak_bytes"].as_u64().unwrap() > 256 << 20);
    assert!(memory["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(memory["estimate"]["hessians"].as_u64().unwrap() > 0);

    // 12. A calibrated method without samples.
    let out = dir.path().join("zero.gguf");
    let calib = sample_text();
    for method in [
        vec!["--method", "gptq"],
        vec!["--method", "rtn", "--imatrix"],
    ] {
        let mut args = vec!["quantize", g, "--format", "gguf:q4_0", "--samples", "0"];
        args.extend(method);
        args.extend(["--calib", s(&calib), "-o", s(&out)]);
        let e = fails(&args);
        assert!(e.contains("samples"), "{e}");
        assert!(!out.exists());
    }
    let mut args = vec!["quantize", g, "--method", "gptq", "--format", "gguf:q4_0"];
    args.extend(["--samples", "1000000000000", "--calib", s(&calib)]);
    args.extend(["-o", s(&out)]);
    let e = fails(&args);
    assert!(e.contains("GB"), "{e}");

    // 13. validate checks what run would refuse.
    let text = pipeline_text(&gguf, "v", "", "")
        .replace("format = \"gguf:q8_0\"", "format = \"hf\"\nbits = 3");
    let file = write_pipeline(dir.path(), "v.toml", &text);
    let e = fails(&["validate", s(&file)]);
    assert!(e.contains("4- or 8-bit"), "{e}");
    let text = pipeline_text(&gguf, "v", "", "")
        .replace(
            &format!("calib = \"{}\"", sample_text().display()),
            "calib = \"nosuchdata:calib\"",
        )
        .replace("kind = \"quantize.rtn\"", "kind = \"quantize.gptq\"");
    let file = write_pipeline(dir.path(), "calib.toml", &text);
    let e = fails(&["validate", s(&file)]);
    assert!(e.contains("nosuchdata") && e.contains("calib"), "{e}");
    // A group that does not divide the rows: refused before the baseline is measured.
    let text = pipeline_text(&gguf, "g", "", "").replace(
        "format = \"gguf:q8_0\"",
        "format = \"hf\"\nbits = 4\ngroup = 7",
    ) + "[export]\nformats = [\"hf\"]\n";
    let file = write_pipeline(dir.path(), "group.toml", &text);
    let run = dir.path().join("g");
    // (the run has logged the baseline's path by then: not `fails`, whose stderr starts with it)
    let out = shrink(&["run", s(&file), "-o", s(&run)]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("multiple of 7") && !e.contains("panicked"),
        "{e}"
    );
    assert!(!run.join("baseline").exists(), "no work before the refusal");
}

// 14. A Hugging Face folder becomes a GGUF with its vocabulary built from tokenizer.json.
#[test]
fn hugging_face_folders_become_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let hf = dir.path().join("hf");
    ok(&["convert", s(&gguf), "--to", "hf", s(&hf)]);
    let back = dir.path().join("back.gguf");
    ok(&["convert", s(&hf), "--to", "gguf", s(&back)]);
    let text = sample_text();
    let ids = |m: &Path| ok(&["tokenize", s(m), "--text", s(&text)]);
    assert_eq!(ids(&hf), ids(&back));
    let ppl = |m: &Path| -> f64 {
        let out = ok(&[
            "eval",
            s(m),
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--chunks",
            "4",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["perplexity"]["ppl"].as_f64().unwrap()
    };
    assert!((ppl(&hf) - ppl(&back)).abs() < 1e-4 * ppl(&hf));
    // quantize and pipelines from the folder write GGUF too.
    let q = dir.path().join("q.gguf");
    ok(&[
        "quantize",
        s(&hf),
        "--method",
        "rtn",
        "--format",
        "gguf:q8_0",
        "-o",
        s(&q),
    ]);
    let meta = std::fs::read(&q).unwrap();
    for key in [
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
        "tokenizer.ggml.merges",
    ] {
        assert!(
            meta.windows(key.len()).any(|w| w == key.as_bytes()),
            "{key}"
        );
    }
    // A tokenizer llama.cpp would split differently is refused up front, with the reason.
    let tj = hf.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    json["model"]["byte_fallback"] = serde_json::Value::Bool(true);
    std::fs::write(&tj, json.to_string()).unwrap();
    let e = fails(&[
        "quantize",
        s(&hf),
        "--method",
        "gptq",
        "--format",
        "gguf:q4_0",
        "--calib",
        s(&text),
        "-o",
        s(&dir.path().join("spm.gguf")),
    ]);
    // (Byte fallback means a SentencePiece-style tokenizer, which this pre-tokenizer is not.)
    assert!(
        e.contains("not SentencePiece's") && e.contains("tokenizer.json"),
        "{e}"
    );
}

// Also: messages say each thing once, without backtraces.
#[test]
fn errors_are_one_clean_message() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = variant(dir.path(), "trunc.gguf", |b| b.truncate(b.len() - 100));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["eval", s(&gguf), "--text", "x"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // An OS error said once.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = fails(&[
        "convert",
        s(&tiny_gguf(dir.path())),
        "--to",
        "gguf",
        s(&blocker.join("m.gguf")),
    ]);
    assert_eq!(e.matches("os error").count(), 1, "{e}");
}
