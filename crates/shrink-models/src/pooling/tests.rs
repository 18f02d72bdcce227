use super::*;
use candle_core::Device;

#[test]
fn pooling_modes_skip_padding_and_normalise_by_hand() {
    // Two sequences of 3 positions; the second has 2 real tokens, its padding holds 100s.
    let h = Tensor::new(
        &[
            [[1f32, 2.0], [3.0, 4.0], [5.0, 9.0]],
            [[2.0, -2.0], [4.0, 0.0], [100.0, 100.0]],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let pool = |mode, normalize| {
        Pooling { mode, normalize }
            .pool(&h, &[3, 2])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(pool(PoolingMode::Mean, false), [[3.0, 5.0], [3.0, -1.0]]);
    assert_eq!(pool(PoolingMode::Cls, false), [[1.0, 2.0], [2.0, -2.0]]);
    assert_eq!(pool(PoolingMode::Max, false), [[5.0, 9.0], [4.0, 0.0]]);
    let n = pool(PoolingMode::Mean, true);
    let r = 1.0 / 34f32.sqrt();
    assert!((n[0][0] - 3.0 * r).abs() < 1e-6 && (n[0][1] - 5.0 * r).abs() < 1e-6);
    assert!(
        Pooling::default().pool(&h, &[3, 4]).is_err(),
        "length past the batch"
    );
}

#[test]
fn sentence_transformers_files_choose_the_pooling() {
    let json = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    let cls = json(r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#);
    let modules = json(
        r#"[{"type": "sentence_transformers.models.Transformer"},
                           {"type": "sentence_transformers.models.Normalize"}]"#,
    );
    let p = Pooling::from_sentence_transformers(Some(&cls), Some(&modules)).unwrap();
    assert_eq!(
        p,
        Pooling {
            mode: PoolingMode::Cls,
            normalize: true
        }
    );
    assert_eq!(
        Pooling::from_sentence_transformers(None, None).unwrap(),
        Pooling::default()
    );
    let weighted = json(r#"{"pooling_mode_weightedmean_tokens": true}"#);
    let err = Pooling::from_sentence_transformers(Some(&weighted), None).unwrap_err();
    assert!(err.to_string().contains("weightedmean"), "{err}");
    let two = json(r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#);
    assert!(Pooling::from_sentence_transformers(Some(&two), None).is_err());
}
