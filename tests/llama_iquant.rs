//! shrink's i-quant blocks against ggml's own functions (issue #21, item 1): a C harness built
//! against the reference build's ggml libraries quantizes the same rows with `ggml_quantize_chunk`
//! (with and without an importance matrix) and dequantizes them with the type's `to_float`;
//! shrink's quantizer must write the same bytes and its dequantizer read llama.cpp's bytes as the
//! same floats.

mod common;

use common::real::*;
use shrink_core::iquant::IQuant;
use std::process::Command;

const HARNESS_C: &str = r#"
#include "ggml.h"
#include <stdio.h>
#include <stdlib.h>

static void *slurp(const char *path, size_t bytes) {
    void *p = malloc(bytes);
    FILE *f = fopen(path, "rb");
    if (!f || fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "reading %s\n", path); exit(1); }
    fclose(f);
    return p;
}

static void spill(const char *path, const void *p, size_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, bytes, f) != bytes) { fprintf(stderr, "writing %s\n", path); exit(1); }
    fclose(f);
}

/* iquant DIR ROWS COLS TYPE_ID: x.bin (and imatrix.bin) in DIR -> TYPE_ID[-imatrix].{q,f32} */
int main(int argc, char **argv) {
    const char *dir = argv[1];
    int rows = atoi(argv[2]), cols = atoi(argv[3]);
    enum ggml_type type = (enum ggml_type) atoi(argv[4]);
    char path[4096];
    snprintf(path, sizeof path, "%s/x.bin", dir);
    float *x = slurp(path, sizeof(float) * rows * cols);
    snprintf(path, sizeof path, "%s/imatrix.bin", dir);
    float *imatrix = slurp(path, sizeof(float) * cols);
    size_t row = ggml_row_size(type, cols);
    void *q = malloc(row * rows);
    float *y = malloc(sizeof(float) * rows * cols);
    /* ggml refuses some types without an importance matrix (IQ2_XS): only the weighted pass. */
    for (int weighted = ggml_quantize_requires_imatrix(type); weighted < 2; weighted++) {
        ggml_quantize_chunk(type, x, q, 0, rows, cols, weighted ? imatrix : NULL);
        ggml_get_type_traits(type)->to_float(q, y, (int64_t) rows * cols);
        snprintf(path, sizeof path, "%s/%d-%d.q", dir, (int) type, weighted);
        spill(path, q, row * rows);
        snprintf(path, sizeof path, "%s/%d-%d.f32", dir, (int) type, weighted);
        spill(path, y, sizeof(float) * rows * cols);
    }
    return 0;
}
"#;

#[test]
fn i_quant_blocks_are_ggml_s() {
    let Some((dir, exe)) = ggml_harness("iquant", HARNESS_C) else {
        return;
    };
    // Rows like a model's: mostly small, a few large weights, one all-zero sub-block, one tiny row.
    let (rows, cols) = (6usize, 512usize);
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5 - 1.0) * if i % 89 == 0 { 9.0 } else { 0.05 })
        .collect();
    x[64..96].fill(0.0);
    x[4 * cols..5 * cols].iter_mut().for_each(|v| *v *= 1e-3);
    let importance: Vec<f32> = (0..cols).map(|c| 0.01 + ((c * 31) % 17) as f32).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(dir.path().join("x.bin"), bytes(&x)).unwrap();
    std::fs::write(dir.path().join("imatrix.bin"), bytes(&importance)).unwrap();
    for kind in IQuant::ALL {
        let id = kind.ggml_id().to_string();
        let (r, c) = (rows.to_string(), cols.to_string());
        run_ok(Command::new(&exe).args([dir.path().to_str().unwrap(), &r, &c, &id]));
        for (weighted, imp) in [(0, None), (1, Some(&importance[..]))] {
            let path = dir.path().join(format!("{id}-{weighted}.q"));
            // ggml quantizes IQ2_XS and IQ2_XXS only with an importance matrix (shrink weights
            // by x² then).
            if weighted == 0 && matches!(kind, IQuant::IQ2XS | IQuant::IQ2XXS) {
                assert!(!path.exists());
                continue;
            }
            let theirs = std::fs::read(path).unwrap();
            let mut ours = vec![0u8; rows * kind.row_bytes(cols)];
            for (row, out) in x.chunks(cols).zip(ours.chunks_mut(kind.row_bytes(cols))) {
                shrink_quant::iquant::quantize_row(kind, row, imp, out);
            }
            // ggml's IQ3_S quantizer skips a sub-block of zeros without advancing its index and
            // sign pointers (`quantize_row_iq3_s_impl`: `continue` before `qs += bs4`), so the
            // rest of that block lands 8 and 4 bytes early and dequantizes to other weights:
            // shrink writes each sub-block in its place, and such blocks are not compared.
            let size = kind.type_size();
            let broken = |b: usize| {
                let x = &x[b * 256..(b + 1) * 256];
                kind == IQuant::IQ3S && x.chunks(32).any(|s| s.iter().all(|&v| v == 0.0))
            };
            let differing = (ours.chunks(size).zip(theirs.chunks(size)).enumerate())
                .filter(|&(b, (a, t))| a != t && !broken(b))
                .count();
            assert_eq!(differing, 0, "{kind:?} weighted {weighted}: bytes differ");
            let floats = std::fs::read(dir.path().join(format!("{id}-{weighted}.f32"))).unwrap();
            let mut back = vec![0f32; rows * cols];
            for (blocks, y) in theirs
                .chunks(kind.row_bytes(cols))
                .zip(back.chunks_mut(cols))
            {
                kind.dequantize_row(blocks, y);
            }
            assert!(
                bytes(&back) == floats,
                "{kind:?} weighted {weighted}: values differ"
            );
        }
    }
}

