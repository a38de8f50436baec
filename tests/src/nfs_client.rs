//! A minimal NFSv3 client (RFC 1813 over ONC RPC, RFC 5531), written here from the RFCs and
//! independent of walt's server code: the calls libnfs's command-line tools cannot make (REMOVE,
//! MKDIR, SYMLINK, CREATE with any name, a handle replayed from another address), for tests that
//! try what a hostile node would.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;

/// The MOUNT program.
pub const MOUNT: u32 = 100_005;
/// The NFS program.
pub const NFS: u32 = 100_003;

/// A connection to an NFSv3 server, calling as root (`AUTH_UNIX` uid 0).
#[derive(Debug)]
pub struct NfsClient {
    stream: TcpStream,
    xid: u32,
}

/// An XDR buffer being written.
#[derive(Debug, Default)]
#[must_use]
pub struct Args(pub Vec<u8>);

impl Args {
    /// A u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Variable-length opaque data or a string.
    pub fn bytes(mut self, data: &[u8]) -> Self {
        self = self.u32(data.len() as u32);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len() + (4 - data.len() % 4) % 4, 0);
        self
    }
    /// An empty `sattr3` (nothing set).
    pub fn no_attrs(self) -> Self {
        self.u32(0).u32(0).u32(0).u32(0).u32(0).u32(0)
    }
}

/// An XDR reply being read.
#[derive(Debug)]
pub struct Reply {
    bytes: Vec<u8>,
    at: usize,
}

