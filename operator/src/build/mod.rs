//! Image builds from a Dockerfile, the walt way: RUN steps in walt's runtime (emulated where the image's
//! CPU differs), each filesystem-changing step one layer written by walt's layer engine, the result pushed
//! by digest and tagged last.
//!
//! - [`dockerfile`]: the parser (pure).
//! - [`context`]: the build context: `.dockerignore` and source globs (pure matching, then a directory walk).
//! - [`config`]: the image config as steps change it, users from `/etc/passwd` (pure).
//! - [`copy`]: `COPY`/`ADD` into a mounted root.
//! - [`executor`]: the build (`walt-operator build`, [`cli`]).

pub mod cli;
pub mod config;
pub mod context;
pub mod copy;
pub mod dockerfile;
pub mod executor;
