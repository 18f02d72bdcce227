use super::*;

#[test]
fn stage_folders_are_one_plain_component() {
    assert_eq!(stage_folder("quantize.gptq"), "quantize.gptq");
    assert_eq!(stage_folder("int8@bits=4"), "int8@bits=4");
    let a = stage_folder("q@preset=configs/x.toml");
    let b = stage_folder("q@preset=configs_x.toml");
    assert!(
        a.starts_with("q@preset=configs_x.toml~") && !a.contains('/'),
        "{a}"
    );
    assert_ne!(a, b);
    assert!(!stage_folder("q@preset=../../etc").contains('/'));
}

#[test]
fn leftovers_of_an_interrupted_run_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".shrink-staging-abc/model")).unwrap();
    std::fs::write(dir.path().join(".shrink-tmp-x"), "partial").unwrap();
    std::fs::create_dir_all(dir.path().join("gptq")).unwrap();
    remove_leftovers(dir.path()).unwrap();
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["gptq"]);
}
