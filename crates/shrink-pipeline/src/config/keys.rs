//! A `[[stage]]` table kept with the place of every value, and the stage kinds' keys structs
//! read from it. Each kind's module owns serde structs of its keys; [`KeyReader::take`] fills one
//! from the stage's table, value by value, so that an error points at the value at fault, as toml's
//! own errors do when it reads a whole file into one struct.

use super::locate::closest;
use super::Stage;
use crate::stage::{KeyError, StageKind};
use serde::de::{
    self, DeserializeOwned, Error as _, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

/// A TOML value and its byte range in the file (unknown for a table made by dotted keys, such as
/// `train.steps = 3`); a table's and an array's members keep theirs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Located {
    pub span: Option<Range<usize>>,
    pub node: Node,
}

/// A TOML value whose tables and arrays hold [`Located`] members.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Value(toml::Value),
    Table(BTreeMap<String, Located>),
    Array(Vec<Located>),
}

// toml hands a value's span to a struct of this name and these fields (`toml::Spanned`'s own
// protocol), and plain values when it has no span; `LocatedVisitor` takes either.
const SPANNED_FIELDS: &[&str] = &[
    serde_spanned::__unstable::START_FIELD,
    serde_spanned::__unstable::END_FIELD,
    serde_spanned::__unstable::VALUE_FIELD,
];

impl<'de> Deserialize<'de> for Located {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(
            serde_spanned::__unstable::NAME,
            SPANNED_FIELDS,
            LocatedVisitor,
        )
    }
}

struct LocatedVisitor;

impl LocatedVisitor {
    fn unplaced<E>(node: std::result::Result<Node, E>) -> std::result::Result<Located, E> {
        node.map(|node| Located { span: None, node })
    }
}

