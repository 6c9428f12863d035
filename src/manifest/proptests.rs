//! Property tests: no input makes the manifest or config parsers panic, and
//! every rejection points at a place inside the file.

use std::path::Path;

use proptest::prelude::*;

use super::Diagnostics;

use super::parse::tests::EXAMPLE as MANIFEST;
use crate::config::tests::FULL as CONFIG;

/// Every diagnostic has a position inside `bytes` (line 1.., col 1..).
fn assert_positioned(bytes: &[u8], diagnostics: &Diagnostics) -> Result<(), TestCaseError> {
    prop_assert!(!diagnostics.0.is_empty(), "a rejection must say why");
    let lines = bytes.iter().filter(|b| **b == b'\n').count() + 1;
    for d in &diagnostics.0 {
        let p = d.position.as_ref();
        prop_assert!(p.is_some(), "no position: {d}");
        let p = p.expect("checked above");
        prop_assert!(p.line >= 1 && p.line <= lines, "line out of range: {d}");
        prop_assert!(p.col >= 1, "column out of range: {d}");
        prop_assert!(!d.message.contains('\n'), "multi-line message: {d:?}");
    }
    Ok(())
}

fn check_both(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(d) = super::parse("m.toml", bytes) {
        assert_positioned(bytes, &d)?;
    }
    if let Err(d) = crate::config::parse("c.toml", bytes, Path::new("/home/ops")) {
        assert_positioned(bytes, &d)?;
    }
    Ok(())
}

/// One edit of a valid file: delete, insert or overwrite a few bytes.
fn mutate(base: &str) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    let edit = (
        0..=len,
        0usize..8,
        prop::collection::vec(
            prop_oneof![
                any::<u8>(),
                prop::sample::select(b"[]{}=\"'.,#\n 0a-_/@:~".to_vec())
            ],
            0..6,
        ),
    );
    let base = base.as_bytes().to_vec();
    prop::collection::vec(edit, 1..4).prop_map(move |edits| {
        let mut bytes = base.clone();
        for (at, remove, insert) in edits {
            let at = at.min(bytes.len());
            let end = (at + remove).min(bytes.len());
            bytes.splice(at..end, insert);
        }
        bytes
    })
}

#[test]
fn the_bases_are_valid() {
    assert!(super::parse("m.toml", MANIFEST.as_bytes()).is_ok());
    assert!(crate::config::parse("c.toml", CONFIG.as_bytes(), Path::new("/home/ops")).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check_both(&bytes)?;
    }

    #[test]
    fn random_toml_like_text(text in "[a-z_.=\\[\\]{}\"', 0-9\n#-]{0,300}") {
        check_both(text.as_bytes())?;
    }

    #[test]
    fn mutated_manifest(bytes in mutate(MANIFEST)) {
        check_both(&bytes)?;
    }

    #[test]
    fn mutated_config(bytes in mutate(CONFIG)) {
        check_both(&bytes)?;
    }
}
