//! Renders a [`Report`] as `report.md` (GitHub-flavoured tables, the long per-layer tables last)
//! and as one self-contained `report.html` (inline CSS, hand-drawn SVG charts, no scripts or
//! external resources). Every user-provided string is escaped for its target format.

use crate::report::{ModelRow, Report, SearchSection, StageLayers};
use shrink_models::Role;
use std::fmt::{self, Display, Write};

/// `write!` into a `String`, which cannot fail.
macro_rules! w {
    ($dst:expr, $($arg:tt)*) => {{
        let _ = write!($dst, $($arg)*);
    }};
}

mod html;
mod markdown;
mod svg;
#[cfg(test)]
mod tests;

pub use html::to_html;
use html::*;
pub use markdown::to_markdown;
use markdown::*;
use svg::*;

const SUMMARY_HEAD: &str = "model,kind,ppl ± se,Δppl %,KL,top-1 %,emb cos,top-10 %,size MB,bits/w,params,\
    shape,sparsity %,compr. ×,eval tok/s,stage s,peak RSS MB,decode ms/tok,prefill tok/s,backend,cached";
/// One colour per linear role (`shrink_models::Role::ALL`), then one for anything else (`lm_head`); also the palette
/// of loss curves.
const COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c9c9c",
];

/// Unescaped cell text, shared by both renderers.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

fn table(head: &str, rows: impl IntoIterator<Item = Vec<String>>) -> Table {
    let head = head.split(',').map(String::from).collect();
    Table {
        head,
        rows: rows.into_iter().collect(),
    }
}

fn summary_table(report: &Report) -> Table {
    let rows = report.rows.iter().map(|r| {
        let base = r.kind == "baseline";
        let d = r.decode.as_ref();
        let kind = match &r.sweep_value {
            Some(v) => format!("{} ({v})", r.kind),
            None => r.kind.clone(),
        };
        vec![
            r.name.clone(),
            kind,
            // Encoders without a masked-LM head have no perplexity.
            opt(r.perplexity.is_finite().then_some(r.perplexity), |v| {
                if r.perplexity_stderr.is_finite() {
                    format!("{v:.2} ± {:.2}", r.perplexity_stderr)
                } else {
                    format!("{v:.2}")
                }
            }),
            opt(
                r.ppl_increase_pct.is_finite().then_some(r.ppl_increase_pct),
                |v| format!("{v:+.2}"),
            ),
            opt(r.kl_mean, |v| format!("{v:.4}")),
            opt(r.top1_agreement, |v| format!("{:.1}", v * 100.0)),
            opt(r.embedding_cosine, |v| format!("{v:.4}")),
            opt(r.neighbour_agreement, |v| format!("{:.1}", v * 100.0)),
            mb(r.size_bytes),
            format!("{:.2}", r.bits_per_weight),
            count(r.parameters),
            r.shape.clone(),
            format!("{:.1}", r.sparsity * 100.0),
            format!("{:.2}", r.compression_ratio),
            speed(r.eval_tokens_per_s, 0, None, r.eval_load.as_ref()),
            opt((!base).then_some(r.stage_wall_s), |v| format!("{v:.1}")),
            opt((!base).then_some(r.peak_rss_bytes as f64 / 1e6), |v| {
                format!("{v:.1}")
            }),
            d.map_or("-".into(), |d| {
                let spread = (d.repeats > 1).then_some(d.decode_spread);
                speed(d.decode_ms_per_token, 1, spread, d.load.as_ref())
            }),
            d.map_or("-".into(), |d| {
                let spread = (d.repeats > 1).then_some(d.prefill_spread);
                speed(d.prefill_tokens_per_s, 0, spread, d.load.as_ref())
            }),
            d.map_or("-".into(), |d| d.backend.clone()),
            if r.cached { "cached" } else { "" }.into(),
        ]
    });
    table(SUMMARY_HEAD, rows)
}

/// A speed figure: the value, the spread of its timed runs (slowest over fastest, as a
/// percentage) and, when it was measured under load, what the machine was doing.
fn speed(
    value: f64,
    digits: usize,
    spread: Option<f64>,
    load: Option<&shrink_core::MachineLoad>,
) -> String {
    let mut cell = format!("{value:.digits$}");
    if let Some(s) = spread {
        w!(cell, " (spread {:.0}%)", (s - 1.0) * 100.0);
    }
    if let Some(note) = load.and_then(|l| l.note()) {
        w!(cell, " ⚠ {note}");
    }
    cell
}