impl<'de> Visitor<'de> for LocatedVisitor {
    type Value = Located;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Located, E> {
        Self::unplaced(NodeVisitor.visit_bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Located, E> {
        Self::unplaced(NodeVisitor.visit_i64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Located, E> {
        Self::unplaced(NodeVisitor.visit_u64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Located, E> {
        Self::unplaced(NodeVisitor.visit_f64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Located, E> {
        Self::unplaced(NodeVisitor.visit_str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Located, A::Error> {
        Self::unplaced(NodeVisitor.visit_seq(seq))
    }
    /// The spanned form (start, end, value), or a table without a span.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Located, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Ok(Located {
                span: None,
                node: Node::Table(BTreeMap::new()),
            });
        };
        if first == SPANNED_FIELDS[0] {
            let start: usize = map.next_value()?;
            let mut end = start;
            let mut node = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == SPANNED_FIELDS[1] {
                    end = map.next_value()?;
                } else {
                    node = Some(map.next_value::<Node>()?);
                }
            }
            let node = node.ok_or_else(|| A::Error::custom("a spanned value without its value"))?;
            return Ok(Located {
                span: Some(start..end),
                node,
            });
        }
        let mut table = BTreeMap::new();
        table.insert(first, map.next_value::<Located>()?);
        while let Some((key, value)) = map.next_entry::<String, Located>()? {
            table.insert(key, value);
        }
        Ok(Located {
            span: None,
            node: Node::Table(table),
        })
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Value(toml::Value::Boolean(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Value(toml::Value::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(|v| Node::Value(toml::Value::Integer(v)))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Value(toml::Value::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Value(toml::Value::String(v.to_string())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Located>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut table = BTreeMap::new();
        while let Some((key, value)) = map.next_entry::<String, Located>()? {
            table.insert(key, value);
        }
        Ok(Node::Table(table))
    }
}

/// A stage's keys that make no sense (a value that does not fit its key, an unknown key, a key of
/// another kind, a missing `kind`), and where (when known).
#[derive(Debug)]
pub(crate) struct ValueError {
    pub span: Option<Range<usize>>,
    /// The key the error is about, when it is about a key rather than its value (an unknown
    /// key): the error then points at the key's line.
    pub key: Option<String>,
    pub message: String,
}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        ValueError {
            span: None,
            key: None,
            message: message.to_string(),
        }
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ValueError {}

impl ValueError {
    /// This error, placed at `span` unless a value inside already placed it.
    fn at(mut self, span: &Option<Range<usize>>) -> Self {
        if self.span.is_none() {
            self.span.clone_from(span);
        }
        self
    }
}

/// Deserializes from a [`Located`] value, placing errors at the innermost value at fault.
struct LocatedDe<'a>(&'a Located);

impl<'de> de::Deserializer<'de> for LocatedDe<'_> {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        let span = &self.0.span;
        match &self.0.node {
            Node::Value(v) => v
                .clone()
                .deserialize_any(visitor)
                .map_err(|e| ValueError::custom(e.message())),
            Node::Table(t) => visitor.visit_map(Entries {
                entries: t.iter().collect(),
                next: 0,
            }),
            Node::Array(a) => visitor.visit_seq(Items(a.iter())),
        }
        .map_err(|e| e.at(span))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match &self.0.node {
            Node::Value(v) => v
                .clone()
                .deserialize_enum(name, variants, visitor)
                .map_err(|e| ValueError::custom(e.message()).at(&self.0.span)),
            _ => self.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

/// A table's entries as serde reads a map; an error in a key (an unknown field) or a value is
/// placed at that entry's value.
struct Entries<'a> {
    entries: Vec<(&'a String, &'a Located)>,
    next: usize,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = ValueError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ValueError> {
        let Some((key, value)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        let name: de::value::StrDeserializer<ValueError> = key.as_str().into_deserializer();
        seed.deserialize(name).map(Some).map_err(|e| ValueError {
            key: Some(key.to_string()),
            ..e.at(&value.span)
        })
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ValueError> {
        let (_, value) = self.entries[self.next];
        self.next += 1;
        seed.deserialize(LocatedDe(value))
            .map_err(|e| e.at(&value.span))
    }
}

struct Items<'a>(std::slice::Iter<'a, Located>);

impl<'de> SeqAccess<'de> for Items<'_> {
    type Error = ValueError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ValueError> {
        self.0
            .next()
            .map(|item| {
                seed.deserialize(LocatedDe(item))
                    .map_err(|e| e.at(&item.span))
            })
            .transpose()
    }
}

/// One located value deserialized into a `T`.
pub(crate) fn value<T: DeserializeOwned>(v: &Located) -> Result<T, ValueError> {
    T::deserialize(LocatedDe(v)).map_err(|e| e.at(&v.span))
}

/// A `[[stage]]` table read into its kind, name, input and own keys.
pub(super) fn read_stage(table: &Located) -> Result<Stage, ValueError> {
    let fail = |span: &Option<Range<usize>>, message: String| ValueError {
        span: span.clone(),
        key: None,
        message,
    };
    let Node::Table(entries) = &table.node else {
        return Err(fail(&table.span, "a [[stage]] must be a table".into()));
    };
    let mut entries = entries.clone();
    let kind = entries
        .remove("kind")
        .ok_or_else(|| fail(&table.span, "missing field `kind`".into()))?;
    let name: String = value(&kind)?;
    let Some(&found) = StageKind::ALL.iter().find(|k| k.name() == name) else {
        let known: Vec<String> = StageKind::ALL.iter().map(|k| k.name().into()).collect();
        let hint = closest(&name, &known)
            .map(|k| format!("; did you mean `{k}`?"))
            .unwrap_or_default();
        return Err(fail(
            &kind.span,
            format!(
                "unknown stage kind `{name}`{hint} (known: {})",
                known.join(", ")
            ),
        ));
    };
    let mut text = |key: &str| entries.remove(key).map(|v| value(&v)).transpose();
    Ok(Stage {
        kind: found,
        name: text("name")?,
        input: text("input")?,
        keys: StageKeys {
            span: table.span.clone(),
            entries,
        },
    })
}

/// The fields of a serde struct, as its derived `Deserialize` names them.
pub(crate) fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe;
    #[derive(Debug)]
    struct Found(Option<&'static [&'static str]>);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("not a struct")
        }
    }
    impl std::error::Error for Found {}
    impl de::Error for Found {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Found(None)
        }
    }
    impl<'de> de::Deserializer<'de> for Probe {
        type Error = Found;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(None))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(Some(fields)))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Found(Some(fields))) => fields,
        _ => &[],
    }
}

/// A stage's own keys (all but `kind`, `name` and `input`), each with its place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct StageKeys {
    /// The `[[stage]]` table's place.
    pub(crate) span: Option<Range<usize>>,
    pub(crate) entries: BTreeMap<String, Located>,
}

