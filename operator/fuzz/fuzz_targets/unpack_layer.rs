//! The layer reader: `overlay::unpack_layer` (and `apply_layer`) into a fresh temporary root, through
//! `oci::decompressor` for gzip, zstd and plain tar layers.
//!
//! Input: the first byte picks the path, the rest is the layer: 0 plain tar, 1 the tar gzip-compressed
//! here, 2 the tar zstd-compressed here, 3 the bytes as a gzip blob, 4 the bytes as a zstd blob; an odd
//! second choice (`byte >> 7`) flattens with `apply_layer` instead.
//! Invariant: nothing appears outside the root (the root's parent holds only the root), whatever the layer.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use walt_operator::oci::decompressor;
use walt_operator::overlay::{OpaqueXattr, UnpackOptions, apply_layer, unpack_layer};

/// Bound on the decompressed size (a tiny zstd frame can claim gigabytes).
const MAX_LAYER: u64 = 8 << 20;

fn compressed(tar: &[u8], zstd: bool) -> Vec<u8> {
    if zstd {
        zstd::encode_all(tar, 1).expect("zstd")
    } else {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(tar).expect("gzip");
        encoder.finish().expect("gzip")
    }
}

fuzz_target!(|data: &[u8]| {
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
    let sandbox = tempfile::tempdir().expect("tempdir");
    let root = sandbox.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let _ = if choice >> 7 == 1 {
        apply_layer(reader, &root).map(|_| ())
    } else {
        let options = UnpackOptions {
            opaque_xattr: OpaqueXattr::User,
            preserve_owners: false,
        };
        unpack_layer(reader, &root, options).map(|_| ())
    };
    let outside: Vec<_> = std::fs::read_dir(sandbox.path())
        .expect("sandbox")
        .map(|e| e.expect("entry").file_name())
        .filter(|name| name != "root")
        .collect();
    assert!(
        outside.is_empty(),
        "the layer wrote outside its root: {outside:?}"
    );
    // The root itself stays a directory (a layer cannot replace it by a symlink).
    let meta = std::fs::symlink_metadata(&root).expect("root");
    assert!(meta.is_dir(), "the root is not a directory any more");
    // Let the sandbox be removed even when the layer left read-only directories.
    make_writable(&root);
});

fn make_writable(dir: &std::path::Path) {
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
