//! Exact sums of products of 16-bit activations and int8 weights: the dense and convolution
//! layers' inner loop, register-blocked, with AVX2 chosen at run time where the CPU has it.
//!
//! Every kernel adds exact integers, so the blocking and the instruction set change only the
//! order of the additions, never a bit of the result. A product of an activation (at most 32767
//! in magnitude) and a weight (at most 127) is below 2^22; the kernels add pairs of products into
//! 32-bit lanes for at most [`PAIRS_PER_BLOCK`] pairs (`2 * 256 * 32767 * 127 < 2^31`) and then
//! widen to 64 bits, so nothing overflows whatever the length of the sum.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use pulp::x86::V3;

/// Columns of the packed operand handled together: two 256-bit vectors of 32-bit sums.
pub(super) const PANEL: usize = 16;
/// Rows of the broadcast operand handled together.
const TILE_ROWS: usize = 4;
/// Pairs of products a 32-bit lane adds before it is widened (see the module's bound).
const PAIRS_PER_BLOCK: usize = 256;

/// Packs two 16-bit operands into the 32 bits a pairwise multiply-add broadcasts (first low).
#[inline]
fn pack_pair(first: i16, second: i16) -> i32 {
    (u32::from(first as u16) | (u32::from(second as u16) << 16)) as i32
}

#[inline]
fn unpack_pair(pair: i32) -> (i32, i32) {
    (i32::from(pair as i16), pair >> 16)
}

/// The broadcast operand: `rows` rows of `k` values as packed pairs, zero past `k`.
#[derive(Debug)]
pub(super) struct PairedRows {
    rows: usize,
    pairs: usize,
    data: Vec<i32>,
}

impl PairedRows {
    /// Rows whose element `(row, kk)` is `value(row, kk)`.
    pub(super) fn build(rows: usize, k: usize, value: impl Fn(usize, usize) -> i16) -> Self {
        let pairs = k.div_ceil(2);
        let mut data = Vec::with_capacity(rows * pairs);
        for row in 0..rows {
            for q in 0..pairs {
                let second = if 2 * q + 1 < k { value(row, 2 * q + 1) } else { 0 };
                data.push(pack_pair(value(row, 2 * q), second));
            }
        }
        Self { rows, pairs, data }
    }

    /// Row-major `rows x k` activations, already checked to be 16-bit operands (packed straight
    /// from the plan's values, without a converted copy).
    pub(super) fn from_row_major(values: &[i32], rows: usize, k: usize) -> Self {
        if k.is_multiple_of(2) {
            let data = values[..rows * k]
                .chunks_exact(2)
                .map(|p| pack_pair(p[0] as i16, p[1] as i16))
                .collect();
            return Self {
                rows,
                pairs: k / 2,
                data,
            };
        }
        Self::build(rows, k, |row, kk| values[row * k + kk] as i16)
    }

    fn row(&self, row: usize) -> &[i32] {
        &self.data[row * self.pairs..(row + 1) * self.pairs]
    }
}

/// The packed operand: `cols` columns of `k` values, in panels of [`PANEL`] columns where, for
/// each pair `q`, the pairs of the panel's columns lie side by side (zero past the end).
#[derive(Debug)]
pub(super) struct Panels {
    cols: usize,
    pairs: usize,
    data: Vec<[i16; 2 * PANEL]>,
}

impl Panels {
    /// Columns of `k` values each, written by `fill(col, column)` into a zeroed column.
    pub(super) fn from_columns(cols: usize, k: usize, mut fill: impl FnMut(usize, &mut [i16])) -> Self {
        let pairs = k.div_ceil(2);
        let mut data = vec![[0i16; 2 * PANEL]; cols.div_ceil(PANEL) * pairs];
        let mut column = vec![0i16; 2 * pairs];
        for col in 0..cols {
            column.fill(0);
            fill(col, &mut column[..k]);
            let (panel, c) = (col / PANEL, col % PANEL);
            for (slot, pair) in data[panel * pairs..(panel + 1) * pairs]
                .iter_mut()
                .zip(column.chunks_exact(2))
            {
                slot[2 * c] = pair[0];
                slot[2 * c + 1] = pair[1];
            }
        }
        Self { cols, pairs, data }
    }

