use super::*;

/// A search that reads its model block by block (the sensitivity, the verified quantizations and
/// their scores) writes the bytes and the summary of the search on the model held whole, from
/// an F16 GGUF and from a bf16 folder; the fixed bytes are the written file's less its searched
/// tensors, to the byte. The folder's search takes the gradient sensitivity.
#[test]
fn a_search_read_block_by_block_writes_the_whole_model_search_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = shrink_io::testing::tiny_streamable(3, dir.path()).unwrap();
    let request = SearchRequest {
        formats: vec!["q8_0".into(), "q5_0".into(), "q4_0".into()],
        embedding_formats: vec!["q8_0".into(), "q4_0".into()],
        budget: BudgetKeys {
            target_bpw: Some(6.0),
            rounds: Some(2),
            ..BudgetKeys::default()
        },
        ..search_request(SearchKeys::default()).unwrap()
    };
    for (source, measure) in [(&tiny.gguf, Measure::Scaled), (&tiny.hf, Measure::Fisher)] {
        let request = SearchRequest {
            measure,
            ..request.clone()
        };
        let checkpoint = shrink_io::load(source).unwrap();
        let model = crate::build_model(&checkpoint, DType::F32).unwrap();
        let search = |input: SearchInput, out: &Path| {
            let job = JobInput {
                checkpoint: &checkpoint,
                windows: Some(&tiny.windows),
                batch: 2,
                world: &shrink_core::Alone,
                keep: Default::default(),
                progress: &shrink_core::NoProgress,
            };
            let (outcome, mut summary) =
                search_and_write(&job, input, "key", None, &request, out).unwrap();
            summary.sensitivity_s = 0.0;
            let mut outcome = serde_json::to_value(outcome).unwrap();
            for layer in outcome["layers"].as_array_mut().unwrap() {
                layer["wall_s"] = 0.into();
            }
            (outcome, serde_json::to_value(summary).unwrap())
        };
        let whole_out = dir.path().join("whole.gguf");
        let streamed_out = dir.path().join("streamed.gguf");
        let whole = search(SearchInput::Whole(&model), &whole_out);
        let streamed = search(SearchInput::BlockByBlock, &streamed_out);
        assert_eq!(whole, streamed, "{}", source.display());
        let bytes = std::fs::read(&whole_out).unwrap();
        assert!(bytes == std::fs::read(&streamed_out).unwrap());
        // Only the written file is left beside the outputs.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("whole") || n.starts_with("streamed"))
            .collect();
        left.sort();
        assert_eq!(left, ["streamed.gguf", "whole.gguf"]);
        let summary = &whole.1;
        let best =
            &summary["outcome"]["tried"][summary["outcome"]["best"].as_u64().unwrap() as usize];
        assert_eq!(best["size_bytes"].as_u64().unwrap(), bytes.len() as u64);
    }
}
