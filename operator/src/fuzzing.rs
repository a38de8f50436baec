//! The bodies of the operator's fuzz targets, as plain functions: the coverage-guided fuzzer
//! (`cargo xtask fuzz`, crate `fuzz/`) calls them with its inputs, and the unit tests below replay the
//! committed seeds (`fuzz/seeds/TARGET/`) and every crash found (`fuzz/regressions/TARGET/`) through them
//! on the stable toolchain. Each panics when an invariant of what it feeds is broken; whatever the input,
//! refusing it with an error is fine.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;

use crate::oci::{
    Credentials, LayerDescriptor, Platform, config_parts, decompressor, image_manifest_parts, index_child,
    squash_tars,
};
use crate::overlay::{DEFAULT_EXCLUSIONS, OpaqueXattr, UnpackOptions, apply_layer, unpack_layer};
use crate::ssh::client::NodeTarget;
use crate::ssh::export::{ExportPlan, NodeTar, Progress, excluded, filter_change_set};

/// A fuzz target: its name and its body (which panics when an invariant is broken).
pub use walt_crds::fuzzing::Target;

/// The operator's fuzz targets: name (as in `fuzz/Cargo.toml` and `fuzz/seeds/`) and body.
pub const TARGETS: &[Target] = &[
    ("unpack_layer", unpack_layer_target),
    ("filter_change_set", filter_change_set_target),
    ("squash", squash_target),
    ("oci_manifest", oci_manifest_target),
    ("dockerfile", dockerfile_target),
];

/// Bound on a decompressed layer in [`unpack_layer_target`] (a tiny zstd frame can claim gigabytes).
const MAX_LAYER: u64 = 8 << 20;

/// `tar` compressed here with gzip (`zstd` false) or zstd.
fn compressed(tar: &[u8], zstd: bool) -> Vec<u8> {
    if zstd {
        zstd::encode_all(tar, 1).expect("zstd into memory")
    } else {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(tar).expect("gzip into memory");
        encoder.finish().expect("gzip into memory")
    }
}

