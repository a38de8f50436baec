//! The image-name parser: the body is [`walt_crds::fuzzing::image_name_target`] (its docs say what
//! the input means and which invariants are checked), also replayed over the committed seeds by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walt_crds::fuzzing::image_name_target(data));
