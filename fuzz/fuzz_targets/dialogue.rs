//! The plugin's image-shell exit dialogue: the body is [`kubectl_walt::fuzzing::dialogue_target`] (its docs say what
//! the input means and which invariants are checked), also replayed over the committed seeds by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubectl_walt::fuzzing::dialogue_target(data));
