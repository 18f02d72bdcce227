//! The hand-drawn SVG charts of `report.html`: axes, scatter, bars and lines.

use super::*;

pub(super) const W: f64 = 900.0;

pub(super) const ML: f64 = 72.0;

pub(super) const MR: f64 = 24.0;

pub(super) const MT: f64 = 36.0;

pub(super) const MB: f64 = 46.0;

/// An SVG coordinate. Callers only map finite values; mapping anything else to 0 is a backstop
/// that keeps `NaN` out of the markup.
pub(super) struct C(f64);

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
pub(super) struct Axis {
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) log: bool,
    /// Tick spacing: in values when linear, in decades when logarithmic.
    pub(super) step: f64,
    p0: f64,
    p1: f64,
}

impl Axis {
    /// Spans the finite `vals`; logarithmic when the positive ones cover more than two decades,
    /// since a few bad layers would otherwise flatten all the others.
    pub(super) fn fit(
        vals: impl Iterator<Item = f64>,
        from_zero: bool,
        p0: f64,
        p1: f64,
    ) -> Option<Axis> {
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
    pub(super) fn index(n: usize, p0: f64, p1: f64) -> Axis {
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

    pub(super) fn plottable(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    pub(super) fn map(&self, v: f64) -> f64 {
        let t = match self.log {
            true => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
            false => (v - self.lo) / (self.hi - self.lo),
        };
        self.p0 + t.clamp(-0.05, 1.05) * (self.p1 - self.p0)
    }

    pub(super) fn ticks(&self) -> Vec<(f64, String)> {
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

pub(super) fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let e = 10f64.powf(raw.log10().floor());
    let m = [1.0, 2.0, 5.0].into_iter().find(|&m| raw / e <= m);
    m.unwrap_or(10.0) * e
}

/// Opens the `<svg>` and draws grid, ticks, frame and axis titles.
pub(super) fn frame(
    h: f64,
    title: &str,
    x: &Axis,
    y: &Axis,
    x_title: &str,
    y_title: &str,
) -> String {
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
pub(super) fn close_with_legend(o: &mut String, items: &[(String, String)]) {
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

pub(super) fn square(colour: &str) -> String {
    format!("<rect x=\"-5\" y=\"-5\" width=\"10\" height=\"10\" fill=\"{colour}\"/>")
}

pub(super) fn stroke(colour: &str) -> String {
    format!("<line x1=\"-6\" x2=\"6\" stroke=\"{colour}\" stroke-width=\"2\"/>")
}

pub(super) fn scatter_chart(report: &Report) -> Option<String> {
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
pub(super) fn linear_kind(name: &str) -> usize {
    Role::of_name(name).map_or(Role::ALL.len(), |r| r as usize)
}

pub(super) fn error_chart(stage: &StageLayers) -> Option<String> {
    let bars: Vec<(String, Option<f64>)> = stage
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.relative_output_error))
        .collect();
    let title = format!("Relative output error per layer — {}", stage.stage);
    bar_chart(&title, "relative output error", &bars)
}

/// One bar per linear (in table order), coloured by its role; non-finite values are left out.
pub(super) fn bar_chart(
    title: &str,
    y_title: &str,
    bars: &[(String, Option<f64>)],
) -> Option<String> {
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

pub(super) fn sensitivity_chart(s: &SearchSection) -> Option<String> {
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

pub(super) fn loss_chart(report: &Report) -> Option<String> {
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
