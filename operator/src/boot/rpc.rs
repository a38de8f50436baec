//! ONC RPC v2 (RFC 5531): call headers, accepted and denied replies, and TCP record marking.

use super::xdr::{Reader, Writer, XdrError};

/// The portmapper program (RFC 1833, version 2).
pub const PORTMAP: u32 = 100_000;
/// The NFS program (RFC 1813, version 3).
pub const NFS: u32 = 100_003;
/// The MOUNT program (RFC 1813 appendix I, version 3).
pub const MOUNT: u32 = 100_005;

/// Largest RPC record accepted (a WRITE of 1 MiB and its header fit; everything else is small).
pub const MAX_RECORD: usize = (1 << 20) + 4096;

/// An RPC call header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Transaction id, echoed in the reply.
    pub xid: u32,
    /// Program number.
    pub program: u32,
    /// Program version.
    pub version: u32,
    /// Procedure number.
    pub procedure: u32,
    /// The caller's `AUTH_UNIX` credential (`None`: another flavor, or a malformed one).
    pub cred: Option<UnixCred>,
}

/// An `AUTH_UNIX` (`AUTH_SYS`) credential: who the caller says it is on its own machine (the
/// owner given to the files it creates on a writable export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixCred {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (at most 16, as RFC 5531 allows).
    pub gids: Vec<u32>,
}

/// The `AUTH_UNIX` flavor number.
const AUTH_UNIX: u32 = 1;

/// Decodes an `AUTH_UNIX` credential body (stamp, machine name, uid, gid, groups).
fn unix_cred(body: &[u8]) -> Option<UnixCred> {
    let mut r = Reader::new(body);
    let _stamp = r.u32().ok()?;
    r.string(255).ok()?;
    let (uid, gid) = (r.u32().ok()?, r.u32().ok()?);
    let count = r.u32().ok()?;
    if count > 16 {
        return None;
    }
    let gids = (0..count).map(|_| r.u32().ok()).collect::<Option<Vec<u32>>>()?;
    Some(UnixCred { uid, gid, gids })
}

/// How a call is answered when it is not a procedure's own result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The program is not served.
    ProgUnavail,
    /// The version is not served (lowest and highest served).
    ProgMismatch(u32, u32),
    /// The procedure does not exist.
    ProcUnavail,
    /// The arguments could not be decoded.
    GarbageArgs,
    /// Not RPC version 2.
    RpcMismatch,
}

/// Decodes a call header; the reader is left at the procedure's arguments. `Err(Some(xid))`: the
/// message is a call of another RPC version (answer [`Refusal::RpcMismatch`]).
pub fn decode_call(r: &mut Reader<'_>) -> Result<Call, (XdrError, Option<u32>)> {
    let xid = r.u32().map_err(|e| (e, None))?;
    let header = (|| {
        if r.u32()? != 0 {
            return Err(XdrError("not a call"));
        }
        let rpcvers = r.u32()?;
        let mut call = Call {
            xid,
            program: r.u32()?,
            version: r.u32()?,
            procedure: r.u32()?,
            cred: None,
        };
        for verifier in [false, true] {
            let flavor = r.u32()?;
            let body = r.opaque(400)?;
            if !verifier && flavor == AUTH_UNIX {
                call.cred = unix_cred(body);
            }
        }
        Ok((rpcvers, call))
    })();
    match header {
        Ok((2, call)) => Ok(call),
        Ok(_) => Err((XdrError("RPC version is not 2"), Some(xid))),
        Err(e) => Err((e, None)),
    }
}

/// The header of an accepted, successful reply; the procedure's result follows.
pub fn success(xid: u32) -> Writer {
    let mut w = Writer::new();
    w.u32(xid).u32(1).u32(0).u32(0).u32(0).u32(0);
    w
}

/// A whole reply that refuses the call.
pub fn refusal(xid: u32, refusal: Refusal) -> Writer {
    let mut w = Writer::new();
    w.u32(xid).u32(1);
    match refusal {
        Refusal::RpcMismatch => {
            w.u32(1).u32(0).u32(2).u32(2);
        }
        other => {
            w.u32(0).u32(0).u32(0);
            match other {
                Refusal::ProgUnavail => w.u32(1),
                Refusal::ProgMismatch(low, high) => w.u32(2).u32(low).u32(high),
                Refusal::ProcUnavail => w.u32(3),
                _ => w.u32(4),
            };
        }
    }
    w
}

/// Frames one reply as a single last fragment (TCP record marking).
pub fn frame(reply: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.len() + 4);
    out.extend_from_slice(&(0x8000_0000 | reply.len() as u32).to_be_bytes());
    out.extend_from_slice(reply);
    out
}

/// Reads one record (all its fragments) from a TCP stream; `Ok(None)` at a clean end of stream.
pub async fn read_record<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut record = Vec::new();
    loop {
        let mut header = [0; 4];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && record.is_empty() => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let word = u32::from_be_bytes(header);
        let len = (word & 0x7fff_ffff) as usize;
        if record.len() + len > MAX_RECORD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("RPC record larger than {MAX_RECORD} bytes"),
            ));
        }
        let start = record.len();
        record.resize(start + len, 0);
        stream.read_exact(&mut record[start..]).await?;
        if word & 0x8000_0000 != 0 {
            return Ok(Some(record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_bytes(rpcvers: u32) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(42).u32(0).u32(rpcvers).u32(NFS).u32(3).u32(1);
        let mut cred = Writer::new();
        cred.u32(7).opaque(b"node1").u32(1000).u32(100).u32(1).u32(100);
        w.u32(1).opaque(&cred.bytes).u32(0).opaque(&[]);
        w.u32(99);
        w.bytes
    }

    #[test]
    fn call_header_is_decoded_and_arguments_follow() {
        let bytes = call_bytes(2);
        let mut r = Reader::new(&bytes);
        let call = decode_call(&mut r).expect("call");
        assert_eq!(
            call,
            Call {
                xid: 42,
                program: NFS,
                version: 3,
                procedure: 1,
                cred: Some(UnixCred {
                    uid: 1000,
                    gid: 100,
                    gids: vec![100]
                }),
            }
        );
        assert_eq!(r.u32(), Ok(99));
    }

    #[test]
    fn other_rpc_versions_get_rpc_mismatch() {
        let bytes = call_bytes(3);
        let err = decode_call(&mut Reader::new(&bytes)).expect_err("refused");
        assert_eq!(err.1, Some(42));
        assert_eq!(
            refusal(42, Refusal::RpcMismatch).bytes,
            [
                0, 0, 0, 42, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2
            ]
        );
    }

    #[tokio::test]
    async fn fragments_are_joined_into_one_record() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u32.to_be_bytes());
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&frame(b"de"));
        let mut stream = &bytes[..];
        assert_eq!(
            read_record(&mut stream).await.expect("read"),
            Some(b"abcde".to_vec())
        );
        assert_eq!(read_record(&mut stream).await.expect("eof"), None);
    }
}
