//! One file per command: argument handling and human output.

/// `moorline check`: validate a manifest offline.
pub mod check;