/// Whole SmolLM2 files (issue #21, item 1): `shrink quantize --preset iq4_nl|iq4_xs --method rtn`
/// writes the tensors `llama-quantize … IQ4_NL|IQ4_XS` writes from the same F32 weights, byte for
/// byte (without an importance matrix llama.cpp gives the first eighth of the `ffn_down` layers
/// Q5_K: the same overrides here, whose bytes are candle's), and llama.cpp scores shrink's file
/// as `shrink eval` does ([`scores_alike`]).
#[test]
fn iq4_files_are_llama_quantize_s_and_score_alike() {
    let Some(model) = model_path() else { return };
    let Some(f32_ref) = f32_reference(&model) else {
        return;
    };
    let (Some(quantize), Some(perplexity)) =
        (llama_tool("llama-quantize"), llama_tool("llama-perplexity"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (preset, ftype, overrides) in [
        (
            "iq4_nl",
            "IQ4_NL",
            &[
                "layers.0.mlp.down_proj=q5_k",
                "layers.1.mlp.down_proj=q5_k",
                "layers.2.mlp.down_proj=q5_k",
            ],
        ),
        (
            "iq4_xs",
            "IQ4_XS",
            &[
                "layers.0.mlp.down_proj=q5_k",
                "layers.1.mlp.down_proj=q5_k",
                "layers.2.mlp.down_proj=q5_k",
            ],
        ),
    ] {
        let theirs = dir.path().join(format!("llama-{preset}.gguf"));
        llama_quantize(&quantize, None, &f32_ref, &theirs, ftype);
        let ours = dir.path().join(format!("shrink-{preset}.gguf"));
        let mut args = vec![
            "quantize",
            model.to_str().unwrap(),
            "--preset",
            preset,
            "--method",
            "rtn",
        ];
        for o in overrides {
            args.extend(["--override", o]);
        }
        args.extend(["-o", ours.to_str().unwrap()]);
        run_shrink(&args);
        let (a, b) = (gguf_tensor_bytes(&ours), gguf_tensor_bytes(&theirs));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        let mut types = std::collections::BTreeMap::new();
        let mut differ = vec![];
        for (name, (ty, data)) in &a {
            assert_eq!(ty, &b[name].0, "{preset}: {name}'s type");
            // The three Q5_K tensors come from candle's Q5_K port, which does not write ggml's
            // reference bytes (its quantizer predates ggml's current `make_qkx2_quants` call).
            if data != &b[name].1 && ty != "Q5K" {
                differ.push(format!("{name} ({ty})"));
            }
            *types.entry(ty.clone()).or_insert(0) += 1;
        }
        assert!(
            differ.is_empty(),
            "{preset}: blocks differ from llama-quantize's in {differ:?}"
        );
        eprintln!("{preset}: {types:?}");
        let want = if preset == "iq4_xs" { "IQ4XS" } else { "IQ4NL" };
        assert!(types.get(want).is_some_and(|&n| n >= 27), "{types:?}");

        scores_alike(preset, &perplexity, &ours);
    }
}

/// The grid i-quants in whole files: the `iq3_xxs`, `iq2_xs`, `iq3_s`, `iq2_m` and `iq2_xxs`
/// presets (RTN with an importance matrix, or GPTQ choosing each code of eight weights, from a
/// small calibration) give every tensor of SmolLM2 the type `llama-quantize --imatrix …` gives it
/// for the same type name (the grid type where rows hold super-blocks, the `ffn_down` weights;
/// IQ3_S, IQ4_NL, Q4_0 and Q2_K as llama.cpp's mix elsewhere), and llama.cpp loads each file and
/// scores it as `shrink eval` does ([`scores_alike`]; with products of dequantized i-quants in
/// f32 `shrink eval` was 0.43–0.62% away).
#[test]
fn grid_i_quant_files_are_llama_cpp_s_mixes_and_score_alike() {
    let Some(model) = model_path() else { return };
    let Some(f32_ref) = f32_reference(&model) else {
        return;
    };
    let (Some(quantize), Some(imatrix_tool), Some(perplexity)) = (
        llama_tool("llama-quantize"),
        llama_tool("llama-imatrix"),
        llama_tool("llama-perplexity"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // llama.cpp writes these types only with an importance matrix: one from two windows.
    let calib = String::from_utf8(run_shrink(&["data", "path", "shakespeare:calib"])).unwrap();
    let imatrix = dir.path().join("calib.imatrix");
    run_ok(
        Command::new(imatrix_tool)
            .args([
                "-m",
                f32_ref.to_str().unwrap(),
                "-f",
                calib.lines().next().unwrap(),
            ])
            .args(["-c", "512", "--chunks", "2", "-t", "2", "-o"])
            .arg(&imatrix),
    );
    let rtn: &[&str] = &["--method", "rtn", "--imatrix"];
    for (name, kind, ftype, method) in [
        ("iq3_xxs", IQuant::IQ3XXS, "IQ3_XXS", rtn),
        ("iq2_xs", IQuant::IQ2XS, "IQ2_XS", &[]),
        ("iq3_s", IQuant::IQ3S, "IQ3_S", rtn),
        ("iq2_m", IQuant::IQ2S, "IQ2_M", &[]),
        ("iq2_xxs", IQuant::IQ2XXS, "IQ2_XXS", rtn),
    ] {
        let theirs = dir.path().join(format!("llama-{name}.gguf"));
        llama_quantize(&quantize, Some(&imatrix), &f32_ref, &theirs, ftype);
        let ours = dir.path().join(format!("{name}.gguf"));
        let model = model.to_str().unwrap();
        let mut args = vec!["quantize", model, "--preset", name, "--samples", "4"];
        args.extend(method);
        args.extend(["-o", ours.to_str().unwrap()]);
        run_shrink(&args);
        let (a, b) = (gguf_tensor_bytes(&ours), gguf_tensor_bytes(&theirs));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (tensor, (ty, _)) in &a {
            assert_eq!(ty, &b[tensor].0, "{name}: {tensor}'s type");
        }
        let stored = format!("{:?}", shrink_core::ggml::GgmlType::of_iquant(kind));
        let count = a.values().filter(|(ty, _)| *ty == stored).count();
        assert!(count >= 27, "{name}: {count} {stored} tensors");
        let started = std::time::Instant::now();
        scores_alike(name, &perplexity, &ours);
        eprintln!("{name}: scored in {:?}", started.elapsed());
    }
}

/// `shrink eval` (integer products, as ggml's `vec_dot`) against `llama-perplexity` on 32
/// chunks of Hamlet: within 0.5%. llama.cpp's own CPU paths disagree by as much on these files
/// (on 8 chunks of IQ3_XXS: 52.0575 through `vec_dot` alone, 52.1416 with repacked IQ4_NL,
/// 52.3456 with its default tiled kernels; shrink 52.3579), so fewer chunks would test noise.
fn scores_alike(name: &str, perplexity: &std::path::Path, file: &std::path::Path) {
    let shrink = shrink_eval(file, 32)["perplexity"]["ppl"].as_f64().unwrap();
    let llama = llama_perplexity(perplexity, file, 32);
    eprintln!("{name}: shrink eval {shrink:.4}, llama-perplexity {llama:.4}");
    assert!(
        (shrink / llama - 1.0).abs() < 0.005,
        "{name}: {shrink} vs {llama}"
    );
}