    /// Int8 weights of `cols` rows (output channels) of `k` each.
    pub(super) fn from_weights(weights: &[i8], cols: usize, k: usize) -> Self {
        Self::from_columns(cols, k, |col, column| {
            for (slot, w) in column.iter_mut().zip(&weights[col * k..(col + 1) * k]) {
                *slot = i16::from(*w);
            }
        })
    }

    /// Empty panels of `cols` columns of `k` values, to [`Panels::gather`] into.
    pub(super) fn zeroed(cols: usize, k: usize) -> Self {
        let pairs = k.div_ceil(2);
        Self {
            cols,
            pairs,
            data: vec![[0i16; 2 * PANEL]; cols.div_ceil(PANEL) * pairs],
        }
    }

    /// Refills the panels from `source` as `map` says (built for the same columns and `k`).
    /// The source's values must already be known to be 16-bit operands.
    pub(super) fn gather(&mut self, map: &GatherMap, source: &[i32]) {
        debug_assert_eq!((self.cols, self.pairs), (map.cols, map.pairs));
        let slots = self.data.as_flattened_mut();
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = V3::try_new() {
            return v3.vectorize(Gather {
                slots,
                map: &map.slots,
                source,
            });
        }
        gather_slots(slots, &map.slots, source);
    }

    fn panel(&self, panel: usize) -> &[[i16; 2 * PANEL]] {
        &self.data[panel * self.pairs..(panel + 1) * self.pairs]
    }
}

/// Where each slot of a [`Panels`] layout reads its value in a source: the same layout serves
/// every image of a convolution, so the patches of each image are one gather.
#[derive(Debug)]
pub(super) struct GatherMap {
    cols: usize,
    pairs: usize,
    /// Per slot, an index into the source; past its end (padding, and slots past `k` or the
    /// last column) reads zero.
    slots: Vec<u32>,
}

impl GatherMap {
    /// The map whose element `(col, kk)` reads `source[index(col, kk)]`, or zero for `None`.
    /// Indices must be below `u32::MAX`.
    pub(super) fn new(cols: usize, k: usize, index: impl Fn(usize, usize) -> Option<usize>) -> Self {
        let pairs = k.div_ceil(2);
        let mut slots = vec![u32::MAX; cols.div_ceil(PANEL) * pairs * 2 * PANEL];
        for col in 0..cols {
            let (panel, c) = (col / PANEL, col % PANEL);
            for kk in 0..k {
                if let Some(i) = index(col, kk) {
                    slots[((panel * pairs + kk / 2) * PANEL + c) * 2 + kk % 2] = u32::try_from(i).unwrap_or(u32::MAX);
                }
            }
        }
        Self { cols, pairs, slots }
    }
}

/// A gather compiled with AVX2 enabled (its loads become vector gathers).
struct Gather<'a> {
    slots: &'a mut [i16],
    map: &'a [u32],
    source: &'a [i32],
}

impl pulp::NullaryFnOnce for Gather<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        gather_slots(self.slots, self.map, self.source);
    }
}

#[inline(always)]
fn gather_slots(slots: &mut [i16], map: &[u32], source: &[i32]) {
    for (slot, index) in slots.iter_mut().zip(map) {
        *slot = source.get(*index as usize).map_or(0, |v| *v as i16);
    }
}

/// Where the kernels hand their sums: runs of consecutive columns of one row.
pub(super) trait Sink {
    /// Takes `sums` of `row`, columns `first_col..first_col + sums.len()`.
    fn take(&mut self, row: usize, first_col: usize, sums: &[i64]);
}

/// Computes `sum over kk of a(row, kk) * b(col, kk)` for every row of `a` in `rows` and every
/// column of `b`, and hands them to `sink` as runs of consecutive columns: with the fastest kernel the CPU has when `simd`, else one product at a time. The
/// operands must share `k`.
pub(super) fn product_sums(a: &PairedRows, rows: Range<usize>, b: &Panels, simd: bool, sink: &mut impl Sink) {
    debug_assert_eq!(a.pairs, b.pairs);
    let rows = rows.start.min(a.rows)..rows.end.min(a.rows);
    if !simd {
        return scalar_sums(a, rows, b, sink);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxSums { v3, a, rows, b, sink });
    }
    tiled_sums(a, rows, b, sink, portable_tile);
}

