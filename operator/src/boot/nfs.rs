//! An NFSv3 server (RFC 1813) with its MOUNT (v3) and portmapper (v2, RFC 1833) programs, over TCP
//! and UDP, serving [`ImageView`]s read-only under `/var/lib/walt/nodes/<mac|ip|hostname>/fs`, and
//! each device's persistent directory read-write under `/var/lib/walt/nodes/<…>/persist`
//! ([`super::persist`]).
//!
//! Every program is served on every port the service listens on; the portmapper answers that NFS and
//! MOUNT are on the NFS port. Anything that would write to a root gets `NFS3ERR_ROFS`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket};

use super::persist;
use super::rpc::{self, Call, MOUNT, NFS, PORTMAP, Refusal};
use super::state::{self, Binding, BootState};
use super::view::{Attr, ImageView, Inode, Kind, ReadError};
use super::xdr::{Reader, Writer, XdrError};

/// NFS status codes used here.
pub mod status {
    #![allow(missing_docs)]
    pub const OK: u32 = 0;
    pub const NOENT: u32 = 2;
    pub const ACCES: u32 = 13;
    pub const IO: u32 = 5;
    pub const NOTDIR: u32 = 20;
    pub const ISDIR: u32 = 21;
    pub const INVAL: u32 = 22;
    pub const ROFS: u32 = 30;
    pub const NAMETOOLONG: u32 = 63;
    pub const STALE: u32 = 70;
    pub const BADHANDLE: u32 = 10001;
    pub const TOOSMALL: u32 = 10005;
}

/// Largest READ served (and advertised in FSINFO).
pub const MAX_READ: u32 = 1 << 20;

const HANDLE_MAGIC: &[u8; 4] = b"wnb1";

/// A file handle: magic, the view's key, the inode number (20 bytes, stable across restarts).
pub fn handle(view: &ImageView, id: u64) -> Vec<u8> {
    encode_handle(*HANDLE_MAGIC, view.key(), id)
}

/// The view key and inode number of a handle.
pub fn parse_handle(fh: &[u8]) -> Option<([u8; 8], u64)> {
    decode_handle(*HANDLE_MAGIC, fh)
}

/// The 20 bytes of a handle of the boot service's exports: `magic`, an export's key, an inode number.
pub(super) fn encode_handle(magic: [u8; 4], key: [u8; 8], id: u64) -> Vec<u8> {
    let mut fh = Vec::with_capacity(20);
    fh.extend_from_slice(&magic);
    fh.extend_from_slice(&key);
    fh.extend_from_slice(&id.to_be_bytes());
    fh
}

/// The export key and inode number of a handle made by [`encode_handle`] with `magic` (pure).
pub(super) fn decode_handle(magic: [u8; 4], fh: &[u8]) -> Option<([u8; 8], u64)> {
    if fh.len() != 20 || fh[..4] != magic {
        return None;
    }
    let mut key = [0; 8];
    key.copy_from_slice(&fh[4..12]);
    let mut id = [0; 8];
    id.copy_from_slice(&fh[12..20]);
    Some((key, u64::from_be_bytes(id)))
}

/// Ports the portmapper reports.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Where NFS and MOUNT are served.
    pub nfs: u16,
}

/// Answers one RPC message (`None`: not answerable, drop it).
pub fn dispatch(state: &BootState, ports: Ports, client: IpAddr, message: &[u8]) -> Option<Vec<u8>> {
    let mut r = Reader::new(message);
    let call = match rpc::decode_call(&mut r) {
        Ok(call) => call,
        Err((_, Some(xid))) => return Some(rpc::refusal(xid, Refusal::RpcMismatch).bytes),
        Err((_, None)) => return None,
    };
    let result = match (call.program, call.version) {
        (PORTMAP, 2) => portmap(&call, &mut r, ports),
        (PORTMAP, _) => Err(Refusal::ProgMismatch(2, 2)),
        (MOUNT, 3) => mount(state, &call, &mut r, client),
        (NFS, 3) => nfs(state, &call, &mut r, client),
        (MOUNT | NFS, _) => Err(Refusal::ProgMismatch(3, 3)),
        _ => Err(Refusal::ProgUnavail),
    };
    Some(match result {
        Ok(w) => w.bytes,
        Err(refusal) => rpc::refusal(call.xid, refusal).bytes,
    })
}

