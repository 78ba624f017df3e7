//! The trace commitment: a Merkle root over every value of an execution, in plan order.
//!
//! Leaf `i` is `H_leaf(i || canonical bytes of value i)`; an inner node is `H_node(left || right)`,
//! an odd node at the end of a level moves up unchanged; the root is `H_root(count || top)`, so
//! traces of different lengths never share a root. Each `H` is BLAKE3 keyed by its own domain.

use crate::exec::ITensor;

/// A 32-byte hash.
pub type Hash = [u8; 32];

/// The leaf hash of value `index`.
pub fn leaf_hash(index: usize, value: &ITensor) -> Hash {
    let mut message = (index as u64).to_le_bytes().to_vec();
    message.extend_from_slice(&value.canonical_bytes());
    vouch_crypto::domain_hash("trace leaf", &message)
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut message = [0u8; 64];
    message[..32].copy_from_slice(left);
    message[32..].copy_from_slice(right);
    vouch_crypto::domain_hash("trace node", &message)
}

fn root_hash(count: usize, top: &Hash) -> Hash {
    let mut message = (count as u64).to_le_bytes().to_vec();
    message.extend_from_slice(top);
    vouch_crypto::domain_hash("trace root", &message)
}

/// Every level of the tree, leaves first.
#[derive(Debug, Clone)]
pub struct TraceTree {
    levels: Vec<Vec<Hash>>,
}

impl TraceTree {
    /// Builds the tree over the values of an execution.
    pub fn new(values: &[ITensor]) -> Self {
        let leaves: Vec<Hash> = values.iter().enumerate().map(|(i, v)| leaf_hash(i, v)).collect();
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let level = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [single] => *single,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(level);
        }
        Self { levels }
    }

    /// The number of values committed.
    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    /// Whether no values are committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The trace root.
    pub fn root(&self) -> Hash {
        let top = self.levels.last().and_then(|l| l.first()).copied().unwrap_or([0; 32]);
        root_hash(self.len(), &top)
    }

    /// A proof that value `index` is in the trace, or `None` past the end.
    pub fn prove(&self, index: usize) -> Option<TraceProof> {
        if index >= self.len() {
            return None;
        }
        let mut siblings = Vec::new();
        let mut position = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = position ^ 1;
            if let Some(hash) = level.get(sibling) {
                siblings.push(*hash);
            }
            position /= 2;
        }
        Some(TraceProof {
            index,
            count: self.len(),
            siblings,
        })
    }
}

/// A Merkle path from one value to the trace root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceProof {
    /// The value's index in the plan.
    pub index: usize,
    /// How many values the trace has.
    pub count: usize,
    /// Sibling hashes from the leaf up, skipping levels where the node had none.
    pub siblings: Vec<Hash>,
}

impl TraceProof {
    /// Whether `value` is value `self.index` of the trace with this root.
    pub fn verify(&self, root: &Hash, value: &ITensor) -> bool {
        if self.index >= self.count {
            return false;
        }
        let mut hash = leaf_hash(self.index, value);
        let mut position = self.index;
        let mut width = self.count;
        let mut siblings = self.siblings.iter();
        while width > 1 {
            let sibling = position ^ 1;
            if sibling < width {
                let Some(other) = siblings.next() else {
                    return false;
                };
                hash = if position.is_multiple_of(2) {
                    node_hash(&hash, other)
                } else {
                    node_hash(other, &hash)
                };
            }
            position /= 2;
            width = width.div_ceil(2);
        }
        siblings.next().is_none() && root_hash(self.count, &hash) == *root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize) -> Vec<ITensor> {
        (0..count)
            .map(|i| ITensor {
                shape: vec![2],
                data: vec![i as i32, -(i as i32)],
            })
            .collect()
    }

    #[test]
    fn every_value_proves_and_nothing_else_does() {
        for count in [1, 2, 3, 5, 8, 13] {
            let values = values(count);
            let tree = TraceTree::new(&values);
            let root = tree.root();
            for (index, value) in values.iter().enumerate() {
                let proof = tree.prove(index).expect("in range");
                assert!(proof.verify(&root, value), "count {count} index {index}");
                let mut changed = value.clone();
                changed.data[0] += 1;
                assert!(!proof.verify(&root, &changed));
                let other = (index + 1) % count;
                if other != index {
                    assert!(!proof.verify(&root, &values[other]));
                }
            }
            assert!(tree.prove(count).is_none());
        }
    }

    #[test]
    fn roots_differ_with_length() {
        let four = values(4);
        assert_ne!(TraceTree::new(&four[..3]).root(), TraceTree::new(&four).root());
    }
}
