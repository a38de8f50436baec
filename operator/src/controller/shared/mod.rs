//! What every kind folder shares, and the only module they import from each other's neighbourhood:
//! how watched objects are cached ([`cached`]) and read back ([`caches`]), the [`context::Context`] (client, config, events, apply helpers), the one [`error::Error`], status
//! conditions, which node addresses are acceptable ([`address`]), how to reach a node ([`node_access`]), the lab registry ([`registry`]), the image lock
//! ([`lock`]), lookups ([`lookup`]), the running saves ([`save_tasks`]), session lifetimes
//! ([`session`]), pod pieces and walt's runtime pods ([`pods`]), the tenant's runtime namespace
//! ([`runtime`]), and how an image change becomes the image of a name ([`image_result`]). Nothing here
//! imports a kind folder.

pub mod address;
pub mod cached;
pub mod caches;
pub mod clock;
pub mod context;
pub mod error;
pub mod events;
pub mod image_result;
pub mod lock;
pub mod lookup;
pub mod node_access;
pub mod node_index;
pub mod pods;
pub mod registry;
pub mod registry_paths;
pub mod runtime;
pub mod save_tasks;
pub mod session;
