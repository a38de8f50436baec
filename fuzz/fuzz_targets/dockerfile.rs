//! The Dockerfile parser of `walt image build` with word splitting and variable expansion: the body is
//! [`walt_operator::fuzzing::dockerfile_target`] (its docs say what the input means and which invariants are
//! checked), also replayed over the committed seeds by `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walt_operator::fuzzing::dockerfile_target(data));
