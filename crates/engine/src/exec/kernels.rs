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
/// Most products of an activation and a weight that one 32-bit sum may add.
pub(super) const MAX_NARROW_TERMS: usize = 2 * PAIRS_PER_BLOCK;

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

    /// How many rows there are.
    pub(super) fn rows(&self) -> usize {
        self.rows
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

    /// Refills the panels with `cols` columns (at most the panels were made for) of `k` values,
    /// where value `kk` of column `col` is `source[offsets[kk] + col]`: each value's columns are
    /// a contiguous run of the source, as in a stride-1 convolution over padded data. The source
    /// must hold a whole panel past the last column read, and its values must already be known to
    /// be 16-bit operands.
    pub(super) fn fill_shifted(&mut self, cols: usize, offsets: &[usize], source: &[i32]) {
        debug_assert_eq!(self.pairs, offsets.len().div_ceil(2));
        debug_assert!(cols.div_ceil(PANEL) * self.pairs <= self.data.len());
        self.cols = cols;
        let panels = &mut self.data[..cols.div_ceil(PANEL) * self.pairs];
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = V3::try_new() {
            return v3.vectorize(FillShifted {
                v3,
                panels,
                pairs: self.pairs,
                offsets,
                source,
            });
        }
        fill_shifted(panels, self.pairs, offsets, source, |first, second| {
            let mut slot = [0i16; 2 * PANEL];
            for ((values, a), b) in slot.chunks_exact_mut(2).zip(first).zip(second) {
                values[0] = *a as i16;
                values[1] = *b as i16;
            }
            slot
        });
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

/// [`Panels::fill_shifted`]'s loop: for each panel and pair of values, the pair's two runs of
/// [`PANEL`] source values interleaved into one slot by `interleave`.
#[inline(always)]
fn fill_shifted(
    panels: &mut [[i16; 2 * PANEL]],
    pairs: usize,
    offsets: &[usize],
    source: &[i32],
    interleave: impl Fn(&[i32; PANEL], &[i32; PANEL]) -> [i16; 2 * PANEL],
) {
    let (mut first, mut second) = ([0i32; PANEL], [0i32; PANEL]);
    for (panel, slots) in panels.chunks_exact_mut(pairs).enumerate() {
        let column = panel * PANEL;
        for (slot, pair) in slots.iter_mut().zip(offsets.chunks(2)) {
            first.copy_from_slice(&source[pair[0] + column..][..PANEL]);
            match pair.get(1) {
                Some(offset) => second.copy_from_slice(&source[offset + column..][..PANEL]),
                None => second = [0; PANEL],
            }
            *slot = interleave(&first, &second);
        }
    }
}

/// [`fill_shifted`] compiled with AVX2 enabled: each 32-bit lane takes the low halves of one
/// value from each run (x86 is little-endian, so the first value is the lane's first `i16`).
#[cfg(target_arch = "x86_64")]
struct FillShifted<'a> {
    v3: V3,
    panels: &'a mut [[i16; 2 * PANEL]],
    pairs: usize,
    offsets: &'a [usize],
    source: &'a [i32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for FillShifted<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        use pulp::cast;
        use std::arch::x86_64::__m256i;
        let v3 = self.v3;
        fill_shifted(self.panels, self.pairs, self.offsets, self.source, |first, second| {
            let (first, second): ([__m256i; 2], [__m256i; 2]) = (cast(*first), cast(*second));
            let lanes: [__m256i; 2] = std::array::from_fn(|i| {
                v3.avx2
                    ._mm256_blend_epi16::<0xAA>(first[i], v3.avx2._mm256_slli_epi32::<16>(second[i]))
            });
            cast(lanes)
        });
    }
}

/// The vector instructions the sinks may use to rescale sums: AVX2 where the product kernels
/// run with it, else none.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Lanes {
    #[cfg(target_arch = "x86_64")]
    v3: Option<V3>,
}

impl Lanes {
    /// The best the CPU has when `simd`, else none (the reference loops).
    pub(super) fn new(simd: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        return Self {
            v3: if simd { V3::try_new() } else { None },
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = simd;
            Self {}
        }
    }
}

/// A rescale of 32-bit sums: `((sum * m + offset) >> shift)` clamped to `low..=high`, where the
/// maker guarantees `|sum * m + offset| < 2^63` for every 32-bit sum, `shift` in `1..63` and
/// `-32767 <= low <= high <= 32767`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rescale {
    pub(super) m: i32,
    pub(super) offset: i64,
    pub(super) shift: u32,
    pub(super) low: i32,
    pub(super) high: i32,
}

