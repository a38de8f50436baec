//! `ImageName::parse` (walt-crds), what every image name typed by a user or read from an object goes
//! through.
//!
//! Invariants: a parsed name re-parses to itself from `name:tag` and from its object name, and its
//! object name is a valid Kubernetes object name (lower-case alphanumerics, `-` and `.`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walt_crds::ImageName;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = ImageName::parse(text) else {
        return;
    };
    let full = format!("{}:{}", parsed.name(), parsed.tag());
    let again = ImageName::parse(&full).expect("name:tag re-parses");
    assert_eq!((again.name(), again.tag()), (parsed.name(), parsed.tag()));
    let object = parsed.object_name();
    assert!(
        object
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
        "object name {object:?}"
    );
    let back = ImageName::from_object_name(&object).expect("the object name reads back");
    assert_eq!((back.name(), back.tag()), (parsed.name(), parsed.tag()));
    assert_eq!(back.object_name(), object);
});
