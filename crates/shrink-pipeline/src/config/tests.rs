use super::locate::levenshtein;
use super::*;

const GOOD: &str = r#"name = "w4"
seed = 0

[model]
source = "smollm2"

[data]
calib = "shakespeare:calib"
samples = 16

[[stage]]
kind = "quantize.gptq"
preset = "q4_k_m"
damp = 0.01

[[stage]]
kind = "quantize.rtn"
name = "q8"
input = "model"
format = "q8_0"

[eval]
chunks = 8

[gates]
max_ppl_increase_pct = 5.0
"#;

fn err(text: &str) -> String {
    parse(text, "p.toml").unwrap_err().to_string()
}

#[test]
fn a_good_pipeline_plans_its_stages() {
    let p = parse(GOOD, "p.toml").unwrap();
    let plan = p.plan();
    assert_eq!(plan.len(), 2);
    assert_eq!(
        (plan[0].name.as_str(), plan[0].input.as_str()),
        ("quantize.gptq", "model")
    );
    assert_eq!(
        (plan[1].name.as_str(), plan[1].input.as_str()),
        ("q8", "model")
    );
    assert!(plan[0].calibrates && !plan[1].calibrates);
    assert_eq!(p.data.seq_len, 512, "defaults fill what is not given");
    assert_eq!(p.eval.chunks, 8);
    // SmolLM2: 134.5M parameters, width 576, MLP 1536, 16 × 512 calibration tokens (the default
    // pipeline, with 128 × 512, measured 2.18 GB when its GPTQ stage held the model whole).
    let gb = p.estimated_peak_bytes(134_515_008, 576, 1536, 49_152) as f64 / 1e9;
    assert!((2.2..2.8).contains(&gb), "{gb}");
}

#[test]
fn every_kind_of_mistake_is_one_positioned_message() {
    // Unknown key, with a suggestion, at the key's own line.
    let e = err(&GOOD.replace("damp = 0.01", "dmap = 0.01"));
    assert!(
        e.starts_with("p.toml:14:1: unknown key `dmap`; did you mean `damp`?"),
        "{e}"
    );
    let e = err(&GOOD.replace("[eval]\nchunks", "[eval]\nchunk"));
    assert!(
        e.starts_with("p.toml:23:1: unknown key `chunk`; did you mean `chunks`?"),
        "{e}"
    );
    // Wrong type.
    let e = err(&GOOD.replace("samples = 16", "samples = \"many\""));
    assert!(
        e.starts_with("p.toml:9:11: invalid type: string \"many\", expected usize"),
        "{e}"
    );
    // Missing field.
    let e = err(&GOOD.replace("source = \"smollm2\"\n", ""));
    assert!(e.contains("missing field `source`"), "{e}");
    // Unknown stage kind.
    let e = err(&GOOD.replace("quantize.gptq", "quantize.gpt"));
    assert!(
        e.starts_with("p.toml:12:")
            && e.contains("unknown stage kind `quantize.gpt`; did you mean `quantize.gptq`?"),
        "{e}"
    );
    // Bad value range.
    let e = err(&GOOD.replace("damp = 0.01", "damp = 3.0"));
    assert!(
        e.starts_with("p.toml:14:1: damp = 3 is outside 0..=1"),
        "{e}"
    );
    let e = err(&GOOD.replace("max_ppl_increase_pct = 5.0", "max_ppl_increase_pct = -1.0"));
    assert!(
        e.starts_with("p.toml:26:1: max_ppl_increase_pct = -1"),
        "{e}"
    );
    // A stage whose input does not exist.
    let e = err(&GOOD.replace("input = \"model\"", "input = \"gptq\""));
    assert!(
        e.starts_with("p.toml:19:1: input `gptq` is not the model or an earlier stage"),
        "{e}"
    );
    // A key that does not apply to the kind, an unknown preset, a bad block type.
    let e = err(&GOOD.replace("format = \"q8_0\"", "format = \"q8_0\"\nalpha = 0.5"));
    assert!(
        e.starts_with("p.toml:21:1: `alpha` does not apply to a quantize.rtn stage"),
        "{e}"
    );
    let e = err(&GOOD.replace("q4_k_m", "q4_k_x"));
    assert!(e.starts_with("p.toml:13:1: preset `q4_k_x`"), "{e}");
    let e = err(&GOOD.replace("\"q8_0\"", "\"q9_0\""));
    assert!(
        e.starts_with("p.toml:20:1: quantization scheme: unknown block type 'q9_0'"),
        "{e}"
    );
    // Duplicate stage names, no stages, syntax errors.
    let e = err(&GOOD.replace("name = \"q8\"", "name = \"quantize.gptq\""));
    assert!(e.contains("used twice"), "{e}");
    let e = err(&GOOD[..GOOD.find("[[stage]]").unwrap()]);
    assert!(e.contains("no [[stage]]"), "{e}");
    let e = err(&GOOD.replace("seed = 0", "seed = "));
    assert!(e.starts_with("p.toml:2:"), "{e}");
}

