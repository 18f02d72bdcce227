//! `report.html`: one self-contained page (inline CSS, no scripts or external resources).

use super::*;

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
    if let Some(t) = tasks_table(report) {
        o.push_str("<h2>Tasks (zero-shot)</h2>\n");
        html_table(&mut o, "num", &t);
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

pub(super) const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}\
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

pub(super) fn esc(s: &str) -> String {
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

pub(super) fn html_table(o: &mut String, class: &str, t: &Table) {
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
