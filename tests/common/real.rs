//! Helpers of the tests on real assets: the demo model and text (fetched when
//! `SHRINK_REAL_TESTS=require`, as CI sets it; otherwise a test whose inputs are missing says so and
//! passes without checking anything) and llama.cpp's tools built from the vendored source.

use std::path::PathBuf;
use std::process::Command;

pub fn required() -> bool {
    std::env::var("SHRINK_REAL_TESTS").as_deref() == Ok("require")
}

/// The asset directory of a manifest, fetched when required, `None` (skip) when absent.
pub fn asset(name: &str) -> Option<PathBuf> {
    let m = shrink_data::find(name).unwrap();
    if required() || shrink_data::is_cached(&m).unwrap() {
        return Some(shrink_data::fetch(&m).unwrap_or_else(|e| panic!("fetching {name}: {e}")));
    }
    eprintln!("SKIPPED: '{name}' is not cached; run `shrink data fetch {name}` or set SHRINK_REAL_TESTS=require");
    None
}

pub fn model_path() -> Option<PathBuf> {
    let m = shrink_data::find("smollm2").unwrap();
    Some(asset("smollm2")?.join(m.model.unwrap()))
}

pub fn text(file: &str) -> Option<String> {
    Some(std::fs::read_to_string(asset("shakespeare")?.join(file)).unwrap())
}

/// A llama.cpp tool from `$SHRINK_LLAMA_CPP_BIN` or the cache the build script fills.
pub fn llama_tool(tool: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("SHRINK_LLAMA_CPP_BIN") {
        Some(d) => PathBuf::from(d),
        None => shrink_core::cache_dir()
            .unwrap()
            .join("llama.cpp/0.3.36/bin-noamx-logflush"),
    };
    let path = dir.join(tool);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !required(),
        "{} is missing: run scripts/build-llama-cpp.sh",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} not built (scripts/build-llama-cpp.sh)",
        path.display()
    );
    None
}

/// Runs `command`, which must succeed (else its stderr is the failure); its output.
pub fn run_ok(command: &mut Command) -> std::process::Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_shrink(args: &[&str]) -> Vec<u8> {
    run_ok(Command::new(env!("CARGO_BIN_EXE_shrink")).args(args)).stdout
}

/// `llama-quantize [--imatrix IMATRIX] INPUT OUTPUT FTYPE`, which must succeed.
pub fn llama_quantize(
    tool: &std::path::Path,
    imatrix: Option<&std::path::Path>,
    input: &std::path::Path,
    output: &std::path::Path,
    ftype: &str,
) {
    let weighted = imatrix.map(|m| ["--imatrix", m.to_str().unwrap()]);
    run_ok(Command::new(tool).args(weighted.iter().flatten()).args([
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        ftype,
    ]));
}

/// The cached F32 reference GGUF (`llama-quantize --allow-requantize … F32`), made on first use.
pub fn f32_reference(model: &std::path::Path) -> Option<PathBuf> {
    let quantize = llama_tool("llama-quantize")?;
    let out = shrink_core::cache_dir()
        .unwrap()
        .join("bench/smollm2-f32.gguf");
    // Tests run in parallel: one makes the file while the others wait.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if !out.is_file() {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let part = out.with_extension(format!("part-{}", std::process::id()));
        // llama-quantize takes its options before the positional arguments.
        let st = Command::new(quantize)
            .args([
                "--allow-requantize",
                model.to_str().unwrap(),
                part.to_str().unwrap(),
                "F32",
            ])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::rename(&part, &out).unwrap();
    }
    Some(out)
}

/// A C program `source` compiled against the reference build's ggml libraries (`-lggml-cpu
/// -lggml-base`), in a temporary folder it returns with the executable; `None` (the test is
/// skipped) when the libraries are not built and the real tests are not required.
pub fn ggml_harness(name: &str, source: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    let root = shrink_core::cache_dir().unwrap().join("llama.cpp/0.3.36");
    let (libs, include) = (
        root.join("build-noamx/ggml/src"),
        root.join("src/ggml/include"),
    );
    if !libs.join("libggml-cpu.a").is_file() || !include.join("ggml-cpu.h").is_file() {
        assert!(
            !required(),
            "llama.cpp's ggml libraries are missing: run scripts/build-llama-cpp.sh"
        );
        eprintln!("SKIPPED: llama.cpp's ggml libraries not built (scripts/build-llama-cpp.sh)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.c"));
    std::fs::write(&file, source).unwrap();
    let exe = dir.path().join(name);
    let built = Command::new("cc")
        .args([
            "-O2",
            file.to_str().unwrap(),
            "-I",
            include.to_str().unwrap(),
        ])
        .args(["-L", libs.to_str().unwrap(), "-lggml-cpu", "-lggml-base"])
        .args(["-lstdc++", "-lm", "-lpthread", "-fopenmp"])
        .args(["-o", exe.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some((dir, exe))
}

/// `shrink eval --json` on hamlet, llama-cpp protocol, ctx 512.
pub fn shrink_eval(model: &std::path::Path, chunks: usize) -> serde_json::Value {
    let chunks = chunks.to_string();
    let args = [
        "eval",
        model.to_str().unwrap(),
        "--text",
        "shakespeare:eval",
        "--protocol",
        "llama-cpp",
        "--ctx",
        "512",
        "--chunks",
        &chunks,
        "--json",
    ];
    serde_json::from_slice(&run_shrink(&args)).unwrap()
}

/// `llama-perplexity -c 512` on hamlet: its final estimate (the build script makes the tool print
/// every queued log line before it exits).
pub fn llama_perplexity(tool: &std::path::Path, model: &std::path::Path, chunks: usize) -> f64 {
    let hamlet = asset("shakespeare").unwrap().join("hamlet");
    llama_perplexity_of(tool, model, &hamlet, chunks)
}

/// `llama-perplexity -c 512` on the text file `text`: its final estimate.
pub fn llama_perplexity_of(
    tool: &std::path::Path,
    model: &std::path::Path,
    hamlet: &std::path::Path,
    chunks: usize,
) -> f64 {
    let chunks = chunks.to_string();
    let out = Command::new(tool)
        .args([
            "-m",
            model.to_str().unwrap(),
            "-f",
            hamlet.to_str().unwrap(),
            "-c",
            "512",
            "--chunks",
            &chunks,
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("Final estimate: PPL ="))
        .unwrap_or_else(|| panic!("no final estimate from llama-perplexity:\n{stderr}"));
    line.split("PPL =")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Every tensor of a GGUF file: its ggml type's name and its data, read through shrink's own
/// header reader (candle's rejects the i-quant types).
pub fn gguf_tensor_bytes(
    path: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let layout = shrink_io::check_gguf_layout(path, &bytes).unwrap();
    layout
        .tensors
        .iter()
        .map(|t| {
            let start = (layout.data_offset + t.offset) as usize;
            let data = bytes[start..start + t.size_bytes as usize].to_vec();
            (t.name.clone(), (format!("{:?}", t.dtype), data))
        })
        .collect()
}
