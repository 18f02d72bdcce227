use super::*;

#[test]
fn builtins_parse() {
    for name in builtin_names() {
        let m = builtin(name).unwrap();
        assert_eq!(m.name, name);
    }
    assert_eq!(builtin("smollm2").unwrap().kind, Kind::Model);
}

#[test]
fn bad_manifests_are_rejected_with_origin() {
    let err = Manifest::parse("name = 1", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("manifest x.toml:"), "{err}");
    let text =
        builtin_text("shakespeare").replace("calib = [\"macbeth\"", "calib = [\"cymbeline\"");
    let err = Manifest::parse(&text, "y.toml").unwrap_err().to_string();
    assert!(err.contains("unknown file 'cymbeline'"), "{err}");
    let text = builtin_text("shakespeare").replace("[splits]", "colour = 1\n[splits]");
    assert!(Manifest::parse(&text, "z.toml").is_err());
}

fn builtin_text(name: &str) -> String {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
        .to_string()
}

#[test]
fn unknown_name_lists_known_ones() {
    let err = find("llama-70b").unwrap_err().to_string();
    assert!(
        err.contains("llama-70b") && err.contains("smollm2"),
        "{err}"
    );
}