fn gates_table(report: &Report) -> Table {
    let rows = report.gates.iter().map(|g| {
        let result = if g.passed { "pass" } else { "FAIL" };
        vec![
            g.gate.clone(),
            g.model.clone(),
            num(g.limit),
            num(g.value),
            result.into(),
            g.message.clone(),
        ]
    });
    table("gate,model,limit,value,result,message", rows)
}

/// Each model's zero-shot task scores (`[eval] tasks`): accuracy and length-normalized accuracy
/// with their standard errors, and the drop below the baseline; `None` without tasks.
fn tasks_table(report: &Report) -> Option<Table> {
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .flat_map(|m| {
            m.tasks.iter().map(|t| {
                vec![
                    m.name.clone(),
                    t.task.clone(),
                    count(t.docs as u64),
                    format!("{:.2} ± {:.2}", t.acc * 100.0, t.acc_stderr * 100.0),
                    format!(
                        "{:.2} ± {:.2}",
                        t.acc_norm * 100.0,
                        t.acc_norm_stderr * 100.0
                    ),
                    opt(m.acc_norm_drop, |d| format!("{d:.2}")),
                ]
            })
        })
        .collect();
    (!rows.is_empty()).then(|| {
        table(
            "model,task,documents,acc %,acc_norm %,worst acc_norm drop (points)",
            rows,
        )
    })
}

/// The variants, then front members that are not variants (the baseline), so the whole front shows.
fn sweep_table(report: &Report) -> Table {
    let Some(s) = &report.sweep else {
        return table("variant", []);
    };
    let extra = s.pareto.iter().filter(|p| !s.variants.contains(p));
    let rows = s.variants.iter().chain(extra).map(|name| {
        let row = report.rows.iter().find(|r| r.name == *name);
        let front = if s.pareto.contains(name) {
            "✓ front"
        } else {
            ""
        };
        vec![
            name.clone(),
            row.and_then(|r| r.sweep_value.clone())
                .unwrap_or_else(|| "-".into()),
            row.map_or("-".into(), |r| mb(r.size_bytes)),
            row.map_or("-".into(), |r| format!("{:.3}", r.perplexity)),
            front.into(),
        ]
    });
    table("variant,value,size MB,ppl,Pareto", rows)
}

fn layer_table(stage: &StageLayers) -> Table {
    let rows = stage.layers.iter().enumerate().map(|(i, l)| {
        vec![
            i.to_string(),
            l.name.clone(),
            l.format.clone(),
            format!("{}×{}", l.shape[0], l.shape[1]),
            format!("{:.3}", l.bits_per_weight),
            opt(l.relative_output_error, |v| format!("{v:.3e}")),
            format!("{:.1}", l.sparsity * 100.0),
        ]
    });
    table("#,name,format,shape,bits/w,rel. error,sparsity %", rows)
}

/// One row per prompt, one column per model.
fn generations_table(report: &Report) -> Table {
    let cols = generation_columns(report);
    let head = std::iter::once("prompt")
        .chain(cols.iter().copied())
        .map(String::from)
        .collect();
    let rows = report.generations.iter().map(|g| {
        let out = |n: &&str| g.outputs.get(*n).cloned().unwrap_or_else(|| "-".into());
        std::iter::once(g.prompt.clone())
            .chain(cols.iter().map(out))
            .collect()
    });
    Table {
        head,
        rows: rows.collect(),
    }
}

fn provenance(report: &Report) -> Vec<(String, String)> {
    let (p, m) = (&report.provenance, &report.provenance.machine);
    let mut v = vec![
        ("shrink version".into(), p.shrink_version.clone()),
        ("pipeline file".into(), report.pipeline_file.clone()),
        ("config sha256".into(), p.config_sha256.clone()),
    ];
    for i in &p.inputs {
        v.push((
            format!("input: {}", i.role),
            format!("{} (sha256 {})", i.path, i.sha256),
        ));
    }
    let gb = m.memory_bytes as f64 / 1e9;
    let machine = format!(
        "{} · {}/{} · {} · {} cores · {gb:.1} GB",
        m.hostname, m.os, m.arch, m.cpu, m.cores
    );
    v.extend([
        ("seed".into(), p.seed.to_string()),
        ("machine".into(), machine),
        ("date (UTC)".into(), p.date_utc.clone()),
        ("command".into(), p.command.clone()),
    ]);
    v
}

