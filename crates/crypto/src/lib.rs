//! Generate, store and use Vouch's ed25519 keys, and hash and sign with domain separation.
//!
//! Every signature covers a BLAKE3 digest of the message derived under a per-purpose domain
//! (`"manifest"`, later `"receipt"`, …), so a signature made for one kind of object can never be
//! replayed as another. Verification is strict (ed25519-dalek's `verify_strict`): malleable
//! signatures and small-order keys are refused.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use bytes::BufMut;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use vouch_codec::{Buf, Error as CodecError, FixedSize, Read, Write};

/// The context string every Vouch domain hash is derived under, followed by the domain.
const CONTEXT_PREFIX: &str = "vouch v1 ";

/// Errors from key handling and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A signature does not verify for the given key, domain and message.
    #[error("signature does not verify")]
    BadSignature,
    /// The bytes are not a valid ed25519 public key.
    #[error("invalid public key")]
    InvalidPublicKey,
    /// A hex string of the wrong length or with non-hex characters.
    #[error("invalid hex: expected {expected_bytes} bytes")]
    InvalidHex {
        /// How many bytes the hex string should encode.
        expected_bytes: usize,
    },
    /// A key file that is not a PKCS#8 PEM ed25519 private key.
    #[error("key file {path} is not a PKCS#8 PEM ed25519 private key")]
    InvalidKeyFile {
        /// The file that was read.
        path: String,
    },
    /// The system's random number generator failed.
    #[error("no randomness available: {0}")]
    Randomness(String),
    /// Reading or writing a key file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Hashes `message` with BLAKE3 in key-derivation mode under the context for `domain`.
pub fn domain_hash(domain: &str, message: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(&format!("{CONTEXT_PREFIX}{domain}"));
    hasher.update(message);
    *hasher.finalize().as_bytes()
}

/// An ed25519 private key. Zeroed when dropped.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public={})", self.public_key())
    }
}

impl SecretKey {
    /// Generates a new key from the operating system's random number generator.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| CryptoError::Randomness(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// Builds a key from a 32-byte seed (deterministic; for tests and derived dev keys).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed, for handing the same key to another ed25519 implementation (the
    /// consensus signer); keep what it returns as secret as the key.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` for `domain`.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Signature {
        Signature(self.0.sign(&domain_hash(domain, message)).to_bytes())
    }

    /// Encodes the key as a PKCS#8 PEM document.
    pub fn to_pem(&self) -> Result<String, CryptoError> {
        self.0
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|_| CryptoError::InvalidKeyFile {
                path: "<memory>".into(),
            })
    }

    /// Decodes a PKCS#8 PEM document; `origin` names it in errors.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, CryptoError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|_| CryptoError::InvalidKeyFile {
                path: origin.to_string(),
            })
    }

    /// Reads a key file written by [`SecretKey::save`].
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let pem = std::fs::read_to_string(path).map_err(|source| CryptoError::Io {
            action: "cannot read key file",
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Writes the key to `path` as PEM, readable by its owner only, creating parent directories.
    /// Refuses to replace an existing file so that a key is never lost by accident.
    pub fn save(&self, path: &Path) -> Result<(), CryptoError> {
        use std::io::Write as _;
        let io_error = |action: &'static str| {
            let path = path.display().to_string();
            move |source| CryptoError::Io { action, path, source }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error("cannot create directory for"))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io_error("cannot create key file"))?;
        file.write_all(self.to_pem()?.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error("cannot write key file"))
    }
}

/// Decodes exactly `N` bytes from a hex string.
fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| CryptoError::InvalidHex { expected_bytes: N })?;
    Ok(out)
}

/// Implements hex display and parsing, serde as a hex string, and the fixed-size codec for a
/// newtype over `[u8; N]`.
macro_rules! fixed_bytes {
    ($name:ident, $len:expr) => {
        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            /// Wraps raw bytes.
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
        impl FromStr for $name {
            type Err = CryptoError;
            fn from_str(text: &str) -> Result<Self, CryptoError> {
                decode_hex::<$len>(text).map(Self)
            }
        }
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
        impl Write for $name {
            fn write(&self, buf: &mut impl BufMut) {
                buf.put_slice(&self.0);
            }
        }
        impl FixedSize for $name {
            const SIZE: usize = $len;
        }
        impl Read for $name {
            type Cfg = ();
            fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
                <[u8; $len]>::read_cfg(buf, &()).map(Self)
            }
        }
    };
}

/// A 32-byte BLAKE3 digest (a tensor hash, a trace root, a request hash), written as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);
fixed_bytes!(Digest, 32);

impl Digest {
    /// [`domain_hash`] of `message` under `domain`.
    pub fn of(domain: &str, message: &[u8]) -> Self {
        Self(domain_hash(domain, message))
    }
}

/// An ed25519 public key: a publisher's or a node's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);
fixed_bytes!(PublicKey, 32);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);
fixed_bytes!(Signature, 64);

impl PublicKey {
    /// Checks that `signature` is this key's signature of `message` for `domain`.
    pub fn verify(&self, domain: &str, message: &[u8], signature: &Signature) -> Result<(), CryptoError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| CryptoError::InvalidPublicKey)?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(&domain_hash(domain, message), &signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_domain_and_message() {
        let key = SecretKey::from_seed([7; 32]);
        let other = SecretKey::from_seed([8; 32]);
        let signature = key.sign("manifest", b"hello");
        let public = key.public_key();
        assert!(public.verify("manifest", b"hello", &signature).is_ok());
        assert!(public.verify("receipt", b"hello", &signature).is_err());
        assert!(public.verify("manifest", b"hellO", &signature).is_err());
        assert!(other.public_key().verify("manifest", b"hello", &signature).is_err());
        let mut tampered = *signature.as_bytes();
        tampered[10] ^= 1;
        assert!(
            public
                .verify("manifest", b"hello", &Signature::from_bytes(tampered))
                .is_err()
        );
    }

    #[test]
    fn signing_is_deterministic() {
        let key = SecretKey::from_seed([1; 32]);
        assert_eq!(key.sign("manifest", b"m"), key.sign("manifest", b"m"));
    }

    #[test]
    fn key_files_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/key.pem");
        let key = SecretKey::generate().expect("randomness");
        key.save(&path).expect("save");
        let loaded = SecretKey::load(&path).expect("load");
        assert_eq!(loaded.public_key(), key.public_key());
        assert!(matches!(key.save(&path), Err(CryptoError::Io { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_key_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            SecretKey::load(&path),
            Err(CryptoError::InvalidKeyFile { .. })
        ));
    }

    #[test]
    fn hex_parsing_checks_length() {
        let key = SecretKey::from_seed([3; 32]).public_key();
        assert_eq!(key.to_string().parse::<PublicKey>().expect("parses"), key);
        assert!("abcd".parse::<PublicKey>().is_err());
        assert!("zz".repeat(32).parse::<PublicKey>().is_err());
    }
}