/// One product at a time in 64 bits: the reference order.
fn scalar_sums(a: &PairedRows, rows: Range<usize>, b: &Panels, sink: &mut impl Sink) {
    for row in rows {
        let x = a.row(row);
        for col in 0..b.cols {
            let (panel, c) = (col / PANEL, col % PANEL);
            let mut sum = 0i64;
            for (pair, w) in x.iter().zip(b.panel(panel)) {
                let (first, second) = unpack_pair(*pair);
                sum += i64::from(first) * i64::from(w[2 * c]);
                sum += i64::from(second) * i64::from(w[2 * c + 1]);
            }
            sink.take(row, col, &[sum]);
        }
    }
}

/// Sums of one tile: [`TILE_ROWS`] rows (each `pairs` long) against one panel.
type Tile = [[i64; PANEL]; TILE_ROWS];

/// Walks the tiles, computing each with `tile` (rows past the end read zeros and are not emitted).
#[inline(always)]
fn tiled_sums(
    a: &PairedRows,
    rows: Range<usize>,
    b: &Panels,
    sink: &mut impl Sink,
    tile: impl Fn([&[i32]; TILE_ROWS], &[[i16; 2 * PANEL]]) -> Tile,
) {
    let zeros = vec![0i32; a.pairs];
    let mut first = rows.start;
    while first < rows.end {
        let present = TILE_ROWS.min(rows.end - first);
        let x: [&[i32]; TILE_ROWS] = std::array::from_fn(|r| if r < present { a.row(first + r) } else { &zeros[..] });
        for panel in 0..b.cols.div_ceil(PANEL) {
            let sums = tile(x, b.panel(panel));
            let width = PANEL.min(b.cols - panel * PANEL);
            for (r, sums) in sums.iter().enumerate().take(present) {
                sink.take(first + r, panel * PANEL, &sums[..width]);
            }
        }
        first += present;
    }
}

/// A tile in plain Rust (the compiler vectorizes the column loop).
#[inline(always)]
fn portable_tile(x: [&[i32]; TILE_ROWS], panel: &[[i16; 2 * PANEL]]) -> Tile {
    let mut total = [[0i64; PANEL]; TILE_ROWS];
    for (block, weights) in panel.chunks(PAIRS_PER_BLOCK).enumerate() {
        let start = block * PAIRS_PER_BLOCK;
        let mut acc = [[0i32; PANEL]; TILE_ROWS];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (pair, w) in x[r][start..start + weights.len()].iter().zip(weights) {
                let (first, second) = unpack_pair(*pair);
                for c in 0..PANEL {
                    acc[c] += first * i32::from(w[2 * c]) + second * i32::from(w[2 * c + 1]);
                }
            }
        }
        for (total, acc) in total.iter_mut().zip(&acc) {
            for (t, a) in total.iter_mut().zip(acc) {
                *t += i64::from(*a);
            }
        }
    }
    total
}

/// The product sums compiled with AVX2 enabled (`V3::vectorize` runs them with the features on).
#[cfg(target_arch = "x86_64")]
struct AvxSums<'a, S> {
    v3: V3,
    a: &'a PairedRows,
    rows: Range<usize>,
    b: &'a Panels,
    sink: &'a mut S,
}

#[cfg(target_arch = "x86_64")]
impl<S: Sink> pulp::NullaryFnOnce for AvxSums<'_, S> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let v3 = self.v3;
        tiled_sums(self.a, self.rows, self.b, self.sink, |x, panel| avx_tile(v3, x, panel));
    }
}