impl StageKeys {
    /// Where `key`'s value is, if the stage sets it.
    pub fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.entries.get(key).and_then(|v| v.span.clone())
    }

    /// Whether the stage sets `key`.
    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// `key`'s value, if it is a string.
    pub fn text(&self, key: &str) -> Option<&str> {
        match self.entries.get(key).map(|v| &v.node) {
            Some(Node::Value(toml::Value::String(s))) => Some(s),
            _ => None,
        }
    }

    /// These keys with `key` set to `value` (a sweep's variant), at the place of the value it
    /// replaces.
    pub fn with_value(&self, key: &str, value: &toml::Value) -> StageKeys {
        let mut keys = self.clone();
        let span = self.span_of(key).or_else(|| self.span.clone());
        keys.entries.insert(
            key.to_string(),
            Located {
                span,
                node: Node::Value(value.clone()),
            },
        );
        keys
    }

    /// Refuses a key that a stage of `kind` does not read, the first in the file first: "does
    /// not apply" when another kind reads it, "unknown key … did you mean" otherwise.
    pub(crate) fn check_applies(&self, kind: StageKind) -> Result<(), KeyError> {
        let accepted = kind.keys();
        let mut in_file: Vec<(&String, &Located)> = self.entries.iter().collect();
        in_file.sort_by_key(|(_, v)| v.span.as_ref().map_or(usize::MAX, |s| s.start));
        for (key, value) in in_file {
            if accepted.contains(&key.as_str()) {
                continue;
            }
            let message = if StageKind::ALL
                .iter()
                .any(|k| k.keys().contains(&key.as_str()))
            {
                format!("`{key}` does not apply to a {} stage", kind.name())
            } else {
                let mut expected: Vec<String> = ["kind", "name", "input"]
                    .into_iter()
                    .chain(accepted.iter().copied())
                    .map(String::from)
                    .collect();
                expected.sort();
                let hint = closest(key, &expected)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                format!(
                    "unknown key `{key}`{hint} (expected one of: {})",
                    expected.join(", ")
                )
            };
            return Err(KeyError::Value(ValueError {
                span: value.span.clone().or_else(|| self.span.clone()),
                key: Some(key.clone()),
                message,
            }));
        }
        Ok(())
    }
}

/// Reads a stage's keys into its kind's structs, and remembers which keys were read.
pub(crate) struct KeyReader<'a> {
    keys: &'a StageKeys,
    read: BTreeSet<&'static str>,
}

impl<'a> KeyReader<'a> {
    pub fn new(keys: &'a StageKeys) -> Self {
        KeyReader {
            keys,
            read: BTreeSet::new(),
        }
    }

    /// The stage's keys that are fields of `T`, deserialized into a `T`; the others are left to
    /// other structs. `T` is a plain struct (no `#[serde(flatten)]`, whose fields serde does not
    /// list).
    pub fn take<T: DeserializeOwned>(&mut self) -> Result<T, KeyError> {
        let fields = fields::<T>();
        let entries: Vec<(&String, &Located)> = self
            .keys
            .entries
            .iter()
            .filter(|(k, _)| fields.contains(&k.as_str()))
            .collect();
        self.read.extend(fields.iter().filter(|f| self.keys.has(f)));
        T::deserialize(de::value::MapAccessDeserializer::new(Entries {
            entries,
            next: 0,
        }))
        .map_err(|e| KeyError::Value(e.at(&self.keys.span)))
    }

    /// A key the stage sets that none of the structs read: a kind that lists a key it never
    /// reads (a defect, not the user's mistake).
    pub fn unread(&self) -> Option<&str> {
        self.keys
            .entries
            .keys()
            .find(|k| !self.read.contains(k.as_str()))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
