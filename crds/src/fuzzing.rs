//! The body of the image-name fuzz target, as a plain function: the coverage-guided fuzzer
//! (`cargo xtask fuzz`, crate `fuzz/`) calls it with its inputs, and the unit test below replays the
//! committed seeds (`fuzz/seeds/image_name/`) and every crash found (`fuzz/regressions/image_name/`)
//! through it on the stable toolchain. It panics when an invariant is broken.

use crate::ImageName;
use crate::schema::IMAGE_NAME_MAX_LENGTH;

/// A fuzz target: its name and its body (which panics when an invariant is broken).
pub type Target = (&'static str, fn(&[u8]));

/// The crate's fuzz targets: name (as in `fuzz/Cargo.toml` and `fuzz/seeds/`) and body.
pub const TARGETS: &[Target] = &[("image_name", image_name_target)];

/// `ImageName::parse`, what every image name typed by a user or read from an object goes through.
///
/// Input: the name (UTF-8; other bytes are skipped).
/// Invariants: a parsed name re-parses to itself from its printed form, from `name:tag` when that fits
/// the length limit (which counts the text as written, like the API server's `maxLength`: a 122-character
/// name is valid, the same name with `:latest` is too long; found by this target) and from its object
/// name, and its object name is a valid Kubernetes object name (lower-case alphanumerics, `-` and `.`).
pub fn image_name_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = ImageName::parse(text) else {
        return;
    };
    let printed = ImageName::parse(&parsed.to_string()).expect("the printed name re-parses");
    assert_eq!((printed.name(), printed.tag()), (parsed.name(), parsed.tag()));
    let full = format!("{}:{}", parsed.name(), parsed.tag());
    if full.len() <= IMAGE_NAME_MAX_LENGTH {
        let again = ImageName::parse(&full).expect("name:tag re-parses");
        assert_eq!((again.name(), again.tag()), (parsed.name(), parsed.tag()));
    }
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
}

/// Runs every committed input of each of `targets` (the seeds under `fuzz/seeds/<target>/` and the
/// crashes fuzzing found, `fuzz/regressions/<target>/`) through its body: what each crate's replay
/// test calls on the stable toolchain. Panics when a target has fewer than two seeds, or when an
/// input breaks an invariant (the file is named on stderr first).
pub fn replay_committed_inputs(targets: &[Target]) {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (target, body) in targets {
        let mut files = Vec::new();
        for dir in ["seeds", "regressions"] {
            if let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) {
                files.extend(entries.flatten().map(|entry| entry.path()));
            }
        }
        files.sort();
        assert!(
            files.len() >= 2,
            "{target}: no committed seeds under fuzz/seeds/{target}"
        );
        for file in files {
            eprintln!("{target}: {}", file.display());
            let data = std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            body(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_and_regressions_replay_through_every_target() {
        super::replay_committed_inputs(super::TARGETS);
    }
}
