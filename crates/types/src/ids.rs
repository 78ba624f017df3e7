//! Content identifiers: CIDv1 with a BLAKE3-256 multihash.

use std::fmt;
use std::str::FromStr;

use bytes::BufMut;
use vouch_codec::{Buf, Error as CodecError, FixedSize, Read, Write};

/// Multicodec code of raw bytes: a blob is opaque to the store.
const RAW_CODEC: u64 = 0x55;
/// Multicodec code of BLAKE3 in a multihash.
const BLAKE3_CODE: u64 = 0x1e;

/// Why a string is not a Vouch content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a CID at all.
    #[error("'{0}' is not a CID")]
    NotACid(String),
    /// A CID, but not CIDv1 / raw / BLAKE3-256.
    #[error("'{0}' is not a CIDv1 of raw bytes with a BLAKE3-256 hash")]
    Unsupported(String),
}

/// The id of a blob: the BLAKE3-256 hash of its bytes, written as a CIDv1 (`bafkr4i…`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

impl BlobId {
    /// Hashes `bytes` to their id.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
    /// Wraps a BLAKE3 hash.
    pub fn from_hash(hash: [u8; 32]) -> Self {
        Self(hash)
    }
    /// The BLAKE3 hash.
    pub fn hash(&self) -> &[u8; 32] {
        &self.0
    }
    /// The hash in lower-case hex (file names on disk).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    fn to_cid(self) -> cid::Cid {
        // A 32-byte digest always fits a 64-byte multihash.
        let multihash = multihash::Multihash::<64>::wrap(BLAKE3_CODE, &self.0)
            .unwrap_or_else(|_| unreachable!("32 bytes fit in 64"));
        cid::Cid::new_v1(RAW_CODEC, multihash)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_cid(), f)
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        // Bound the work a hostile string can cause before handing it to the parser.
        if text.len() > 128 {
            return Err(IdError::NotACid(text.chars().take(32).collect::<String>() + "…"));
        }
        let cid = cid::Cid::try_from(text).map_err(|_| IdError::NotACid(text.to_string()))?;
        let hash = cid.hash();
        if cid.version() != cid::Version::V1
            || cid.codec() != RAW_CODEC
            || hash.code() != BLAKE3_CODE
            || hash.digest().len() != 32
        {
            return Err(IdError::Unsupported(text.to_string()));
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(hash.digest());
        let id = Self(out);
        // Only the canonical spelling (base32, lower case) names an id, so one id has one string.
        if id.to_string() != text {
            return Err(IdError::Unsupported(text.to_string()));
        }
        Ok(id)
    }
}

/// The id of a model: the [`BlobId`] of its signed manifest's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub BlobId);

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.0)
    }
}

impl FromStr for ModelId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        text.parse().map(Self)
    }
}

macro_rules! string_serde {
    ($name:ident) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use string_serde;
string_serde!(BlobId);
string_serde!(ModelId);

impl Write for BlobId {
    fn write(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }
}
impl FixedSize for BlobId {
    const SIZE: usize = 32;
}
impl Read for BlobId {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        <[u8; 32]>::read_cfg(buf, &()).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_blake3_cids() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.hash(), blake3::hash(b"hello").as_bytes());
        let text = id.to_string();
        // CIDv1, raw codec, BLAKE3 multihash, base32: the well-known "bafkr4i" prefix.
        assert!(text.starts_with("bafkr4i"), "{text}");
        assert_eq!(text.parse::<BlobId>().expect("parses"), id);
    }

    #[test]
    fn other_cids_and_garbage_are_refused() {
        // A CIDv1 raw sha2-256 id (from the IPFS docs) is a valid CID but not ours.
        let sha = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
        assert!(matches!(sha.parse::<BlobId>(), Err(IdError::Unsupported(_))));
        assert!(matches!("hello".parse::<BlobId>(), Err(IdError::NotACid(_))));
        assert!("b".repeat(500).parse::<BlobId>().is_err());
        let upper = BlobId::of(b"x").to_string().to_uppercase();
        assert!(upper.parse::<BlobId>().is_err());
    }
}