/// The layer reader: `overlay::unpack_layer` (and `apply_layer`) into a fresh temporary root, through
/// `oci::decompressor` for gzip, zstd and plain tar layers.
///
/// Input: the first byte picks the path, the rest is the layer: `choice % 5` 0 plain tar, 1 the tar
/// gzip-compressed here, 2 the tar zstd-compressed here, 3 the bytes as a gzip blob, 4 the bytes as a zstd
/// blob; a high bit (`choice >= 128`) flattens with `apply_layer` instead.
/// Invariants: nothing appears beside the root (the root's parent holds only the root), and the root stays
/// a directory, whatever the layer.
pub fn unpack_layer_target(data: &[u8]) {
    let Some((&choice, layer)) = data.split_first() else {
        return;
    };
    let (blob, media_type) = match choice % 5 {
        0 => (layer.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        1 => (
            compressed(layer, false),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        2 => (
            compressed(layer, true),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        3 => (layer.to_vec(), "application/vnd.oci.image.layer.v1.tar+gzip"),
        _ => (layer.to_vec(), "application/vnd.oci.image.layer.v1.tar+zstd"),
    };
    let Some(Ok(reader)) = decompressor(media_type, Box::new(blob.as_slice())) else {
        return;
    };
    let reader = reader.take(MAX_LAYER);
    let sandbox = tempfile::tempdir().expect("a temporary directory");
    let root = sandbox.path().join("root");
    std::fs::create_dir(&root).expect("the root");
    let _ = if choice >= 128 {
        apply_layer(reader, &root).map(|_| ())
    } else {
        let options = UnpackOptions {
            opaque_xattr: OpaqueXattr::User,
            preserve_owners: false,
        };
        unpack_layer(reader, &root, options).map(|_| ())
    };
    let outside: Vec<_> = std::fs::read_dir(sandbox.path())
        .expect("the sandbox")
        .map(|e| e.expect("a sandbox entry").file_name())
        .filter(|name| name != "root")
        .collect();
    assert!(
        outside.is_empty(),
        "the layer wrote outside its root: {outside:?}"
    );
    let meta = std::fs::symlink_metadata(&root).expect("the root");
    assert!(meta.is_dir(), "the root is not a directory any more");
    // Let the sandbox be removed even when the layer left read-only directories.
    make_writable(&root);
}

/// Makes `dir` and every directory under it writable by its owner (without following symlinks).
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

/// The node tar-stream parser and change-set filter: `ssh::export::filter_change_set` over what a node
/// sends (busybox or GNU tar of its overlay upper dir).
///
/// Input: the first byte picks the plan (bit 0: busybox tar, bit 1: filter on a ready time, bit 2: a
/// detected opaque `etc`), the rest is the node's tar.
/// Invariants: an accepted stream gives a well-formed tar whose names are UTF-8, relative, without `..`,
/// and no file among them is excluded by the plan's patterns.
pub fn filter_change_set_target(data: &[u8]) {
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
    for entry in archive.entries().expect("the change set's entries") {
        let entry = entry.expect("a change set entry");
        let path = String::from_utf8(entry.path_bytes().to_vec()).expect("a UTF-8 name");
        assert!(!path.starts_with('/'), "absolute name {path:?}");
        assert!(!path.split('/').any(|p| p == ".."), "name {path:?} climbs out");
        let relative = path.trim_start_matches("./").trim_end_matches('/');
        if !entry.header().entry_type().is_dir() {
            assert!(!excluded(relative, &plan.exclude), "excluded /{relative} kept");
        }
    }
}

/// What separates the layers in a [`squash_target`] input.
pub const LAYER_SEPARATOR: &[u8] = b"WALTLAYR";

/// The squash merger: `oci::squash_tars`, the pure part of `walt image squash` (the header pass deciding
/// the survivors across layers, then the copy pass).
///
/// Input: layer tars (bottom first) separated by [`LAYER_SEPARATOR`]; more than 8 layers are skipped.
/// Invariants: an accepted squash is a well-formed tar with no whiteout or opaque marker, each path once.
pub fn squash_target(data: &[u8]) {
    let mut layers = Vec::new();
    let mut rest = data;
    while let Some(at) = rest
        .windows(LAYER_SEPARATOR.len())
        .position(|w| w == LAYER_SEPARATOR)
    {
        layers.push(&rest[..at]);
        rest = &rest[at + LAYER_SEPARATOR.len()..];
    }
    layers.push(rest);
    if layers.len() > 8 {
        return;
    }
    let Ok(squashed) = squash_tars(&layers, Vec::new()) else {
        return;
    };
    let mut archive = tar::Archive::new(squashed.as_slice());
    let mut paths = HashSet::new();
    for entry in archive.entries().expect("the squashed entries") {
        let entry = entry.expect("a squashed entry");
        let path = entry.path_bytes().into_owned();
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|p| !p.is_empty())
            .unwrap_or_default();
        let shown = String::from_utf8_lossy(&path).into_owned();
        assert!(!name.starts_with(b".wh."), "marker {shown:?} kept");
        let key = shown.trim_start_matches("./").trim_end_matches('/').to_string();
        assert!(paths.insert(key.clone()), "{key:?} twice in the squashed layer");
    }
}

/// What a registry answers: manifests, indexes and configs as `RegistryClient::resolve` reads them
/// (`oci::index_child`, `image_manifest_parts`, `config_parts`), platforms (`Platform::parse`), and
/// Docker config JSON credentials (`Credentials::from_docker_config_json`).
///
/// Input: one document, tried as all of them.
/// Invariants: a parsed platform prints back to itself; layer descriptors round-trip through serde;
/// accepted diff_ids match the layer count.
pub fn oci_manifest_target(data: &[u8]) {
    let _ = Credentials::from_docker_config_json(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(platform) = Platform::parse(text)
    {
        let again = Platform::parse(&platform.to_string()).expect("a printed platform parses");
        assert_eq!(again, platform);
    }
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for wanted in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        let wanted = Platform::parse(wanted).expect("a platform");
        let _ = index_child(&document, &wanted, "fuzz");
    }
    if let Ok((config, layers)) = image_manifest_parts(&document, "fuzz") {
        for descriptor in std::iter::once(&config).chain(&layers) {
            let json = serde_json::to_value(descriptor).expect("a descriptor serializes");
            let back: LayerDescriptor = serde_json::from_value(json).expect("a descriptor reads back");
            assert_eq!(&back, descriptor);
        }
    }
    for count in [0, 1, 2] {
        if let Ok((_, diff_ids, _)) = config_parts(data, count, "fuzz") {
            assert_eq!(diff_ids.len(), count);
        }
    }
}

/// The Dockerfile parser of `walt image build` (`build::dockerfile::parse`), and the word splitting and
/// variable expansion the build applies to each instruction's words (`split_words`, `expand`).
///
/// Input: the Dockerfile's text (bytes that are not UTF-8 replaced).
/// Invariants: every line a step, stage or error names is a line of the text (1 ≤ line ≤ the number of
/// lines; an empty text's error is on line 1); an accepted file has a stage, the escape is `\` or `` ` ``,
/// the steps of a stage come after its `FROM`; split words are non-empty; expanding a word (shell or JSON
/// form) either gives a result or an error, never a panic.
pub fn dockerfile_target(data: &[u8]) {
    use crate::build::dockerfile::{expand, parse, split_words};
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count().max(1);
    let dockerfile = match parse(&text) {
        Ok(dockerfile) => dockerfile,
        Err(error) => {
            assert!(
                (1..=lines).contains(&error.line),
                "error on line {} of {lines}: {error}",
                error.line
            );
            return;
        }
    };
    assert!(!dockerfile.stages.is_empty(), "accepted without a stage");
    assert!(
        matches!(dockerfile.escape, '\\' | '`'),
        "escape {:?}",
        dockerfile.escape
    );
    let lookup = |name: &str| (name == "A").then(|| "value of A".to_owned());
    let steps = dockerfile
        .global_args
        .iter()
        .chain(dockerfile.stages.iter().flat_map(|stage| {
            assert!(
                (1..=lines).contains(&stage.line),
                "FROM on line {} of {lines}",
                stage.line
            );
            for step in &stage.steps {
                assert!(
                    step.line > stage.line,
                    "step on line {} before its FROM on line {}",
                    step.line,
                    stage.line
                );
            }
            &stage.steps
        }));
    for step in steps {
        assert!(
            (1..=lines).contains(&step.line),
            "step on line {} of {lines}",
            step.line
        );
        for word in split_words(&step.text, dockerfile.escape) {
            assert!(!word.is_empty(), "an empty word in {:?}", step.text);
            let _ = expand(&word, dockerfile.escape, false, &lookup);
            let _ = expand(&word, dockerfile.escape, true, &lookup);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_and_regressions_replay_through_every_target() {
        walt_crds::fuzzing::replay_committed_inputs(super::TARGETS);
    }
}