fn garbage(_: XdrError) -> Refusal {
    Refusal::GarbageArgs
}

fn portmap(call: &Call, r: &mut Reader<'_>, ports: Ports) -> Result<Writer, Refusal> {
    let mut w = rpc::success(call.xid);
    match call.procedure {
        0 => {}
        // GETPORT(prog, vers, prot, port)
        3 => {
            let (program, version, protocol) = (
                r.u32().map_err(garbage)?,
                r.u32().map_err(garbage)?,
                r.u32().map_err(garbage)?,
            );
            let served = matches!((program, version), (NFS | MOUNT, 3) | (PORTMAP, 2));
            let port = if served && matches!(protocol, 6 | 17) {
                if program == PORTMAP { 111 } else { ports.nfs }
            } else {
                0
            };
            w.u32(u32::from(port));
        }
        // DUMP
        4 => {
            for (program, version) in [(NFS, 3), (MOUNT, 3)] {
                for protocol in [6, 17] {
                    w.bool(true)
                        .u32(program)
                        .u32(version)
                        .u32(protocol)
                        .u32(u32::from(ports.nfs));
                }
            }
            w.bool(false);
        }
        1 | 2 => {
            // SET / UNSET: nobody registers here.
            w.bool(false);
        }
        _ => return Err(Refusal::ProcUnavail),
    }
    Ok(w)
}

fn mount(state: &BootState, call: &Call, r: &mut Reader<'_>, client: IpAddr) -> Result<Writer, Refusal> {
    let mut w = rpc::success(call.xid);
    match call.procedure {
        0 | 3 | 4 => {
            // NULL, UMNT (path ignored), UMNTALL
        }
        1 => {
            let path = r.string(1024).map_err(garbage)?;
            let path = String::from_utf8_lossy(path).into_owned();
            if let Some((key, inside)) = state::persist_export_key(&path) {
                mount_persist(state, &mut w, client, (key, inside), &path);
                return Ok(w);
            }
            let found = state.by_export(&path);
            let mut served = state::served("nfs-mount", found.as_ref().map(|(b, _)| b), client, &path);
            let root = found.map(|(b, inside)| {
                let resolved = b.view.resolve(inside.as_bytes());
                (b, resolved)
            });
            match root {
                // Only the device itself mounts its root: the per-node layer holds its host key.
                Some((b, _)) if client != IpAddr::V4(b.ip) => {
                    served.digest = None;
                    served.refused = Some(format!(
                        "mounted from {client}: only the device at {} mounts this root",
                        b.ip
                    ));
                    w.u32(status::ACCES);
                }
                Some((b, Ok(id))) if matches!(b.view.inode(id).map(|i| &i.kind), Some(Kind::Dir(_))) => {
                    w.u32(status::OK).opaque(&handle(&b.view, id));
                    w.u32(1).u32(1); // auth flavors: AUTH_UNIX
                }
                Some(_) => {
                    served.digest = None;
                    served.refused = Some("not a directory of the image".into());
                    w.u32(status::NOTDIR);
                }
                None => {
                    served.digest = None;
                    served.refused = Some("no device boots from this export".into());
                    w.u32(status::NOENT);
                }
            }
            state.record(served);
        }
        2 => {
            w.bool(false);
        }
        5 => {
            for b in state.bindings().iter() {
                for key in [b.mac.to_string(), b.ip.to_string(), b.hostname.clone()] {
                    w.bool(true)
                        .opaque(format!("{}{key}/fs", state::NODES_DIR).as_bytes());
                    w.bool(false); // no groups: any client
                    if b.persist.is_some() {
                        w.bool(true)
                            .opaque(format!("{}{key}/{}", state::NODES_DIR, persist::EXPORT_NAME).as_bytes());
                        w.bool(false);
                    }
                }
            }
            w.bool(false);
        }
        _ => return Err(Refusal::ProcUnavail),
    }
    Ok(w)
}

/// MOUNT of a device's `/persist` export: its persistent directory (or the directory `inside` it:
/// clients such as libnfs mount the directory of a file), to the device alone.
fn mount_persist(state: &BootState, w: &mut Writer, client: IpAddr, (key, inside): (&str, &str), path: &str) {
    let binding = state.by_key(key);
    let mut served = state::served("nfs-mount-persist", binding.as_ref(), client, path);
    served.digest = None;
    match persist_root(binding.as_ref(), client, inside) {
        Ok((fh, tenant)) => {
            served.tenant = Some(tenant);
            w.u32(status::OK).opaque(&fh);
            w.u32(1).u32(1); // auth flavors: AUTH_UNIX
        }
        Err((code, why)) => {
            served.refused = Some(why);
            w.u32(code);
        }
    }
    state.record(served);
}

