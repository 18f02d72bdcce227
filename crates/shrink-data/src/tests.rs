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
