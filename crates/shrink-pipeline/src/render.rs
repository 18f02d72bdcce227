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

const SUMMARY_HEAD: &str = "model,kind,ppl ± se,Δppl %,KL,top-1 %,emb cos,top-10 %,size MB,bits/w,params,\
    shape,sparsity %,compr. ×,eval tok/s,stage s,peak RSS MB,decode ms/tok,prefill tok/s,backend,cached";
/// One colour per linear role (`shrink_models::Role::ALL`), then one for anything else (`lm_head`); also the palette
/// of loss curves.
const COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c9c9c",
];

pub fn to_markdown(report: &Report) -> String {
    let mut o = format!("# {}\n\n", one_line(&report.name));
    if let Some(d) = &report.description {
        w!(o, "{d}\n\n");
    }
    let (status, meta) = (one_line(&status_line(report)), one_line(&meta_line(report)));
    w!(o, "**Status:** {status}\n\n{meta}\n\n## Models\n\n");
    md_table(&mut o, &summary_table(report));
    if !report.gates.is_empty() {
        o.push_str("\n## Gates\n\n");
        md_table(&mut o, &gates_table(report));
    }
    if let Some(s) = &report.sweep {
        w!(
            o,
            "\n## Sweep of {}.{}\n\n",
            one_line(&s.stage),
            one_line(&s.key)
        );
        md_table(&mut o, &sweep_table(report));
    }
    for sec in &report.searches {
        w!(
            o,
            "\n## Search: {}\n\n{}\n\n",
            one_line(&sec.stage),
            one_line(&search_line(sec))
        );
        md_table(&mut o, &search_table(sec));
        let mut top: Vec<&(String, f64)> = sec.sensitivity.iter().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|(n, v)| format!("{n} ({v:.2e})"))
            .collect();
        w!(
            o,
            "\nMost sensitive in {}: {}\n",
            one_line(&sec.sensitivity_format),
            one_line(&top.join(", "))
        );
    }
    if !report.generations.is_empty() {
        o.push_str("\n## Generations\n");
        for (i, g) in report.generations.iter().enumerate() {
            w!(o, "\n### Prompt {}\n\n{}", i + 1, fenced(&g.prompt));
            for name in generation_columns(report) {
                let text = g.outputs.get(name).map_or("-", String::as_str);
                w!(o, "\n**{}**\n\n{}", one_line(name), fenced(text));
            }
        }
    }
    if !report.training.is_empty() {
        let rows = report.training.iter().map(|c| {
            let loss = |p: Option<&(u64, f64)>| p.map_or("-".into(), |p| format!("{:.4}", p.1));
            let (first, last) = (loss(c.points.first()), loss(c.points.last()));
            vec![c.stage.clone(), c.points.len().to_string(), first, last]
        });
        o.push_str("\n## Training\n\n");
        md_table(&mut o, &table("stage,points,first loss,last loss", rows));
    }
    o.push_str("\n## Provenance\n\n");
    for (k, v) in provenance(report) {
        w!(o, "- **{k}:** {}\n", one_line(&v));
    }
    for stage in &report.layers {
        let (name, n) = (one_line(&stage.stage), stage.layers.len());
        w!(o, "\n## Per-layer: {name} ({n} linears)\n\n");
        md_table(&mut o, &layer_table(stage));
    }
    o
}