/// A tile with 256-bit pairwise multiply-adds: each step broadcasts one pair of each row and
/// multiplies it into the panel's 16 columns (two vectors of eight 32-bit sums).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx_tile(v3: V3, x: [&[i32]; TILE_ROWS], panel: &[[i16; 2 * PANEL]]) -> Tile {
    use pulp::cast;
    use std::arch::x86_64::__m256i;
    let mut total = [[0i64; PANEL]; TILE_ROWS];
    for (block, weights) in panel.chunks(PAIRS_PER_BLOCK).enumerate() {
        let start = block * PAIRS_PER_BLOCK;
        let x: [&[i32]; TILE_ROWS] = std::array::from_fn(|r| &x[r][start..start + weights.len()]);
        let zero: __m256i = cast([0i32; 8]);
        let mut acc = [[zero; 2]; TILE_ROWS];
        for (q, w) in weights.iter().enumerate() {
            let [low, high]: [[i16; PANEL]; 2] = cast(*w);
            let (low, high): (__m256i, __m256i) = (cast(low), cast(high));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = v3.avx._mm256_set1_epi32(x[r][q]);
                acc[0] = v3.avx2._mm256_add_epi32(acc[0], v3.avx2._mm256_madd_epi16(pair, low));
                acc[1] = v3.avx2._mm256_add_epi32(acc[1], v3.avx2._mm256_madd_epi16(pair, high));
            }
        }
        for (total, acc) in total.iter_mut().zip(&acc) {
            let sums: [[i32; 8]; 2] = [cast(acc[0]), cast(acc[1])];
            for (t, s) in total.iter_mut().zip(sums.iter().flatten()) {
                *t += i64::from(*s);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn widen(values: &[i16]) -> Vec<i32> {
        values.iter().map(|v| i32::from(*v)).collect()
    }

    fn direct(a: &[i16], b: &[i8], rows: usize, cols: usize, k: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                out.push(
                    (0..k)
                        .map(|kk| i64::from(a[r * k + kk]) * i64::from(b[c * k + kk]))
                        .sum(),
                );
            }
        }
        out
    }

    /// Keeps the sums as they come.
    struct Sums {
        cols: usize,
        out: Vec<i64>,
    }

    impl Sink for Sums {
        fn take(&mut self, row: usize, first_col: usize, sums: &[i64]) {
            self.out[row * self.cols + first_col..][..sums.len()].copy_from_slice(sums);
        }
    }

    fn run(a: &PairedRows, b: &Panels, rows: usize, cols: usize, kernel: &str) -> Vec<i64> {
        let mut sink = Sums {
            cols,
            out: vec![i64::MIN; rows * cols],
        };
        match kernel {
            "scalar" => product_sums(a, 0..rows, b, false, &mut sink),
            "portable" => tiled_sums(a, 0..rows, b, &mut sink, portable_tile),
            _ => product_sums(a, 0..rows, b, true, &mut sink),
        }
        sink.out
    }

    proptest! {
        /// Every kernel gives the direct formula's sums, for any shape (odd lengths, partial tiles
        /// and panels, sums long enough to widen).
        #[test]
        fn kernels_match_the_direct_sums(
            rows in 0usize..11,
            cols in 0usize..40,
            k in prop_oneof![0usize..40, 500usize..1100],
            seed in any::<u64>(),
        ) {
            let mut state = seed;
            let mut next = |range: i64| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as i64 % (2 * range + 1) - range) as i32
            };
            let a: Vec<i16> = (0..rows * k).map(|_| next(32767) as i16).collect();
            let b: Vec<i8> = (0..cols * k).map(|_| next(127) as i8).collect();
            let (paired, panels) = (PairedRows::from_row_major(&widen(&a), rows, k), Panels::from_weights(&b, cols, k));
            let expected = direct(&a, &b, rows, cols, k);
            for kernel in ["scalar", "portable", "best"] {
                prop_assert_eq!(&run(&paired, &panels, rows, cols, kernel), &expected, "{}", kernel);
            }
        }
    }

    #[test]
    fn kernels_do_not_overflow_at_the_extremes() {
        for k in [511, 512, 513, 1024, 5000] {
            let a = vec![-32767i16; 5 * k];
            let b = vec![127i8; 17 * k];
            let (paired, panels) = (
                PairedRows::from_row_major(&widen(&a), 5, k),
                Panels::from_weights(&b, 17, k),
            );
            let expected = vec![-32767i64 * 127 * k as i64; 5 * 17];
            for kernel in ["scalar", "portable", "best"] {
                assert_eq!(run(&paired, &panels, 5, 17, kernel), expected, "{kernel} k={k}");
            }
        }
    }
}
