use super::*;

/// GPTQ's job on `calibration`: Hessians factored, three f32 copies of the widest linear beside
/// an f32 block, a 16-bit embedding written in 8-bit blocks, activations in f32 in memory.
fn gptq(calibration: Option<(u64, u64, u64)>) -> StreamedJob {
    StreamedJob {
        calibration,
        hessians: true,
        factors: true,
        block_value_bytes: 4,
        widest_copies: 12,
        embedding_value_bytes: 2,
        embedding_written_bytes: 1,
        spilled: false,
        activation_value_bytes: 4,
        targets: false,
        activation_copies: 2,
        scoring: None,
    }
}

#[test]
fn the_streamed_formula_by_hand() {
    let shape = |block_parameters| ModelShape {
        parameters: 0,
        hidden: 64,
        intermediate: 128,
        vocab: 512,
        block_parameters,
    };
    let job = gptq(Some((8, 32, 2)));
    let peak = streamed_peak(&shape(100_000), &job);
    assert_eq!(
        peak,
        StreamedPeak {
            base: 256 << 20,
            embedding: 512 * 64 * 3 + 4 * (64 << 20),
            block: 400_000 + 128 * 64 * 12,
            activations: 8 * 32 * 64 * 8 + 8 * 32 * 4,
            hessians: (3 * 64 * 64 + 128 * 128) * 8,
            // b·s·(3i + 4h) + b·(h/64)·s², in f32, and XᵀX of down's input with its copy.
            accumulation: (2 * 32 * (3 * 128 + 4 * 64) + 2 * 32 * 32) * 4 + 128 * 128 * 8,
            factoring: 128 * 128 * 16,
            head: 0,
            scoring: 0,
        }
    );
    // The embedding's phase is the larger here; a block of 100M weights is larger still.
    let embedding = 512 * 64 * 3 + 4 * (64 << 20);
    assert_eq!(peak.total(), (256 << 20) + embedding + embedding / 8);
    let big = streamed_peak(&shape(100_000_000), &job);
    let work = 400_098_304 + 131_072 + 1_024 + 229_376 + 172_032 + 131_072;
    assert_eq!(big.total(), (256 << 20) + work + work / 8);
    // A search: the reference log-probabilities of 1,000 positions held throughout, the
    // sensitivity's variants as activations when they are more, and the head as a third arm.
    let search = StreamedJob {
        scoring: Some(Scoring {
            positions: 1_000,
            states: 10_000,
            head_copies: 2,
        }),
        ..job
    };
    let s = streamed_peak(&shape(100_000), &search);
    let log_probs = 1_000 * 512 * 4;
    let states = 10_000 * 64 * 4;
    assert_eq!(s.scoring, log_probs);
    assert_eq!(s.activations, states.max(peak.activations));
    assert_eq!(s.head, 2 * 512 * 64 * 4 + states + 4 * log_probs);
    let work = s.head.max(embedding) + log_probs;
    assert_eq!(s.total(), (256 << 20) + work + work / 8);
    // Pruning holds its own copies of the widest linear; spilled activations are one batch's.
    let sparsegpt = StreamedJob {
        widest_copies: 16,
        spilled: true,
        activation_value_bytes: 4,
        ..job
    };
    let p = streamed_peak(&shape(100_000), &sparsegpt);
    assert_eq!(p.block, 400_000 + 128 * 64 * 16);
    assert_eq!(p.activations, 2 * 32 * 64 * 8 + 8 * 32 * 4);
    // Kept in 16 bits: half the bytes held; spilled, the batch in flight is f32 all the same.
    let half = |spilled| StreamedJob {
        activation_value_bytes: 2,
        spilled,
        ..job
    };
    assert_eq!(
        streamed_peak(&shape(100_000), &half(false)).activations,
        8 * 32 * 64 * 4 + 8 * 32 * 4
    );
    assert_eq!(
        streamed_peak(&shape(100_000), &half(true)).activations,
        2 * 32 * 64 * 8 + 8 * 32 * 4
    );
    // Rounding alone: no activations, statistics or factor.
    let rounding = StreamedJob {
        calibration: None,
        factors: true,
        ..job
    };
    let r = streamed_peak(&shape(100_000_000), &rounding);
    assert_eq!((r.activations, r.hessians, r.factoring), (0, 0, 0));
    assert!(check_streamed_memory(&big, big.total()).is_ok());
    let e = check_streamed_memory(&big, big.total() - 1).unwrap_err();
    assert!(e.to_string().contains("block by block"), "{e}");
    // Absurd settings saturate instead of wrapping.
    let absurd = StreamedJob {
        calibration: Some((u64::MAX, 1 << 20, 8)),
        ..job
    };
    assert_eq!(streamed_peak(&shape(1), &absurd).total(), u64::MAX);
}

