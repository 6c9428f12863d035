//! The build context sent to the engine: `.dockerignore` semantics (as the
//! docker CLI applies them) and a small streaming tar writer, so a build never
//! shells out to `docker` and never ships files the repository asked to keep out.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why a build context could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{path:?}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(".dockerignore line {line}: invalid pattern {pattern:?}: {detail}")]
    Pattern {
        line: usize,
        pattern: String,
        detail: &'static str,
    },
    #[error("file {path:?} is too large for the build context")]
    TooLarge { path: PathBuf },
}

impl ContextError {
    /// Whether writing stopped because the reader went away.
    pub fn is_abandoned(&self) -> bool {
        matches!(self, ContextError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// One piece of a compiled pattern; semantics follow moby's `patternmatcher`,
/// which translates patterns to these regular-expression fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Lit(char),
    /// `*`: `[^/]*`
    Star,
    /// `?`: `[^/]`
    Quest,
    /// `[...]`: a character class, never matching `/` unless listed.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**` followed by more pattern (its `/` eaten): `(.*/)?`
    AnyDirs,
    /// `**` at the end of the pattern: `.*`
    AnyAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// The cleaned pattern text, without the `!`.
    text: String,
    exception: bool,
    tokens: Vec<Token>,
}

/// The patterns of one `.dockerignore`, in file order (the last match wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excludes {
    patterns: Vec<Pattern>,
}

impl Excludes {
    /// Parses `.dockerignore` text the way the docker CLI reads it: `#` starts
    /// a comment only at the start of a line, whitespace is trimmed, a leading
    /// `!` makes an exception, paths are cleaned and made relative.
    pub fn parse(text: &str) -> Result<Excludes, ContextError> {
        let mut patterns = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            if pattern.is_empty() {
                return Err(ContextError::Pattern {
                    line: index + 1,
                    pattern: raw.to_string(),
                    detail: "an exception needs a pattern after \"!\"",
                });
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let tokens = compile(&cleaned).map_err(|detail| ContextError::Pattern {
                line: index + 1,
                pattern: raw.to_string(),
                detail,
            })?;
            patterns.push(Pattern {
                text: cleaned,
                exception,
                tokens,
            });
        }
        Ok(Excludes { patterns })
    }

    /// Adds an exception for `path` (the docker CLI always sends the
    /// Dockerfile and `.dockerignore`, whatever the patterns say).
    fn keep(&mut self, path: &str) {
        let text = clean(path);
        let tokens = text.chars().map(Token::Lit).collect();
        self.patterns.push(Pattern {
            text,
            exception: true,
            tokens,
        });
    }

    /// Whether `rel` (slash-separated, relative to the context) is left out:
    /// a pattern matches the path itself or any of its parent directories.
    pub fn excluded(&self, rel: &str) -> bool {
        let parents: Vec<&str> = rel.match_indices('/').map(|(at, _)| &rel[..at]).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An exception only matters once something matched, and vice versa.
            if pattern.exception != matched {
                continue;
            }
            let hit = pattern.matches(rel) || parents.iter().any(|dir| pattern.matches(dir));
            if hit {
                matched = !pattern.exception;
            }
        }
        matched
    }

    /// Whether an excluded directory must still be walked because an
    /// exception names something inside it.
    fn has_exception_under(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.patterns
            .iter()
            .any(|p| p.exception && format!("{}/", p.text).starts_with(&prefix))
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        let chars: Vec<char> = path.chars().collect();
        match_tokens(&self.tokens, &chars)
    }
}

/// `path.Clean` from Go: collapse slashes, drop `.`, resolve `..`.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

fn compile(pattern: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                tokens.push(if i == chars.len() {
                    Token::AnyAll
                } else {
                    Token::AnyDirs
                });
                continue;
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Quest),
            '\\' => match chars.get(i + 1) {
                Some(next) => {
                    tokens.push(Token::Lit(*next));
                    i += 1;
                }
                None => tokens.push(Token::Lit('\\')),
            },
            '[' => {
                let (token, next) = compile_class(&chars, i + 1)?;
                tokens.push(token);
                i = next;
                continue;
            }
            ']' => return Err("unmatched \"]\""),
            other => tokens.push(Token::Lit(other)),
        }
        i += 1;
    }
    Ok(tokens)
}

