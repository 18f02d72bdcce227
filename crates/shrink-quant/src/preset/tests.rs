use super::*;

#[test]
fn every_builtin_preset_parses() {
    for (name, _) in BUILTIN {
        let p = Preset::named(name).unwrap();
        p.plan().unwrap();
    }
    let w4 = Preset::named("w4a16-g128").unwrap().plan().unwrap();
    assert_eq!(
        w4.default,
        Format::Scheme(QuantScheme {
            bits: 4,
            grid: Grid::SymmetricFull,
            granularity: Granularity::Group(128),
            search: false
        })
    );
    let q4km = Preset::named("q4_k_m").unwrap();
    assert_eq!(
        q4km.embeddings_for(576).unwrap(),
        Some(Format::parse("q8_0").unwrap())
    );
    assert_eq!(
        q4km.embeddings_for(2048).unwrap(),
        Some(Format::parse("q6_k").unwrap())
    );
}

#[test]
fn bad_presets_say_where() {
    let e = Preset::parse("description = 1", "x.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.toml") && e.contains("line 1"), "{e}");
    let base = "description = \"d\"\nmethod = \"gptq\"\nexport = \"gguf\"\n";
    let e = Preset::parse(&format!("{base}format = \"q9_k\""), "y.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("y.toml") && e.contains("q9_k"), "{e}");
    let e = Preset::parse(&format!("{base}format = \"q4_0\"\ncolour = 1"), "z.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
    let e = Preset::parse(
        &format!("{base}format = {{ bits = 12, grid = \"symmetric\", group = 32 }}"),
        "b.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bits must be 2..=8"), "{e}");
    assert!(Preset::load("no-such-preset").is_err());
}
