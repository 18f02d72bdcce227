//! `report.md`: GitHub-flavoured tables, the long per-layer tables last.

use super::*;

pub fn to_markdown(report: &Report) -> String {
    let mut o = format!("# {}\n\n", one_line(&report.name));
    if let Some(d) = &report.description {
        w!(o, "{d}\n\n");
    }
    let (status, meta) = (one_line(&status_line(report)), one_line(&meta_line(report)));
    w!(o, "**Status:** {status}\n\n{meta}\n\n## Models\n\n");
    md_table(&mut o, &summary_table(report));
    if let Some(t) = tasks_table(report) {
        o.push_str("\n## Tasks (zero-shot)\n\n");
        md_table(&mut o, &t);
    }
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

pub(super) fn md_text(s: &str, newline: &str) -> String {
    let s = s.replace('<', "\\<").replace("\r\n", newline);
    s.replace(['\n', '\r'], newline)
}

pub(super) fn md_table(o: &mut String, t: &Table) {
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
pub(super) fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat((longest + 1).max(3));
    format!("{fence}text\n{}\n{fence}\n", text.trim_end_matches('\n'))
}