pub fn to_html(report: &Report) -> String {
    let (name, meta) = (esc(&report.name), esc(&meta_line(report)));
    let mut o = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{name} — shrink report</title><style>{CSS}</style></head><body><main>\n\
         <h1>{name}</h1>\n"
    );
    if let Some(d) = &report.description {
        w!(o, "<p>{}</p>\n", esc(d));
    }
    let failed: Vec<_> = report.gates.iter().filter(|g| !g.passed).collect();
    let (class, mut banner) = match (report.gates.len(), failed.len()) {
        (0, _) => ("none", "No gates configured".to_string()),
        (n, 0) => ("pass", format!("PASS — all {n} gates passed")),
        (n, k) => ("fail", format!("FAIL — {k} of {n} gates failed<ul>")),
    };
    for g in &failed {
        let (gate, model, msg) = (esc(&g.gate), esc(&g.model), esc(&g.message));
        w!(banner, "<li><b>{gate}</b> on {model}: {msg}</li>");
    }
    if !failed.is_empty() {
        banner.push_str("</ul>");
    }
    w!(
        o,
        "<p class=\"meta\">{meta}</p>\n<div class=\"status {class}\">{banner}</div>\n"
    );
    o.push_str("<h2>Models</h2>\n");
    html_table(&mut o, "num", &summary_table(report));
    o.push_str("<h2>Charts</h2>\n");
    match scatter_chart(report) {
        Some(svg) => w!(o, "<h3>Size vs perplexity</h3>\n{svg}"),
        None => o.push_str("<p>No finite size/perplexity points to plot.</p>\n"),
    }
    if let Some(svg) = loss_chart(report) {
        w!(o, "<h3>Training loss</h3>\n{svg}");
    }
    if !report.gates.is_empty() {
        o.push_str("<h2>Gates</h2>\n");
        html_table(&mut o, "", &gates_table(report));
    }
    if let Some(s) = &report.sweep {
        w!(o, "<h2>Sweep of {}.{}</h2>\n", esc(&s.stage), esc(&s.key));
        html_table(&mut o, "num", &sweep_table(report));
    }
    for sec in &report.searches {
        w!(
            o,
            "<h2>Search: {}</h2>\n<p>{}</p>\n",
            esc(&sec.stage),
            esc(&search_line(sec))
        );
        html_table(&mut o, "num", &search_table(sec));
        o.push_str(&sensitivity_chart(sec).unwrap_or_default());
    }
    if !report.generations.is_empty() {
        o.push_str("<h2>Generations</h2>\n");
        html_table(&mut o, "gen", &generations_table(report));
    }
    if !report.layers.is_empty() {
        o.push_str("<h2>Per-layer</h2>\n");
    }
    for stage in &report.layers {
        w!(o, "<h3>{}</h3>\n", esc(&stage.stage));
        o.push_str(&error_chart(stage).unwrap_or_default());
        w!(
            o,
            "<details><summary>{} linears</summary>\n",
            stage.layers.len()
        );
        html_table(&mut o, "num", &layer_table(stage));
        o.push_str("</details>\n");
    }
    o.push_str("<h2>Provenance</h2>\n<table class=\"prov\">");
    for (k, v) in provenance(report) {
        w!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&v));
    }
    o.push_str("</table>\n</main></body></html>\n");
    o
}