/// Rows that produced generations, in run order, then any output names without a row.
fn generation_columns(report: &Report) -> Vec<&str> {
    let keys = || {
        report
            .generations
            .iter()
            .flat_map(|g| g.outputs.keys().map(String::as_str))
    };
    let mut cols: Vec<&str> = report
        .rows
        .iter()
        .map(|r| r.name.as_str())
        .filter(|n| keys().any(|k| k == *n))
        .collect();
    for k in keys() {
        if !cols.contains(&k) {
            cols.push(k);
        }
    }
    cols
}

fn status_line(report: &Report) -> String {
    let failed: Vec<String> = report
        .gates
        .iter()
        .filter(|g| !g.passed)
        .map(|g| format!("{} on {} ({})", g.gate, g.model, g.message))
        .collect();
    match (report.gates.len(), failed.len()) {
        (0, _) => "no gates configured".into(),
        (n, 0) => format!("PASS — all {n} gates passed"),
        (n, k) => format!("FAIL — {k} of {n} gates failed: {}", failed.join("; ")),
    }
}

fn meta_line(r: &Report) -> String {
    let e = &r.eval;
    let exported = if r.exported.is_empty() {
        "-".into()
    } else {
        r.exported.join(", ")
    };
    format!(
        "pipeline {} · eval on {} ({}) · wall {:.1} s · exported: {exported}",
        r.pipeline_file,
        e.text,
        match e.sentences {
            Some(n) => format!("sentence embeddings of {n} sentences"),
            None => format!(
                "{}, ctx {}, {} chunks, {} tokens{}",
                e.protocol,
                e.ctx,
                e.chunks,
                e.tokens_scored,
                if e.block_by_block {
                    ", block by block: no generations, decode speed of GGUFs only"
                } else {
                    ""
                }
            ),
        },
        r.wall_s
    )
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn count(n: u64) -> String {
    let x = n as f64;
    match n {
        1_000_000_000.. => format!("{:.2}B", x / 1e9),
        1_000_000.. => format!("{:.1}M", x / 1e6),
        1_000.. => format!("{:.1}k", x / 1e3),
        _ => n.to_string(),
    }
}

/// Up to four decimals without trailing zeros, so a limit of `3` reads `3`.
fn num(v: f64) -> String {
    let s = format!("{v:.4}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

/// Markdown text on one line; `<` is escaped because renderers would take `<name>` for HTML.
fn one_line(s: &str) -> String {
    md_text(s, " ")
}

// ---- SVG charts: a 900 px wide plot area framed by these margins ----

/// A search stage's verdict line.
fn search_line(s: &SearchSection) -> String {
    let verdict = if s.met {
        "met"
    } else {
        "NOT met (best effort written)"
    };
    let sens = if s.sensitivity_cached {
        "sensitivity from the cache".to_string()
    } else {
        format!("sensitivity measured in {:.0} s", s.sensitivity_s)
    };
    format!(
        "Budget {}: {verdict}. Wrote round {} of {} verified; stopped at {}; {sens}.",
        s.goal,
        s.best_round,
        s.rounds.len(),
        s.stopped
    )
}

/// Every verified round of a search stage.
fn search_table(s: &SearchSection) -> Table {
    let rows = s.rounds.iter().map(|r| {
        let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
        let mark = match (r.round == s.best_round, r.pareto) {
            (true, _) => "written",
            (false, true) => "front",
            _ => "",
        };
        vec![
            r.round.to_string(),
            types.join(" "),
            format!("{:.3}", r.size_bytes as f64 / 1e6),
            format!("{:.3}", r.bits_per_weight),
            format!("{:.5}", r.predicted_kl),
            format!("{:.5}", r.kl),
            format!("{:+.2}", r.ppl_increase_pct),
            if r.met { "yes" } else { "no" }.into(),
            mark.into(),
        ]
    });
    table(
        "round,types,size MB,bits/w (searched),predicted KL,KL,ppl %,meets budget,",
        rows,
    )
}
