//! Kernels that pick, join and compare elements: gathers, slices, ranges, broadcasts and
//! element-wise selection. They move integers without arithmetic on their values (except the
//! requantization an embedding row or a comparison carries), so they are exact by construction.

use super::{ExecOptions, ITensor, element_count};
use crate::broadcast;
use crate::fixed::{Multiplier, saturate};
use crate::plan::{CompareOp, LogicOp};

/// The one element of a scalar (or one-element) integer operand.
pub(super) fn scalar(x: &ITensor, what: &str) -> Result<i64, String> {
    match x.data[..] {
        [v] => Ok(i64::from(v)),
        _ => Err(format!("{what} must be one integer, got shape {:?}", x.shape)),
    }
}

/// An index into an axis of `size`; negative ones count from the end.
fn resolve_index(index: i32, size: usize) -> Result<usize, String> {
    let resolved = if index < 0 {
        size as i64 + i64::from(index)
    } else {
        i64::from(index)
    };
    usize::try_from(resolved)
        .ok()
        .filter(|i| *i < size)
        .ok_or_else(|| format!("index {index} is outside an axis of {size}"))
}

pub(super) fn dim(x: &ITensor, axis: u32) -> Result<ITensor, String> {
    let size = x
        .shape
        .get(axis as usize)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let size = i32::try_from(*size).map_err(|_| format!("dimension {size} does not fit in 32 bits"))?;
    Ok(ITensor {
        shape: vec![],
        data: vec![size],
    })
}

pub(super) fn gather(x: &ITensor, indices: &ITensor, axis: u32, options: &ExecOptions) -> Result<ITensor, String> {
    let axis = axis as usize;
    let size = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let mut shape = x.shape[..axis].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&x.shape[axis + 1..]);
    let count = element_count(&shape, options)?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let rows: Vec<usize> = indices
        .data
        .iter()
        .map(|i| resolve_index(*i, size))
        .collect::<Result<_, _>>()?;
    let mut data = Vec::with_capacity(count);
    for o in 0..outer {
        for row in &rows {
            let start = (o * size + row) * inner;
            data.extend_from_slice(&x.data[start..start + inner]);
        }
    }
    Ok(ITensor { shape, data })
}

pub(super) struct EmbeddingTable<'a> {
    pub rows: usize,
    pub width: usize,
    pub table: &'a [i8],
    pub requant: &'a [Multiplier],
}

pub(super) fn embedding(indices: &ITensor, e: &EmbeddingTable<'_>, options: &ExecOptions) -> Result<ITensor, String> {
    if e.table.len() != e.rows * e.width || e.requant.len() != e.rows {
        return Err("table and requantization sizes disagree".into());
    }
    let mut shape = indices.shape.clone();
    shape.push(e.width);
    let count = element_count(&shape, options)?;
    let mut data = Vec::with_capacity(count);
    for index in &indices.data {
        let row = resolve_index(*index, e.rows)?;
        let factor = e.requant[row];
        data.extend(
            e.table[row * e.width..(row + 1) * e.width]
                .iter()
                .map(|q| saturate(factor.apply(i64::from(*q)))),
        );
    }
    Ok(ITensor { shape, data })
}

pub(super) fn gather_nd(x: &ITensor, indices: &ITensor, options: &ExecOptions) -> Result<ITensor, String> {
    let tuple = *indices.shape.last().ok_or("GatherND indices need at least one axis")?;
    if tuple == 0 || tuple > x.shape.len() {
        return Err(format!(
            "index tuples of {tuple} do not fit data of rank {}",
            x.shape.len()
        ));
    }
    let mut shape = indices.shape[..indices.shape.len() - 1].to_vec();
    shape.extend_from_slice(&x.shape[tuple..]);
    let count = element_count(&shape, options)?;
    let inner: usize = x.shape[tuple..].iter().product();
    let mut data = Vec::with_capacity(count);
    for index in indices.data.chunks(tuple) {
        let mut offset = 0usize;
        for (i, size) in index.iter().zip(&x.shape) {
            offset = offset * size + resolve_index(*i, *size)?;
        }
        data.extend_from_slice(&x.data[offset * inner..(offset + 1) * inner]);
    }
    Ok(ITensor { shape, data })
}