#[test]
fn typo_suggestions_only_when_close() {
    let expected: Vec<String> = ["preset", "format", "bits"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(closest("prest", &expected), Some("preset"));
    assert_eq!(closest("colour", &expected), None);
    assert_eq!(levenshtein("kitten", "sitting"), 3);
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
}

const SWEEP: &str = r#"name = "s"
[model]
source = "smollm2"
[[stage]]
kind = "quantize.gptq"
name = "gptq"
format = "q4_0"
[[stage]]
kind = "quantize.rtn"
name = "after"
format = "q8_0"
[[stage]]
kind = "quantize.rtn"
name = "side"
input = "model"
format = "q8_0"
[sweep]
stage = "gptq"
key = "format"
values = ["q4_0", "q5_0", "q8_0"]
"#;

#[test]
fn sweeps_branch_after_the_shared_stages() {
    let p = parse(SWEEP, "s.toml").unwrap();
    let names: Vec<(&str, &str)> = p
        .plan()
        .iter()
        .map(|s| (s.name.as_str(), s.input.as_str()))
        .collect();
    // q4_0 is what the pipeline runs already; "after" reads from the swept stage, "side" does not.
    assert_eq!(
        names,
        [
            ("gptq", "model"),
            ("after", "gptq"),
            ("side", "model"),
            ("gptq@format=q5_0", "model"),
            ("after@format=q5_0", "gptq@format=q5_0"),
            ("gptq@format=q8_0", "model"),
            ("after@format=q8_0", "gptq@format=q8_0"),
        ]
    );
    assert_eq!(p.main_chain().count(), 3);
    let crate::StageJob::Quantize(request) = &p.plan()[3].job else {
        panic!("a quantization stage")
    };
    assert_eq!(request.format.as_deref(), Some("q5_0"));
    assert_eq!(p.plan()[3].sweep_value.as_deref(), Some("format=q5_0"));

    let e = err(&SWEEP.replace("stage = \"gptq\"", "stage = \"gptpq\""));
    assert!(
        e.starts_with("p.toml:18:1: sweep stage `gptpq` is not a stage"),
        "{e}"
    );
    let e = err(&SWEEP.replace("key = \"format\"", "key = \"formt\""));
    assert!(
        e.starts_with("p.toml:19:1: cannot sweep `formt`") && e.contains("did you mean `format`?"),
        "{e}"
    );
    let e = err(&SWEEP.replace("\"q8_0\"]", "\"q9_0\"]"));
    assert!(
        e.starts_with("p.toml:20:1: format=q9_0: ") && e.contains("q9_0"),
        "{e}"
    );
    let e = err(&SWEEP.replace("key = \"format\"", "key = \"alpha\""));
    assert!(
        e.contains("cannot sweep `alpha` of a quantize.gptq stage"),
        "{e}"
    );
}

#[test]
fn exports_need_a_stage_that_writes_them() {
    let e = err(&format!("{GOOD}[export]\nformats = [\"gguf\", \"hf\"]\n"));
    assert!(
        e.starts_with("p.toml:28:1: no stage writes a hf model to export"),
        "{e}"
    );
    // Settings that cannot be combined are caught before anything runs.
    let e = err(&GOOD.replace("format = \"q8_0\"", "format = \"q8_0\"\nbits = 4"));
    assert!(e.contains("stage `q8`: bits/group (4 bits"), "{e}");
}

const PRUNE: &str = r#"name = "sparse"
[model]
source = "smollm2"

[[stage]]
kind = "prune.sparsegpt"
name = "sparse"
sparsity = "2:4"
overrides = { down_proj = 0.25 }

[[stage]]
kind = "quantize.gptq"
name = "q4"
format = "q4_0"

[[stage]]
kind = "prune.layers"
name = "shallow"
input = "model"
fraction = 0.25
criterion = "angular"

[[stage]]
kind = "quantize.rtn"
name = "shallow-q8"
format = "q8_0"
"#;

#[test]
fn prune_stages_plan_and_quantizing_a_sparse_model_keeps_its_mask() {
    let p = parse(PRUNE, "p.toml").unwrap();
    let plan = p.plan();
    let keep: Vec<Option<bool>> = plan
        .iter()
        .map(|s| match &s.job {
            StageJob::Quantize(r) => Some(r.keep_zeros),
            _ => None,
        })
        .collect();
    // GPTQ after SparseGPT keeps the zeros; RTN after depth pruning has none to keep.
    assert_eq!(keep, [None, Some(true), None, Some(false)]);
    assert!(plan[0].calibrates && plan[2].calibrates);
    let StageJob::Prune(r) = &plan[0].job else {
        panic!()
    };
    assert_eq!(r.sparsity.as_deref(), Some("2:4"));
    assert_eq!(r.overrides, [("down_proj".to_string(), "0.25".to_string())]);
    // An explicit keep_sparsity wins.
    let p = parse(
        &PRUNE.replace(
            "format = \"q4_0\"",
            "format = \"q4_0\"\nkeep_sparsity = false",
        ),
        "p.toml",
    )
    .unwrap();
    assert!(matches!(&p.plan()[1].job, StageJob::Quantize(r) if !r.keep_zeros));
    // Magnitude needs no calibration.
    let p = parse(
        &PRUNE.replace("prune.sparsegpt", "prune.magnitude"),
        "p.toml",
    )
    .unwrap();
    assert!(!p.plan()[0].calibrates);

    for (from, to, want) in [
        (
            "sparsity = \"2:4\"",
            "sparsity = \"5:4\"",
            "p.toml:8:1: sparsity '5:4'",
        ),
        (
            "sparsity = \"2:4\"",
            "sparsity = 1.5",
            "p.toml:8:1: sparsity '1.5'",
        ),
        (
            "fraction = 0.25",
            "fraction = 1.0",
            "p.toml:20:1: fraction = 1 is outside",
        ),
        (
            "criterion = \"angular\"",
            "criterion = \"cosine\"",
            "p.toml:21:1: criterion 'cosine'",
        ),
        (
            "criterion = \"angular\"",
            "importance = \"taylor2\"",
            "p.toml:21:1: importance 'taylor2'",
        ),
        (
            "fraction = 0.25",
            "sparsity = 0.25",
            "p.toml:20:1: `sparsity` does not apply to a prune.layers stage",
        ),
        (
            "sparsity = \"2:4\"",
            "sparsity = \"2:4\"\nfraction = 0.5",
            "p.toml:9:1: `fraction` does not apply to a prune.sparsegpt stage",
        ),
        (
            "sparsity = \"2:4\"",
            "sparsity = \"2:4\"\npreset = \"q4_0\"",
            "p.toml:9:1: `preset` does not apply to a prune.sparsegpt stage",
        ),
        (
            "sparsity = \"2:4\"",
            "sparsity = \"2:4\"\nglobal = true",
            "p.toml:9:1: `global` does not apply",
        ),
        ("overrides = { down_proj = 0.25 }", "", "stage `sparse`: "),
    ] {
        let text = PRUNE.replace(from, to);
        let text = if want.starts_with("stage") {
            text.replace("sparsity = \"2:4\"\n", "")
        } else {
            text
        };
        let e = err(&text);
        assert!(e.contains(want), "{to}: {e}");
    }
    // A sweep over a pruning stage's sparsity.
    let p = parse(
        &format!(
            "{PRUNE}\n[sweep]\nstage = \"sparse\"\nkey = \"sparsity\"\nvalues = [0.5, \"2:4\"]\n"
        ),
        "p.toml",
    )
    .unwrap();
    let names: Vec<&str> = p.plan().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "sparse",
            "q4",
            "shallow",
            "shallow-q8",
            "sparse@sparsity=0.5",
            "q4@sparsity=0.5"
        ]
    );
    assert!(matches!(&p.plan()[5].job, StageJob::Quantize(r) if r.keep_zeros));
}

