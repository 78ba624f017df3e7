//! The authenticated state: a sorted key-value map whose root is a binary Merkle tree over its
//! entries in key order, with proofs that a key holds a value or holds none.

use std::collections::BTreeMap;
use std::ops::RangeBounds;

use serde::{Deserialize, Serialize};
use vouch_crypto::Digest;

const LEAF_DOMAIN: &str = "vouch ledger leaf";
const NODE_DOMAIN: &str = "vouch ledger node";
const EMPTY_DOMAIN: &str = "vouch ledger empty";

/// The hash of one entry: its key's length, its key and its value, so no two entries share one.
pub fn leaf_hash(key: &[u8], value: &[u8]) -> Digest {
    let mut message = Vec::with_capacity(8 + key.len() + value.len());
    message.extend_from_slice(&(key.len() as u64).to_be_bytes());
    message.extend_from_slice(key);
    message.extend_from_slice(value);
    Digest::of(LEAF_DOMAIN, &message)
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut message = [0u8; 64];
    message[..32].copy_from_slice(left.as_bytes());
    message[32..].copy_from_slice(right.as_bytes());
    Digest::of(NODE_DOMAIN, &message)
}

/// The root of a tree with no entries.
pub fn empty_root() -> Digest {
    Digest::of(EMPTY_DOMAIN, &[])
}

/// The next level up: pairs hashed together, an odd last node carried up unchanged.
fn parent_level(level: &[Digest]) -> Vec<Digest> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [left, right] => node_hash(left, right),
            [single] => *single,
            _ => unreachable!("chunks(2) yields one or two items"),
        })
        .collect()
}

fn root_of(leaves: &[Digest]) -> Digest {
    if leaves.is_empty() {
        return empty_root();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = parent_level(&level);
    }
    level[0]
}

/// The siblings from a leaf up to the root; `None` where the node was carried up alone.
fn path_of(leaves: &[Digest], mut index: usize) -> Vec<Option<Digest>> {
    let mut path = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sibling = index ^ 1;
        path.push(level.get(sibling).copied());
        level = parent_level(&level);
        index /= 2;
    }
    path
}

/// One entry with the path that places it at `index` among `leaf_count` leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryProof {
    /// The entry's key, hex in JSON.
    #[serde(with = "crate::hex_bytes")]
    pub key: Vec<u8>,
    /// The entry's value, hex in JSON.
    #[serde(with = "crate::hex_bytes")]
    pub value: Vec<u8>,
    /// The entry's position in key order.
    pub index: u64,
    /// Siblings from the leaf up; `null` where the node had none at that level.
    pub path: Vec<Option<Digest>>,
}

impl EntryProof {
    /// The root this entry and path lead to, given the tree's leaf count.
    fn root(&self, leaf_count: u64) -> Option<Digest> {
        if self.index >= leaf_count {
            return None;
        }
        let mut hash = leaf_hash(&self.key, &self.value);
        let mut index = self.index;
        let mut width = leaf_count;
        for sibling in &self.path {
            if width <= 1 {
                return None;
            }
            let has_sibling = (index ^ 1) < width;
            hash = match (sibling, has_sibling) {
                (Some(sibling), true) if index.is_multiple_of(2) => node_hash(&hash, sibling),
                (Some(sibling), true) => node_hash(sibling, &hash),
                (None, false) => hash,
                _ => return None,
            };
            index /= 2;
            width = width.div_ceil(2);
        }
        (width == 1).then_some(hash)
    }
}

/// A proof of what a key holds in the state with a given root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StateProof {
    /// The key holds `entry.value`.
    Present {
        /// How many entries the state holds.
        leaf_count: u64,
        /// The entry itself.
        entry: EntryProof,
    },
    /// The key holds nothing: the entries beside the place it would sort into, if any.
    Absent {
        /// How many entries the state holds.
        leaf_count: u64,
        /// The greatest entry whose key is below the key, if one exists.
        below: Option<EntryProof>,
        /// The least entry whose key is above the key, if one exists.
        above: Option<EntryProof>,
    },
}

/// Why a proof does not show what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state proof does not verify: {0}")]
pub struct ProofError(&'static str);

impl StateProof {
    /// Checks the proof against `root` and returns what `key` holds (`None`: nothing).
    pub fn verify(&self, root: &Digest, key: &[u8]) -> Result<Option<Vec<u8>>, ProofError> {
        match self {
            Self::Present { leaf_count, entry } => {
                if entry.key != key {
                    return Err(ProofError("the proven entry is for another key"));
                }
                if entry.root(*leaf_count).as_ref() != Some(root) {
                    return Err(ProofError("the entry does not lead to the root"));
                }
                Ok(Some(entry.value.clone()))
            }
            Self::Absent {
                leaf_count,
                below,
                above,
            } => {
                if *leaf_count == 0 {
                    return if below.is_none() && above.is_none() && *root == empty_root() {
                        Ok(None)
                    } else {
                        Err(ProofError("an empty state has no neighbours and the empty root"))
                    };
                }
                for neighbour in below.iter().chain(above.iter()) {
                    if neighbour.root(*leaf_count).as_ref() != Some(root) {
                        return Err(ProofError("a neighbouring entry does not lead to the root"));
                    }
                }
                match (below, above) {
                    (Some(below), Some(above)) => {
                        if !(below.key.as_slice() < key && key < above.key.as_slice()) {
                            return Err(ProofError("the key does not sort between the neighbours"));
                        }
                        if above.index != below.index + 1 {
                            return Err(ProofError("the neighbours are not adjacent"));
                        }
                    }
                    (Some(below), None) => {
                        if below.key.as_slice() >= key || below.index + 1 != *leaf_count {
                            return Err(ProofError("the lower neighbour is not the last entry below the key"));
                        }
                    }
                    (None, Some(above)) => {
                        if above.key.as_slice() <= key || above.index != 0 {
                            return Err(ProofError("the upper neighbour is not the first entry above the key"));
                        }
                    }
                    (None, None) => return Err(ProofError("a non-empty state needs a neighbour")),
                }
                Ok(None)
            }
        }
    }
}

/// A sorted key-value map with a Merkle root over its entries.
///
/// Leaf hashes are kept beside the values, so a new root costs one hash per inner node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthMap {
    entries: BTreeMap<Vec<u8>, (Vec<u8>, Digest)>,
}

