//! Kernels that move elements without arithmetic on them (gathers, joins, slices, ranges,
//! broadcasts and axis permutations), generic over the element type so that the exact
//! executor's integers and the float executor's floats and integers share one implementation.
//!
//! Every kernel checks the size of its result against a caller's element limit before it
//! allocates it.

use crate::broadcast;

/// A tensor's shape and its elements in row-major order, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a, T> {
    /// The shape.
    pub shape: &'a [usize],
    /// The elements.
    pub data: &'a [T],
}

/// A computed tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Moved<T> {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: Vec<T>,
}

/// Why a kernel refused its operands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MoveError {
    /// The result would pass the element limit.
    #[error("shape {shape:?} has more than the limit of {limit} elements")]
    TooLarge {
        /// The result's shape.
        shape: Vec<usize>,
        /// The limit.
        limit: usize,
    },
    /// Indices or shapes that do not fit the operation.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for MoveError {
    fn from(reason: String) -> Self {
        Self::Invalid(reason)
    }
}

impl From<&str> for MoveError {
    fn from(reason: &str) -> Self {
        Self::Invalid(reason.to_owned())
    }
}

impl From<MoveError> for String {
    fn from(error: MoveError) -> Self {
        error.to_string()
    }
}

/// The element count of `shape`, refused over `max_elements`.
pub(crate) fn element_count(shape: &[usize], max_elements: usize) -> Result<usize, MoveError> {
    shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .filter(|n| *n <= max_elements)
        .ok_or_else(|| MoveError::TooLarge {
            shape: shape.to_vec(),
            limit: max_elements,
        })
}

/// An index into an axis of `size`; negative ones count from the end.
pub(crate) fn resolve_index(index: i64, size: usize) -> Result<usize, MoveError> {
    let resolved = if index < 0 {
        index.checked_add(size as i64)
    } else {
        Some(index)
    };
    resolved
        .and_then(|i| usize::try_from(i).ok())
        .filter(|i| *i < size)
        .ok_or_else(|| MoveError::Invalid(format!("index {index} is outside an axis of {size}")))
}

/// The entries of `x` along `axis` picked by `indices` (ONNX Gather).
pub(crate) fn gather<T: Copy, I: Copy + Into<i64>>(
    x: View<'_, T>,
    indices: View<'_, I>,
    axis: usize,
    max_elements: usize,
) -> Result<Moved<T>, MoveError> {
    let size = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let mut shape = x.shape[..axis].to_vec();
    shape.extend_from_slice(indices.shape);
    shape.extend_from_slice(&x.shape[axis + 1..]);
    let count = element_count(&shape, max_elements)?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let rows: Vec<usize> = indices
        .data
        .iter()
        .map(|i| resolve_index((*i).into(), size))
        .collect::<Result<_, _>>()?;
    let mut data = Vec::with_capacity(count);
    for o in 0..outer {
        for row in &rows {
            let start = (o * size + row) * inner;
            data.extend_from_slice(&x.data[start..start + inner]);
        }
    }
    Ok(Moved { shape, data })
}

/// The slices of `x` picked by the index tuples in the last axis of `indices` (ONNX GatherND
/// with no batch dimensions).
pub(crate) fn gather_nd<T: Copy, I: Copy + Into<i64>>(
    x: View<'_, T>,
    indices: View<'_, I>,
    max_elements: usize,
) -> Result<Moved<T>, MoveError> {
    let tuple = *indices.shape.last().ok_or("GatherND indices need at least one axis")?;
    if tuple == 0 || tuple > x.shape.len() {
        return Err(MoveError::Invalid(format!(
            "index tuples of {tuple} do not fit data of rank {}",
            x.shape.len()
        )));
    }
    let mut shape = indices.shape[..indices.shape.len() - 1].to_vec();
    shape.extend_from_slice(&x.shape[tuple..]);
    let count = element_count(&shape, max_elements)?;
    let inner: usize = x.shape[tuple..].iter().product();
    let mut data = Vec::with_capacity(count);
    for index in indices.data.chunks(tuple) {
        let mut offset = 0usize;
        for (i, size) in index.iter().zip(x.shape) {
            offset = offset * size + resolve_index((*i).into(), *size)?;
        }
        data.extend_from_slice(&x.data[offset * inner..(offset + 1) * inner]);
    }
    Ok(Moved { shape, data })
}

