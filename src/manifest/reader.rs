//! Shared plumbing for reading a TOML file into validated settings: size and
//! UTF-8 checks, TOML syntax errors, byte offsets turned into `line:col`, and
//! typed, position-aware access to tables so every problem names its place.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Diagnostic, Diagnostics, Position};

/// Files larger than this are refused before parsing.
pub(crate) const MAX_FILE_BYTES: usize = 1024 * 1024;

/// A value and where it sits in the file (byte offsets).
#[derive(Debug, Clone)]
pub(crate) struct At<T> {
    pub span: Range<usize>,
    pub value: T,
}

/// Collects diagnostics against one file; converts offsets to positions.
pub(crate) struct Reader<'s> {
    file: &'s str,
    text: &'s str,
    found: Vec<(usize, String)>,
}

impl<'s> Reader<'s> {
    pub fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.found.push((offset, message.into()));
    }

    pub fn has_errors(&self) -> bool {
        !self.found.is_empty()
    }

    /// Every collected problem, sorted by position (stable for equal places).
    pub fn finish(self) -> Diagnostics {
        let mut found = self.found;
        found.sort_by_key(|(offset, _)| *offset);
        Diagnostics(
            found
                .into_iter()
                .map(|(offset, message)| Diagnostic {
                    file: self.file.to_owned(),
                    position: Some(position_of(self.file, self.text, offset)),
                    message,
                })
                .collect(),
        )
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn position_of(file: &str, text: &str, offset: usize) -> Position {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Position {
        file: file.to_owned(),
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
    }
}

/// A diagnostic at line 1, column 1: for problems with the file as a whole.
fn whole_file(file: &str, message: impl Into<String>) -> Diagnostics {
    Diagnostics(vec![Diagnostic {
        file: file.to_owned(),
        position: Some(Position {
            file: file.to_owned(),
            line: 1,
            col: 1,
        }),
        message: message.into(),
    }])
}

/// Checks size, encoding and TOML syntax; hands the root table and a reader
/// for semantic checks to `validate`.
pub(crate) fn read_toml<T>(
    file: &str,
    bytes: &[u8],
    validate: impl FnOnce(&mut Reader<'_>, Table<'_, '_>) -> Option<T>,
) -> Result<T, Diagnostics> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(whole_file(file, "file is larger than 1 MiB"));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let valid = &bytes[..error.valid_up_to()];
            let valid = std::str::from_utf8(valid).expect("prefix up to valid_up_to is UTF-8");
            let position = position_of(file, valid, valid.len());
            return Err(Diagnostics(vec![Diagnostic {
                file: file.to_owned(),
                position: Some(position),
                message: "file is not valid UTF-8".to_owned(),
            }]));
        }
    };
    let mut reader = Reader {
        file,
        text,
        found: Vec::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            let message = syntax_message(error.message(), text.get(span.clone()).unwrap_or(""));
            reader.error(span.start, message);
            return Err(reader.finish());
        }
    };
    let table = Table {
        label: "the top level".to_owned(),
        span: 0..0,
        map: root.get_ref(),
    };
    let validated = validate(&mut reader, table);
    match validated {
        Some(value) if !reader.has_errors() => Ok(value),
        _ => {
            debug_assert!(reader.has_errors(), "validation failed without saying why");
            Err(reader.finish())
        }
    }
}

/// toml's message on one line, prefixed so the user knows it is syntax.
fn syntax_message(message: &str, under_span: &str) -> String {
    let one_line = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if one_line == "duplicate key" {
        let key = under_span.trim_matches(|c| c == '"' || c == '\'');
        return format!("invalid TOML: duplicate key {key:?}");
    }
    format!("invalid TOML: {one_line}")
}