pub(super) fn concat(inputs: &[&ITensor], axis: u32, options: &ExecOptions) -> Result<ITensor, String> {
    let axis = axis as usize;
    let first = inputs.first().ok_or("nothing to join")?;
    if axis >= first.shape.len() {
        return Err(format!("axis {axis} is past rank {}", first.shape.len()));
    }
    let fits = |x: &ITensor| {
        x.shape.len() == first.shape.len()
            && x.shape
                .iter()
                .zip(&first.shape)
                .enumerate()
                .all(|(a, (d, f))| a == axis || d == f)
    };
    if let Some(bad) = inputs.iter().find(|x| !fits(x)) {
        return Err(format!(
            "shapes {:?} and {:?} do not join along axis {axis}",
            first.shape, bad.shape
        ));
    }
    let mut shape = first.shape.clone();
    shape[axis] = inputs.iter().map(|x| x.shape[axis]).sum();
    let count = element_count(&shape, options)?;
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let mut data = Vec::with_capacity(count);
    for o in 0..outer {
        for x in inputs {
            let block = x.shape[axis] * inner;
            data.extend_from_slice(&x.data[o * block..(o + 1) * block]);
        }
    }
    Ok(ITensor { shape, data })
}

pub(super) fn slice(x: &ITensor, axis: u32, start: i64, end: i64) -> Result<ITensor, String> {
    let axis = axis as usize;
    let size = *x
        .shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} is past rank {}", x.shape.len()))?;
    let bound = |v: i64| -> usize {
        let v = if v < 0 { v + size as i64 } else { v };
        v.clamp(0, size as i64) as usize
    };
    let (start, end) = (bound(start), bound(end));
    let len = end.saturating_sub(start);
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut shape = x.shape.clone();
    shape[axis] = len;
    let mut data = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = o * size * inner;
        data.extend_from_slice(&x.data[base + start * inner..base + end.max(start) * inner]);
    }
    Ok(ITensor { shape, data })
}

pub(super) fn range(start: i64, end: i64, step: i64, options: &ExecOptions) -> Result<ITensor, String> {
    if step == 0 {
        return Err("a range needs a non-zero step".into());
    }
    let span = end - start;
    let len = if (span > 0) == (step > 0) && span != 0 {
        (span.abs() + step.abs() - 1) / step.abs()
    } else {
        0
    };
    let len = usize::try_from(len).map_err(|_| "range length out of bounds".to_owned())?;
    element_count(&[len], options)?;
    let data = (0..len as i64)
        .map(|i| i32::try_from(start + i * step).map_err(|_| "range element does not fit in 32 bits".to_owned()))
        .collect::<Result<_, _>>()?;
    Ok(ITensor { shape: vec![len], data })
}

/// Each input read at every position of `shape` (which its own shape broadcasts to), through `f`.
fn broadcast_map<const N: usize>(
    inputs: [&ITensor; N],
    shape: Vec<usize>,
    options: &ExecOptions,
    f: impl Fn([i32; N]) -> i32,
) -> Result<ITensor, String> {
    let count = element_count(&shape, options)?;
    let strides: [Vec<usize>; N] = std::array::from_fn(|i| broadcast::strides(&inputs[i].shape, &shape));
    let step: [usize; N] = std::array::from_fn(|i| strides[i].last().copied().unwrap_or(0));
    let width = shape.last().copied().unwrap_or(1);
    let mut data = Vec::with_capacity(count);
    let rows: [&[usize]; N] = std::array::from_fn(|i| strides[i].as_slice());
    broadcast::for_each_row(&shape, rows, |offsets: [usize; N]| {
        for column in 0..width {
            data.push(f(std::array::from_fn(|i| {
                inputs[i].data[offsets[i] + column * step[i]]
            })));
        }
    });
    Ok(ITensor { shape, data })
}

pub(super) fn expand(x: &ITensor, shape: &ITensor, options: &ExecOptions) -> Result<ITensor, String> {
    if shape.shape.len() != 1 {
        return Err(format!("an expansion's shape must be 1-D, got {:?}", shape.shape));
    }
    let target: Vec<usize> = shape
        .data
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| format!("dimension {d} is negative")))
        .collect::<Result<_, _>>()?;
    let out = broadcast::shape(&[&x.shape, &target])?;
    broadcast_map([x], out, options, |v| v[0])
}

pub(super) fn select(cond: &ITensor, a: &ITensor, b: &ITensor, options: &ExecOptions) -> Result<ITensor, String> {
    let shape = broadcast::shape(&[&cond.shape, &a.shape, &b.shape])?;
    broadcast_map([cond, a, b], shape, options, |v| if v[0] != 0 { v[1] } else { v[2] })
}

