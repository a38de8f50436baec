//! SSH: the node client, node save over SSH, the gateway, the virtual node server.

pub mod cli;
