//! The squash merger: `oci::squash_tars`, the pure part of `walt image squash` (header pass deciding the
//! survivors across layers, then the copy pass).
//!
//! Input: layer tars (bottom first) separated by the 8 bytes `WALTLAYR`.
//! Invariants: an accepted squash is a well-formed tar with no whiteout or opaque marker, each path once.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use walt_operator::oci::squash_tars;

const SEPARATOR: &[u8] = b"WALTLAYR";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut layers = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        layers.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    layers.push(rest);
    layers
}

fuzz_target!(|data: &[u8]| {
    let layers = split(data);
    if layers.len() > 8 {
        return;
    }
    let Ok(squashed) = squash_tars(&layers, Vec::new()) else {
        return;
    };
    let mut archive = tar::Archive::new(squashed.as_slice());
    let mut paths = HashSet::new();
    for entry in archive.entries().expect("squashed entries") {
        let entry = entry.expect("squashed entry");
        let path = entry.path_bytes().into_owned();
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|p| !p.is_empty())
            .unwrap_or_default();
        assert!(
            !name.starts_with(b".wh."),
            "marker {:?} kept",
            String::from_utf8_lossy(&path)
        );
        let key = String::from_utf8_lossy(&path).trim_end_matches('/').to_string();
        assert!(paths.insert(key.clone()), "{key:?} twice in the squashed layer");
    }
});