/// Writes each sum rescaled.
#[inline(always)]
pub(super) fn rescale_narrow(lanes: Lanes, out: &mut [i32], sums: &[i32], rescale: Rescale) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = lanes.v3 {
        done = rescale_lanes(v3, out, sums, rescale);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lanes;
    let Rescale {
        m,
        offset,
        shift,
        low,
        high,
    } = rescale;
    let (m, low, high) = (i64::from(m), i64::from(low), i64::from(high));
    for (slot, sum) in out[done..].iter_mut().zip(&sums[done..]) {
        *slot = ((i64::from(*sum) * m + offset) >> shift).clamp(low, high) as i32;
    }
}

/// [`rescale_narrow`] eight sums at a time; returns how many it wrote. AVX2 has no 64-bit
/// arithmetic shift or 64-bit min/max, so each value `x` is moved to `x + 2^63` (non-negative
/// as an unsigned number); a logical shift of that is `(x >> shift) + 2^(63 - shift)` exactly,
/// and the clamp compares against the bounds moved the same way, all of them below 2^63 so the
/// signed 64-bit comparison orders them. The low 32 bits of the clamped value less those of
/// `2^(63 - shift)` are the result.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rescale_lanes(v3: V3, out: &mut [i32], sums: &[i32], rescale: Rescale) -> usize {
    let Rescale {
        m,
        offset,
        shift,
        low,
        high,
    } = rescale;
    use pulp::cast;
    use std::arch::x86_64::__m256i;
    let (avx, avx2) = (v3.avx, v3.avx2);
    let moved = 1i64 << (63 - shift);
    let m = avx._mm256_set1_epi64x(i64::from(m));
    let offset = avx._mm256_set1_epi64x(offset.wrapping_add(i64::MIN));
    let count = avx._mm256_set1_epi64x(i64::from(shift));
    let (i32_low, i32_high) = (low, high);
    let (low, high) = (
        avx._mm256_set1_epi64x(i64::from(low) + moved),
        avx._mm256_set1_epi64x(i64::from(high) + moved),
    );
    let moved_low = avx._mm256_set1_epi32(moved as i32);
    let bounds = [offset, count, low, high];
    let (chunks, _) = sums.as_chunks::<8>();
    let (slots, _) = out.as_chunks_mut::<8>();
    if shift >= 33 {
        // The moved value is below 2^64, so its high half shifted by `shift - 32` is below
        // 2^31: the shift and the clamp can both be done on 32-bit lanes.
        let count = v3.sse2._mm_cvtsi32_si128((shift - 32) as i32);
        let (low, high) = (
            avx._mm256_set1_epi32(i32_low + moved as i32),
            avx._mm256_set1_epi32(i32_high + moved as i32),
        );
        for (slot, chunk) in slots.iter_mut().zip(chunks) {
            let sums: __m256i = cast(*chunk);
            let even = avx2._mm256_add_epi64(avx2._mm256_mul_epi32(sums, m), offset);
            let odd = avx2._mm256_add_epi64(avx2._mm256_mul_epi32(avx2._mm256_srli_epi64::<32>(sums), m), offset);
            let high_halves = avx2._mm256_blend_epi32::<0b1010_1010>(avx2._mm256_srli_epi64::<32>(even), odd);
            let moved_values = avx2._mm256_srl_epi32(high_halves, count);
            let clamped = avx2._mm256_min_epi32(avx2._mm256_max_epi32(moved_values, low), high);
            *slot = cast(avx2._mm256_sub_epi32(clamped, moved_low));
        }
        return 8 * chunks.len().min(slots.len());
    }
    for (slot, chunk) in slots.iter_mut().zip(chunks) {
        let sums: __m256i = cast(*chunk);
        let even = rescale_products(v3, avx2._mm256_mul_epi32(sums, m), bounds);
        let odd = rescale_products(v3, avx2._mm256_mul_epi32(avx2._mm256_srli_epi64::<32>(sums), m), bounds);
        let joined = avx2._mm256_blend_epi32::<0b1010_1010>(even, avx2._mm256_slli_epi64::<32>(odd));
        *slot = cast(avx2._mm256_sub_epi32(joined, moved_low));
    }
    8 * chunks.len().min(slots.len())
}

