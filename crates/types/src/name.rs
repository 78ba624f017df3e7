//! Model names, versions and references (`id`, `name@version`, `name`).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::ids::{IdError, ModelId, string_serde};

/// Longest part (namespace or model) of a model name, in bytes.
pub const MAX_NAME_PART_BYTES: usize = 64;
/// Longest model name (`namespace/model`), in bytes.
pub const MAX_NAME_BYTES: usize = 2 * MAX_NAME_PART_BYTES + 1;
/// Longest version string, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;

/// Why a string is not a valid name, version or reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Model names are `namespace/model`.
    #[error(
        "invalid model name '{0}': expected 'namespace/model', each part 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidName(String),
    /// Versions are short and free of separators.
    #[error(
        "invalid version '{0}': expected 1-64 characters of A-Z, a-z, 0-9, '.', '_', '+' or '-', starting with a letter or digit"
    )]
    InvalidVersion(String),
    /// A reference that is neither an id nor a name.
    #[error("invalid model reference '{reference}': {reason}")]
    InvalidRef {
        /// What was given.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
}

fn valid_name_part(part: &str) -> bool {
    let bytes = part.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_PART_BYTES
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// A model's name: `namespace/model`, lower case.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName(String);

impl ModelName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ModelName {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, NameError> {
        match text.split_once('/') {
            Some((namespace, model)) if valid_name_part(namespace) && valid_name_part(model) => {
                Ok(Self(text.to_string()))
            }
            _ => Err(NameError::InvalidName(text.chars().take(200).collect())),
        }
    }
}

/// A version of a model: free-form but short (`1.2`, `2026-01-05`, `1.0.0-rc.1`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

impl Version {
    /// The version as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Version {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, NameError> {
        let bytes = text.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_VERSION_BYTES
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if valid {
            Ok(Self(text.to_string()))
        } else {
            Err(NameError::InvalidVersion(text.chars().take(200).collect()))
        }
    }
}

/// Compares two dot-separated identifiers: numbers numerically, numbers before words, a missing
/// trailing component as zero.
fn compare_components(a: &str, b: &str) -> Ordering {
    let mut left = a.split(['.', '_']);
    let mut right = b.split(['.', '_']);
    loop {
        let (x, y) = match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (x, y) => (x.unwrap_or("0"), y.unwrap_or("0")),
        };
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        let order = match (numeric(x), numeric(y)) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
}

impl Ord for Version {
    /// Semantic-version precedence generalised to any number of components: `1.10` > `1.9`,
    /// `1.0-rc.1` < `1.0`, build metadata after `+` ignored; ties (`1.0` and `1.0.0`) are broken
    /// by the text so that distinct versions never compare equal.
    fn cmp(&self, other: &Self) -> Ordering {
        fn split(v: &str) -> (&str, Option<&str>) {
            let main = v.split_once('+').map_or(v, |(main, _)| main);
            match main.split_once('-') {
                Some((release, pre)) => (release, Some(pre)),
                None => (main, None),
            }
        }
        let (release_a, pre_a) = split(&self.0);
        let (release_b, pre_b) = split(&other.0);
        compare_components(release_a, release_b)
            .then_with(|| match (pre_a, pre_b) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => compare_components(a, b),
            })
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// How a user names a model: by id, by `name@version`, or by `name` (its latest version).
#[derive(Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// An exact model id.
    Id(ModelId),
    /// One published version.
    Version(ModelName, Version),
    /// The latest published version of a name.
    Latest(ModelName),
}

impl FromStr for ModelRef {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, NameError> {
        let invalid = |reason: String| NameError::InvalidRef {
            reference: text.chars().take(200).collect(),
            reason,
        };
        if let Some((name, version)) = text.split_once('@') {
            return Ok(Self::Version(
                name.parse().map_err(|e: NameError| invalid(e.to_string()))?,
                version.parse().map_err(|e: NameError| invalid(e.to_string()))?,
            ));
        }
        if text.contains('/') {
            return text
                .parse()
                .map(Self::Latest)
                .map_err(|e: NameError| invalid(e.to_string()));
        }
        text.parse().map(Self::Id).map_err(|e: IdError| {
            invalid(format!(
                "{e}; expected a model id, 'namespace/model' or 'namespace/model@version'"
            ))
        })
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Version(name, version) => write!(f, "{name}@{version}"),
            Self::Latest(name) => write!(f, "{name}"),
        }
    }
}
impl fmt::Debug for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelName({})", self.0)
    }
}
impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.0)
    }
}
impl fmt::Debug for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelRef({self})")
    }
}
string_serde!(ModelName);
string_serde!(Version);
string_serde!(ModelRef);

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        text.parse().expect("valid version")
    }

    #[test]
    fn names_are_namespaced_and_lower_case() {
        assert!("acme/fraud".parse::<ModelName>().is_ok());
        assert!("acme/fraud-detector_2.onnx".parse::<ModelName>().is_ok());
        for bad in [
            "fraud",
            "Acme/fraud",
            "acme/",
            "/fraud",
            "acme/fr aud",
            "a/b/c",
            "-a/b",
            &"a".repeat(65),
        ] {
            assert!(bad.parse::<ModelName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_order_by_precedence() {
        assert!(v("2") > v("1.9"));
        assert!(v("1.10") > v("1.9"));
        assert!(v("1.0.0") > v("1.0.0-rc.1"));
        assert!(v("1.0.0-rc.2") > v("1.0.0-rc.1"));
        assert!(v("1.0.0-rc.10") > v("1.0.0-rc.9"));
        assert!(v("2026-02-01") > v("2026-01-31"));
        assert_ne!(v("1.0").cmp(&v("1.0.0")), Ordering::Equal);
        assert!(v("0010") > v("9"));
        for bad in ["", "1 0", "v1@2", "a/b", ".1"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references_parse_all_three_forms() {
        assert!(matches!(
            "acme/fraud@1.2".parse::<ModelRef>(),
            Ok(ModelRef::Version(_, _))
        ));
        assert!(matches!("acme/fraud".parse::<ModelRef>(), Ok(ModelRef::Latest(_))));
        let id = ModelId(crate::BlobId::of(b"m"));
        assert_eq!(id.to_string().parse::<ModelRef>().expect("id"), ModelRef::Id(id));
        assert!("fraud".parse::<ModelRef>().is_err());
        assert!("acme/fraud@".parse::<ModelRef>().is_err());
    }
}
