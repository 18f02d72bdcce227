use super::*;

#[test]
fn text_refs_parse() {
    let r: TextRef = "shakespeare:calib".parse().unwrap();
    assert_eq!(r.split, "calib");
    assert!("shakespeare".parse::<TextRef>().is_err());
    assert!(":eval".parse::<TextRef>().is_err());
    assert!("a:b/c".parse::<TextRef>().is_err());
}

#[test]
fn splits_resolve_to_files_in_order() {
    let m = builtin("shakespeare").unwrap();
    assert_eq!(split_files(&m, "calib").unwrap(), ["macbeth", "tempest"]);
    assert_eq!(split_files(&m, "hamlet").unwrap(), ["hamlet"]);
    let train = split_files(&m, "train").unwrap();
    assert_eq!(train.len(), 10);
    assert!(!train.contains(&"hamlet"), "Hamlet is held out");
    let err = split_files(&m, "test").unwrap_err().to_string();
    assert!(err.contains("'test'") && err.contains("calib"), "{err}");
}

#[test]
fn missing_file_path_is_treated_as_reference_and_rejected() {
    let err = read_text("no/such/file.txt").unwrap_err().to_string();
    assert!(err.contains("no/such/file.txt"), "{err}");
}

#[test]
fn texts_join_with_plus_in_order_and_each_part_is_checked() {
    assert_eq!(
        text_parts("shakespeare:calib+click-code:calib"),
        ["shakespeare:calib", "click-code:calib"]
    );
    check_text("shakespeare:calib+setuptools-docs:calib+click-code:calib").unwrap();
    let err = check_text("shakespeare:calib+click-code:nope")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'nope'") && err.contains("click-code"),
        "{err}"
    );
    assert!(check_text("shakespeare:calib+").is_err());
    // A file whose name holds a `+` is one text.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a+b.txt");
    std::fs::write(&odd, "x").unwrap();
    let spec = odd.to_str().unwrap();
    assert_eq!(text_parts(spec), [spec]);
    assert_eq!(read_text(spec).unwrap(), "x");
    // The held-out evaluation texts are in no calibration split.
    for (dataset, split) in [("pip-docs", "eval"), ("requests-code", "eval")] {
        let m = builtin(dataset).unwrap();
        assert!(split_files(&m, split).is_ok());
        assert!(split_files(&m, "calib").is_err(), "{dataset}");
    }
}
