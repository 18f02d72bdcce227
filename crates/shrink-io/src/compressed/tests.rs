use super::*;

#[test]
fn packing_matches_the_documented_example_and_round_trips() {
    // pack_to_int32 docs: 8-bit [1, 2] → unsigned [129, 130] → 0x8281 = 33409.
    assert_eq!(pack_rows(&[1, 2], 8, 1, 2), vec![33409]);
    for bits in [4u32, 8] {
        let (rows, cols) = (3, 13);
        let lo = -(1i32 << (bits - 1));
        let codes: Vec<i8> = (0..rows * cols)
            .map(|k| (lo + (k as i32 * 7) % (1 << bits)) as i8)
            .collect();
        let packed = pack_rows(&codes, bits, rows, cols);
        let t = IntTensor {
            shape: vec![rows, packed.len() / rows],
            values: packed.iter().map(|&v| v as i64).collect(),
        };
        let back = unpack_rows(&t, bits, rows, cols).unwrap();
        assert_eq!(back, codes.iter().map(|&c| c as i64).collect::<Vec<_>>());
    }
}

#[test]
fn malformed_folders_are_errors_not_panics() {
    let dir = Path::new("m");
    let config = |bits: u64| {
        serde_json::json!({"quantization_config": {
            "quant_method": "compressed-tensors", "format": "int-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": bits}}}
        }})
    };
    let setup = |scales: usize, zero: Option<usize>| {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "l.weight_scale".to_string(),
            Tensor::ones(scales, DType::F32, &Device::Cpu).unwrap(),
        );
        let mut ints = BTreeMap::new();
        ints.insert(
            "l.weight".to_string(),
            IntTensor {
                shape: vec![4, 8],
                values: vec![1; 32],
            },
        );
        if let Some(n) = zero {
            ints.insert(
                "l.weight_zero_point".to_string(),
                IntTensor {
                    shape: vec![n],
                    values: vec![0; n],
                },
            );
        }
        (crate::Tensors::from(tensors), ints)
    };
    let run = |bits, scales, zero| {
        let (mut t, i) = setup(scales, zero);
        decompress(dir, &config(bits), &mut t, i).map(|_| t)
    };
    let t = run(8, 4, Some(4)).unwrap();
    assert_eq!(t.shape("l.weight"), Some(&[4, 8][..]));
    assert!(run(0, 4, None)
        .unwrap_err()
        .to_string()
        .contains("expected 1 to 8"));
    assert!(run(8, 3, None)
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    assert!(run(8, 4, Some(3))
        .unwrap_err()
        .to_string()
        .contains("zero points"));
}

#[test]
fn targets() {
    assert!(target_matches("Linear", "model.layers.0.mlp.up_proj"));
    assert!(target_matches(
        "re:.*down_proj$",
        "model.layers.3.mlp.down_proj"
    ));
    assert!(!target_matches(
        "re:.*down_proj$",
        "model.layers.3.mlp.up_proj"
    ));
    assert!(target_matches(
        "model.layers.3.mlp.up_proj",
        "model.layers.3.mlp.up_proj"
    ));
}
