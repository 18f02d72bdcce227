//! Where things are in a pipeline file: line and column of an offset, the offset of a key in a
//! table, and the "did you mean" of a misspelt key.

#[derive(Clone, Copy)]
pub(super) enum Place {
    Top,
    Stage(usize),
    Section(&'static str),
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Byte offsets of lines that are exactly `header` (ignoring surrounding spaces).
pub(super) fn header_offsets(text: &str, header: &str) -> Vec<usize> {
    let mut offset = 0;
    let mut out = vec![];
    for line in text.split_inclusive('\n') {
        if line.trim() == header {
            out.push(offset + line.len() - line.trim_start().len());
        }
        offset += line.len();
    }
    out
}

/// The offset of the line that assigns `key` (bare or quoted) at or after `from`, before the next
/// table header.
pub(super) fn key_offset(text: &str, from: usize, key: &str) -> Option<usize> {
    let from = text[..from.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let mut offset = from;
    for (n, line) in text[from..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if n > 0 && t.starts_with('[') {
            return None;
        }
        let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
        if t.contains('=') && k == key {
            return Some(offset + line.len() - t.len());
        }
        offset += line.len();
    }
    None
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`"; or "unknown variant").
pub(super) fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (key, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    Some((key.to_string(), expected))
}

/// The expected key nearest to `key` by edit distance, if it is close enough to be a typo.
pub(super) fn closest<'a>(key: &str, expected: &'a [String]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (levenshtein(key, e), e.as_str()))
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))
        .min()
        .map(|(_, e)| e)
}

pub(super) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