/// The handle a `/persist` MOUNT answers and the tenant served, or the MOUNT status and why not.
fn persist_root(
    binding: Option<&Binding>,
    client: IpAddr,
    inside: &str,
) -> Result<(Vec<u8>, String), (u32, String)> {
    let b = binding.ok_or((status::NOENT, "no device boots from this export".to_string()))?;
    if client != IpAddr::V4(b.ip) {
        let why = format!(
            "mounted from {client}: only the device at {} mounts its /persist",
            b.ip
        );
        return Err((status::ACCES, why));
    }
    let dir = b.persist.as_ref().ok_or((
        status::NOENT,
        "no persistent directory for this device (--persist-dir unset, or lent to no tenant)".to_string(),
    ))?;
    let fh = dir.resolve_dir(inside).map_err(|e| {
        let code = if e == nix::errno::Errno::ENOTDIR {
            status::NOTDIR
        } else {
            status::NOENT
        };
        (code, format!("{inside} inside /persist: {e}"))
    })?;
    Ok((fh, dir.owner().tenant.clone()))
}

/// Answers an NFS call on a persistent directory's handle: only the device at `client` reaches its
/// own (current tenant's) directory; another device's, or a former tenant's, gets `ACCES`.
fn nfs_persist(
    state: &BootState,
    call: &Call,
    fh: &[u8],
    r: &mut Reader<'_>,
    client: IpAddr,
) -> Result<Writer, Refusal> {
    let mut w = rpc::success(call.xid);
    let refused = match persist::parse_handle(fh) {
        None => Some(status::BADHANDLE),
        Some((key, ino)) => match state.persist_for(client, key) {
            Some(dir) => {
                dir.call(call.procedure, ino, r, &mut w, call.cred.as_ref())?;
                None
            }
            None if state.persist_known(key) => Some(status::ACCES),
            None => Some(status::STALE),
        },
    };
    if let Some(code) = refused {
        w.u32(code);
        persist_failure_body(&mut w, call.procedure);
    }
    Ok(w)
}

/// What follows the status of a failed call (RFC 1813's `…resfail`), every optional part absent.
fn persist_failure_body(w: &mut Writer, procedure: u32) {
    match procedure {
        // GETATTR: nothing.
        1 => {}
        // SETATTR, WRITE, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, COMMIT: wcc_data.
        2 | 7..=13 | 21 => empty_wcc(w),
        // RENAME: two wcc_data; LINK: post_op_attr and wcc_data.
        14 => {
            empty_wcc(w);
            empty_wcc(w);
        }
        15 => {
            w.bool(false);
            empty_wcc(w);
        }
        // The others: post_op_attr.
        _ => {
            w.bool(false);
        }
    }
}

/// Finds the view and inode number of a handle; `Err(status)` when it is not one of ours, is
/// stale, or names the root of another device than `client` (`ACCES`).
fn file(state: &BootState, client: IpAddr, fh: &[u8]) -> Result<(Arc<ImageView>, u64), u32> {
    let (key, id) = parse_handle(fh).ok_or(status::BADHANDLE)?;
    let view = match state.view_for(client, key) {
        Some(view) => view,
        None if state.view(key).is_some() => return Err(status::ACCES),
        None => return Err(status::STALE),
    };
    view.inode(id).ok_or(status::STALE)?;
    Ok((view, id))
}

fn ftype(kind: &Kind) -> u32 {
    match kind {
        Kind::File(_) | Kind::Data(_) => 1,
        Kind::Dir(_) => 2,
        Kind::Block => 3,
        Kind::Char => 4,
        Kind::Symlink(_) => 5,
        Kind::Socket => 6,
        Kind::Fifo => 7,
    }
}

