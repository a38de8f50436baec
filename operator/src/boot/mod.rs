//! The boot service: what lab devices (and VM nodes) network-boot from. DHCP hands out the address,
//! the boot server and the boot file; TFTP and HTTP serve the image's `/boot/<model>/`; a read-only
//! NFSv3 server serves the image root, merged from its OCI layers, under
//! `/var/lib/walt/nodes/<mac|ip|hostname>/fs`, under a per-node top layer ([`node_layer`]: walt's
//! node scripts, keys, the booted digest); [`services`] serves what booting nodes ask (clock, boot
//! notification) and [`verify`] judges whether a node booted what it was served; [`persist`] serves
//! each device's `/persist`, read-write, per (device, tenant). Everything runs in userspace: no
//! kernel NFS server, no mount.

pub mod cli;
pub mod dhcp;
pub mod http;
pub mod nfs;
pub mod node_layer;
pub mod persist;
pub mod rpc;
pub mod services;
pub mod state;
pub mod tftp;
pub mod verify;
pub mod view;
pub mod xdr;
