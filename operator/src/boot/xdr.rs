//! XDR (RFC 4506): the big-endian, 4-byte aligned encoding of ONC RPC messages.

/// A message ended before the field being read, or a field is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XDR: {0}")]
pub struct XdrError(pub &'static str);

/// Reads XDR fields from a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        let end = self.at.checked_add(len).ok_or(XdrError(what))?;
        let slice = self.bytes.get(self.at..end).ok_or(XdrError(what))?;
        self.at = end;
        Ok(slice)
    }

    /// An unsigned 32-bit integer.
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4, "truncated u32")?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An unsigned 64-bit integer (hyper).
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    /// A boolean.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        Ok(self.u32()? != 0)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, max: usize) -> Result<&'a [u8], XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError("opaque longer than allowed"));
        }
        let data = self.take(len, "truncated opaque")?;
        self.take((4 - len % 4) % 4, "truncated padding")?;
        Ok(data)
    }

    /// Fixed-length opaque data.
    pub fn fixed(&mut self, len: usize) -> Result<&'a [u8], XdrError> {
        let data = self.take(len, "truncated fixed opaque")?;
        self.take((4 - len % 4) % 4, "truncated padding")?;
        Ok(data)
    }

    /// A string of at most `max` bytes (UTF-8 is not required: file names are bytes).
    pub fn string(&mut self, max: usize) -> Result<&'a [u8], XdrError> {
        self.opaque(max)
    }

    /// Skips `len` bytes.
    pub fn skip(&mut self, len: usize) -> Result<(), XdrError> {
        self.take(len, "truncated").map(|_| ())
    }
}

/// Writes XDR fields into a growing buffer.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes written so far.
    pub bytes: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer::default()
    }

    /// An unsigned 32-bit integer.
    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// An unsigned 64-bit integer.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A boolean.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.u32(u32::from(value))
    }

    /// Variable-length opaque data (or a string).
    pub fn opaque(&mut self, data: &[u8]) -> &mut Self {
        self.u32(data.len() as u32);
        self.fixed(data)
    }

    /// Fixed-length opaque data, padded to 4 bytes.
    pub fn fixed(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self.bytes.resize(self.bytes.len() + (4 - data.len() % 4) % 4, 0);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_round_trip_pads_to_four_bytes() {
        let mut w = Writer::new();
        w.u32(7).opaque(b"abcde").u64(1 << 40).bool(true);
        assert_eq!(w.bytes.len(), 4 + 4 + 8 + 8 + 4);
        assert_eq!(&w.bytes[8..16], b"abcde\0\0\0");
        let mut r = Reader::new(&w.bytes);
        assert_eq!(r.u32(), Ok(7));
        assert_eq!(r.opaque(16), Ok(&b"abcde"[..]));
        assert_eq!(r.u64(), Ok(1 << 40));
        assert_eq!(r.bool(), Ok(true));
        assert!(r.u32().is_err());
    }

    #[test]
    fn oversized_or_truncated_opaque_is_refused() {
        let mut w = Writer::new();
        w.opaque(&[1; 10]);
        assert!(Reader::new(&w.bytes).opaque(9).is_err());
        assert!(Reader::new(&w.bytes[..12]).opaque(64).is_err());
    }
}
