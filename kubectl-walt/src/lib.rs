//! `kubectl walt`: the WalT workflows (image shell, node shell, node save) on Kubernetes.
//!
//! The binary is a thin `main`; everything lives here so that tests reach the pure parts
//! (formatting, parsing, the exit dialogue, completion) directly.

pub mod app;
pub mod cli;
pub mod cluster;
pub mod complete;
pub mod describe;
pub mod device_cmd;
pub mod dialogue;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod gateway;
pub mod image_build;
pub mod image_cmd;
pub mod image_cp;
pub mod image_shell;
pub mod node_cmd;
pub mod node_shell;
pub mod progress;
pub mod resolve;
pub mod session;
pub mod ssh;
pub mod terminal;
pub mod topics;
pub mod watch;
