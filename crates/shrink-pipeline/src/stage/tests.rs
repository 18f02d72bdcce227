use super::*;

#[test]
fn every_kind_reads_its_keys_from_structs() {
    for kind in StageKind::ALL {
        let keys = kind.keys();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            keys.len(),
            "{kind:?} lists a key twice: {keys:?}"
        );
        for key in ["kind", "name", "input"] {
            assert!(!keys.contains(&key), "{kind:?}");
        }
    }
    assert!(StageKind::QuantizeQat.keys().contains(&"preset"));
    assert!(StageKind::Search.keys().contains(&"budget"));
}

#[test]
fn kinds_are_named_once_and_parse_back() {
    for kind in StageKind::ALL {
        let parsed: StageKind = serde_json::from_value(serde_json::json!(kind.name())).unwrap();
        assert_eq!(parsed, *kind);
    }
    assert_eq!(
        StageKind::PruneWanda.prune_kind(),
        Some(prune::PruneKind::Wanda)
    );
    assert!(StageKind::QuantizeGptq.keys().contains(&"damp"));
    assert!(!StageKind::QuantizeRtn.keys().contains(&"damp"));
}
