//! NumPy broadcasting, shared by the exact and the float executors: the broadcast shape, the
//! strides that read an operand at every index of it, and a walk over its rows.

/// The NumPy broadcast of several shapes.
pub(crate) fn shape(shapes: &[&[usize]]) -> Result<Vec<usize>, String> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut shape = vec![1usize; rank];
    for s in shapes {
        for (axis, dim) in s.iter().enumerate() {
            let slot = &mut shape[rank - s.len() + axis];
            match (*slot, *dim) {
                (a, b) if a == b => {}
                (1, b) => *slot = b,
                (_, 1) => {}
                _ => return Err(format!("shapes {shapes:?} do not broadcast")),
            }
        }
    }
    Ok(shape)
}

/// The strides that read a value of `shape` at each index of `out_shape`, which `shape`
/// broadcasts to: zero along the axes where the value has 1 and along the axes it lacks.
pub(crate) fn strides(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let lead = out_shape.len().saturating_sub(shape.len());
    let mut strides = vec![0; out_shape.len()];
    let mut stride = 1;
    for (axis, dim) in shape.iter().enumerate().rev() {
        if *dim != 1
            && let Some(slot) = strides.get_mut(axis + lead)
        {
            *slot = stride;
        }
        stride *= dim;
    }
    strides
}

/// Calls `f`, for every row of `shape` (its last axis) in row-major order, with the offset of
/// the row's first element under each set of strides. A shape of rank 0 has one row; a shape
/// with a dimension of 0 has none.
pub(crate) fn for_each_row<const N: usize>(shape: &[usize], strides: [&[usize]; N], mut f: impl FnMut([usize; N])) {
    if shape.contains(&0) {
        return;
    }
    let outer = shape.len().saturating_sub(1);
    let mut index = vec![0usize; outer];
    let mut offsets = [0usize; N];
    loop {
        f(offsets);
        // Carry into the outer axes.
        let mut axis = outer;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            for (offset, s) in offsets.iter_mut().zip(&strides) {
                *offset += s[axis];
            }
            if index[axis] < shape[axis] {
                break;
            }
            for (offset, s) in offsets.iter_mut().zip(&strides) {
                *offset -= s[axis] * shape[axis];
            }
            index[axis] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_broadcast_as_numpy_does() {
        assert_eq!(shape(&[&[2, 1, 3], &[4, 1]]), Ok(vec![2, 4, 3]));
        assert_eq!(shape(&[&[], &[5]]), Ok(vec![5]));
        assert!(shape(&[&[2, 3], &[4, 3]]).is_err());
    }

    #[test]
    fn rows_are_read_through_broadcast_strides() {
        let out = [2, 3, 2];
        let (a, b) = ([2, 1, 2], [3, 1]);
        let (sa, sb) = (strides(&a, &out), strides(&b, &out));
        assert_eq!((sa.as_slice(), sb.as_slice()), (&[2, 0, 1][..], &[0, 1, 0][..]));
        let mut rows = Vec::new();
        for_each_row(&out, [&sa, &sb], |offsets| rows.push(offsets));
        assert_eq!(rows, [[0, 0], [0, 1], [0, 2], [2, 0], [2, 1], [2, 2]]);
        let mut scalar_rows = 0;
        for_each_row(&[], [&[]], |_| scalar_rows += 1);
        assert_eq!(scalar_rows, 1);
        for_each_row(&[3, 0, 2], [&[0, 0, 0]], |_| {
            unreachable!("a shape with no elements has no rows")
        });
    }
}