/// The inputs joined along `axis`; every other axis must agree.
pub(crate) fn concat<T: Copy>(inputs: &[View<'_, T>], axis: usize, max_elements: usize) -> Result<Moved<T>, MoveError> {
    let first = inputs.first().ok_or("nothing to join")?;
    if axis >= first.shape.len() {
        return Err(MoveError::Invalid(format!(
            "axis {axis} is past rank {}",
            first.shape.len()
        )));
    }
    let fits = |x: &View<'_, T>| {
        x.shape.len() == first.shape.len()
            && x.shape
                .iter()
                .zip(first.shape)
                .enumerate()
                .all(|(a, (d, f))| a == axis || d == f)
    };
    if let Some(bad) = inputs.iter().find(|x| !fits(x)) {
        return Err(MoveError::Invalid(format!(
            "shapes {:?} and {:?} do not join along axis {axis}",
            first.shape, bad.shape
        )));
    }
    let mut shape = first.shape.to_vec();
    shape[axis] = inputs.iter().map(|x| x.shape[axis]).sum();
    let count = element_count(&shape, max_elements)?;
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let mut data = Vec::with_capacity(count);
    for o in 0..outer {
        for x in inputs {
            let block = x.shape[axis] * inner;
            data.extend_from_slice(&x.data[o * block..(o + 1) * block]);
        }
    }
    Ok(Moved { shape, data })
}

/// `start..end` along `axis`, as ONNX Slice with step 1 reads its bounds: negative ones count
/// from the end, and both are clamped to the axis.
pub(crate) fn slice<T: Copy>(x: View<'_, T>, axis: usize, start: i64, end: i64) -> Result<Moved<T>, MoveError> {
    let size = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let bound = |v: i64| -> usize {
        let v = if v < 0 { v.saturating_add(size as i64) } else { v };
        v.clamp(0, size as i64) as usize
    };
    let (start, end) = (bound(start), bound(end));
    let len = end.saturating_sub(start);
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut shape = x.shape.to_vec();
    shape[axis] = len;
    let mut data = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = o * size * inner;
        data.extend_from_slice(&x.data[base + start * inner..base + (start + len) * inner]);
    }
    Ok(Moved { shape, data })
}

/// `start, start + step, ..` short of `end` (ONNX Range).
pub(crate) fn range(start: i64, end: i64, step: i64, max_elements: usize) -> Result<Vec<i64>, MoveError> {
    if step == 0 {
        return Err("a range needs a non-zero step".into());
    }
    let span = i128::from(end) - i128::from(start);
    let step_size = i128::from(step).abs();
    let len = if (span > 0) == (step > 0) && span != 0 {
        (span.abs() + step_size - 1) / step_size
    } else {
        0
    };
    let len = usize::try_from(len).map_err(|_| "range length out of bounds".to_owned())?;
    element_count(&[len], max_elements)?;
    // Every element lies between `start` and `end`, so none overflows.
    Ok((0..len as i64).map(|i| start + i * step).collect())
}

/// Calls `f` with the offsets, under each set of strides, of every index of `shape` in
/// row-major order.
pub(crate) fn for_each_index<const N: usize>(shape: &[usize], strides: [&[usize]; N], mut f: impl FnMut([usize; N])) {
    let width = shape.last().copied().unwrap_or(1);
    let steps: [usize; N] = std::array::from_fn(|s| strides[s].last().copied().unwrap_or(0));
    broadcast::for_each_row(shape, strides, |row| {
        for i in 0..width {
            f(std::array::from_fn(|s| row[s] + i * steps[s]));
        }
    });
}