const TRAINING: &str = r#"name = "d"
[model]
source = "smollm2"

[[stage]]
kind = "quantize.qat"
format = "q4_0"
learn_scales = false

[stage.train]
steps = 3
lr = 1e-4
"#;

#[test]
fn each_kind_reads_its_keys_with_every_error_at_its_value() {
    let p = parse(TRAINING, "t.toml").unwrap();
    let StageJob::Qat(r) = &p.plan()[0].job else {
        panic!("a QAT stage")
    };
    assert_eq!((r.train.steps, r.learn_scales), (3, false));
    // A type error inside a nested table points at the value, as toml's own errors do.
    let e = err(&TRAINING.replace("steps = 3", "steps = \"many\""));
    assert!(
        e.starts_with("p.toml:11:9: invalid type: string \"many\", expected u64"),
        "{e}"
    );
    let e = err(&TRAINING.replace("learn_scales = false", "learn_scales = \"no\""));
    assert!(
        e.starts_with("p.toml:8:16: invalid type: string \"no\", expected a boolean"),
        "{e}"
    );
    // An unknown key lists what this kind reads, not every kind's keys.
    let e = err(&TRAINING.replace("learn_scales", "learn_scale"));
    assert!(
        e.starts_with("p.toml:8:1: unknown key `learn_scale`; did you mean `learn_scales`?"),
        "{e}"
    );
    assert!(e.contains("learn_scales") && !e.contains("sparsity"), "{e}");
    // A key of another kind does not apply; a key inside [stage.train] is checked there.
    let e = err(&TRAINING.replace("learn_scales = false", "kv_groups = true"));
    assert!(
        e.starts_with("p.toml:8:1: `kv_groups` does not apply to a quantize.qat stage"),
        "{e}"
    );
    let e = err(&TRAINING.replace("lr = 1e-4", "lr = -1.0"));
    assert!(
        e.starts_with("p.toml:10:1: training: the learning rate must be positive"),
        "{e}"
    );
    // The kind itself must be a string naming a kind.
    let e = err(&TRAINING.replace("\"quantize.qat\"", "5"));
    assert!(
        e.starts_with("p.toml:6:8: invalid type: integer `5`, expected a string"),
        "{e}"
    );
    // Tables made by dotted keys (no place of their own in toml) read as [stage.train] does, and
    // their values keep their places.
    let dotted = TRAINING.replace(
        "\n[stage.train]\nsteps = 3\nlr = 1e-4\n",
        "train.steps = 3\n",
    );
    let p = parse(&dotted, "t.toml").unwrap();
    let StageJob::Qat(r) = &p.plan()[0].job else {
        panic!("a QAT stage")
    };
    assert_eq!(r.train.steps, 3);
    let e = err(&dotted.replace("train.steps = 3", "train.steps = \"many\""));
    assert!(
        e.starts_with("p.toml:9:15: invalid type: string \"many\", expected u64"),
        "{e}"
    );
    let e = err(&dotted.replace("train.steps = 3", "train.stepz = 3"));
    assert!(
        e.starts_with("p.toml:9:") && e.contains("unknown key `stepz`; did you mean `steps`?"),
        "{e}"
    );
}

