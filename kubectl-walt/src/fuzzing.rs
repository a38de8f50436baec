//! The bodies of the plugin's fuzz targets, as plain functions: the coverage-guided fuzzer
//! (`cargo xtask fuzz`, crate `fuzz/`) calls them with its inputs, and the unit test below replays the
//! committed seeds (`fuzz/seeds/TARGET/`) and every crash found (`fuzz/regressions/TARGET/`) through them
//! on the stable toolchain. Each panics when an invariant is broken.

use std::collections::HashSet;

use walt_crds::ImageName;

use crate::dialogue::{Decision, NameFacts, confirm, exit_dialogue};
use crate::format::split_set;

/// A fuzz target: its name and its body (which panics when an invariant is broken).
pub use walt_crds::fuzzing::Target;

/// The plugin's fuzz targets: name (as in `fuzz/Cargo.toml` and `fuzz/seeds/`) and body.
pub const TARGETS: &[Target] = &[("node_set", node_set_target), ("dialogue", dialogue_target)];

/// The node-set parser (`kubectl walt node … NODE1,NODE2`): `format::split_set`.
///
/// Input: the set as typed (UTF-8; other bytes are skipped).
/// Invariants: items are trimmed, non-empty, comma-free and unique, in first-seen order; joining them
/// back with `,` splits to the same list.
pub fn node_set_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let items = split_set(text);
    let mut seen = HashSet::new();
    for item in &items {
        assert!(!item.is_empty(), "an empty item in {items:?}");
        assert!(!item.contains(','), "{item:?} holds a comma");
        assert_eq!(item.trim(), item);
        assert!(seen.insert(item.as_str()), "{item:?} twice");
    }
    assert_eq!(split_set(&items.join(",")), items);
}

/// The image shell's exit dialogue (`dialogue::exit_dialogue`: save as / overwrite / discard) and its y/N
/// `confirm`, over arbitrary typed input.
///
/// Input: what the user types. Names whose length is even exist; names holding `b` are booted by a node.
/// Invariants: it ends (the input is finite); a saved name is the image itself or one the validator
/// accepted, trimmed, on one line; confirm is true only after a `y` or `yes` first line.
pub fn dialogue_target(data: &[u8]) {
    let validate = |name: &str| ImageName::parse(name).err().map(|e| e.to_string());
    let mut facts = |name: &str| NameFacts {
        exists: name.len().is_multiple_of(2),
        booted_by: if name.contains('b') {
            vec!["rpi3-01".into()]
        } else {
            Vec::new()
        },
    };
    let mut input = data;
    let mut output = Vec::new();
    if let Ok(Decision::SaveAs(name)) =
        exit_dialogue("rpi-debian", &mut input, &mut output, &validate, &mut facts)
    {
        assert!(
            name == "rpi-debian" || validate(&name).is_none(),
            "accepted {name:?}"
        );
        assert_eq!(name.trim(), name);
        assert!(!name.contains('\n'), "{name:?} spans lines");
    }
    let mut input = data;
    let mut output = Vec::new();
    if let Ok(yes) = confirm("Continue?", &mut input, &mut output) {
        let first = String::from_utf8_lossy(data);
        let line = first
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        assert_eq!(yes, line == "y" || line == "yes", "confirm on {line:?}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_and_regressions_replay_through_every_target() {
        walt_crds::fuzzing::replay_committed_inputs(super::TARGETS);
    }
}
