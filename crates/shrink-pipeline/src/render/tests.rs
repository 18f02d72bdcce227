use super::*;
use crate::report::{LayerRow, StageLayers};

const SAMPLE: &str = r#"{"schema": "shrink.report/v1", "name": "demo & <test>",
  "description": "A small run.", "pipeline_file": "pipelines/demo.toml",
  "provenance": {"shrink_version": "0.1.0", "config_sha256": "ab12", "seed": 7,
    "inputs": [{"role": "model", "path": "m.gguf", "sha256": "cd34"}],
    "machine": {"hostname": "box", "os": "linux", "arch": "x86_64", "cpu": "cpu", "cores": 2,
      "memory_bytes": 8000000000},
    "date_utc": "2025-01-01T00:00:00Z", "command": "shrink run pipelines/demo.toml"},
  "eval": {"text": "shakespeare", "protocol": "chunked", "ctx": 512, "chunks": 8,
    "tokens_scored": 4096},
  "rows": [{"name": "base", "kind": "baseline", "input": null, "artifact": "m.gguf",
    "format": "gguf", "cached": false, "sweep_value": null, "perplexity": 20.0,
    "perplexity_stderr": 0.2, "ppl_increase_pct": 0.0, "kl_mean": null, "top1_agreement": null,
    "size_bytes": 270000000, "bits_per_weight": 16.0, "parameters": 134515008, "sparsity": 0.0,
    "compression_ratio": 1.0, "eval_tokens_per_s": 900.0, "stage_wall_s": 0.0,
    "peak_rss_bytes": 0, "decode": {"backend": "candle-f32", "prefill_tokens": 128,
      "prefill_tokens_per_s": 400.0, "decode_tokens": 64, "decode_ms_per_token": 21.5}}],
  "exported": ["gptq-b4"],
  "gates": [{"gate": "max_ppl_increase_pct", "model": "gptq-b3", "limit": 3.0, "value": 15.5,
      "passed": false, "message": "ppl increase 15.5% > 3%"},
    {"gate": "max_size_mb", "model": "gptq-b3", "limit": 100.0, "value": 62.0, "passed": true,
      "message": "size ok"}],
  "generations": [{"prompt": "ROMEO:", "outputs": {"base": "To be, or\nnot | to be",
    "gptq-b4": "<script>alert(1)</script>"}}],
  "layers": [],
  "sweep": {"stage": "gptq", "key": "bits", "variants": ["gptq-b3", "gptq-b4"],
    "pareto": ["gptq-b3", "gptq-b4", "base"]},
  "training": [{"stage": "distill", "points": [[0, 3.0], [10, 2.5], [20, 2.2]]}],
  "wall_s": 42.0}"#;

fn layers(stage: &str, with_errors: bool) -> StageLayers {
    let kinds = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "mlp.down_proj",
        "lm_head",
    ];
    let layer = |i: usize| LayerRow {
        name: format!("model.layers.{}.{}.weight", i / 4, kinds[i % 4]),
        format: "q4_k".into(),
        shape: [576, 1536],
        bits_per_weight: 4.5,
        relative_output_error: with_errors.then_some(1e-3 * (i + 1) as f64),
        sparsity: 0.0,
    };
    StageLayers {
        stage: stage.into(),
        layers: (0..12).map(layer).collect(),
    }
}

/// Baseline, two sweep variants (one cached) and another stage of the same size as a variant.
fn sample() -> Report {
    let mut r: Report = serde_json::from_str(SAMPLE).expect("sample report parses");
    for (name, kind, mb, ppl) in [
        ("gptq-b4", "gptq", 80, 20.8),
        ("gptq-b3", "gptq", 62, 23.1),
        ("rtn", "rtn", 80, 21.5),
    ] {
        let mut m = r.rows[0].clone();
        (m.name, m.kind, m.size_bytes, m.perplexity) =
            (name.into(), format!("quantize.{kind}"), mb * 1_000_000, ppl);
        (m.kl_mean, m.top1_agreement, m.cached) = (Some(0.05), Some(0.9), name == "gptq-b4");
        m.sweep_value = name.strip_prefix("gptq-b").map(|b| format!("bits={b}"));
        r.rows.push(m);
    }
    r.layers = vec![layers("gptq-b4", true), layers("rtn", false)];
    r
}

fn svgs(html: &str) -> Vec<&str> {
    html.split("<svg")
        .skip(1)
        .map(|s| s.split("</svg>").next().unwrap_or(""))
        .collect()
}