fn fattr(w: &mut Writer, view: &ImageView, id: u64, inode: &Inode) {
    let a: &Attr = &inode.attr;
    w.u32(ftype(&inode.kind))
        .u32(a.mode)
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid);
    w.u64(a.size).u64(a.size.div_ceil(4096) * 4096);
    w.u32(a.rdev.0).u32(a.rdev.1);
    w.u64(u64::from_be_bytes(view.key())).u64(id);
    for (secs, nanos) in [a.atime, a.mtime, a.ctime] {
        w.u32(secs.clamp(0, i64::from(u32::MAX)) as u32).u32(nanos);
    }
}

fn post_op(w: &mut Writer, view: &ImageView, id: u64, inode: &Inode) {
    w.bool(true);
    fattr(w, view, id, inode);
}

/// `wcc_data` with nothing known (both sides absent).
fn empty_wcc(w: &mut Writer) {
    w.bool(false).bool(false);
}

fn nfs(state: &BootState, call: &Call, r: &mut Reader<'_>, client: IpAddr) -> Result<Writer, Refusal> {
    let mut w = rpc::success(call.xid);
    let procedure = call.procedure;
    if procedure == 0 {
        return Ok(w);
    }
    if procedure > 21 {
        return Err(Refusal::ProcUnavail);
    }
    let fh = r.opaque(64).map_err(garbage)?;
    if persist::is_handle(fh) {
        return nfs_persist(state, call, fh, r, client);
    }
    if matches!(procedure, 2 | 7..=14 | 21) {
        // SETATTR, WRITE, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME, COMMIT: read-only.
        w.u32(status::ROFS);
        empty_wcc(&mut w);
        if procedure == 14 {
            empty_wcc(&mut w);
        }
        return Ok(w);
    }
    if procedure == 15 {
        // LINK
        w.u32(status::ROFS).bool(false);
        empty_wcc(&mut w);
        return Ok(w);
    }
    let found = file(state, client, fh);
    let found = found.as_ref().map(|(view, id)| (view, *id));
    let (view, id, inode): (&ImageView, u64, &Inode) = match found {
        Ok((view, id)) => match view.inode(id) {
            Some(inode) => (&**view, id, inode),
            None => return Err(Refusal::GarbageArgs),
        },
        Err(code) => {
            w.u32(*code);
            if procedure != 1 {
                w.bool(false);
            }
            return Ok(w);
        }
    };
    match procedure {
        1 => {
            w.u32(status::OK);
            fattr(&mut w, view, id, inode);
        }
        3 => lookup(&mut w, view, id, inode, r)?,
        4 => {
            let asked = r.u32().map_err(garbage)?;
            // READ | LOOKUP | EXECUTE: what a read-only export may grant.
            let granted = asked & (0x01 | 0x02 | 0x20);
            w.u32(status::OK);
            post_op(&mut w, view, id, inode);
            w.u32(granted);
        }
        5 => {
            if let Kind::Symlink(target) = &inode.kind {
                w.u32(status::OK);
                post_op(&mut w, view, id, inode);
                w.opaque(target);
            } else {
                w.u32(status::INVAL);
                post_op(&mut w, view, id, inode);
            }
        }
        6 => {
            let offset = r.u64().map_err(garbage)?;
            let count = r.u32().map_err(garbage)?.min(MAX_READ);
            match view.read(id, offset, count) {
                Ok((data, eof)) => {
                    w.u32(status::OK);
                    post_op(&mut w, view, id, inode);
                    w.u32(data.len() as u32).bool(eof).opaque(&data);
                }
                Err(e) => {
                    w.u32(match e {
                        ReadError::Stale => status::STALE,
                        ReadError::IsDir => status::ISDIR,
                        ReadError::Invalid => status::INVAL,
                        ReadError::Io(_) => status::IO,
                    });
                    post_op(&mut w, view, id, inode);
                }
            }
        }
        16 | 17 => readdir(&mut w, view, id, inode, r, procedure == 17)?,
        18 => {
            w.u32(status::OK);
            post_op(&mut w, view, id, inode);
            let files = view.len() as u64;
            w.u64(1 << 40)
                .u64(0)
                .u64(0)
                .u64(files)
                .u64(0)
                .u64(0)
                .u32(u32::MAX);
        }
        19 => {
            w.u32(status::OK);
            post_op(&mut w, view, id, inode);
            w.u32(MAX_READ).u32(MAX_READ).u32(4096);
            w.u32(MAX_READ).u32(MAX_READ).u32(4096);
            w.u32(64 * 1024).u64(u64::MAX).u32(0).u32(1);
            w.u32(0x01 | 0x02 | 0x08);
        }
        20 => {
            w.u32(status::OK);
            post_op(&mut w, view, id, inode);
            w.u32(u32::MAX)
                .u32(255)
                .bool(true)
                .bool(true)
                .bool(false)
                .bool(true);
        }
        _ => return Err(Refusal::ProcUnavail),
    }
    Ok(w)
}