const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}\
main{max-width:1200px;margin:0 auto;padding:12px 24px 40px}h1{margin:.3em 0}.meta{color:#57606a}\
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}\
.status{padding:10px 14px;border-radius:6px;font-weight:600}.status ul{margin:.4em 0 0;font-weight:400}\
.pass{background:#dafbe1;border:1px solid #1a7f37;color:#116329}\
.fail{background:#ffebe9;border:1px solid #cf222e;color:#82071e}\
.none{background:#f6f8fa;border:1px solid #d0d7de}.scroll{overflow-x:auto}\
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;padding:3px 7px;vertical-align:top}\
th{background:#f6f8fa;text-align:left}table.num{font-size:12.5px}table.num td,table.num th{padding:3px 5px}\
table.num td{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}\
table.num td:nth-child(-n+2){text-align:left;white-space:normal}\
table.gen td{white-space:pre-wrap;font:12px/1.4 ui-monospace,monospace;min-width:12em}\
table.prov td{font:12px ui-monospace,monospace;word-break:break-all}\
details{margin:4px 0 16px}summary{cursor:pointer;color:#0969da}\
svg{max-width:100%;height:auto;display:block;margin:8px 0}svg text{font:11px system-ui,sans-serif;fill:#333}";

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
            format!("{:.0}", r.eval_tokens_per_s),
            opt((!base).then_some(r.stage_wall_s), |v| format!("{v:.1}")),
            opt((!base).then_some(r.peak_rss_bytes as f64 / 1e6), |v| {
                format!("{v:.1}")
            }),
            opt(d.map(|d| d.decode_ms_per_token), |v| format!("{v:.1}")),
            opt(d.map(|d| d.prefill_tokens_per_s), |v| format!("{v:.0}")),
            d.map_or("-".into(), |d| d.backend.clone()),
            if r.cached { "cached" } else { "" }.into(),
        ]
    });
    table(SUMMARY_HEAD, rows)
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
                "{}, ctx {}, {} chunks, {} tokens",
                e.protocol, e.ctx, e.chunks, e.tokens_scored
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

fn md_text(s: &str, newline: &str) -> String {
    let s = s.replace('<', "\\<").replace("\r\n", newline);
    s.replace(['\n', '\r'], newline)
}

fn md_table(o: &mut String, t: &Table) {
    w!(
        o,
        "| {} |\n|{}\n",
        t.head.join(" | "),
        "---|".repeat(t.head.len())
    );
    for row in &t.rows {
        let cells: Vec<String> = row
            .iter()
            .map(|c| md_text(c, "↵").replace('|', "\\|"))
            .collect();
        w!(o, "| {} |\n", cells.join(" | "));
    }
}

/// A fence longer than any backtick run inside, so generated text cannot close it early.
fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat((longest + 1).max(3));
    format!("{fence}text\n{}\n{fence}\n", text.trim_end_matches('\n'))
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

fn html_table(o: &mut String, class: &str, t: &Table) {
    w!(
        o,
        "<div class=\"scroll\"><table class=\"{class}\"><thead><tr>"
    );
    for h in &t.head {
        w!(o, "<th>{}</th>", esc(h));
    }
    o.push_str("</tr></thead><tbody>\n");
    for row in &t.rows {
        o.push_str("<tr>");
        for c in row {
            w!(o, "<td>{}</td>", esc(c));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody></table></div>\n");
}

// ---- SVG charts: a 900 px wide plot area framed by these margins ----

const W: f64 = 900.0;
const ML: f64 = 72.0;
const MR: f64 = 24.0;
const MT: f64 = 36.0;
const MB: f64 = 46.0;

/// An SVG coordinate. Callers only map finite values; mapping anything else to 0 is a backstop
/// that keeps `NaN` out of the markup.
struct C(f64);

impl Display for C {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}",
            if self.0.is_finite() {
                self.0 + 0.0
            } else {
                0.0
            }
        )
    }
}

/// A value→pixel mapping; `p0` is the pixel of `lo`.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    /// Tick spacing: in values when linear, in decades when logarithmic.
    step: f64,
    p0: f64,
    p1: f64,
}