/// `a string`, `an integer`, ... for "found ..." in type errors.
pub(crate) fn kind_of(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Parses a TOML integer as written (any radix) into an i128.
pub(crate) fn integer_of(value: &DeValue<'_>) -> Option<i128> {
    match value {
        DeValue::Integer(int) => i128::from_str_radix(int.as_str(), int.radix()).ok(),
        _ => None,
    }
}

/// One TOML table with the name used for it in messages.
#[derive(Clone)]
pub(crate) struct Table<'a, 'i> {
    /// How messages name this table: `[scopes.api]`, `health check 1 of scope "api"`.
    pub label: String,
    /// Where the table starts (its header, or the inline table).
    pub span: Range<usize>,
    pub map: &'a DeTable<'i>,
}

impl<'a, 'i> Table<'a, 'i> {
    /// "in [scopes.api]", or "at the top level" for the root table.
    fn place(&self) -> String {
        if self.span == (0..0) && self.label == "the top level" {
            "at the top level".to_owned()
        } else {
            format!("in {}", self.label)
        }
    }

    /// Reports every key not in `allowed`, at the key.
    pub fn check_keys(&self, reader: &mut Reader<'_>, allowed: &[&str]) {
        for key in self.map.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                reader.error(
                    key.span().start,
                    format!(
                        "unknown key {:?} {}; expected one of: {}",
                        key.get_ref(),
                        self.place(),
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    /// The key's span and the value.
    pub fn entry(&self, key: &str) -> Option<(Range<usize>, &'a Spanned<DeValue<'i>>)> {
        self.map
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(k, v)| (k.span(), v))
    }

    pub fn value(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.entry(key).map(|(_, v)| v)
    }

    fn wrong_type(reader: &mut Reader<'_>, key: &str, want: &str, found: &Spanned<DeValue<'_>>) {
        reader.error(
            found.span().start,
            format!("{key:?} must be {want}, found {}", kind_of(found.get_ref())),
        );
    }

    pub fn string(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<&'a str>> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::String(s) => Some(At {
                span: value.span(),
                value: s.as_ref(),
            }),
            _ => {
                Self::wrong_type(reader, key, "a string", value);
                None
            }
        }
    }

    /// Like [`Table::string`] but reports a missing key at the table.
    pub fn required_string(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<&'a str>> {
        if self.value(key).is_none() {
            reader.error(
                self.span.start,
                format!("missing key {key:?} {}", self.place()),
            );
            return None;
        }
        self.string(reader, key)
    }

    pub fn boolean(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<bool>> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::Boolean(b) => Some(At {
                span: value.span(),
                value: *b,
            }),
            _ => {
                Self::wrong_type(reader, key, "a boolean", value);
                None
            }
        }
    }

    pub fn integer(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<i128>> {
        let value = self.value(key)?;
        match integer_of(value.get_ref()) {
            Some(n) => Some(At {
                span: value.span(),
                value: n,
            }),
            None => {
                Self::wrong_type(reader, key, "an integer", value);
                None
            }
        }
    }

    /// A number, written as a float or an integer.
    pub fn float(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<f64>> {
        let value = self.value(key)?;
        let number = match value.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            other => integer_of(other).map(|n| n as f64),
        };
        match number.filter(|n| n.is_finite()) {
            Some(n) => Some(At {
                span: value.span(),
                value: n,
            }),
            None => {
                Self::wrong_type(reader, key, "a number", value);
                None
            }
        }
    }

    /// An array of strings; a wrong element is reported at the element and
    /// left out. `None` when the key is absent or not an array.
    pub fn strings(&self, reader: &mut Reader<'_>, key: &str) -> Option<At<Vec<At<&'a str>>>> {
        let value = self.value(key)?;
        let DeValue::Array(array) = value.get_ref() else {
            Self::wrong_type(reader, key, "an array of strings", value);
            return None;
        };
        let mut items = Vec::new();
        for item in array.iter() {
            match item.get_ref() {
                DeValue::String(s) => items.push(At {
                    span: item.span(),
                    value: s.as_ref(),
                }),
                other => reader.error(
                    item.span().start,
                    format!(
                        "elements of {key:?} must be strings, found {}",
                        kind_of(other)
                    ),
                ),
            }
        }
        Some(At {
            span: value.span(),
            value: items,
        })
    }

    /// A sub-table named `key`, labelled `label` in messages.
    pub fn table(
        &self,
        reader: &mut Reader<'_>,
        key: &str,
        label: String,
    ) -> Option<Table<'a, 'i>> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::Table(map) => Some(Table {
                label,
                span: value.span(),
                map,
            }),
            _ => {
                Self::wrong_type(reader, key, "a table", value);
                None
            }
        }
    }

    /// An array of tables (`[[key]]`); element `i` (1-based) is labelled by
    /// `label(i)`. Non-table elements are reported and skipped.
    pub fn tables(
        &self,
        reader: &mut Reader<'_>,
        key: &str,
        label: impl Fn(usize) -> String,
    ) -> Option<Vec<Table<'a, 'i>>> {
        let value = self.value(key)?;
        let DeValue::Array(array) = value.get_ref() else {
            Self::wrong_type(reader, key, "an array of tables", value);
            return None;
        };
        let mut tables = Vec::new();
        for (index, item) in array.iter().enumerate() {
            match item.get_ref() {
                DeValue::Table(map) => tables.push(Table {
                    label: label(index + 1),
                    span: item.span(),
                    map,
                }),
                other => reader.error(
                    item.span().start,
                    format!(
                        "elements of {key:?} must be tables, found {}",
                        kind_of(other)
                    ),
                ),
            }
        }
        Some(tables)
    }
}