fn lookup(
    w: &mut Writer,
    view: &ImageView,
    id: u64,
    inode: &Inode,
    r: &mut Reader<'_>,
) -> Result<(), Refusal> {
    let name = r.string(4096).map_err(garbage)?;
    if name.len() > 255 {
        w.u32(status::NAMETOOLONG);
        post_op(w, view, id, inode);
        return Ok(());
    }
    if !matches!(inode.kind, Kind::Dir(_)) {
        w.u32(status::NOTDIR);
        post_op(w, view, id, inode);
        return Ok(());
    }
    let found = view
        .lookup(id, name)
        .and_then(|child| Some((child, view.inode(child)?)));
    if let Some((child, child_inode)) = found {
        w.u32(status::OK).opaque(&handle(view, child));
        post_op(w, view, child, child_inode);
        post_op(w, view, id, inode);
    } else {
        w.u32(status::NOENT);
        post_op(w, view, id, inode);
    }
    Ok(())
}

/// READDIR / READDIRPLUS: `.`, `..`, then the entries in name order; cookie `n` resumes after the
/// `n`-th entry (the listing of an image never changes, so the verifier is constant).
fn readdir(
    w: &mut Writer,
    view: &ImageView,
    id: u64,
    inode: &Inode,
    r: &mut Reader<'_>,
    plus: bool,
) -> Result<(), Refusal> {
    let cookie = r.u64().map_err(garbage)?;
    r.fixed(8).map_err(garbage)?;
    let count = r.u32().map_err(garbage)?;
    let maxcount = if plus { r.u32().map_err(garbage)? } else { count };
    let Kind::Dir(children) = &inode.kind else {
        w.u32(status::NOTDIR);
        post_op(w, view, id, inode);
        return Ok(());
    };
    let mut entries: Vec<(&[u8], u64)> = vec![(b".", id), (b"..", inode.parent)];
    entries.extend(children.iter().map(|(n, c)| (n.as_slice(), *c)));
    let start = usize::try_from(cookie).unwrap_or(usize::MAX);
    if start > entries.len() {
        w.u32(status::INVAL);
        post_op(w, view, id, inode);
        return Ok(());
    }
    let mut body = Writer::new();
    let limit = maxcount.saturating_sub(200) as usize;
    let mut emitted = 0;
    let mut eof = true;
    for (index, (name, child)) in entries.iter().enumerate().skip(start) {
        let mut entry = Writer::new();
        entry.bool(true).u64(*child).opaque(name).u64(index as u64 + 1);
        if plus {
            match view.inode(*child) {
                Some(child_inode) => {
                    post_op(&mut entry, view, *child, child_inode);
                    entry.bool(true).opaque(&handle(view, *child));
                }
                None => {
                    entry.bool(false).bool(false);
                }
            }
        }
        if body.bytes.len() + entry.bytes.len() > limit {
            eof = false;
            break;
        }
        body.bytes.extend_from_slice(&entry.bytes);
        emitted += 1;
    }
    if emitted == 0 && !eof {
        w.u32(status::TOOSMALL);
        post_op(w, view, id, inode);
        return Ok(());
    }
    w.u32(status::OK);
    post_op(w, view, id, inode);
    w.fixed(&[0; 8]);
    w.bytes.extend_from_slice(&body.bytes);
    w.bool(false).bool(eof);
    Ok(())
}

/// Serves RPC over TCP on `listener` until the task is dropped.
pub async fn serve_tcp(listener: TcpListener, state: Arc<BootState>, ports: Ports) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, peer, state, ports).await {
                tracing::debug!(%peer, %error, "NFS connection ended");
            }
        });
    }
}

/// Calls of one connection answered at once. Clients keep several READs in flight (libnfs splits a
/// large read into `rsize` calls sent together; the kernel's readahead does too): answering them one
/// after the other left the disk and the network idle in turn (a 1 GiB read at half the reference's
/// throughput). Bounds a connection's memory to this many replies of up to [`MAX_READ`].
const CALLS_IN_FLIGHT: usize = 4;