/// Parses a class starting after its `[`; returns the token and the index
/// after its `]`.
fn compile_class(chars: &[char], mut i: usize) -> Result<(Token, usize), &'static str> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = match chars.get(i) {
            None => return Err("unclosed character class"),
            Some(']') if !first => return Ok((Token::Class { negated, ranges }, i + 1)),
            Some('\\') => {
                i += 1;
                *chars.get(i).ok_or("unclosed character class")?
            }
            Some(c) => *c,
        };
        first = false;
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            let mut hi = chars[i + 1];
            i += 2;
            if hi == '\\' {
                hi = *chars.get(i).ok_or("unclosed character class")?;
                i += 1;
            }
            if hi < c {
                return Err("character class range out of order");
            }
            ranges.push((c, hi));
        } else {
            ranges.push((c, c));
        }
    }
}

fn match_tokens(tokens: &[Token], s: &[char]) -> bool {
    let Some((token, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match token {
        Token::Lit(c) => s.first() == Some(c) && match_tokens(rest, &s[1..]),
        Token::Quest => s.first().is_some_and(|c| *c != '/') && match_tokens(rest, &s[1..]),
        Token::Class { negated, ranges } => s.first().is_some_and(|c| {
            let inside = ranges.iter().any(|(lo, hi)| lo <= c && c <= hi);
            // Like a negated regexp class, `[^a]` may match `/`; moby behaves the same.
            inside != *negated && match_tokens(rest, &s[1..])
        }),
        Token::Star => {
            for skip in 0..=s.len() {
                if match_tokens(rest, &s[skip..]) {
                    return true;
                }
                if s.get(skip) == Some(&'/') {
                    return false;
                }
            }
            false
        }
        Token::AnyAll => (0..=s.len()).any(|skip| match_tokens(rest, &s[skip..])),
        Token::AnyDirs => {
            match_tokens(rest, s)
                || s.iter()
                    .enumerate()
                    .any(|(at, c)| *c == '/' && match_tokens(rest, &s[at + 1..]))
        }
    }
}

/// Walks `context` in name order and writes every file that `.dockerignore`
/// keeps as a tar archive to `out`. `dockerfile` (relative to the context)
/// and `.dockerignore` are always included. Returns how many entries it wrote.
pub fn write_context(
    context: &Path,
    dockerfile: &str,
    out: impl Write,
) -> Result<usize, ContextError> {
    let ignore_path = context.join(".dockerignore");
    let mut excludes = match fs::read_to_string(&ignore_path) {
        Ok(text) => Excludes::parse(&text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Excludes::default(),
        Err(source) => {
            return Err(ContextError::Io {
                path: ignore_path,
                source,
            });
        }
    };
    excludes.keep(dockerfile);
    excludes.keep(".dockerignore");
    let mut tar = TarWriter { out, entries: 0 };
    walk(context, "", &excludes, &mut tar)?;
    tar.finish().map_err(|source| ContextError::Io {
        path: context.to_path_buf(),
        source,
    })?;
    Ok(tar.entries)
}

fn walk<W: Write>(
    dir: &Path,
    rel_dir: &str,
    excludes: &Excludes,
    tar: &mut TarWriter<W>,
) -> Result<(), ContextError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContextError::Io { path, source }
    };
    let mut entries = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(dir))?;
    entries.sort();
    for name in entries {
        let path = dir.join(&name);
        let name = name.to_string_lossy();
        let rel = if rel_dir.is_empty() {
            name.to_string()
        } else {
            format!("{rel_dir}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let kind = meta.file_type();
        if excludes.excluded(&rel) {
            if kind.is_dir() && excludes.has_exception_under(&rel) {
                walk(&path, &rel, excludes, tar)?;
            }
            continue;
        }
        let mode = permissions(&meta);
        let mtime = mtime(&meta);
        if kind.is_dir() {
            tar.entry(&format!("{rel}/"), Kind::Dir, mode, mtime, 0, "")
                .map_err(io_err(&path))?;
            walk(&path, &rel, excludes, tar)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err(&path))?;
            tar.entry(
                &rel,
                Kind::Symlink,
                mode,
                mtime,
                0,
                &target.to_string_lossy(),
            )
            .map_err(io_err(&path))?;
        } else if kind.is_file() {
            if meta.len() > MAX_OCTAL_SIZE {
                return Err(ContextError::TooLarge { path });
            }
            let mut file = fs::File::open(&path).map_err(io_err(&path))?;
            tar.entry(&rel, Kind::File, mode, mtime, meta.len(), "")
                .map_err(io_err(&path))?;
            tar.file_body(&mut file, meta.len())
                .map_err(io_err(&path))?;
        } else {
            tracing::debug!(path = %path.display(), "skipping a special file in the build context");
        }
    }
    Ok(())
}

#[cfg(unix)]
fn permissions(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

fn mtime(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The largest size an 11-digit octal ustar field holds.
const MAX_OCTAL_SIZE: u64 = 0o777_7777_7777;

#[derive(Clone, Copy)]
enum Kind {
    File,
    Dir,
    Symlink,
}

/// A ustar writer with PAX records for names that do not fit.
struct TarWriter<W: Write> {
    out: W,
    entries: usize,
}

impl<W: Write> TarWriter<W> {
    fn entry(
        &mut self,
        name: &str,
        kind: Kind,
        mode: u32,
        mtime: u64,
        size: u64,
        link: &str,
    ) -> io::Result<()> {
        let mut records = String::new();
        if name.len() > 100 {
            records.push_str(&pax_record("path", name));
        }
        if link.len() > 100 {
            records.push_str(&pax_record("linkpath", link));
        }
        if !records.is_empty() {
            let header = header(
                &format!("PaxHeaders/{}", short(name)),
                b'x',
                0o644,
                mtime,
                records.len() as u64,
                "",
            );
            self.out.write_all(&header)?;
            self.out.write_all(records.as_bytes())?;
            self.pad(records.len() as u64)?;
        }
        let flag = match kind {
            Kind::File => b'0',
            Kind::Dir => b'5',
            Kind::Symlink => b'2',
        };
        self.out
            .write_all(&header(short(name), flag, mode, mtime, size, short(link)))?;
        self.entries += 1;
        Ok(())
    }

    fn file_body(&mut self, file: &mut fs::File, size: u64) -> io::Result<()> {
        let copied = io::copy(&mut io::Read::take(file, size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being read",
            ));
        }
        self.pad(size)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rest = (512 - size % 512) % 512;
        self.out.write_all(&[0u8; 512][..rest as usize])
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.write_all(&[0u8; 1024])?;
        self.out.flush()
    }
}

/// The first at most 100 bytes of `s`, cut at a character boundary.
fn short(s: &str) -> &str {
    let mut end = s.len().min(100);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn pax_record(key: &str, value: &str) -> String {
    // "<len> key=value\n" where <len> counts the whole record, itself included.
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

fn header(name: &str, flag: u8, mode: u32, mtime: u64, size: u64, link: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime.min(MAX_OCTAL_SIZE));
    h[156] = flag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let digits = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(digits.as_bytes());
    h
}

/// Writes `value` as zero-padded octal followed by a NUL.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    field[..width].copy_from_slice(&text.as_bytes()[text.len() - width..]);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excludes(text: &str) -> Excludes {
        Excludes::parse(text).expect("test patterns are valid")
    }

    #[test]
    fn patterns_follow_docker_semantics() {
        // (dockerignore, path, excluded?)
        let table: &[(&str, &str, bool)] = &[
            ("*.bin", "big.bin", true),
            ("*.bin", "www/big.bin", false), // anchored at the root, unlike .gitignore
            ("**/*.bin", "www/big.bin", true),
            ("**/*.bin", "big.bin", true),
            ("www", "www/deep/file", true), // a matching parent excludes children
            ("www/", "www/file", true),
            ("/secret", "secret", true),
            ("./a/../secret", "secret", true),
            ("*.bin\n!keep.bin", "keep.bin", false),
            ("*.bin\n!keep.bin", "drop.bin", true),
            ("!keep.bin\n*.bin", "keep.bin", true), // the last match wins
            ("www\n!www/keep", "www/keep", false),
            ("www\n!www/keep", "www/other", true),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("a/**", "a/x/y", true),
            ("a/**", "b/x", false),
            ("fil?", "file", true),
            ("fil?", "fil/", false),
            ("f[a-c]o", "fbo", true),
            ("f[a-c]o", "fdo", false),
            ("f[^a-c]o", "fdo", true),
            ("f\\*o", "f*o", true),
            ("f\\*o", "fxo", false),
            ("# comment\n  spaced  ", "spaced", true),
            ("# comment", "# comment", false),
            ("*", "anything/at/all", true),
            ("*/*.tmp", "a/b.tmp", true),
            ("*/*.tmp", "a/b/c.tmp", false),
        ];
        for (patterns, path, want) in table {
            assert_eq!(
                excludes(patterns).excluded(path),
                *want,
                "patterns {patterns:?} on {path:?}"
            );
        }
    }

    #[test]
    fn invalid_patterns_name_the_line() {
        let err = Excludes::parse("ok\n!\n").expect_err("a lone ! is invalid");
        assert_eq!(
            err.to_string(),
            ".dockerignore line 2: invalid pattern \"!\": an exception needs a pattern after \"!\""
        );
        let err = Excludes::parse("a[bc").expect_err("an open class is invalid");
        assert_eq!(
            err.to_string(),
            ".dockerignore line 1: invalid pattern \"a[bc\": unclosed character class"
        );
    }

    #[test]
    fn clean_matches_go() {
        for (input, want) in [
            ("a//b/./c/", "a/b/c"),
            ("./", "."),
            ("../a", "../a"),
            ("a/../../b", "../b"),
            ("/../a", "/a"),
        ] {
            assert_eq!(clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn pax_record_length_counts_itself() {
        assert_eq!(pax_record("path", "a"), "9 path=a\n");
        // Around the point where the length grows from two to three digits.
        for n in 85..100 {
            let record = pax_record("path", &"x".repeat(n));
            let (len, _) = record.split_once(' ').expect("a length prefix");
            assert_eq!(len, record.len().to_string(), "value of {n} bytes");
        }
    }

    /// Reads back the names of a written archive (a tiny ustar/PAX reader).
    fn names(archive: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        let mut pax_path = None;
        while at + 512 <= archive.len() && archive[at] != 0 {
            let h = &archive[at..at + 512];
            let size_text = String::from_utf8_lossy(&h[124..135]).to_string();
            let size = u64::from_str_radix(&size_text, 8).expect("size is octal") as usize;
            let name = String::from_utf8_lossy(&h[..100])
                .trim_end_matches('\0')
                .to_string();
            let body = &archive[at + 512..at + 512 + size];
            if h[156] == b'x' {
                let text = String::from_utf8_lossy(body);
                pax_path = text
                    .split_once("path=")
                    .map(|(_, rest)| rest.trim_end_matches('\n').to_string());
            } else {
                names.push(pax_path.take().unwrap_or(name));
            }
            at += 512 + size.div_ceil(512) * 512;
        }
        names
    }

    #[test]
    fn context_applies_dockerignore_and_keeps_build_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let long_dir = "d".repeat(60);
        for (path, body) in [
            (
                ".dockerignore",
                "*.bin\n!keep.bin\nsecret\nDockerfile\nnested\n!nested/in/kept\n",
            ),
            ("Dockerfile", "FROM scratch\n"),
            ("app.txt", "app"),
            ("big.bin", "big"),
            ("keep.bin", "keep"),
            ("secret/key", "k"),
            ("nested/in/kept", "x"),
            ("nested/in/dropped", "y"),
            (&format!("{long_dir}/{long_dir}/file.txt"), "long"),
        ] {
            let path = root.join(path);
            fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
            fs::write(path, body).expect("write");
        }
        let mut out = Vec::new();
        let count = write_context(root, "Dockerfile", &mut out).expect("context is readable");
        let names = names(&out);
        assert_eq!(
            names,
            vec![
                ".dockerignore".to_string(),
                "Dockerfile".to_string(),
                "app.txt".to_string(),
                format!("{long_dir}/"),
                format!("{long_dir}/{long_dir}/"),
                format!("{long_dir}/{long_dir}/file.txt"),
                "keep.bin".to_string(),
                "nested/in/kept".to_string(),
            ]
        );
        assert_eq!(count, names.len());
        assert_eq!(out.len() % 512, 0);
    }
}
