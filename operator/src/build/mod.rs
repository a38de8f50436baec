//! Image builds from a Dockerfile, the walt way: RUN steps in walt's runtime (emulated where the image's
//! CPU differs), each filesystem-changing step one layer written by walt's layer engine, the result pushed
//! by digest and tagged last.
//!
//! - [`dockerfile`]: the parser (pure).
//! - [`context`]: the build context: `.dockerignore` and source globs (pure matching, then a directory walk).

// context: next
pub mod dockerfile;
