use super::*;

#[test]
fn qk_permutation_matches_the_documented_row_mapping() {
    // 2 heads of head_dim 4, 1 column: HF row h*4 + half*2 + j -> GGUF row h*4 + 2*j + half.
    let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let t = Tensor::from_vec(hf, (8, 1), &Device::Cpu).unwrap();
    let g: Vec<f32> = permute_qk(&t, 2, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut want = [0f32; 8];
    for h in 0..2 {
        for half in 0..2 {
            for j in 0..2 {
                want[h * 4 + 2 * j + half] = (h * 4 + half * 2 + j) as f32;
            }
        }
    }
    assert_eq!(g, want);
    let back = permute_qk(&Tensor::from_vec(g, (8, 1), &Device::Cpu).unwrap(), 2, true).unwrap();
    assert_eq!(
        back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        (0..8).map(|v| v as f32).collect::<Vec<_>>()
    );
}

#[test]
fn tensor_names_round_trip() {
    for n in [
        "model.embed_tokens.weight",
        "model.layers.12.self_attn.k_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "lm_head.weight",
    ] {
        assert_eq!(
            llama::GGUF.to_hf(&hf_to_gguf_name(n).unwrap()).unwrap().0,
            n
        );
    }
    assert_eq!(
        hf_to_gguf_name("model.layers.1.mlp.gate_proj.weight").unwrap(),
        "blk.1.ffn_gate.weight"
    );
    assert!(llama::GGUF.to_hf("blk.1.ffn_gate_exps.weight").is_none());
}