/// One vector of [`rescale_lanes`]: four 64-bit products offset, shifted and clamped, given
/// `[offset, shift count, low, high]` as moved there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rescale_products(
    v3: V3,
    products: std::arch::x86_64::__m256i,
    bounds: [std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    let avx2 = v3.avx2;
    let [offset, count, low, high] = bounds;
    let x = avx2._mm256_srlv_epi64(avx2._mm256_add_epi64(products, offset), count);
    let x = avx2._mm256_blendv_epi8(x, low, avx2._mm256_cmpgt_epi64(low, x));
    avx2._mm256_blendv_epi8(x, high, avx2._mm256_cmpgt_epi64(x, high))
}

/// Sums of one row of weights against shifted runs of a source:
/// `out[j] = sum over kk of weights[kk] * source[offsets[kk] + j]`, the products of a stride-1
/// convolution group with a single output channel (a depthwise layer's), computed straight from
/// the runs instead of through packed panels whose tiles would be three quarters empty. Weights
/// are int8 and the source 16-bit operands; at most [`MAX_NARROW_TERMS`] weights, so every sum
/// fits 32 bits. The sums (as many as `sums` holds) go to `sink` as row 0 from column 0.
pub(super) fn shifted_row_sums(
    weights: &[i32],
    offsets: &[usize],
    source: &[i32],
    sums: &mut [i32],
    sink: &mut impl Sink,
) {
    debug_assert!(weights.len() <= MAX_NARROW_TERMS);
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(ShiftedRowSums {
            weights,
            offsets,
            source,
            sums,
            sink,
        });
    }
    shifted_row_sums_loop(weights, offsets, source, sums);
    sink.take_narrow(0, 0, sums);
}

/// [`shifted_row_sums`] compiled with AVX2 enabled (eight 32-bit products per instruction, and
/// the sink's rescale inlined with the same features).
#[cfg(target_arch = "x86_64")]
struct ShiftedRowSums<'a, S> {
    weights: &'a [i32],
    offsets: &'a [usize],
    source: &'a [i32],
    sums: &'a mut [i32],
    sink: &'a mut S,
}

#[cfg(target_arch = "x86_64")]
impl<S: Sink> pulp::NullaryFnOnce for ShiftedRowSums<'_, S> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        shifted_row_sums_loop(self.weights, self.offsets, self.source, self.sums);
        self.sink.take_narrow(0, 0, self.sums);
    }
}

#[inline(always)]
fn shifted_row_sums_loop(weights: &[i32], offsets: &[usize], source: &[i32], out: &mut [i32]) {
    out.fill(0);
    for (weight, offset) in weights.iter().zip(offsets) {
        let run = &source[*offset..][..out.len()];
        for (sum, value) in out.iter_mut().zip(run) {
            *sum += weight * value;
        }
    }
}

/// Where the kernels hand their sums: runs of consecutive columns of one row.
pub(super) trait Sink {
    /// Takes `sums` of `row`, columns `first_col..first_col + sums.len()`.
    fn take(&mut self, row: usize, first_col: usize, sums: &[i64]);