#[test]
fn markdown_has_rows_gates_and_escaped_cells() {
    let md = to_markdown(&sample());
    for name in ["| base |", "| gptq-b4 |", "| gptq-b3 |", "| rtn |"] {
        assert!(md.contains(name), "{name}");
    }
    assert!(md.contains("ppl increase 15.5% > 3%"));
    assert!(md.contains("FAIL — 1 of 2 gates failed"));
    assert!(md.contains("```text\nTo be, or\nnot | to be\n```"));
    assert!(md.contains("| cached |") && md.contains("✓ front"));
    assert!(md.starts_with("# demo & \\<test>\n"));
    assert!(md.rfind("## Per-layer").unwrap() > md.find("## Provenance").unwrap());
    let mut o = String::new();
    md_table(&mut o, &table("a", [vec!["x|y\nz".to_string()]]));
    assert!(o.ends_with("| x\\|y↵z |\n"), "{o}");
    assert_eq!(fenced("x ```` y"), "`````text\nx ```` y\n`````\n");
}

#[test]
fn html_is_balanced_escaped_and_has_the_charts() {
    let html = to_html(&sample());
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    // summary, gates, sweep, generations, two per-layer tables, provenance
    assert_eq!(html.matches("<table").count(), 7);
    assert!(!html.contains("<script"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("demo &amp; &lt;test&gt;"));
    assert_eq!(html.matches("<title>Size vs perplexity</title>").count(), 1);
    assert_eq!(
        html.matches("<title>Relative output error per layer")
            .count(),
        1
    );
    assert_eq!(html.matches("<title>Training loss</title>").count(), 1);
    assert_eq!(html.matches("<details>").count(), 2);
    assert!(html.contains("class=\"status fail\""));
}

#[test]
fn non_finite_values_stay_out_of_svg() {
    let mut r = sample();
    r.rows[2].perplexity = f64::NAN;
    r.rows[3].perplexity = f64::INFINITY;
    r.layers[0].layers[3].relative_output_error = Some(f64::NAN);
    r.layers[0].layers[4].relative_output_error = Some(f64::INFINITY);
    r.training[0].points.push((30, f64::NAN));
    let html = to_html(&r);
    let charts = svgs(&html);
    assert_eq!(charts.len(), 3);
    for svg in charts {
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}

#[test]
fn degenerate_reports_render() {
    let mut r = sample();
    r.rows.truncate(1);
    (r.sweep, r.gates, r.generations, r.training) = (None, vec![], vec![], vec![]);
    r.layers = vec![
        StageLayers {
            stage: "empty".into(),
            layers: vec![],
        },
        layers("flat", true),
    ];
    for l in &mut r.layers[1].layers {
        l.relative_output_error = Some(0.01);
    }
    let html = to_html(&r);
    assert_eq!(svgs(&html).len(), 2);
    assert!(html.contains("No gates configured"));
    assert!(to_markdown(&r).contains("| base |"));
    r.rows[0].perplexity = f64::NAN;
    r.layers.clear();
    assert!(to_html(&r).contains("No finite size/perplexity points"));
}

#[test]
fn axis_handles_wide_and_flat_ranges() {
    let log = Axis::fit([1e-5, 0.0, 0.2].into_iter(), true, 0.0, 100.0).unwrap();
    assert!(log.log && log.lo == 1e-5 && log.hi == 1.0);
    let flat = Axis::fit([5.0, 5.0].into_iter(), false, 0.0, 100.0).unwrap();
    assert!(flat.hi > flat.lo && flat.map(5.0).is_finite());
    assert!(flat.ticks().iter().all(|t| t.0.is_finite()));
}

#[test]
fn speed_figures_carry_their_spread_and_a_load_warning() {
    let mut r = sample();
    let load = shrink_core::MachineLoad {
        loadavg_before: 1.5,
        loadavg_after: 2.25,
        others: 0.23,
    };
    let d = r.rows[1].decode.as_mut().unwrap();
    (d.repeats, d.decode_spread, d.prefill_spread, d.load) = (5, 1.04, 1.5, Some(load));
    r.rows[2].eval_load = Some(shrink_core::MachineLoad {
        others: 0.02,
        ..load
    });
    let md = to_markdown(&r);
    let note = "⚠ under load: others took 23% of the CPU (load average 1.50 → 2.25)";
    assert!(md.contains(&format!("| 21.5 (spread 4%) {note} |")), "{md}");
    assert!(md.contains(&format!("| 400 (spread 50%) {note} |")));
    // An old report (one run, no load) and a quiet machine: the plain figure.
    assert!(md.contains("| 900 |") && !md.contains("| 900 ⚠"));
    assert!(to_html(&r).contains("(spread 4%) ⚠ under load"));
}
