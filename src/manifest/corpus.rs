//! Walks tests/bad-inputs: every `NAME.toml` must be rejected with exactly
//! the diagnostics in `NAME.expected`, labelled with the file name.

use std::path::{Path, PathBuf};

/// The `.toml` files of one corpus directory, sorted.
fn cases(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/bad-inputs")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry is readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Checks every case with `parse`; returns the mismatches.
fn walk(kind: &str, parse: impl Fn(&str, &[u8]) -> Result<(), String>) -> Vec<String> {
    let mut failures = Vec::new();
    let files = cases(kind);
    assert!(
        files.len() >= 25,
        "the {kind} corpus has only {} cases",
        files.len()
    );
    for file in files {
        let label = file
            .file_name()
            .expect("listed files have names")
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&file).expect("corpus file is readable");
        let expected_path = file.with_extension("expected");
        let got = match parse(&label, &bytes) {
            Ok(()) => "accepted".to_owned(),
            Err(text) => text,
        };
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", expected_path.display()));
        if got != expected.trim_end_matches('\n') {
            failures.push(format!("{kind}/{label}\nwant:\n{expected}got:\n{got}\n"));
        }
    }
    failures
}

#[test]
fn manifest_corpus() {
    let failures = walk("manifest", |label, bytes| {
        super::parse(label, bytes)
            .map(|_| ())
            .map_err(|d| d.to_string())
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn config_corpus() {
    let failures = walk("config", |label, bytes| {
        crate::config::parse(label, bytes, Path::new("/home/ops"))
            .map(|_| ())
            .map_err(|d| d.to_string())
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Cases too big to commit: files just over the 1 MiB limit.
#[test]
fn generated_huge_files() {
    let mut manifest = b"version = 1\n".to_vec();
    manifest.resize(super::reader::MAX_FILE_BYTES + 1, b'#');
    assert_eq!(
        super::parse("huge.toml", &manifest)
            .map(|_| ())
            .map_err(|d| d.to_string()),
        Err("huge.toml:1:1: file is larger than 1 MiB".to_owned())
    );
    let mut config = b"[source]\nurl = \"/srv/app.git\"\n".to_vec();
    config.resize(super::reader::MAX_FILE_BYTES + 1, b' ');
    assert_eq!(
        crate::config::parse("huge.toml", &config, Path::new("/home/ops"))
            .map(|_| ())
            .map_err(|d| d.to_string()),
        Err("huge.toml:1:1: file is larger than 1 MiB".to_owned())
    );
    // Exactly at the limit is still read.
    config.truncate(super::reader::MAX_FILE_BYTES);
    assert!(crate::config::parse("big.toml", &config, Path::new("/home/ops")).is_ok());
}
