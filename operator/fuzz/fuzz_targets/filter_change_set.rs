//! The node tar-stream parser and change-set filter: `ssh::export::filter_change_set` over what a node
//! sends (busybox or GNU tar of its overlay upper dir).
//!
//! Input: the first byte picks the plan (bit 0: busybox tar, bit 1: filter on a ready time, bit 2: detected
//! opaque `etc`), the rest is the node's tar.
//! Invariants: an accepted stream gives a well-formed tar whose names are relative, with no `..`, and
//! none excluded by the plan's patterns.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use walt_operator::overlay::DEFAULT_EXCLUSIONS;
use walt_operator::ssh::client::NodeTarget;
use walt_operator::ssh::export::{ExportPlan, NodeTar, Progress, excluded, filter_change_set};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, tar)) = data.split_first() else {
        return;
    };
    let plan = ExportPlan {
        tar: if choice & 1 == 0 {
            NodeTar::Gnu
        } else {
            NodeTar::Busybox
        },
        changed_since: (choice & 2 != 0).then_some(1_000_000),
        detected_opaque: if choice & 4 != 0 {
            HashSet::from(["etc".to_string()])
        } else {
            HashSet::new()
        },
        command: String::new(),
        exclude: DEFAULT_EXCLUSIONS.iter().map(|p| (*p).to_string()).collect(),
    };
    let target = NodeTarget {
        user: "root".into(),
        host: "node".into(),
        port: 22,
    };
    let mut out = Vec::new();
    if filter_change_set(tar, &mut out, &plan, &target, &Progress::default()).is_err() {
        return;
    }
    let mut archive = tar::Archive::new(out.as_slice());
    for entry in archive.entries().expect("change set entries") {
        let entry = entry.expect("change set entry");
        let path = entry.path_bytes();
        let path = String::from_utf8(path.to_vec()).expect("UTF-8 name");
        assert!(!path.starts_with('/'), "absolute name {path:?}");
        assert!(!path.split('/').any(|p| p == ".."), "name {path:?} climbs out");
        let relative = path.trim_start_matches("./").trim_end_matches('/');
        if !entry.header().entry_type().is_dir() {
            assert!(!excluded(relative, &plan.exclude), "excluded /{relative} kept");
        }
    }
});
