//! Kernels that pick, join and compare elements: gathers, slices, ranges, broadcasts and
//! element-wise selection. They move integers without arithmetic on their values (except the
//! requantization an embedding row or a comparison carries), so they are exact by construction.

use super::{ExecOptions, ITensor};
use crate::broadcast;
use crate::fixed::{Multiplier, saturate};
use crate::moves::{self, Moved, View};
use crate::plan::{CompareOp, LogicOp};

/// The one element of a scalar (or one-element) integer operand.
pub(super) fn scalar(x: &ITensor, what: &str) -> Result<i64, String> {
    match x.data[..] {
        [v] => Ok(i64::from(v)),
        _ => Err(format!("{what} must be one integer, got shape {:?}", x.shape)),
    }
}

fn view(x: &ITensor) -> View<'_, i32> {
    View {
        shape: &x.shape,
        data: &x.data,
    }
}

fn tensor(moved: Moved<i32>) -> ITensor {
    ITensor {
        shape: moved.shape,
        data: moved.data,
    }
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
    moves::gather(view(x), view(indices), axis as usize, options.max_elements)
        .map(tensor)
        .map_err(String::from)
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
    let count = moves::element_count(&shape, options.max_elements)?;
    let mut data = Vec::with_capacity(count);
    for index in &indices.data {
        let row = moves::resolve_index(i64::from(*index), e.rows)?;
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
    moves::gather_nd(view(x), view(indices), options.max_elements)
        .map(tensor)
        .map_err(String::from)
}

pub(super) fn concat(inputs: &[&ITensor], axis: u32, options: &ExecOptions) -> Result<ITensor, String> {
    let views: Vec<View<'_, i32>> = inputs.iter().map(|x| view(x)).collect();
    moves::concat(&views, axis as usize, options.max_elements)
        .map(tensor)
        .map_err(String::from)
}

pub(super) fn slice(x: &ITensor, axis: u32, start: i64, end: i64) -> Result<ITensor, String> {
    moves::slice(view(x), axis as usize, start, end)
        .map(tensor)
        .map_err(String::from)
}

pub(super) fn range(start: i64, end: i64, step: i64, options: &ExecOptions) -> Result<ITensor, String> {
    let values = moves::range(start, end, step, options.max_elements)?;
    let data = values
        .iter()
        .map(|v| i32::try_from(*v).map_err(|_| "range element does not fit in 32 bits".to_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ITensor {
        shape: vec![data.len()],
        data,
    })
}

/// Each input read at every position of `shape` (which its own shape broadcasts to), through `f`.
fn broadcast_map<const N: usize>(
    inputs: [&ITensor; N],
    shape: Vec<usize>,
    options: &ExecOptions,
    f: impl Fn([i32; N]) -> i32,
) -> Result<ITensor, String> {
    moves::broadcast_map(inputs.map(view), shape, options.max_elements, f)
        .map(tensor)
        .map_err(String::from)
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
        i32::from(op.holds(x, y))
    })
}

pub(super) fn logic(a: &ITensor, b: &ITensor, op: LogicOp, options: &ExecOptions) -> Result<ITensor, String> {
    let shape = broadcast::shape(&[&a.shape, &b.shape])?;
    broadcast_map([a, b], shape, options, |v| op.apply(v[0], v[1]))
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
