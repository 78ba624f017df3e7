//! Einsums of two operands read as batches of matrix products, the operands' and the output's
//! axes reordered around the kernels when their letters are not laid out as the kernels read
//! them.

use super::kernels::PackedMatrix;

/// An einsum of two operands that is a (batched) matrix product once its operands' axes are
/// reordered: the kernels read `A` as `batch ++ rows ++ sum` and `B` as `batch ++ sum ++ cols`
/// (or `batch ++ cols ++ sum` when transposed), and write `batch ++ rows ++ cols`; the fields
/// count the axes of each group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EinsumForm {
    pub(super) batch: usize,
    pub(super) rows: usize,
    pub(super) sum: usize,
    pub(super) cols: usize,
    pub(super) transposed: bool,
    /// Axis `i` of `A` as the kernels read it is axis `a_order[i]` of the given operand; `None`
    /// when they are the same.
    pub(super) a_order: Option<Vec<usize>>,
    /// The same for `B`.
    pub(super) b_order: Option<Vec<usize>>,
    /// Axis `i` of the output is axis `out_order[i]` of the kernels' result; `None` when they
    /// are the same.
    pub(super) out_order: Option<Vec<usize>>,
    /// Where the output's first axis is in the given `A` and `B`, if at all: what decides whether
    /// the product keeps batch rows apart.
    pub(super) lead_in: [Option<usize>; 2],
}

/// A batch of matrix products: `batches` times `m x k` by `k x n`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProductSizes {
    pub(super) batches: usize,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) n: usize,
}

/// Where each of `wanted` is in `given`; `None` when that is every axis in order.
fn order(wanted: &[char], given: &[char]) -> Option<Option<Vec<usize>>> {
    let order: Vec<usize> = wanted
        .iter()
        .map(|c| given.iter().position(|g| g == c))
        .collect::<Option<_>>()?;
    Some((!order.iter().enumerate().all(|(i, o)| i == *o)).then_some(order))
}

impl EinsumForm {
    /// The form of `expr` (such as `bmk,bkn->bmn` or `ambk,abkn->abmn`), or `None` when it is
    /// not a product of two operands: a letter repeated within an operand, or summed in only one.
    pub(super) fn parse(expr: &str) -> Option<Self> {
        let (operands, out) = expr.split_once("->")?;
        let (a, b) = operands.split_once(',')?;
        if b.contains(',') {
            return None;
        }
        let [a, b, out]: [Vec<char>; 3] = [a, b, out].map(|s| s.chars().collect());
        let distinct = |s: &[char]| s.iter().enumerate().all(|(i, c)| !s[..i].contains(c));
        if !distinct(&a) || !distinct(&b) || !distinct(&out) {
            return None;
        }
        // Every letter is in two of the three: kept from both operands, or from one, or summed.
        let in_two =
            |c: &char| usize::from(a.contains(c)) + usize::from(b.contains(c)) + usize::from(out.contains(c)) == 2;
        let shared_by_all = |c: &char| a.contains(c) && b.contains(c) && out.contains(c);
        if !a.iter().chain(&b).chain(&out).all(|c| in_two(c) || shared_by_all(c)) {
            return None;
        }
        let batch: Vec<char> = out.iter().copied().filter(shared_by_all).collect();
        let rows: Vec<char> = out
            .iter()
            .copied()
            .filter(|c| a.contains(c) && !b.contains(c))
            .collect();
        let cols: Vec<char> = out
            .iter()
            .copied()
            .filter(|c| b.contains(c) && !a.contains(c))
            .collect();
        let sum: Vec<char> = a.iter().copied().filter(|c| !out.contains(c)).collect();
        let canonical_a: Vec<char> = [&batch[..], &rows, &sum].concat();
        let canonical_out: Vec<char> = [&batch[..], &rows, &cols].concat();
        let (transposed, b_order) = if b == [&batch[..], &sum, &cols].concat() {
            (false, None)
        } else if b == [&batch[..], &cols, &sum].concat() {
            (true, None)
        } else {
            (false, order(&[&batch[..], &sum, &cols].concat(), &b)?)
        };
        // The kernels' result is in canonical order; the output reads it back in its own.
        let out_order = order(&out, &canonical_out)?;
        let lead = out.first();
        Some(Self {
            batch: batch.len(),
            rows: rows.len(),
            sum: sum.len(),
            cols: cols.len(),
            transposed,
            a_order: order(&canonical_a, &a)?,
            b_order,
            out_order,
            lead_in: [&a, &b].map(|operand| lead.and_then(|l| operand.iter().position(|c| c == l))),
        })
    }