impl Axis {
    /// Spans the finite `vals`; logarithmic when the positive ones cover more than two decades,
    /// since a few bad layers would otherwise flatten all the others.
    fn fit(vals: impl Iterator<Item = f64>, from_zero: bool, p0: f64, p1: f64) -> Option<Axis> {
        let v: Vec<f64> = vals.filter(|v| v.is_finite()).collect();
        let (mut lo, mut hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let pos_min = v
            .iter()
            .fold(f64::MAX, |a, &x| if x > 0.0 { a.min(x) } else { a });
        let log = pos_min < f64::MAX && hi / pos_min > 100.0;
        let step = if log {
            let (a, b) = (pos_min.log10().floor(), hi.log10().ceil());
            (lo, hi) = (10f64.powf(a), 10f64.powf(b));
            ((b - a) / 8.0).ceil().max(1.0)
        } else {
            if from_zero {
                lo = lo.min(0.0);
            }
            if hi - lo <= hi.abs().max(lo.abs()) * 1e-9 {
                // All values equal: widen around them so the scale has a non-zero span.
                let d = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
                (lo, hi) = (lo - d, hi + d);
            }
            // Keep points off the frame, except at a zero origin.
            let pad = (hi - lo) * 0.05;
            lo -= if from_zero && lo == 0.0 { 0.0 } else { pad };
            hi += pad;
            let step = nice_step((hi - lo) / 5.0);
            (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
            step
        };
        let ok = !v.is_empty() && lo.is_finite() && hi.is_finite() && hi > lo;
        ok.then_some(Axis {
            lo,
            hi,
            log,
            step,
            p0,
            p1,
        })
    }

    /// Bar slots 0..n centred on integer ticks.
    fn index(n: usize, p0: f64, p1: f64) -> Axis {
        let step = nice_step(n as f64 / 8.0).max(1.0);
        Axis {
            lo: -0.5,
            hi: n as f64 - 0.5,
            log: false,
            step,
            p0,
            p1,
        }
    }

    fn plottable(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    fn map(&self, v: f64) -> f64 {
        let t = match self.log {
            true => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
            false => (v - self.lo) / (self.hi - self.lo),
        };
        self.p0 + t.clamp(-0.05, 1.05) * (self.p1 - self.p0)
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        if self.log {
            let a = self.lo.log10().round() as i32;
            let b = self.hi.log10().round() as i32;
            let label = |k: i32| match k {
                -2..=3 => format!("{}", 10f64.powi(k)),
                _ => format!("1e{k}"),
            };
            return (a..=b)
                .step_by(self.step as usize)
                .map(|k| (10f64.powi(k), label(k)))
                .collect();
        }
        let decimals = (-self.step.log10().floor()).clamp(0.0, 9.0) as usize;
        let first = (self.lo / self.step - 1e-9).ceil() as i64;
        let last = (self.hi / self.step + 1e-9).floor() as i64;
        let tick = |v: f64| (v, format!("{:.*}", decimals, v + 0.0));
        (first..=last.min(first + 50))
            .map(|i| tick(i as f64 * self.step))
            .collect()
    }
}

fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let e = 10f64.powf(raw.log10().floor());
    let m = [1.0, 2.0, 5.0].into_iter().find(|&m| raw / e <= m);
    m.unwrap_or(10.0) * e
}

/// Opens the `<svg>` and draws grid, ticks, frame and axis titles.
fn frame(h: f64, title: &str, x: &Axis, y: &Axis, x_title: &str, y_title: &str) -> String {
    let title = esc(title);
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" \
         viewBox=\"0 0 {W} {h}\" role=\"img\"><title>{title}</title>\n"
    );
    let (l, r, b, t, lx) = (C(x.p0), C(x.p1), C(y.p0), C(y.p1), C(x.p0 - 6.0));
    for (v, label) in y.ticks() {
        let (py, ty) = (C(y.map(v)), C(y.map(v) + 4.0));
        w!(
            o,
            "<line x1=\"{l}\" y1=\"{py}\" x2=\"{r}\" y2=\"{py}\" stroke=\"#e5e7eb\"/>\
             <text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>\n"
        );
    }
    let (b5, b17) = (C(y.p0 + 5.0), C(y.p0 + 17.0));
    for (v, label) in x.ticks() {
        let px = C(x.map(v));
        w!(
            o,
            "<line x1=\"{px}\" y1=\"{b}\" x2=\"{px}\" y2=\"{b5}\" stroke=\"#555\"/>\
             <text x=\"{px}\" y=\"{b17}\" text-anchor=\"middle\">{label}</text>\n"
        );
    }
    let (cx, tb) = (C((x.p0 + x.p1) / 2.0), C(y.p0 + 36.0));
    let (yl, cy) = (C(x.p0 - 54.0), C((y.p0 + y.p1) / 2.0));
    let (xt, yt) = (esc(x_title), esc(y_title));
    let log = if y.log { " (log scale)" } else { "" };
    w!(
        o,
        "<path d=\"M{l} {t}V{b}H{r}\" fill=\"none\" stroke=\"#555\"/>\n\
         <text x=\"{cx}\" y=\"{tb}\" text-anchor=\"middle\">{xt}</text>\n\
         <text transform=\"translate({yl},{cy}) rotate(-90)\" text-anchor=\"middle\">{yt}{log}</text>\n"
    );
    o
}

/// A row of legend entries in the top margin (each mark is SVG drawn around (0, 0)), then `</svg>`.
fn close_with_legend(o: &mut String, items: &[(String, String)]) {
    let mut x = ML + 6.0;
    for (mark, label) in items {
        w!(
            o,
            "<g transform=\"translate({},14)\">{mark}<text x=\"10\" y=\"4\">{}</text></g>\n",
            C(x),
            esc(label)
        );
        x += 28.0 + 6.5 * label.chars().count() as f64;
    }
    o.push_str("</svg>\n");
}

fn square(colour: &str) -> String {
    format!("<rect x=\"-5\" y=\"-5\" width=\"10\" height=\"10\" fill=\"{colour}\"/>")
}

fn stroke(colour: &str) -> String {
    format!("<line x1=\"-6\" x2=\"6\" stroke=\"{colour}\" stroke-width=\"2\"/>")
}

fn scatter_chart(report: &Report) -> Option<String> {
    let h = 420.0;
    let xy = |r: &ModelRow| (r.size_bytes as f64 / 1e6, r.perplexity);
    // Only points with both coordinates finite may stretch the axes.
    let finite: Vec<_> = report
        .rows
        .iter()
        .map(xy)
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let x = Axis::fit(finite.iter().map(|p| p.0), true, ML, W - MR)?;
    let y = Axis::fit(finite.iter().map(|p| p.1), false, h - MB, MT)?;
    let pts: Vec<(&ModelRow, f64, f64)> = (report.rows.iter())
        .filter(|r| x.plottable(xy(r).0) && y.plottable(xy(r).1))
        .map(|r| (r, x.map(xy(r).0), y.map(xy(r).1)))
        .collect();
    let mut o = frame(h, "Size vs perplexity", &x, &y, "size (MB)", "perplexity");
    let mut legend = vec![(square("#111"), "baseline".to_string())];
    if pts.iter().any(|p| p.0.kind != "baseline") {
        legend.push((
            "<circle r=\"5\" fill=\"#4e79a7\"/>".into(),
            "compressed".into(),
        ));
    }
    if let Some(s) = &report.sweep {
        let on_front = s
            .pareto
            .iter()
            .filter_map(|n| pts.iter().find(|p| p.0.name == *n));
        let line: Vec<String> = on_front.map(|p| format!("{},{}", C(p.1), C(p.2))).collect();
        let line = line.join(" ");
        w!(
            o,
            "<polyline points=\"{line}\" fill=\"none\" stroke=\"#e15759\" stroke-width=\"2\"/>\n"
        );
        legend.push((stroke("#e15759"), "Pareto front".into()));
    }
    // Models of near-identical size and quality would overprint their labels: nudge each label
    // down or up until it clears the ones already placed.
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    for &(r, px, py) in &pts {
        let (cx, cy, sx, sy) = (C(px), C(py), C(px - 5.0), C(py - 5.0));
        match r.kind.as_str() {
            "baseline" => w!(
                o,
                "<rect x=\"{sx}\" y=\"{sy}\" width=\"10\" height=\"10\" fill=\"#111\"/>"
            ),
            _ => w!(
                o,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"5\" fill=\"#4e79a7\"/>"
            ),
        }
        let width = 6.5 * r.name.chars().count() as f64;
        let left = px + 8.0 + width > W - MR;
        let (x0, tx, anchor) = match left {
            true => (px - 8.0 - width, px - 8.0, "end"),
            false => (px + 8.0, px + 8.0, "start"),
        };
        let clear = |ly: &f64| {
            !placed
                .iter()
                .any(|&(bx, by, bw)| x0 < bx + bw && bx < x0 + width && (ly - by).abs() < 12.0)
        };
        let offsets = [0.0, 13.0, -13.0, 26.0, -26.0, 39.0, -39.0].map(|d| py + 4.0 + d);
        let ly = offsets.into_iter().find(clear).unwrap_or(py + 4.0);
        placed.push((x0, ly, width));
        let (tx, ty, name) = (C(tx), C(ly), esc(&r.name));
        w!(
            o,
            "<text x=\"{tx}\" y=\"{ty}\" text-anchor=\"{anchor}\">{name}</text>\n"
        );
    }
    close_with_legend(&mut o, &legend);
    Some(o)
}

/// Index into `Role::ALL` (or past its end for other linears) from a weight name in any family,
/// such as `model.layers.3.self_attn.q_proj.weight` or `encoder.layer.0.output.dense.weight`.
fn linear_kind(name: &str) -> usize {
    Role::of_name(name).map_or(Role::ALL.len(), |r| r as usize)
}

fn error_chart(stage: &StageLayers) -> Option<String> {
    let bars: Vec<(String, Option<f64>)> = stage
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.relative_output_error))
        .collect();
    let title = format!("Relative output error per layer — {}", stage.stage);
    bar_chart(&title, "relative output error", &bars)
}

