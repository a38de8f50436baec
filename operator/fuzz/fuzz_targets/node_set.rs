//! The plugin's node-set parser (`kubectl walt node … NODE1,NODE2`): `format::split_set`.
//!
//! Invariants: items are trimmed, non-empty, comma-free and unique, in first-seen order; joining them
//! back with `,` splits to the same list.
#![no_main]

use std::collections::HashSet;

use kubectl_walt::format::split_set;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let items = split_set(text);
    let mut seen = HashSet::new();
    for item in &items {
        assert!(!item.is_empty());
        assert!(!item.contains(','));
        assert_eq!(item.trim(), item);
        assert!(seen.insert(item.as_str()), "{item:?} twice");
    }
    assert_eq!(split_set(&items.join(",")), items);
});