    /// The sizes of the products and the kernels' output shape (before `out_order`) for these
    /// operand shapes, already in the kernels' order, or why they do not fit.
    pub(super) fn sizes(&self, a: &[usize], b: &[usize]) -> Result<(ProductSizes, Vec<usize>), String> {
        if a.len() != self.batch + self.rows + self.sum || b.len() != self.batch + self.sum + self.cols {
            return Err(format!("operands of shapes {a:?} and {b:?} do not fit the product"));
        }
        let (b_sum, b_cols) = if self.transposed {
            (&b[self.batch + self.cols..], &b[self.batch..self.batch + self.cols])
        } else {
            (&b[self.batch..self.batch + self.sum], &b[self.batch + self.sum..])
        };
        if a[..self.batch] != b[..self.batch] || a[self.batch + self.rows..] != *b_sum {
            return Err(format!("operands of shapes {a:?} and {b:?} do not line up"));
        }
        let product = |dims: &[usize]| dims.iter().product::<usize>();
        let out: Vec<usize> = a[..self.batch + self.rows].iter().chain(b_cols).copied().collect();
        let sizes = ProductSizes {
            batches: product(&a[..self.batch]),
            m: product(&a[self.batch..self.batch + self.rows]),
            k: product(b_sum),
            n: product(b_cols),
        };
        Ok((sizes, out))
    }

    /// The product's right operand packed once per batch index, from a constant of `shape`
    /// already in the kernels' order.
    pub(super) fn pack(&self, shape: &[usize], data: &[f32]) -> Option<Vec<PackedMatrix>> {
        if shape.len() != self.batch + self.sum + self.cols {
            return None;
        }
        let (batch_dims, rest) = shape.split_at(self.batch);
        let (first, second) = rest.split_at(if self.transposed { self.cols } else { self.sum });
        let (k, n) = if self.transposed {
            (second.iter().product::<usize>(), first.iter().product::<usize>())
        } else {
            (first.iter().product::<usize>(), second.iter().product::<usize>())
        };
        let batches = batch_dims.iter().product::<usize>();
        if data.len() != batches * k * n {
            return None;
        }
        Some(
            (0..batches)
                .map(|batch| PackedMatrix::pack(&data[batch * k * n..][..k * n], k, n, self.transposed))
                .collect(),
        )
    }

    /// Whether the output's axes are the kernels' and its last axis is the columns: where a
    /// per-column epilogue can be folded in.
    pub(super) fn writes_columns_last(&self) -> bool {
        self.out_order.is_none() && self.cols == 1
    }

    /// Which of `A`'s given axes are summed over.
    pub(super) fn summed_axes_of_a(&self) -> Vec<usize> {
        let canonical: Vec<usize> = (self.batch + self.rows..self.batch + self.rows + self.sum).collect();
        match &self.a_order {
            Some(order) => canonical.iter().map(|i| order[*i]).collect(),
            None => canonical,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn einsums_that_are_matrix_products_are_recognized() {
        let form = |e: &str| EinsumForm::parse(e).unwrap_or_else(|| panic!("{e}"));
        let plain = form("mk,kn->mn");
        assert_eq!(
            (plain.batch, plain.rows, plain.sum, plain.cols, plain.transposed),
            (0, 1, 1, 1, false)
        );
        assert_eq!(
            (plain.a_order.clone(), plain.b_order.clone(), plain.out_order.clone()),
            (None, None, None)
        );
        assert_eq!(plain.lead_in, [Some(0), None]);
        let several = form("mbak,bakn->mn");
        assert_eq!((several.rows, several.sum, several.cols), (1, 3, 1));
        let transposed = form("bmk,bnk->bmn");
        assert_eq!((transposed.batch, transposed.transposed), (1, true));
        // MiniLM's attention: batch axes that are not leading, and two summed axes.
        let scores = form("ambk,abkn->abmn");
        assert_eq!((scores.batch, scores.rows, scores.sum, scores.cols), (2, 1, 1, 1));
        assert_eq!(scores.a_order, Some(vec![0, 2, 1, 3]));
        assert_eq!((scores.b_order.clone(), scores.out_order.clone()), (None, None));
        let mix = form("abmk,akbn->ambn");
        assert_eq!(mix.b_order, Some(vec![0, 2, 1, 3]));
        assert_eq!(mix.out_order, Some(vec![0, 2, 1, 3]));
        assert_eq!(mix.lead_in, [Some(0), Some(0)]);
        let heads = form("ambk,bkn->amn");
        assert_eq!((heads.batch, heads.rows, heads.sum, heads.cols), (0, 2, 2, 1));
        assert_eq!(heads.summed_axes_of_a(), [2, 3]);
        assert_eq!(form("mk,kn->nm").out_order, Some(vec![1, 0]));
        for other in [
            "mk,kn->m",
            "ii,ij->j",
            "mk->m",
            "mk,nk,kj->mn",
            "mk,kn->mnx",
            "mkx,kn->mn",
        ] {
            assert_eq!(EinsumForm::parse(other), None, "{other}");
        }
    }
}
