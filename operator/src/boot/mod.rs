//! The boot service: what lab devices (and VM nodes) network-boot from. DHCP hands out the address,
//! the boot server and the boot file; TFTP and HTTP serve the image's `/boot/<model>/`; a read-only
//! NFSv3 server serves the image root, merged from its OCI layers, under
//! `/var/lib/walt/nodes/<mac|ip|hostname>/fs`. Everything runs in userspace: no kernel NFS server, no
//! mount.

pub mod cli;
pub mod dhcp;
pub mod http;
pub mod nfs;
pub mod rpc;
pub mod state;
pub mod tftp;
pub mod view;
pub mod xdr;
