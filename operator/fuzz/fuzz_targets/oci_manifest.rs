//! What a registry answers: manifests, indexes and configs as `RegistryClient::resolve` reads them
//! (`oci::index_child`, `oci::image_manifest_parts`, `oci::config_parts`), platforms
//! (`Platform::parse`), and Docker config JSON credentials (`Credentials::from_docker_config_json`).
//!
//! Input: one JSON document, tried as all of them.
//! Invariants: a parsed platform prints back to what parses to itself; layer descriptors round-trip
//! through serde.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walt_operator::oci::{
    Credentials, LayerDescriptor, Platform, config_parts, image_manifest_parts, index_child,
};

fuzz_target!(|data: &[u8]| {
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
        let wanted = Platform::parse(wanted).expect("platform");
        let _ = index_child(&document, &wanted, "fuzz");
    }
    if let Ok((config, layers)) = image_manifest_parts(&document, "fuzz") {
        for descriptor in std::iter::once(&config).chain(&layers) {
            let json = serde_json::to_value(descriptor).expect("serialize");
            let back: LayerDescriptor = serde_json::from_value(json).expect("deserialize");
            assert_eq!(&back, descriptor);
        }
        let _ = config_parts(data, layers.len(), "fuzz");
    }
    for count in [0, 1, 2] {
        if let Ok((_, diff_ids, _)) = config_parts(data, count, "fuzz") {
            assert_eq!(diff_ids.len(), count);
        }
    }
});