/// One bar per linear (in table order), coloured by its role; non-finite values are left out.
fn bar_chart(title: &str, y_title: &str, bars: &[(String, Option<f64>)]) -> Option<String> {
    let h = 300.0;
    let values = bars.iter().map(|b| b.1.filter(|v| v.is_finite()));
    let y = Axis::fit(values.clone().flatten(), true, h - MB, MT)?;
    let x = Axis::index(bars.len(), ML, W - MR);
    let mut o = frame(h, title, &x, &y, "layer (table order)", y_title);
    let slot = (x.p1 - x.p0) / bars.len() as f64;
    let (bw, base) = (
        C((slot * 0.8).max(0.8)),
        y.map(if y.log { y.lo } else { 0.0 }),
    );
    let mut kinds = [false; 8];
    for (i, ((name, _), e)) in bars.iter().zip(values).enumerate() {
        let Some(e) = e.filter(|&e| y.plottable(e)) else {
            continue;
        };
        let kind = linear_kind(name);
        kinds[kind] = true;
        let (bx, by, bh) = (
            C(x.map(i as f64) - slot * 0.4),
            C(y.map(e).min(base)),
            C((base - y.map(e)).abs()),
        );
        let (colour, name) = (COLOURS[kind], esc(name));
        w!(
            o,
            "<rect x=\"{bx}\" y=\"{by}\" width=\"{bw}\" height=\"{bh}\" fill=\"{colour}\">\
             <title>{i} {name}: {e:.3e}</title></rect>\n"
        );
    }
    let names = Role::ALL.iter().map(|r| r.short_name()).chain(["other"]);
    let legend: Vec<_> = (names.zip(COLOURS).zip(kinds))
        .filter(|x| x.1)
        .map(|((name, colour), _)| (square(colour), name.to_string()))
        .collect();
    close_with_legend(&mut o, &legend);
    Some(o)
}

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

