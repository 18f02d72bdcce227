//! A mutation fuzzer for the readers of untrusted input: GGUF files, safetensors folders and
//! pipeline files. Seeds are valid files made here; mutants flip bits, write boundary values
//! (0, 0xff…, 2^31, 2^63) over counts and lengths, truncate, cut and repeat spans. A reader must
//! return an error or a value — never panic, and never allocate without bound (a capping
//! allocator aborts on any single allocation over 4 GiB).
//!
//! Every file in `tests/fuzz-corpus/<target>/` (inputs that once crashed a reader) is replayed
//! first. `SHRINK_FUZZ_ITERATIONS` (default 300 per target, for CI) or `SHRINK_FUZZ_SECONDS`
//! sets the length of a run; crashing inputs are written to `tests/fuzz-corpus/<target>/` as
//! `crash-<sha256>` for the record, and the test fails.

mod common;

use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

struct Capped;

const ALLOCATION_CAP: usize = 4 << 30;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz-corpus")
        .join(target)
}

fn mutate(seed: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        if b.is_empty() {
            break;
        }
        let at = rng.gen_range(0..b.len());
        match rng.gen_range(0..6) {
            0 => b[at] ^= 1 << rng.gen_range(0..8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, 1][rng.gen_range(0..5)],
            2 => {
                let v: u64 =
                    [0, 1, u64::MAX, 1 << 31, 1 << 63, 1 << 40, 0xffff_ffff][rng.gen_range(0..7)];
                let at = at & !7;
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => b.truncate(at),
            4 => {
                let end = rng.gen_range(at..=b.len().min(at + 64));
                b.drain(at..end);
            }
            _ => {
                let end = rng.gen_range(at..=b.len().min(at + 64));
                let span = b[at..end].to_vec();
                b.splice(at..at, span);
            }
        }
    }
    b
}

/// Runs `read` on `input`; a panic is a crash.
fn survives(read: &dyn Fn(&[u8]), input: &[u8]) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(input))).is_ok()
}

/// Replays the target's corpus, then fuzzes from `seeds`; returns (inputs run, crashes).
fn fuzz(target: &str, seeds: &[Vec<u8>], read: &dyn Fn(&[u8])) -> (usize, Vec<PathBuf>) {
    let dir = corpus(target);
    let mut crashes = Vec::new();
    let mut runs = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let input = std::fs::read(e.path()).unwrap();
            runs += 1;
            if !survives(read, &input) {
                crashes.push(e.path());
            }
        }
    }
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let iterations = env("SHRINK_FUZZ_ITERATIONS").unwrap_or(300);
    let deadline = env("SHRINK_FUZZ_SECONDS")
        .map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(env("SHRINK_FUZZ_SEED").unwrap_or(1));
    let mut i = 0u64;
    loop {
        match deadline {
            Some(d) if std::time::Instant::now() >= d => break,
            None if i >= iterations => break,
            _ => {}
        }
        i += 1;
        let input = mutate(&seeds[rng.gen_range(0..seeds.len())], &mut rng);
        runs += 1;
        if !survives(read, &input) {
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("crash-{}", &shrink_core::sha256_hex(&input)[..16]));
            std::fs::write(&path, &input).unwrap();
            crashes.push(path);
        }
    }
    (runs, crashes)
}

fn report(target: &str, (runs, crashes): (usize, Vec<PathBuf>)) {
    eprintln!("fuzz {target}: {runs} inputs, {} crashes", crashes.len());
    assert!(crashes.is_empty(), "{target} crashed on {crashes:?}");
}

#[test]
fn gguf_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read(common::tiny_gguf(dir.path())).unwrap();
    let file = dir.path().join("m.gguf");
    let read = |b: &[u8]| {
        let _ = shrink_io::check_gguf_layout(Path::new("m.gguf"), b);
        std::fs::write(&file, b).unwrap();
        if let Ok(c) = shrink_io::load(&file) {
            let _ = shrink_io::inspect(&file);
            let _ = shrink_pipeline::build_model(&c, candle_core::DType::F32);
        }
    };
    report("gguf", fuzz("gguf", &[seed], &read));
}

#[test]
fn safetensors_folder_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = common::tiny_gguf(dir.path());
    let hf = dir.path().join("hf");
    let checkpoint = shrink_io::load(&gguf).unwrap();
    shrink_io::save_hf(&checkpoint, &hf, shrink_io::SaveDType::F16).unwrap();
    let weights = hf.join("model.safetensors");
    let seeds = vec![
        std::fs::read(&weights).unwrap(),
        std::fs::read(hf.join("config.json")).unwrap(),
    ];
    let config = std::fs::read(hf.join("config.json")).unwrap();
    let original = std::fs::read(&weights).unwrap();
    let read = |b: &[u8]| {
        // A mutant replaces the weights or the config (whichever it came from).
        let is_json = b.first() == Some(&b'{');
        std::fs::write(&weights, if is_json { &original[..] } else { b }).unwrap();
        std::fs::write(
            hf.join("config.json"),
            if is_json { b } else { &config[..] },
        )
        .unwrap();
        if let Ok(c) = shrink_io::load(&hf) {
            let _ = shrink_pipeline::build_model(&c, candle_core::DType::F32);
        }
        let _ = shrink_io::inspect(&hf);
    };
    report("safetensors", fuzz("safetensors", &seeds, &read));
}

#[test]
fn pipeline_parser_never_panics() {
    let pipelines = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&pipelines)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    let read = |b: &[u8]| {
        if let Ok(text) = std::str::from_utf8(b) {
            if let Ok(p) = shrink_pipeline::parse(text, "fuzz.toml") {
                let _ = p.estimated_peak_for(None, None, true, u64::MAX, u64::MAX);
                let _ = p.estimated_peak_bytes(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
            }
        }
    };
    report("pipeline", fuzz("pipeline", &seeds, &read));
}