/// Serves one TCP connection: each call is answered on the blocking pool as soon as it is read (up
/// to [`CALLS_IN_FLIGHT`] at once), each reply written whole as it is ready (RPC replies are matched
/// by their xid, not by their order).
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<BootState>,
    ports: Ports,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut outgoing) = tokio::sync::mpsc::channel::<Vec<u8>>(CALLS_IN_FLIGHT);
    let read = async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT));
        while let Some(record) = rpc::read_record(&mut reader).await? {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?;
            let (state, replies) = (state.clone(), replies.clone());
            tokio::task::spawn_blocking(move || {
                if let Some(reply) = dispatch(&state, ports, peer.ip(), &record) {
                    // The writer is gone only when the connection broke: nothing to answer then.
                    let _ = replies.blocking_send(rpc::frame(&reply));
                }
                drop(slot);
            });
        }
        Ok::<_, std::io::Error>(())
    };
    let write = async move {
        // Ends once the reader and every call in flight are done (their senders dropped).
        while let Some(reply) = outgoing.recv().await {
            writer.write_all(&reply).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Serves RPC over UDP on `socket` (one message per datagram) until the task is dropped.
pub async fn serve_udp(socket: UdpSocket, state: Arc<BootState>, ports: Ports) {
    let mut buf = vec![0; 65_536];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(mut reply) = dispatch(&state, ports, peer.ip(), &buf[..len]) {
            reply.truncate(65_000);
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_foreign_ones_are_refused() {
        let fh = [b"wnb1".as_slice(), &[7; 8], &42u64.to_be_bytes()].concat();
        assert_eq!(parse_handle(&fh), Some(([7; 8], 42)));
        assert_eq!(parse_handle(&fh[..19]), None);
        assert_eq!(parse_handle(&[b"xxxx".as_slice(), &fh[4..]].concat()), None);
    }

    #[test]
    fn only_the_device_mounts_its_persist_and_only_inside_it() {
        use crate::boot::persist::{PersistDir, PersistOwner};
        use crate::boot::state::Mac;
        use crate::overlay::OpaqueXattr;
        let dir = tempfile::tempdir().expect("tempdir");
        let view = ImageView::build(&[], "sha256:feed", OpaqueXattr::Trusted).expect("view");
        let owner = PersistOwner::new("rpi-1", "alice").expect("owner");
        let persist = PersistDir::open(dir.path(), owner, None).expect("persist dir");
        std::fs::create_dir(dir.path().join("rpi-1/alice/sub")).expect("mkdir");
        std::fs::write(dir.path().join("rpi-1/alice/file"), "x").expect("write");
        let mut binding = Binding {
            mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
            ip: std::net::Ipv4Addr::new(10, 0, 0, 1),
            hostname: "rpi-1".into(),
            model: "rpi-3-b".into(),
            view: Arc::new(view),
            persist: Some(Arc::new(persist)),
        };
        let device = IpAddr::V4(binding.ip);
        let (fh, tenant) = persist_root(Some(&binding), device, "/").expect("the device mounts it");
        assert_eq!(tenant, "alice");
        assert!(persist::is_handle(&fh));
        assert!(
            persist_root(Some(&binding), device, "/sub").is_ok(),
            "a directory inside"
        );
        let code = |inside: &str, client: IpAddr, b: Option<&Binding>| {
            persist_root(b, client, inside).map(|_| ()).map_err(|(c, _)| c)
        };
        assert_eq!(code("/file", device, Some(&binding)), Err(status::NOTDIR));
        assert_eq!(
            code("/../..", device, Some(&binding)),
            Err(status::NOENT),
            "no way up"
        );
        assert_eq!(code("/sub/../..", device, Some(&binding)), Err(status::NOENT));
        let neighbour = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            code("/", neighbour, Some(&binding)),
            Err(status::ACCES),
            "another address"
        );
        assert_eq!(code("/", device, None), Err(status::NOENT), "no such device");
        binding.persist = None;
        let refused = persist_root(Some(&binding), device, "/").expect_err("none served");
        assert_eq!(refused.0, status::NOENT);
        assert!(refused.1.contains("--persist-dir unset"), "{}", refused.1);
    }
}