impl Reply {
    /// The next u32.
    ///
    /// # Panics
    /// When the reply ends (test helper).
    pub fn u32(&mut self) -> u32 {
        let b = &self.bytes[self.at..self.at + 4];
        self.at += 4;
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    /// The next u64.
    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    /// The next variable-length opaque data.
    pub fn bytes(&mut self) -> Vec<u8> {
        let len = self.u32() as usize;
        let data = self.bytes[self.at..self.at + len].to_vec();
        self.at += len + (4 - len % 4) % 4;
        data
    }
    /// Skips a `post_op_attr` (present or not).
    pub fn skip_post_op(&mut self) {
        if self.u32() != 0 {
            self.at += 84;
        }
    }
    /// A `post_op_attr`'s file id, when present.
    pub fn post_op_fileid(&mut self) -> Option<u64> {
        if self.u32() == 0 {
            return None;
        }
        let start = self.at;
        self.at += 84;
        let b = &self.bytes[start + 52..start + 60];
        Some(u64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
}

impl NfsClient {
    /// Connects to `server:port` from `source` inside the network namespace `netns` (a name under
    /// `/run/netns`): the socket is made by a thread that entered it.
    ///
    /// # Panics
    /// When the namespace or the connection cannot be had (test helper).
    pub fn connect_in(netns: &str, source: Ipv4Addr, server: SocketAddr) -> Self {
        let netns = Path::new("/run/netns").join(netns);
        let stream = std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("the lab namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket
                .bind(&SocketAddr::new(source.into(), 0).into())
                .expect("bind the source address");
            socket.connect(&server.into()).expect("connect to the NFS server");
            TcpStream::from(socket)
        })
        .join()
        .expect("the connecting thread");
        NfsClient { stream, xid: 1 }
    }

    /// Calls `procedure` of `program` version 3; the reply's results (after an accepted, successful
    /// reply header).
    ///
    /// # Panics
    /// When the call is not accepted (test helper).
    pub fn call(&mut self, program: u32, procedure: u32, args: &Args) -> Reply {
        self.xid += 1;
        let mut cred = Args::default().u32(0).bytes(b"test").u32(0).u32(0).u32(0);
        let mut msg = Args::default()
            .u32(self.xid)
            .u32(0)
            .u32(2)
            .u32(program)
            .u32(3)
            .u32(procedure)
            .u32(1);
        msg = msg.bytes(&std::mem::take(&mut cred.0)).u32(0).u32(0);
        msg.0.extend_from_slice(&args.0);
        let mut framed = (0x8000_0000u32 | msg.0.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&msg.0);
        self.stream.write_all(&framed).expect("send the call");
        let mut record = Vec::new();
        loop {
            let mut header = [0; 4];
            self.stream.read_exact(&mut header).expect("read the reply");
            let word = u32::from_be_bytes(header);
            let start = record.len();
            record.resize(start + (word & 0x7fff_ffff) as usize, 0);
            self.stream
                .read_exact(&mut record[start..])
                .expect("read the reply");
            if word & 0x8000_0000 != 0 {
                break;
            }
        }
        let mut reply = Reply { bytes: record, at: 0 };
        assert_eq!(reply.u32(), self.xid, "xid");
        assert_eq!(reply.u32(), 1, "a reply");
        assert_eq!(reply.u32(), 0, "accepted");
        let _verifier_flavor = reply.u32();
        reply.bytes();
        assert_eq!(reply.u32(), 0, "the call succeeded at the RPC level");
        reply
    }

    /// MOUNT `path`: the root handle, or the MOUNT status.
    pub fn mount(&mut self, path: &str) -> Result<Vec<u8>, u32> {
        let mut reply = self.call(MOUNT, 1, &Args::default().bytes(path.as_bytes()));
        match reply.u32() {
            0 => Ok(reply.bytes()),
            status => Err(status),
        }
    }

    /// LOOKUP `name` in `dir`: the handle and the file id, or the status.
    pub fn lookup(&mut self, dir: &[u8], name: &[u8]) -> Result<(Vec<u8>, u64), u32> {
        let mut reply = self.call(NFS, 3, &Args::default().bytes(dir).bytes(name));
        match reply.u32() {
            0 => {
                let fh = reply.bytes();
                let id = reply.post_op_fileid().unwrap_or_default();
                Ok((fh, id))
            }
            status => Err(status),
        }
    }

    /// GETATTR: the status and, when it is 0, the file id.
    pub fn getattr(&mut self, fh: &[u8]) -> Result<u64, u32> {
        let mut reply = self.call(NFS, 1, &Args::default().bytes(fh));
        match reply.u32() {
            0 => {
                // type, mode, nlink, uid, gid, size, used, rdev, fsid: then the file id.
                reply.at += 52;
                Ok(reply.u64())
            }
            status => Err(status),
        }
    }

    /// MKDIR `name` in `dir`: the new handle, or the status.
    pub fn mkdir(&mut self, dir: &[u8], name: &[u8]) -> Result<Vec<u8>, u32> {
        let mut reply = self.call(NFS, 9, &Args::default().bytes(dir).bytes(name).no_attrs());
        match reply.u32() {
            0 => {
                assert_eq!(reply.u32(), 1, "a handle follows");
                Ok(reply.bytes())
            }
            status => Err(status),
        }
    }

    /// CREATE (UNCHECKED) `name` in `dir`: the status.
    pub fn create(&mut self, dir: &[u8], name: &[u8]) -> u32 {
        self.call(NFS, 8, &Args::default().bytes(dir).bytes(name).u32(0).no_attrs())
            .u32()
    }

    /// SYMLINK `name` → `target` in `dir`: the status.
    pub fn symlink(&mut self, dir: &[u8], name: &[u8], target: &[u8]) -> u32 {
        self.call(
            NFS,
            10,
            &Args::default().bytes(dir).bytes(name).no_attrs().bytes(target),
        )
        .u32()
    }

    /// REMOVE `name` from `dir`: the status.
    pub fn remove(&mut self, dir: &[u8], name: &[u8]) -> u32 {
        self.call(NFS, 12, &Args::default().bytes(dir).bytes(name)).u32()
    }

    /// READDIR of `dir` (first 64 KiB): the names, or the status.
    pub fn readdir(&mut self, dir: &[u8]) -> Result<Vec<String>, u32> {
        let mut reply = self.call(NFS, 16, &Args::default().bytes(dir).u64(0).u64(0).u32(65_536));
        let status = reply.u32();
        if status != 0 {
            return Err(status);
        }
        reply.skip_post_op();
        reply.at += 8;
        let mut names = Vec::new();
        while reply.u32() != 0 {
            let _id = reply.u64();
            names.push(String::from_utf8_lossy(&reply.bytes()).into_owned());
            let _cookie = reply.u64();
        }
        Ok(names)
    }
}