pub(super) fn compare(
    a: &ITensor,
    b: &ITensor,
    op: CompareOp,
    scales: (Multiplier, Multiplier),
    options: &ExecOptions,
) -> Result<ITensor, String> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    broadcast_map([a, b], shape, options, |v| {
        let (x, y) = (scales.0.apply(i64::from(v[0])), scales.1.apply(i64::from(v[1])));
        i32::from(match op {
            CompareOp::Eq => x == y,
            CompareOp::Ne => x != y,
            CompareOp::Lt => x < y,
            CompareOp::Le => x <= y,
            CompareOp::Gt => x > y,
            CompareOp::Ge => x >= y,
        })
    })
}

pub(super) fn logic(a: &ITensor, b: &ITensor, op: LogicOp, options: &ExecOptions) -> Result<ITensor, String> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    broadcast_map([a, b], shape, options, |v| {
        let (x, y) = (v[0] != 0, v[1] != 0);
        i32::from(match op {
            LogicOp::And => x && y,
            LogicOp::Or => x || y,
            LogicOp::Xor => x ^ y,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[i32]) -> ITensor {
        ITensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn gather_picks_rows_and_counts_negative_indices_from_the_end() {
        let x = t(&[3, 2], &[1, 2, 3, 4, 5, 6]);
        let got = gather(&x, &t(&[2], &[2, -3]), 0, &ExecOptions::default()).expect("gather");
        assert_eq!(got, t(&[2, 2], &[5, 6, 1, 2]));
        let columns = gather(&x, &t(&[1], &[1]), 1, &ExecOptions::default()).expect("gather");
        assert_eq!(columns, t(&[3, 1], &[2, 4, 6]));
        assert!(gather(&x, &t(&[1], &[3]), 0, &ExecOptions::default()).is_err());
    }

    #[test]
    fn gather_nd_reads_index_tuples() {
        let x = t(&[2, 2], &[0, 1, 2, 3]);
        let got = gather_nd(&x, &t(&[2, 2], &[0, 0, 1, 1]), &ExecOptions::default()).expect("gather");
        assert_eq!(got, t(&[2], &[0, 3]));
        let rows = gather_nd(&x, &t(&[2, 1], &[1, 0]), &ExecOptions::default()).expect("gather");
        assert_eq!(rows, t(&[2, 2], &[2, 3, 0, 1]));
    }

    #[test]
    fn concat_slice_range_and_expand() {
        let options = ExecOptions::default();
        let a = t(&[2, 1], &[1, 2]);
        let b = t(&[2, 2], &[3, 4, 5, 6]);
        assert_eq!(
            concat(&[&a, &b], 1, &options).expect("concat"),
            t(&[2, 3], &[1, 3, 4, 2, 5, 6])
        );
        assert!(concat(&[&a, &t(&[3, 1], &[0, 0, 0])], 1, &options).is_err());
        assert_eq!(slice(&b, 1, 1, 99).expect("slice"), t(&[2, 1], &[4, 6]));
        assert_eq!(slice(&b, 0, -1, 2).expect("slice"), t(&[1, 2], &[5, 6]));
        assert_eq!(slice(&b, 0, 2, 1).expect("slice"), t(&[0, 2], &[]));
        assert_eq!(range(5, 0, -2, &options).expect("range"), t(&[3], &[5, 3, 1]));
        assert_eq!(range(0, 0, 1, &options).expect("range"), t(&[0], &[]));
        assert!(range(0, 5, 0, &options).is_err());
        assert!(
            range(0, i64::from(i32::MAX), 1, &options).is_err(),
            "over the element limit"
        );
        assert_eq!(
            expand(&a, &t(&[1], &[3]), &options).expect("expand"),
            t(&[2, 3], &[1, 1, 1, 2, 2, 2])
        );
    }

    #[test]
    fn select_compare_and_logic_broadcast() {
        let options = ExecOptions::default();
        let identity = Multiplier::from_f64(1.0);
        let cond = t(&[2, 1], &[1, 0]);
        let got = select(&cond, &t(&[1, 2], &[7, 8]), &t(&[], &[0]), &options).expect("select");
        assert_eq!(got, t(&[2, 2], &[7, 8, 0, 0]));
        // 3 at scale 1 against 5 at scale 1/2 (2.5), both brought to the finer scale: 6 > 5.
        let double = Multiplier::from_f64(2.0);
        let greater = compare(
            &t(&[1], &[3]),
            &t(&[1], &[5]),
            CompareOp::Gt,
            (double, identity),
            &options,
        );
        assert_eq!(greater.expect("compare"), t(&[1], &[1]));
        let xor = logic(&t(&[2], &[0, 3]), &t(&[1], &[1]), LogicOp::Xor, &options).expect("logic");
        assert_eq!(xor, t(&[2], &[1, 0]));
    }
}
