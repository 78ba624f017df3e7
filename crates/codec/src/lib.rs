//! Encode and decode Vouch's signed and hashed structures canonically, with a limit on every length.
//!
//! The wire format is commonware-codec's (big-endian integers, canonical varint lengths, no
//! trailing bytes), re-exported here so every Vouch crate encodes the same way. This crate adds
//! what commonware-codec leaves out and Vouch needs everywhere: bounded UTF-8 strings, and a
//! check that a decoded value re-encodes to the exact input bytes (a canonical encoding is what
//! makes "the id of a structure is the hash of its encoding" sound).

pub use commonware_codec::{
    Buf, Decode, DecodeExt, Encode, EncodeSize, Error, FixedSize, RangeCfg, Read, ReadExt, ReadRangeExt, Write,
};

use bytes::BufMut;

/// Writes a string as its UTF-8 bytes with a varint length prefix.
pub fn write_str(value: &str, buf: &mut impl BufMut) {
    value.as_bytes().write(buf);
}

/// Reads a string written by [`write_str`], refusing more than `max_bytes` bytes or invalid UTF-8.
pub fn read_str(buf: &mut impl Buf, max_bytes: usize, context: &'static str) -> Result<String, Error> {
    let bytes = Vec::<u8>::read_range(buf, 0..=max_bytes)?;
    String::from_utf8(bytes).map_err(|_| Error::Invalid(context, "not valid UTF-8"))
}

/// Reads a vector of at most `max_items` items, each decoded by `read_item`.
///
/// Use this instead of `Vec::<T>::read_range` when items need a configuration that is not `()`
/// or a hand-written reader (strings, nested limits).
pub fn read_vec<T, B: Buf>(
    buf: &mut B,
    max_items: usize,
    mut read_item: impl FnMut(&mut B) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    let len = usize::read_cfg(buf, &RangeCfg::from(0..=max_items))?;
    let mut items = Vec::with_capacity(len.min(1024));
    for _ in 0..len {
        items.push(read_item(buf)?);
    }
    Ok(items)
}

/// Writes the varint length prefix that [`read_vec`] expects, then each item with `write_item`.
pub fn write_vec<T, B: BufMut>(items: &[T], buf: &mut B, mut write_item: impl FnMut(&T, &mut B)) {
    items.len().write(buf);
    for item in items {
        write_item(item, buf);
    }
}

/// Reads one value from `bytes` with `read` and refuses bytes left over after it.
pub fn read_whole<T>(bytes: &[u8], read: impl FnOnce(&mut bytes::Bytes) -> Result<T, Error>) -> Result<T, Error> {
    let mut buf = bytes::Bytes::copy_from_slice(bytes);
    let value = read(&mut buf)?;
    if bytes::Buf::has_remaining(&buf) {
        return Err(Error::ExtraData(bytes::Buf::remaining(&buf)));
    }
    Ok(value)
}

/// Why a byte string was refused as the canonical encoding of a value.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// The bytes do not decode within the limits.
    #[error("malformed encoding: {0}")]
    Malformed(#[from] Error),
    /// The bytes decode, but re-encoding the value gives different bytes.
    #[error("encoding is not canonical")]
    NotCanonical,
}

/// Decodes `bytes` with `decode` and checks that re-encoding the value with `encode` gives back
/// exactly `bytes`, so that one value has one encoding and so one id.
pub fn decode_canonical<T>(
    bytes: &[u8],
    decode: impl FnOnce(&[u8]) -> Result<T, Error>,
    encode: impl FnOnce(&T) -> Vec<u8>,
) -> Result<T, CanonicalError> {
    let value = decode(bytes)?;
    if encode(&value) != bytes {
        return Err(CanonicalError::NotCanonical);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Buf as _;

    fn decode_string(bytes: &[u8], max: usize) -> Result<String, Error> {
        let mut buf = bytes::Bytes::copy_from_slice(bytes);
        let value = read_str(&mut buf, max, "test")?;
        if buf.has_remaining() {
            return Err(Error::ExtraData(buf.remaining()));
        }
        Ok(value)
    }

    #[test]
    fn strings_round_trip_and_respect_limits() {
        let mut out = Vec::new();
        write_str("acme/fraud", &mut out);
        assert_eq!(out.len(), 1 + "acme/fraud".len());
        assert_eq!(decode_string(&out, 64).expect("decodes"), "acme/fraud");
        assert!(matches!(decode_string(&out, 4), Err(Error::InvalidLength(10))));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let mut out = Vec::new();
        [0xffu8, 0xfe].as_slice().write(&mut out);
        assert!(matches!(decode_string(&out, 64), Err(Error::Invalid(_, _))));
    }

    #[test]
    fn vectors_respect_item_limits() {
        let mut out = Vec::new();
        write_vec(&[1u32, 2, 3], &mut out, |item, buf| buf.put_u32(*item));
        let mut buf = bytes::Bytes::from(out.clone());
        let items = read_vec(&mut buf, 3, u32::read).expect("decodes");
        assert_eq!(items, vec![1, 2, 3]);
        let mut buf = bytes::Bytes::from(out);
        assert!(read_vec(&mut buf, 2, u32::read).is_err());
    }

    #[test]
    fn non_canonical_bytes_are_refused() {
        // A decoder that ignores a trailing byte accepts two encodings of one value.
        let lenient = |b: &[u8]| -> Result<u8, Error> { b.first().copied().ok_or(Error::EndOfBuffer) };
        let encode = |v: &u8| vec![*v];
        assert!(decode_canonical(&[7], lenient, encode).is_ok());
        assert!(matches!(
            decode_canonical(&[7, 0], lenient, encode),
            Err(CanonicalError::NotCanonical)
        ));
    }
}