fn sensitivity_chart(s: &SearchSection) -> Option<String> {
    let bars: Vec<(String, Option<f64>)> = s
        .sensitivity
        .iter()
        .map(|(n, v)| (n.clone(), Some(*v)))
        .collect();
    let title = format!(
        "Sensitivity — {}: KL with only this tensor in {}",
        s.stage, s.sensitivity_format
    );
    bar_chart(&title, "KL (nats/token)", &bars)
}

fn loss_chart(report: &Report) -> Option<String> {
    let h = 320.0;
    let pts = || report.training.iter().flat_map(|c| c.points.iter());
    let x = Axis::fit(pts().map(|p| p.0 as f64), true, ML, W - MR)?;
    let y = Axis::fit(pts().map(|p| p.1), false, h - MB, MT)?;
    let mut o = frame(h, "Training loss", &x, &y, "step", "loss");
    let mut legend = Vec::new();
    for (c, colour) in report.training.iter().zip(COLOURS.iter().cycle()) {
        let finite = c.points.iter().filter(|p| y.plottable(p.1));
        let line: Vec<String> = finite
            .map(|p| format!("{},{}", C(x.map(p.0 as f64)), C(y.map(p.1))))
            .collect();
        let line = line.join(" ");
        w!(o, "<polyline points=\"{line}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>\n");
        legend.push((stroke(colour), c.stage.clone()));
    }
    close_with_legend(&mut o, &legend);
    Some(o)
}

#[cfg(test)]
mod tests {
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
}