impl AuthMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many entries the map holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map holds no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.get(key).map(|(value, _)| value.as_slice())
    }

    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let hash = leaf_hash(&key, &value);
        self.entries.insert(key, (value, hash));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }

    /// The entries whose keys fall in `range`, in key order.
    pub fn range<R: RangeBounds<Vec<u8>>>(&self, range: R) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .range(range)
            .map(|(key, (value, _))| (key.as_slice(), value.as_slice()))
    }

    /// Every entry in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.range::<std::ops::RangeFull>(..)
    }

    fn leaves(&self) -> Vec<Digest> {
        self.entries.values().map(|(_, hash)| *hash).collect()
    }

    /// The Merkle root over every entry in key order.
    pub fn root(&self) -> Digest {
        root_of(&self.leaves())
    }

    fn entry_proof(&self, leaves: &[Digest], index: usize) -> Option<EntryProof> {
        let (key, (value, _)) = self.entries.iter().nth(index)?;
        Some(EntryProof {
            key: key.clone(),
            value: value.clone(),
            index: index as u64,
            path: path_of(leaves, index),
        })
    }

    /// A proof of what `key` holds, checkable against [`AuthMap::root`].
    pub fn prove(&self, key: &[u8]) -> StateProof {
        let leaves = self.leaves();
        let leaf_count = leaves.len() as u64;
        let below_count = self
            .entries
            .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(key)))
            .count();
        if self.entries.contains_key(key) {
            let entry = self
                .entry_proof(&leaves, below_count)
                .unwrap_or_else(|| unreachable!("the key is present at its rank"));
            return StateProof::Present { leaf_count, entry };
        }
        StateProof::Absent {
            leaf_count,
            below: below_count
                .checked_sub(1)
                .and_then(|index| self.entry_proof(&leaves, index)),
            above: self.entry_proof(&leaves, below_count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map_of(entries: &BTreeMap<Vec<u8>, Vec<u8>>) -> AuthMap {
        let mut map = AuthMap::new();
        for (key, value) in entries {
            map.insert(key.clone(), value.clone());
        }
        map
    }

    proptest! {
        #[test]
        fn every_key_proves_what_it_holds(
            entries in proptest::collection::btree_map(proptest::collection::vec(0u8..8, 0..4), proptest::collection::vec(any::<u8>(), 0..8), 0..40),
            probe in proptest::collection::vec(0u8..8, 0..4),
        ) {
            let map = map_of(&entries);
            let root = map.root();
            for (key, value) in &entries {
                prop_assert_eq!(map.prove(key).verify(&root, key), Ok(Some(value.clone())));
            }
            let expected = entries.get(&probe).cloned();
            prop_assert_eq!(map.prove(&probe).verify(&root, &probe), Ok(expected));
        }

        #[test]
        fn a_proof_does_not_verify_against_another_state(
            entries in proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 1..4), proptest::collection::vec(any::<u8>(), 0..8), 1..20),
            probe in proptest::collection::vec(any::<u8>(), 1..4),
        ) {
            let map = map_of(&entries);
            let mut changed = map.clone();
            changed.insert(probe.clone(), b"changed".to_vec());
            let proof = map.prove(&probe);
            prop_assert!(proof.verify(&changed.root(), &probe).is_err());
        }
    }

    #[test]
    fn the_root_depends_on_every_entry_and_not_on_insertion_order() {
        let mut forward = AuthMap::new();
        let mut backward = AuthMap::new();
        for index in 0u8..10 {
            forward.insert(vec![index], vec![index; 3]);
            backward.insert(vec![9 - index], vec![9 - index; 3]);
        }
        assert_eq!(forward.root(), backward.root());
        let before = forward.root();
        forward.insert(vec![4], vec![0]);
        assert_ne!(forward.root(), before);
        forward.remove(&[4]);
        assert_ne!(forward.root(), before);
        assert_eq!(AuthMap::new().root(), empty_root());
    }

    #[test]
    fn a_forged_absence_is_refused() {
        let mut map = AuthMap::new();
        for index in 0u8..5 {
            map.insert(vec![index * 2], vec![index]);
        }
        let root = map.root();
        // Claim key 4 is absent by showing its non-adjacent neighbours 2 and 6.
        let StateProof::Present { leaf_count, .. } = map.prove(&[4]) else {
            panic!("key 4 is present");
        };
        let StateProof::Present { entry: below, .. } = map.prove(&[2]) else {
            panic!("key 2 is present");
        };
        let StateProof::Present { entry: above, .. } = map.prove(&[6]) else {
            panic!("key 6 is present");
        };
        let forged = StateProof::Absent {
            leaf_count,
            below: Some(below),
            above: Some(above),
        };
        assert!(forged.verify(&root, &[4]).is_err());
    }
}