#[test]
fn a_pipeline_whose_quantizations_stream_is_estimated_by_the_streamed_formula() {
    let p = crate::parse(
        "name = \"w4\"\n[model]\nsource = \"smollm2\"\n[data]\nsamples = 16\n\
         [[stage]]\nkind = \"quantize.gptq\"\npreset = \"q4_k_m\"\n\
         [[stage]]\nkind = \"quantize.rtn\"\nname = \"q8\"\ninput = \"model\"\nformat = \"q8_0\"\n",
        "p.toml",
    )
    .unwrap();
    // A Llama-family checkpoint in f32 (its header is all the estimate reads).
    let cfg = shrink_models::ModelConfig::tiny_for_tests();
    let model = shrink_models::Transformer::random(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let checkpoint = shrink_io::Checkpoint {
        path: "tiny".into(),
        format: shrink_io::Format::HfFolder,
        config: serde_json::to_value(&cfg).unwrap(),
        tensors: model.named_tensors().into(),
        tokenizer: None,
        generation_config: None,
        side_files: Default::default(),
    };
    // SmolLM2's shape.
    let shape = ModelShape {
        parameters: 134_515_008,
        hidden: 576,
        intermediate: 1536,
        vocab: 49_152,
        block_parameters: 3_540_096,
    };
    let job = |calibration, factors| StreamedJob {
        factors,
        embedding_value_bytes: 4,
        ..gptq(calibration)
    };
    let held = 4 * shape.parameters;
    let gptq = streamed_peak(&shape, &job(Some((16, 512, 8)), true)).total() + held;
    let rtn = streamed_peak(&shape, &job(None, false)).total() + held;
    // The evaluation still holds three models and two windows of logits.
    let work = 3 * held + 2 * 512 * shape.vocab * 4;
    let evaluation = (256 << 20) + work + work / 8;
    let streamed = p.estimated_peak_for(Some(shape), Some(&checkpoint), false, 32, u64::MAX);
    assert_eq!(streamed, evaluation.max(gptq).max(rtn));
    // Without the checkpoint (or for a family that does not stream) every stage holds the
    // model and the whole-model calibration terms count.
    let whole = p.estimated_peak_for(Some(shape), None, false, 32, u64::MAX);
    assert_eq!(
        whole,
        p.estimated_peak_bytes(134_515_008, 576, 1536, 49_152)
    );
    assert!(whole > streamed, "{whole} vs {streamed}");
    // Evaluated block by block, no model is held: the stages' own peaks and the
    // evaluation's (two models, 32 chunks of 512 tokens, 4 at a time).
    let eval = streamed_eval_peak(
        &shape,
        &StreamedEval {
            chunks: 32,
            ctx: 512,
            scored: 255,
            batch: 4,
            models: 2,
            widened_head_bytes: 0,
            packed: false,
        },
    );
    let gptq_alone = gptq - held;
    let block_by_block = p.estimated_peak_for(Some(shape), Some(&checkpoint), true, 32, u64::MAX);
    assert_eq!(block_by_block, eval.max(gptq_alone).max(rtn - held));
    assert!(block_by_block < streamed, "{block_by_block} vs {streamed}");

    // `auto` evaluates block by block only when the models held whole do not fit.
    let plan = |limit| p.check_memory(Some(shape), Some(&checkpoint), limit, Some(32));
    assert_eq!(
        plan(u64::MAX).unwrap(),
        MemoryPlan {
            estimate: streamed,
            block_by_block: false
        }
    );
    assert_eq!(
        plan(streamed - 1).unwrap(),
        MemoryPlan {
            estimate: block_by_block,
            block_by_block: true
        }
    );
    let e = plan(block_by_block - 1).unwrap_err().to_string();
    assert!(e.contains("evaluating block by block"), "{e}");
    // `never` refuses what does not fit whole; `always` evaluates block by block even when
    // it would fit, and refuses a model that cannot be read so.
    let mut never = p.clone();
    never.eval.stream = crate::StreamEval::Never;
    let e = never
        .check_memory(Some(shape), Some(&checkpoint), streamed - 1, Some(32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("stream = \"auto\""), "{e}");
    let mut always = p.clone();
    always.eval.stream = crate::StreamEval::Always;
    assert!(
        always
            .check_memory(Some(shape), Some(&checkpoint), u64::MAX, Some(32))
            .unwrap()
            .block_by_block
    );
    let e = always
        .check_memory(Some(shape), None, u64::MAX, Some(32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[eval] stream = \"always\""), "{e}");
}

#[test]
fn the_streamed_evaluation_formula_by_hand() {
    let shape = ModelShape {
        parameters: 0,
        hidden: 64,
        intermediate: 128,
        vocab: 1000,
        block_parameters: 50_000,
    };
    let eval = |chunks, models| StreamedEval {
        chunks,
        ctx: 16,
        scored: 7,
        batch: 4,
        models,
        widened_head_bytes: 0,
        packed: false,
    };
    let kept = 10 * 7 * 64 * 4;
    // Scoring dominates: two heads, the kept states, one chunk's logits of its scored
    // positions three times (both models', one also as a tensor).
    let work = 2 * 1000 * 64 * 4 + 2 * kept + 3 * 7 * 1000 * 4;
    assert_eq!(
        streamed_eval_peak(&shape, &eval(10, 2)),
        (256 << 20) + work + work / 4
    );
    // One chunk: the batch is that chunk (its forward pass: 16 tokens through an MLP of
    // 128 and one 16 × 16 attention head); one model's logits once.
    let (states, kept) = (16 * 64 * 4, 7 * 64 * 4);
    let forward = (16 * (3 * 128 + 4 * 64) + 16 * 16) * 4;
    let work: u64 = (1000 * 64 * 4 + states)
        .max(50_000 * 4 + 2 * states + forward + kept)
        .max(1000 * 64 * 4 + kept + 7 * 1000 * 4);
    assert_eq!(
        streamed_eval_peak(&shape, &eval(1, 1)),
        (256 << 20) + work + work / 4
    );
    assert_eq!(streamed_eval_peak(&shape, &eval(u64::MAX, 2)), u64::MAX);
    // A bf16 head read and widened beside the other model's: its stored copy, not the
    // logits, sets the scoring phase.
    let bf16 = StreamedEval {
        widened_head_bytes: 2,
        ..eval(10, 2)
    };
    let work = 2 * 1000 * 64 * 4 + 2 * 10 * 7 * 64 * 4 + 1000 * 64 * 2;
    assert_eq!(
        streamed_eval_peak(&shape, &bf16),
        (256 << 20) + work + work / 4
    );
}

#[test]
fn each_rank_holds_its_share_of_activations_and_the_exchange_buffers() {
    // Llama-3-8B's shape; GPTQ over 16 × 512 tokens in batches of 2 (8 batches).
    let shape = ModelShape {
        parameters: 8_030_261_248,
        hidden: 4096,
        intermediate: 14_336,
        vocab: 128_256,
        block_parameters: 218_112_000,
    };
    let job = gptq(Some((16, 512, 2)));
    let one = streamed_peak(&shape, &job);
    assert_eq!(streamed_peak_per_rank(&shape, &job, 1), one);
    // Three ranks: ⌈8 / 3⌉ = 3 batches of 2 windows each, 6 × 512 tokens of 4096 values; the
    // token ids of all 16 windows.
    let three = streamed_peak_per_rank(&shape, &job, 3);
    assert_eq!(three.activations, 6 * 512 * 4096 * 8 + 16 * 512 * 4);
    let (h, i) = (4096u64, 14_336u64);
    // The batch's statistics before down_proj's beside its forward pass and product, which
    // hold at least what the exchange holds.
    assert_eq!(three.accumulation, one.accumulation + 3 * h * h * 4);
    assert!((3 * h * h + 2 * i * i) * 4 < three.accumulation);
    assert_eq!(
        (three.block, three.hessians, three.factoring),
        (one.block, one.hessians, one.factoring)
    );
    // Without calibration there is nothing to split.
    let rtn = StreamedJob {
        calibration: None,
        ..job
    };
    assert_eq!(
        streamed_peak_per_rank(&shape, &rtn, 4),
        streamed_peak(&shape, &rtn)
    );
}

#[test]
fn sizes_parse_with_units() {
    assert_eq!(parse_size("512").unwrap(), 512);
    assert_eq!(parse_size("16G").unwrap(), 16 << 30);
    assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
    assert_eq!(parse_size("64m").unwrap(), 64 << 20);
    assert!(parse_size("lots").is_err());
    assert!(parse_size("5X").is_err());
    assert!(parse_size("0").is_err());
}

#[test]
fn activations_are_spilled_when_only_spilled_they_fit() {
    // Wide activations (16 windows of 4096 tokens) against a small block: in memory they are
    // most of the peak, spilled one batch of 2 windows is left.
    let shape = ModelShape {
        parameters: 0,
        hidden: 1024,
        intermediate: 2048,
        vocab: 512,
        block_parameters: 1 << 20,
    };
    let job = StreamedJob {
        hessians: false,
        factors: false,
        widest_copies: 8,
        embedding_value_bytes: 4,
        embedding_written_bytes: 4,
        ..gptq(Some((16, 4096, 2)))
    };
    let total = |spilled, bytes| {
        let job = StreamedJob {
            spilled,
            activation_value_bytes: bytes,
            ..job
        };
        streamed_peak(&shape, &job).total()
    };
    let (memory, disk) = (total(false, 4), total(true, 4));
    // 2 copies × 65,536 tokens × 1,024 × 4 bytes held, against one batch's.
    assert!(memory - disk > 400 << 20, "{memory} {disk}");
    let decide = |spill, limit| keep_activations(&shape, &job, 4, spill, 1, limit);
    // Auto spills only when that is what makes the job fit.
    assert!(!decide(Spill::Auto, memory).0.spilled);
    let (spilled, chosen) = decide(Spill::Auto, memory - 1);
    assert!(spilled.spilled && chosen);
    assert!(!decide(Spill::Auto, disk - 1).0.spilled);
    // Always and Never are obeyed; neither is a choice.
    assert_eq!(
        decide(Spill::Always, u64::MAX),
        (
            StreamedJob {
                spilled: true,
                ..job
            },
            false
        )
    );
    assert!(!decide(Spill::Never, 0).0.spilled);
    // Half the bytes a value: kept in bf16 they fit where f32 would have spilled.
    let (half, chosen) = keep_activations(&shape, &job, 2, Spill::Auto, 1, total(false, 2));
    assert!(!half.spilled && !chosen);
    assert_eq!(half.activation_value_bytes, 2);
    // Without calibration there is nothing to spill.
    let rounding = StreamedJob {
        calibration: None,
        ..job
    };
    assert!(
        !keep_activations(&shape, &rounding, 4, Spill::Auto, 1, 0)
            .0
            .spilled
    );
}
