use super::*;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct A {
    x: Option<u8>,
    #[serde(default)]
    list: Vec<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct B {
    y: Option<f64>,
}

fn keys(text: &str) -> StageKeys {
    #[derive(Deserialize)]
    struct Doc {
        stage: Located,
    }
    let doc: Doc = toml::from_str(text).unwrap();
    let Node::Table(entries) = doc.stage.node else {
        panic!()
    };
    StageKeys {
        span: doc.stage.span,
        entries,
    }
}

#[test]
fn structs_share_out_a_table_and_errors_point_at_values() {
    assert_eq!(fields::<A>(), ["x", "list"]);
    let text = "[stage]\nx = 3\nlist = [\"a\", \"b\"]\ny = 1\n";
    let k = keys(text);
    let mut reader = KeyReader::new(&k);
    let a: A = reader.take().unwrap();
    assert_eq!(
        a,
        A {
            x: Some(3),
            list: vec!["a".into(), "b".into()]
        }
    );
    assert_eq!(reader.unread(), Some("y"));
    let b: B = reader.take().unwrap();
    assert_eq!(b, B { y: Some(1.0) });
    assert_eq!(reader.unread(), None);

    let text = "[stage]\nx = 3\nlist = [\"a\", 7]\n";
    let Err(KeyError::Value(e)) = KeyReader::new(&keys(text)).take::<A>() else {
        panic!()
    };
    assert_eq!(e.message, "invalid type: integer `7`, expected a string");
    assert_eq!(&text[e.span.unwrap()], "7");
    let text = "[stage]\nx = 300\n";
    let Err(KeyError::Value(e)) = KeyReader::new(&keys(text)).take::<A>() else {
        panic!()
    };
    assert_eq!(e.message, "invalid value: integer `300`, expected u8");
    assert_eq!(&text[e.span.unwrap()], "300");
}
