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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::TARGETS;

    /// The committed inputs of `target`: its seeds and the crashes fuzzing found (regressions).
    fn corpus(target: &str) -> Vec<PathBuf> {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut files = Vec::new();
        for dir in ["seeds", "regressions"] {
            if let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) {
                files.extend(entries.flatten().map(|e| e.path()));
            }
        }
        files.sort();
        files
    }

    #[test]
    fn seeds_and_regressions_replay_through_every_target() {
        for (target, body) in TARGETS {
            let files = corpus(target);
            assert!(
                files.len() >= 2,
                "{target}: no committed seeds under fuzz/seeds/{target}"
            );
            for file in files {
                let data = std::fs::read(&file).expect("a corpus file");
                eprintln!("{target}: {}", file.display());
                body(&data);
            }
        }
    }
}