/// Each input read at every position of `shape` (which each input's shape broadcasts to),
/// combined by `f`.
pub(crate) fn broadcast_map<const N: usize, T: Copy, U>(
    inputs: [View<'_, T>; N],
    shape: Vec<usize>,
    max_elements: usize,
    f: impl Fn([T; N]) -> U,
) -> Result<Moved<U>, MoveError> {
    let count = element_count(&shape, max_elements)?;
    let strides: [Vec<usize>; N] = std::array::from_fn(|i| broadcast::strides(inputs[i].shape, &shape));
    let mut data = Vec::with_capacity(count);
    let rows: [&[usize]; N] = std::array::from_fn(|i| strides[i].as_slice());
    for_each_index(&shape, rows, |offsets: [usize; N]| {
        data.push(f(std::array::from_fn(|i| inputs[i].data[offsets[i]])));
    });
    Ok(Moved { shape, data })
}

/// The axes of `x` reordered: axis `i` of the result is axis `order[i]` of `x`.
pub(crate) fn permute<T: Copy>(x: View<'_, T>, order: &[usize]) -> Result<Moved<T>, MoveError> {
    let rank = x.shape.len();
    let mut seen = vec![false; rank];
    if order.len() != rank
        || order
            .iter()
            .any(|a| *a >= rank || std::mem::replace(&mut seen[*a], true))
    {
        return Err(MoveError::Invalid(format!(
            "{order:?} does not reorder the axes of {:?}",
            x.shape
        )));
    }
    let strides = broadcast::strides(x.shape, x.shape);
    let shape: Vec<usize> = order.iter().map(|a| x.shape[*a]).collect();
    // A dimension of 1 has stride 0 in `broadcast::strides`, which reads the same element.
    let read: Vec<usize> = order.iter().map(|a| strides[*a]).collect();
    let mut data = Vec::with_capacity(x.data.len());
    let width = shape.last().copied().unwrap_or(1);
    let step = read.last().copied().unwrap_or(0);
    broadcast::for_each_row(&shape, [&read], |[start]| {
        if step == 1 {
            // The last axis stays last: its rows are copied whole.
            data.extend_from_slice(&x.data[start..start + width]);
        } else {
            data.extend((0..width).map(|i| x.data[start + i * step]));
        }
    });
    Ok(Moved { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v<'a, T>(shape: &'a [usize], data: &'a [T]) -> View<'a, T> {
        View { shape, data }
    }

    fn m<T: Copy>(shape: &[usize], data: &[T]) -> Moved<T> {
        Moved {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    const LIMIT: usize = 1 << 20;

    #[test]
    fn gather_picks_rows_and_counts_negative_indices_from_the_end() {
        let x = v(&[3, 2], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            gather(x, v(&[2], &[2i64, -3]), 0, LIMIT).expect("gather"),
            m(&[2, 2], &[5, 6, 1, 2])
        );
        assert_eq!(
            gather(x, v(&[1], &[1i32]), 1, LIMIT).expect("gather"),
            m(&[3, 1], &[2, 4, 6])
        );
        assert!(gather(x, v(&[1], &[3i64]), 0, LIMIT).is_err());
        assert!(gather(x, v(&[1], &[i64::MIN]), 0, LIMIT).is_err());
    }

    #[test]
    fn gather_nd_reads_index_tuples() {
        let x = v(&[2, 2], &[0.0f32, 1.0, 2.0, 3.0]);
        assert_eq!(
            gather_nd(x, v(&[2, 2], &[0i64, 0, 1, 1]), LIMIT).expect("gather"),
            m(&[2], &[0.0, 3.0])
        );
        assert_eq!(
            gather_nd(x, v(&[2, 1], &[1i64, 0]), LIMIT).expect("gather"),
            m(&[2, 2], &[2.0, 3.0, 0.0, 1.0])
        );
        assert!(gather_nd(x, v(&[1, 3], &[0i64, 0, 0]), LIMIT).is_err());
    }

    #[test]
    fn concat_slice_range_broadcast_and_permute() {
        let (a, b) = (v(&[2, 1], &[1, 2]), v(&[2, 2], &[3, 4, 5, 6]));
        assert_eq!(
            concat(&[a, b], 1, LIMIT).expect("concat"),
            m(&[2, 3], &[1, 3, 4, 2, 5, 6])
        );
        assert!(concat(&[a, v(&[3, 1], &[0, 0, 0])], 1, LIMIT).is_err());
        assert!(concat(&[b, b], 1, 7).is_err(), "over the element limit");
        assert_eq!(slice(b, 1, 1, 99).expect("slice"), m(&[2, 1], &[4, 6]));
        assert_eq!(slice(b, 0, -1, 2).expect("slice"), m(&[1, 2], &[5, 6]));
        assert_eq!(slice(b, 0, 2, 1).expect("slice"), m::<i32>(&[0, 2], &[]));
        assert_eq!(range(5, 0, -2, LIMIT).expect("range"), [5, 3, 1]);
        assert_eq!(range(0, 0, 1, LIMIT).expect("range"), [0i64; 0]);
        assert!(range(0, 5, 0, LIMIT).is_err());
        assert!(range(i64::MIN, i64::MAX, 1, LIMIT).is_err(), "over the element limit");
        assert_eq!(
            broadcast_map([a], vec![2, 3], LIMIT, |[x]| x * 10).expect("broadcast"),
            m(&[2, 3], &[10, 10, 10, 20, 20, 20])
        );
        let cube: Vec<i32> = (0..24).collect();
        let moved = permute(v(&[2, 3, 4], &cube), &[2, 0, 1]).expect("permute");
        assert_eq!(moved.shape, [4, 2, 3]);
        for (i, j, k) in (0..2).flat_map(|i| (0..3).flat_map(move |j| (0..4).map(move |k| (i, j, k)))) {
            assert_eq!(moved.data[k * 6 + i * 3 + j], cube[i * 12 + j * 4 + k]);
        }
        assert!(permute(v(&[2, 3], &cube[..6]), &[0, 0]).is_err());
    }
}
