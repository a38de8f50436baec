//! The plugin's image-shell exit dialogue (`dialogue::exit_dialogue`: save as / overwrite / discard)
//! and its y/N `confirm`, over arbitrary typed input.
//!
//! Input: what the user types. Names whose length is even exist; names holding `b` are booted by a node.
//! Invariants: it ends (input is finite); a saved name is the image itself or one the validator
//! accepted, trimmed, one line; confirm is true only after a y or yes line.
#![no_main]

use kubectl_walt::dialogue::{Decision, NameFacts, confirm, exit_dialogue};
use libfuzzer_sys::fuzz_target;
use walt_crds::ImageName;

fuzz_target!(|data: &[u8]| {
    let validate = |name: &str| ImageName::parse(name).err().map(|e| e.to_string());
    let mut facts = |name: &str| NameFacts {
        exists: name.len() % 2 == 0,
        booted_by: if name.contains('b') {
            vec!["rpi3-01".into()]
        } else {
            Vec::new()
        },
    };
    let mut input = data;
    let mut output = Vec::new();
    let Ok(decision) = exit_dialogue("rpi-debian", &mut input, &mut output, &validate, &mut facts) else {
        return;
    };
    if let Decision::SaveAs(name) = &decision {
        assert!(
            name == "rpi-debian" || validate(name).is_none(),
            "accepted {name:?}"
        );
        assert_eq!(name.trim(), name);
        assert!(!name.contains('\n'));
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
});