    /// Takes sums known to be below 2^31 in magnitude (products of at most
    /// [`PAIRS_PER_BLOCK`] pairs), which a sink can rescale in 32-bit lanes.
    fn take_narrow(&mut self, row: usize, first_col: usize, sums: &[i32]) {
        let mut wide = [0i64; PANEL];
        for (w, s) in wide.iter_mut().zip(sums) {
            *w = i64::from(*s);
        }
        self.take(row, first_col, &wide[..sums.len()]);
    }
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
    tiled_sums(a, rows, b, sink, PortableBlock);
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

/// Sums of one block of a tile: `R` rows (at most [`TILE_ROWS`]) against one panel, over at
/// most [`PAIRS_PER_BLOCK`] pairs, so each fits 32 bits.
type Block<const R: usize> = [[i32; PANEL]; R];

/// Computes one [`Block`]. (A trait with an always-inlined method, not a closure: the AVX2 code
/// must be inlined into the function compiled with AVX2 enabled, and the compiler inlines a
/// closure called from two places only when it sees fit.)
trait BlockKernel {
    fn block<const R: usize>(&self, x: [&[i32]; R], weights: &[[i16; 2 * PANEL]]) -> Block<R>;
}

/// Walks the tiles, computing each block with `kernel` (rows past the end read zeros and are not
/// emitted). Sums of one block go to the sink as they are; longer sums add their blocks in 64 bits.
#[inline(always)]
fn tiled_sums(a: &PairedRows, rows: Range<usize>, b: &Panels, sink: &mut impl Sink, kernel: impl BlockKernel) {
    let zeros = vec![0i32; a.pairs];
    let mut first = rows.start;
    while first < rows.end {
        let present = TILE_ROWS.min(rows.end - first);
        let x: [&[i32]; TILE_ROWS] = std::array::from_fn(|r| if r < present { a.row(first + r) } else { &zeros[..] });
        for panel in 0..b.cols.div_ceil(PANEL) {
            let weights = b.panel(panel);
            let width = PANEL.min(b.cols - panel * PANEL);
            if a.pairs <= PAIRS_PER_BLOCK && present == 1 {
                // A tile of one row (a depthwise convolution's group) computes only that row.
                let sums = kernel.block([x[0]], weights);
                sink.take_narrow(first, panel * PANEL, &sums[0][..width]);
                continue;
            }
            if a.pairs <= PAIRS_PER_BLOCK {
                let sums = kernel.block(x, weights);
                for (r, sums) in sums.iter().enumerate().take(present) {
                    sink.take_narrow(first + r, panel * PANEL, &sums[..width]);
                }
                continue;
            }
            let mut total = [[0i64; PANEL]; TILE_ROWS];
            for (index, weights) in weights.chunks(PAIRS_PER_BLOCK).enumerate() {
                let start = index * PAIRS_PER_BLOCK;
                let sums: Block<TILE_ROWS> =
                    kernel.block(std::array::from_fn(|r| &x[r][start..start + weights.len()]), weights);
                for (total, sums) in total.iter_mut().zip(&sums) {
                    for (t, s) in total.iter_mut().zip(sums) {
                        *t += i64::from(*s);
                    }
                }
            }
            for (r, sums) in total.iter().enumerate().take(present) {
                sink.take(first + r, panel * PANEL, &sums[..width]);
            }
        }
        first += present;
    }
}

/// Blocks in plain Rust (the compiler vectorizes the column loop).
struct PortableBlock;

impl BlockKernel for PortableBlock {
    #[inline(always)]
    fn block<const R: usize>(&self, x: [&[i32]; R], weights: &[[i16; 2 * PANEL]]) -> Block<R> {
        portable_block(x, weights)
    }
}

#[inline(always)]
fn portable_block<const R: usize>(x: [&[i32]; R], weights: &[[i16; 2 * PANEL]]) -> Block<R> {
    let mut acc = [[0i32; PANEL]; R];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (pair, w) in x[r].iter().zip(weights) {
            let (first, second) = unpack_pair(*pair);
            for c in 0..PANEL {
                acc[c] += first * i32::from(w[2 * c]) + second * i32::from(w[2 * c + 1]);
            }
        }
    }
    acc
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
        tiled_sums(self.a, self.rows, self.b, self.sink, AvxBlock(v3));
    }
}

/// Blocks with AVX2 (only made where the CPU has it).
#[cfg(target_arch = "x86_64")]
struct AvxBlock(V3);

#[cfg(target_arch = "x86_64")]
impl BlockKernel for AvxBlock {
    #[inline(always)]
    fn block<const R: usize>(&self, x: [&[i32]; R], weights: &[[i16; 2 * PANEL]]) -> Block<R> {
        avx_block(self.0, x, weights)
    }
}

/// A block with 256-bit pairwise multiply-adds: each step broadcasts one pair of each row and
/// multiplies it into the panel's 16 columns (two vectors of eight 32-bit sums).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx_block<const R: usize>(v3: V3, x: [&[i32]; R], weights: &[[i16; 2 * PANEL]]) -> Block<R> {
    use pulp::cast;
    use std::arch::x86_64::__m256i;
    let zero: __m256i = cast([0i32; 8]);
    let mut acc = [[zero; 2]; R];
    for (q, w) in weights.iter().enumerate() {
        let [low, high]: [[i16; PANEL]; 2] = cast(*w);
        let (low, high): (__m256i, __m256i) = (cast(low), cast(high));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = v3.avx._mm256_set1_epi32(x[r][q]);
            acc[0] = v3.avx2._mm256_add_epi32(acc[0], v3.avx2._mm256_madd_epi16(pair, low));
            acc[1] = v3.avx2._mm256_add_epi32(acc[1], v3.avx2._mm256_madd_epi16(pair, high));
        }
    }
    acc.map(cast)
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
            "portable" => tiled_sums(a, 0..rows, b, &mut sink, PortableBlock),
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
            let mut next = super::super::test_values(seed);
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