/// Checks a repository-relative path: not empty, no NUL, not absolute, and
/// no `..` that climbs above the repository root.
pub(crate) fn check_repo_path(reader: &mut Reader<'_>, path: &At<&str>) -> bool {
    let problem = repo_path_problem(path.value);
    if let Some(problem) = problem {
        reader.error(path.span.start, problem);
        return false;
    }
    true
}

fn repo_path_problem(path: &str) -> Option<String> {
    if path.is_empty() {
        return Some("path must not be empty".to_owned());
    }
    if path.contains('\0') {
        return Some(format!("path {path:?} contains a NUL byte"));
    }
    if path.starts_with('/') {
        return Some(format!("path {path:?} must be relative to the repository"));
    }
    let mut depth: usize = 0;
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return Some(format!("path {path:?} leaves the repository")),
            },
            _ => depth += 1,
        }
    }
    None
}

/// Parses a strict duration: one or more `<digits><unit>` with unit `ms`,
/// `s`, `m` or `h`, no spaces: "500ms", "30s", "5m", "1h", "1m30s".
/// `at` as an IP address and port; an error at it otherwise.
pub fn socket_addr(r: &mut Reader<'_>, at: &At<&str>) -> Option<std::net::SocketAddr> {
    let parsed = at.value.parse::<std::net::SocketAddr>();
    if parsed.is_err() {
        r.error(
            at.span.start,
            format!(
                "invalid listen address {:?}; expected an IP address and port such as \"127.0.0.1:9821\"",
                at.value
            ),
        );
    }
    parsed.ok()
}

pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total_ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total_ms = total_ms.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(std::time::Duration::from_millis(total_ms))
}

/// Reads an optional duration key; a bad one is reported at the value.
pub(crate) fn duration(
    reader: &mut Reader<'_>,
    table: &Table<'_, '_>,
    key: &str,
) -> Option<At<std::time::Duration>> {
    let text = table.string(reader, key)?;
    match parse_duration(text.value) {
        Some(d) => Some(At {
            span: text.span,
            value: d,
        }),
        None => {
            reader.error(
                text.span.start,
                format!(
                    "duration {:?} does not parse; use e.g. \"500ms\", \"30s\", \"5m\"",
                    text.value
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("500ms", Some(500)),
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("1h", Some(3_600_000)),
            ("1m30s", Some(90_000)),
            ("0s", Some(0)),
            ("", None),
            ("5", None),
            ("5 minutes", None),
            ("5min", None),
            ("s", None),
            ("-1s", None),
            ("1.5s", None),
            ("99999999999999999999s", None),
            ("18446744073709551615h", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_duration(text),
                want.map(Duration::from_millis),
                "{text:?}"
            );
        }
    }

    #[test]
    fn repo_paths() {
        let cases: &[(&str, Option<&str>)] = &[
            ("services/api/", None),
            ("a/../b", None),
            ("./deploy/x", None),
            ("a/..", None),
            ("", Some("path must not be empty")),
            (
                "../etc/passwd",
                Some("path \"../etc/passwd\" leaves the repository"),
            ),
            (
                "a/../../b",
                Some("path \"a/../../b\" leaves the repository"),
            ),
            (
                "/etc/passwd",
                Some("path \"/etc/passwd\" must be relative to the repository"),
            ),
            ("a\0b", Some("path \"a\\0b\" contains a NUL byte")),
        ];
        for (path, want) in cases {
            assert_eq!(repo_path_problem(path).as_deref(), *want, "{path:?}");
        }
    }

    #[test]
    fn positions_count_characters() {
        let text = "é = 1\nab = \"ü\" x";
        let p = position_of("f", text, text.find('x').expect("x is in the text"));
        assert_eq!((p.line, p.col), (2, 10));
        let p = position_of("f", text, 0);
        assert_eq!((p.line, p.col), (1, 1));
    }
}