#[test]
fn a_signround_stage_reads_its_steps_and_refuses_bad_ones_at_their_key() {
    let text = GOOD.replace(
        "kind = \"quantize.gptq\"\npreset = \"q4_k_m\"\ndamp = 0.01",
        "kind = \"quantize.signround\"\npreset = \"q2_k\"\nsteps = 50\nlr = 0.01",
    );
    let p = parse(&text, "p.toml").unwrap();
    let StageJob::Quantize(r) = &p.plan()[0].job else {
        panic!("a quantization stage")
    };
    assert_eq!(r.method, Some(crate::QuantMethod::SignRound));
    assert_eq!(
        r.signround,
        shrink_quant::SignRoundConfig {
            steps: 50,
            lr: Some(0.01),
            keep_zeros: false,
            gptq: None
        }
    );
    assert!(matches!(
        r.resolve().unwrap().method,
        shrink_quant::Method::SignRound(c) if c.steps == 50
    ));
    let e = err(&text.replace("steps = 50", "steps = 0"));
    assert!(
        e.starts_with("p.toml:14:1: steps = 0: SignRound needs at least one"),
        "{e}"
    );
    let e = err(&text.replace("lr = 0.01", "lr = 2.0"));
    assert!(
        e.starts_with("p.toml:15:1: lr = 2 is outside (0, 1]"),
        "{e}"
    );
    // GPTQ's settings apply only when it starts from GPTQ's codes.
    let e = err(&text.replace("lr = 0.01", "damp = 0.1"));
    assert!(e.contains("damp is a setting of GPTQ or RTN"), "{e}");
    let p = parse(
        &text.replace("lr = 0.01", "weights = \"gptq\"\ndamp = 0.1"),
        "p.toml",
    )
    .unwrap();
    let StageJob::Quantize(r) = &p.plan()[0].job else {
        panic!("a quantization stage")
    };
    assert!(matches!(
        r.resolve().unwrap().method,
        shrink_quant::Method::SignRound(c) if c.gptq.is_some_and(|g| g.damp == 0.1)
    ));
}

