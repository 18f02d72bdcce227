use super::*;

#[test]
fn spilled_batches_read_back_the_bits_written() {
    let dir = tempfile::tempdir().unwrap();
    let batch = |seed: f32, n: usize| {
        let v: Vec<f32> = (0..n * 6).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_vec(v, (n, 2, 3), &Device::Cpu).unwrap()
    };
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let mut spilled = Activations::spilled_in(dir.path()).unwrap();
    let mut memory = Activations::in_memory(vec![]);
    for (k, n) in [2usize, 1, 2].iter().enumerate() {
        spilled.push(batch(k as f32, *n)).unwrap();
        memory.push(batch(k as f32, *n)).unwrap();
    }
    spilled.set(1, batch(9.0, 1)).unwrap();
    memory.set(1, batch(9.0, 1)).unwrap();
    assert!(spilled.set(0, batch(0.0, 1)).is_err(), "a shape change");
    assert!(spilled.get(3).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "unnamed");
    let saved = dir.path().join("saved");
    spilled.save(&saved).unwrap();
    for loaded in [
        Activations::load(&saved, Keep::default()).unwrap(),
        Activations::load(&saved, Keep::spilled(dir.path())).unwrap(),
    ] {
        assert_eq!(loaded.len(), 3);
        for k in 0..3 {
            let want = bits(&memory.get(k).unwrap());
            assert_eq!(bits(&spilled.get(k).unwrap()), want);
            assert_eq!(bits(&loaded.get(k).unwrap()), want);
            assert_eq!(loaded.get(k).unwrap().dims(), memory.get(k).unwrap().dims());
        }
    }
    std::fs::write(&saved, b"\x07\0\0\0\0\0\0\0f32:2x3").unwrap();
    let e = Activations::load(&saved, Keep::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn batches_kept_in_16_bits_are_rounded_once_the_same_in_memory_spilled_and_saved() {
    let dir = tempfile::tempdir().unwrap();
    let x = Tensor::from_vec(
        (0..24)
            .map(|i| (i as f32 * 0.731).sin() * 1e3)
            .collect::<Vec<_>>(),
        (2, 3, 4),
        &Device::Cpu,
    )
    .unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (dtype, bits) in [(DType::F16, 11), (DType::BF16, 8)] {
        // Each value as the type rounds it, computed by hand from the f32 (round to nearest
        // even on the mantissa bits the type keeps; no value here is out of f16's range).
        let by_hand: Vec<f32> = values(&x)
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    return 0.0;
                }
                let e = v.abs().log2().floor() as i32;
                let ulp = 2f32.powi(e - (bits - 1));
                let q = v / ulp;
                let r = q.round();
                let even = if (q - q.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
                    r - q.signum()
                } else {
                    r
                };
                even * ulp
            })
            .collect();
        let memory = Keep { spill: None, dtype };
        let spilled = Keep {
            spill: Some(dir.path()),
            dtype,
        };
        for keep in [memory, spilled] {
            let mut xs = keep.store().unwrap();
            xs.push(x.clone()).unwrap();
            xs.push(x.clone()).unwrap();
            xs.set(1, (x.clone() * 2.0).unwrap()).unwrap();
            assert_eq!(xs.get(0).unwrap().dtype(), DType::F32);
            assert_eq!(values(&xs.get(0).unwrap()), by_hand, "{dtype:?}");
            let twice: Vec<f32> = by_hand.iter().map(|v| v * 2.0).collect();
            assert_eq!(values(&xs.get(1).unwrap()), twice);
            let saved = dir.path().join("saved");
            xs.save(&saved).unwrap();
            assert_eq!(
                std::fs::metadata(&saved).unwrap().len(),
                8 + format!("{}:2x3x4,2x3x4", dtype.as_str()).len() as u64 + 2 * 24 * 2
            );
            let loaded = Activations::load(&saved, keep).unwrap();
            assert_eq!(values(&loaded.get(0).unwrap()), by_hand);
            assert_eq!(values(&loaded.get(1).unwrap()), twice);
            let e = Activations::load(&saved, Keep::default()).unwrap_err();
            assert!(e.to_string().contains("keeps them in f32"), "{e}");
        }
    }
    assert!(Keep {
        spill: None,
        dtype: DType::U8
    }
    .store()
    .is_err());
    // Beyond f16's range: refused, not kept as an infinity; bf16 keeps it.
    let big = Tensor::new(&[1.0f32, -70_000.0], &Device::Cpu).unwrap();
    let keep = |dtype| Keep { spill: None, dtype };
    let e = keep(DType::F16)
        .store()
        .unwrap()
        .push(big.clone())
        .unwrap_err();
    assert!(e.to_string().contains("beyond f16's range"), "{e}");
    let mut bf16 = keep(DType::BF16).store().unwrap();
    bf16.push(big).unwrap();
    assert_eq!(values(&bf16.get(0).unwrap()), [1.0, -70_144.0]);
}
