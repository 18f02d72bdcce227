//! Tests of structured pruning read block by block against the model held whole.

use super::*;
use crate::tests::{assert_same_output, streamed_run};
use crate::StreamedRun;
use candle_core::DType;
use shrink_core::NoProgress;
use shrink_io::{Export, GgufWriteType};
use shrink_models::{ModelConfig, Transformer};
use std::path::Path;

/// Every structure that scores block by block, pruned from a model read block by block,
/// writes what the whole-model path writes (a GGUF byte for byte, a folder bit for bit), from
/// a GGUF and from a bf16 folder, with its activations in memory or spilled; two ranks
/// splitting the calibration write what one process writes; Taylor importance and the
/// perplexity criterion are refused before anything is written.
#[test]
fn streamed_structured_pruning_writes_what_the_whole_model_path_writes() {
    let dir = tempfile::tempdir().unwrap();
    let shrink_io::testing::TinyStreamable {
        gguf, hf, windows, ..
    } = shrink_io::testing::tiny_streamable(11, dir.path()).unwrap();
    use Importance::{Activation, Magnitude};
    let layers = |criterion| Structure::Layers {
        count: 1,
        criterion,
    };
    let cases = [
        (Structure::QueryHeads { per_group: 1 }, Magnitude),
        (Structure::QueryHeads { per_group: 1 }, Activation),
        (Structure::KvGroups { count: 1 }, Magnitude),
        (Structure::KvGroups { count: 1 }, Activation),
        (Structure::Channels { count: 24 }, Magnitude),
        (Structure::Channels { count: 24 }, Activation),
        (layers(LayerCriterion::BlockInfluence), Activation),
        (layers(LayerCriterion::Angular), Activation),
        (Structure::Width { count: 8 }, Magnitude),
        (Structure::Width { count: 8 }, Activation),
    ];
    let outputs = [
        (Export::Gguf, GgufWriteType::F16),
        (Export::Gguf, GgufWriteType::F32),
        (Export::Hf, GgufWriteType::F16),
    ];
    for input in [&gguf, &hf] {
        let checkpoint = shrink_io::load(input).unwrap();
        let config = ModelConfig::from_json(&checkpoint.config).unwrap();
        for (structure, importance) in cases {
            let mut whole = Transformer::from_checkpoint(
                &config,
                checkpoint.load_finite().unwrap(),
                DType::F32,
            )
            .unwrap();
            let a = crate::prune_structured(
                &mut whole,
                structure,
                importance,
                Some(&windows),
                2,
                &NoProgress,
            )
            .unwrap();
            for (export, dtype) in outputs {
                let case = format!(
                    "{structure:?} by {importance:?} from {} to {} {dtype:?}",
                    input.display(),
                    export.name()
                );
                let (whole_path, streamed_path) =
                    (dir.path().join("whole"), dir.path().join("streamed"));
                shrink_io::write_model(&checkpoint, &whole, export, dtype, &whole_path).unwrap();
                let keep = shrink_calib::Keep {
                    spill: (export == Export::Hf).then_some(dir.path()),
                    ..Default::default()
                };
                let run = StreamedRun {
                    keep,
                    export,
                    dtype,
                    ..streamed_run(&windows, &shrink_core::Alone)
                };
                let b = prune_structured_streamed(
                    &checkpoint,
                    structure,
                    importance,
                    &run,
                    &streamed_path,
                )
                .unwrap();
                assert_eq!(a, b, "{case}");
                assert_same_output(export, &whole_path, &streamed_path, &case);
                for path in [whole_path, streamed_path] {
                    match export {
                        Export::Gguf => std::fs::remove_file(path).unwrap(),
                        Export::Hf => std::fs::remove_dir_all(path).unwrap(),
                    }
                }
            }
        }
    }
    // Two ranks split the calibration (block influence and activation statistics alike):
    // rank 0 writes one process's bytes, rank 1 nothing.
    let checkpoint = shrink_io::load(&gguf).unwrap();
    for (structure, importance) in [cases[1], cases[6]] {
        let run = |world: &dyn shrink_core::Collective, out: &Path| {
            let run = StreamedRun {
                batch: 1,
                ..streamed_run(&windows, world)
            };
            prune_structured_streamed(&checkpoint, structure, importance, &run, out).unwrap()
        };
        let alone = dir.path().join("alone.gguf");
        let one = run(&shrink_core::Alone, &alone);
        let ranks = shrink_core::ThreadGroup::new(2);
        let outs = [dir.path().join("rank0.gguf"), dir.path().join("rank1.gguf")];
        let got: Vec<StructuredOutcome> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .zip(&outs)
                .map(|(r, out)| s.spawn(|| run(r, out)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| *g == one), "{structure:?}");
        assert!(std::fs::read(&alone).unwrap() == std::fs::read(&outs[0]).unwrap());
        assert!(!outs[1].exists());
    }
    // What needs the model whole is refused, and nothing is written.
    for (structure, importance) in [
        (Structure::Channels { count: 8 }, Importance::Taylor),
        (layers(LayerCriterion::Perplexity), Activation),
    ] {
        let out = dir.path().join("refused.gguf");
        let run = streamed_run(&windows, &shrink_core::Alone);
        let e =
            prune_structured_streamed(&checkpoint, structure, importance, &run, &out).unwrap_err();
        assert!(e.to_string().contains("needs the model whole"), "{e}");
        assert!(!out.exists());
    }
}

/// Width pruning keeps a whole number of heads (transformers refuses any other hidden size):
/// SmolLM2's 576 channels and 9 heads, 5% off: the 547 kept round to 61 × 9 = 549. A width that
/// is not a multiple of the heads (547, from an older pruning) keeps at most its whole heads, and
/// a fraction of 0 removes nothing.
#[test]
fn width_from_a_fraction_keeps_a_multiple_of_the_head_count() {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.hidden_size = 576;
    cfg.num_attention_heads = 9;
    cfg.num_key_value_heads = Some(3);
    let width = |cfg: &ModelConfig, fraction| match Structure::from_fraction(
        Target::Width,
        fraction,
        LayerCriterion::BlockInfluence,
        cfg,
    )
    .unwrap()
    {
        Structure::Width { count } => count,
        s => panic!("{s:?}"),
    };
    assert_eq!(width(&cfg, 0.05), 576 - 549);
    assert_eq!(width(&cfg, 0.25), 144);
    for f in [0.01, 0.05, 0.1, 0.3, 0.9] {
        assert_eq!((576 - width(&cfg, f)) % 9, 0, "{f}");
    }
    assert_eq!(width(&cfg, 0.0), 0);
    cfg.hidden_size = 547;
    assert_eq!(width(&cfg, 0.0), 0);
    assert_eq!(width(&cfg, 0.001), 547 - 540, "60 whole heads, not 61");
    assert_eq!(width(&cfg, 0.5), 547 - 270);
}