/// `search` reaches every grid format a plan can write: the default, the rules and a preset's
/// fallbacks (q4_k_m's Q5_0 and Q8_0 for rows that are not whole k-quant blocks); a preset's
/// `search = true` (q2_k's, q3_k_m's, q5_k_m's, q6_k's, w8a8's) is the same plan as `--search`.
#[test]
fn search_applies_to_a_presets_fallbacks() {
    let plan = |preset: &str, search: bool| {
        crate::QuantizeRequest {
            preset: Some(crate::PresetChoice::load(preset).unwrap()),
            search,
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .plan
    };
    let searched = |plan: &shrink_quant::QuantPlan| -> Vec<bool> {
        assert!(!plan.fallbacks.is_empty());
        plan.fallbacks
            .iter()
            .map(|(from, to)| match to {
                shrink_quant::Format::Scheme(s) => s.search,
                other => panic!("{from:?} falls back to {other:?}"),
            })
            .collect()
    };
    assert!(searched(&plan("q4_k_m", true)).iter().all(|&s| s));
    assert!(searched(&plan("q4_k_m", false)).iter().all(|&s| !s));
    // These presets search by themselves: --search changes nothing.
    for preset in ["q2_k", "q3_k_m", "q5_k_m", "q6_k"] {
        assert!(
            searched(&plan(preset, false)).iter().all(|&s| s),
            "{preset}"
        );
        assert_eq!(plan(preset, false), plan(preset, true), "{preset}");
    }
    let w8a8 = plan("w8a8", false);
    assert!(matches!(w8a8.default, shrink_quant::Format::Scheme(s) if s.search));
    assert_eq!(w8a8, plan("w8a8", true));
}
