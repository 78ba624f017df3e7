//! The float kernels of Vouch's own float executor: matrix products, convolutions, pooling and
//! softmax over `f32`, with AVX2 and FMA chosen at run time where the CPU has them.
//!
//! Unlike the exact kernels, these may round differently from one instruction set to another:
//! the float path promises closeness to the model's float semantics, not equal bits.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use pulp::x86::{V3, V4};

use crate::ir::{BinaryOp, Window};

/// Columns of a packed matrix handled together: two vectors of eight.
pub(super) const PANEL: usize = 16;

/// Rows of the left operand handled together by the AVX2 and portable product kernels (two
/// vectors of eight per row: 8 accumulators).
const ROWS: usize = 4;

/// Rows and panels handled together by the AVX-512 product kernel (one vector of sixteen per
/// row and panel): 24 accumulators, 3 panel vectors and a broadcast row value out of the 32
/// registers. Each value of a panel read serves 8 rows, each row value 3 panels, where one
/// panel against 8 rows read a panel value and 8 row values for 8 multiply-adds: MiniLM at one
/// sentence on one thread went from 161 to 205–209 sentences per second (docs/BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
const ROWS_AVX512: usize = 8;
#[cfg(target_arch = "x86_64")]
const PANELS_AVX512: usize = 3;

/// Bytes of the left operand a product goes through for each panel of the right one: a
/// quarter of a typical 1 MiB L2 cache, leaving room for the panels and the output.
const A_CHUNK_BYTES: usize = 256 * 1024;

/// An element-wise operation with a constant per output channel (or one for all channels),
/// applied as a product's results are written: a bias, a batch-norm scale, a ReLU, a clip.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ChannelOp {
    /// `result = op(result, value)`.
    pub op: BinaryOp,
    /// One value per channel, or a single value for all of them.
    pub values: Vec<f32>,
}

impl ChannelOp {
    fn value(&self, channel: usize) -> f32 {
        if self.values.len() == 1 {
            self.values[0]
        } else {
            self.values[channel]
        }
    }
}

/// `a op b`, with NaN passed on by `Max` and `Min` as NumPy does.
#[inline(always)]
pub(super) fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => {
            if a.is_nan() || a > b {
                a
            } else {
                b
            }
        }
        BinaryOp::Min => {
            if a.is_nan() || a < b {
                a
            } else {
                b
            }
        }
    }
}

/// `out[i] = op(out[i], values[i])` (or `op(out[i], values[0])` for every `i` when `values` has
/// one element): one loop per operation, so each vectorizes.
#[inline(always)]
fn apply_run(op: BinaryOp, out: &mut [f32], values: &[f32]) {
    macro_rules! each {
        ($f:expr) => {
            if let [value] = values {
                let value = *value;
                out.iter_mut().for_each(|x| *x = $f(*x, value));
            } else {
                out.iter_mut().zip(values).for_each(|(x, v)| *x = $f(*x, *v));
            }
        };
    }
    match op {
        BinaryOp::Add => each!(|a: f32, b: f32| a + b),
        BinaryOp::Sub => each!(|a: f32, b: f32| a - b),
        BinaryOp::Mul => each!(|a: f32, b: f32| a * b),
        BinaryOp::Div => each!(|a: f32, b: f32| a / b),
        BinaryOp::Max => each!(|a: f32, b: f32| binary(BinaryOp::Max, a, b)),
        BinaryOp::Min => each!(|a: f32, b: f32| binary(BinaryOp::Min, a, b)),
    }
}

/// The right operand of a matrix product, `k x n`, in panels of [`PANEL`] columns: for each
/// panel, the panel's columns of row 0, then of row 1, and so on (zero past `n`).
#[derive(Debug, Clone)]
pub(super) struct PackedMatrix {
    k: usize,
    n: usize,
    panels: Vec<[f32; PANEL]>,
}

impl PackedMatrix {
    /// Packs a row-major matrix: `k x n`, or `n x k` when `transposed`.
    pub(super) fn pack(values: &[f32], k: usize, n: usize, transposed: bool) -> Self {
        let panel_count = n.div_ceil(PANEL);
        let mut panels = vec![[0.0f32; PANEL]; panel_count * k];
        for (p, panel) in panels.chunks_mut(k.max(1)).enumerate().take(panel_count) {
            for (kk, slot) in panel.iter_mut().enumerate() {
                for (c, x) in slot.iter_mut().enumerate() {
                    let col = p * PANEL + c;
                    if col < n {
                        *x = if transposed {
                            values[col * k + kk]
                        } else {
                            values[kk * n + col]
                        };
                    }
                }
            }
        }
        Self { k, n, panels }
    }
}

/// The part of a product's output one call computes: some of its rows, and some of its
/// columns, from a multiple of [`PANEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tile {
    pub(super) rows: Range<usize>,
    pub(super) columns: Range<usize>,
}

/// `out = a x b` for the tile `tile` of the output, `a` being row-major `m x k` (into `out`,
/// which holds the tile's rows, each as wide as its columns), then `epilogue` per column.
pub(super) fn matmul(a: &[f32], tile: Tile, b: &PackedMatrix, out: &mut [f32], epilogue: &[ChannelOp]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v4) = V4::try_new() {
        return v4.vectorize(VectorMatmul::<_, ROWS_AVX512, PANELS_AVX512> {
            kernel: Avx512Block(v4),
            a,
            tile,
            b,
            out,
            epilogue,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(VectorMatmul::<_, ROWS, 1> {
            kernel: AvxBlock(v3),
            a,
            tile,
            b,
            out,
            epilogue,
        });
    }
    matmul_loop::<ROWS, 1>(a, tile, b, out, epilogue, PortableBlock);
}

/// A kernel for a block of `R` rows against `Q` panels: each panel's [`PANEL`] sums per row,
/// each sum one multiply-add after another along `k`, so that every shape of block gives the
/// same bits for the same row and column.
trait BlockKernel: Copy {
    fn block<const R: usize, const Q: usize>(
        self,
        rows: [&[f32]; R],
        panels: [&[[f32; PANEL]]; Q],
    ) -> [[[f32; PANEL]; Q]; R];
}

/// Panels a row left over from the blocks of rows goes through at once.
const WIDE_PANELS: usize = 4;

/// The product in blocks of `R` rows against `Q` panels at once (then row by row for the rest
/// of the rows).
#[inline(always)]
fn matmul_loop<const R: usize, const Q: usize>(
    a: &[f32],
    tile: Tile,
    b: &PackedMatrix,
    out: &mut [f32],
    epilogue: &[ChannelOp],
    kernel: impl BlockKernel,
) {
    let k = b.k;
    let Tile { rows, columns } = tile;
    let columns = columns.start..columns.end.min(b.n);
    let width = columns.len();
    let row_of = |r: usize| &a[r * k..][..k];
    let mut write = |r: usize, p: usize, sums: &[f32; PANEL]| {
        let first_col = p * PANEL;
        let cols = PANEL.min(columns.end - first_col);
        let dest = &mut out[(r - rows.start) * width + first_col - columns.start..][..cols];
        dest.copy_from_slice(&sums[..cols]);
    };
    // Rows in chunks whose part of `a` stays in the L2 cache, and each panel (which stays in
    // the L1 cache) used by every row of a chunk before the next panel: `b` is read from
    // memory once per chunk, not once per block of `R` rows.
    let chunk_rows = (A_CHUNK_BYTES / (k.max(1) * size_of::<f32>()) / R).max(1) * R;
    let panels = columns.start / PANEL..columns.end.div_ceil(PANEL);
    let panel_at = |p: usize| &b.panels[p * k..][..k];
    let mut chunk_start = rows.start;
    while chunk_start < rows.end {
        let chunk_end = rows.end.min(chunk_start + chunk_rows);
        let blocks_end = chunk_end - (chunk_end - chunk_start) % R;
        let mut p = panels.start;
        while p < panels.end {
            // `Q` panels at a time, then the rest in a pair and alone.
            let step = match panels.end - p {
                left if left >= Q => Q,
                left => left.min(2),
            };
            for r in (chunk_start..blocks_end).step_by(R) {
                let rows = std::array::from_fn(|i| row_of(r + i));
                let write = |i: usize, q: usize, sums: &[f32; PANEL]| write(r + i, p + q, sums);
                match step {
                    1 => one_block::<R, 1>(kernel, rows, [panel_at(p)], write),
                    2 if Q != 2 => one_block::<R, 2>(kernel, rows, [panel_at(p), panel_at(p + 1)], write),
                    _ => one_block::<R, Q>(kernel, rows, std::array::from_fn(|q| panel_at(p + q)), write),
                }
            }
            p += step;
        }
        // The rows left over, each against several panels at once.
        for r in blocks_end..chunk_end {
            let mut p = panels.start;
            while p < panels.end {
                let write = |_: usize, q: usize, sums: &[f32; PANEL]| write(r, p + q, sums);
                if panels.end - p >= WIDE_PANELS {
                    one_block::<1, WIDE_PANELS>(kernel, [row_of(r)], std::array::from_fn(|q| panel_at(p + q)), write);
                    p += WIDE_PANELS;
                } else {
                    one_block::<1, 1>(kernel, [row_of(r)], [panel_at(p)], write);
                    p += 1;
                }
            }
        }
        chunk_start = chunk_end;
    }
    if !epilogue.is_empty() {
        for row in out[..rows.len() * width].chunks_exact_mut(width.max(1)) {
            for e in epilogue {
                let values = match &e.values[..] {
                    [_] => &e.values[..],
                    all => &all[columns.clone()],
                };
                apply_run(e.op, row, values);
            }
        }
    }
}

/// One block of `R` rows against `Q` panels through `kernel`, each panel's sums for each row
/// handed to `write(row in the block, panel in the block, sums)`.
#[inline(always)]
fn one_block<const R: usize, const Q: usize>(
    kernel: impl BlockKernel,
    rows: [&[f32]; R],
    panels: [&[[f32; PANEL]]; Q],
    mut write: impl FnMut(usize, usize, &[f32; PANEL]),
) {
    let sums = kernel.block::<R, Q>(rows, panels);
    for (i, row_sums) in sums.iter().enumerate() {
        for (q, panel_sums) in row_sums.iter().enumerate() {
            write(i, q, panel_sums);
        }
    }
}

/// Blocks in plain Rust (the compiler vectorizes the column loop).
#[derive(Clone, Copy)]
struct PortableBlock;

impl BlockKernel for PortableBlock {
    #[inline(always)]
    fn block<const R: usize, const Q: usize>(
        self,
        rows: [&[f32]; R],
        panels: [&[[f32; PANEL]]; Q],
    ) -> [[[f32; PANEL]; Q]; R] {
        let mut acc = [[[0.0f32; PANEL]; Q]; R];
        let k = panels.iter().map(|panel| panel.len()).min().unwrap_or(0);
        for kk in 0..k {
            for (acc, row) in acc.iter_mut().zip(&rows) {
                let x = row[kk];
                for (acc, panel) in acc.iter_mut().zip(&panels) {
                    for (s, w) in acc.iter_mut().zip(&panel[kk]) {
                        *s += x * w;
                    }
                }
            }
        }
        acc
    }
}

/// The product through `kernel` in blocks of `R` rows, inside a `pulp` instruction-set context
/// (`vectorize`), so that the loop around the kernel is compiled for the same instructions.
#[cfg(target_arch = "x86_64")]
struct VectorMatmul<'a, K, const R: usize, const Q: usize> {
    kernel: K,
    a: &'a [f32],
    tile: Tile,
    b: &'a PackedMatrix,
    out: &'a mut [f32],
    epilogue: &'a [ChannelOp],
}

#[cfg(target_arch = "x86_64")]
impl<K: BlockKernel, const R: usize, const Q: usize> pulp::NullaryFnOnce for VectorMatmul<'_, K, R, Q> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        matmul_loop::<R, Q>(self.a, self.tile, self.b, self.out, self.epilogue, self.kernel);
    }
}

/// Blocks with fused multiply-adds on two 256-bit vectors per row.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct AvxBlock(V3);

#[cfg(target_arch = "x86_64")]
impl BlockKernel for AvxBlock {
    #[inline(always)]
    fn block<const R: usize, const Q: usize>(
        self,
        rows: [&[f32]; R],
        panels: [&[[f32; PANEL]]; Q],
    ) -> [[[f32; PANEL]; Q]; R] {
        use pulp::{cast, f32x8};
        let v3 = self.0;
        // Rows and panels cut to one length, so that reading them needs no bounds check.
        let k = panels.iter().map(|panel| panel.len()).min().unwrap_or(0);
        let rows = rows.map(|row| &row[..k]);
        let panels = panels.map(|panel| &panel[..k]);
        let zero = v3.splat_f32x8(0.0);
        let mut acc = [[[zero; 2]; Q]; R];
        for kk in 0..k {
            let w: [[f32x8; 2]; Q] = std::array::from_fn(|q| cast(panels[q][kk]));
            for (acc, row) in acc.iter_mut().zip(&rows) {
                let x = v3.splat_f32x8(row[kk]);
                for (acc, [low, high]) in acc.iter_mut().zip(w) {
                    acc[0] = v3.mul_add_f32x8(x, low, acc[0]);
                    acc[1] = v3.mul_add_f32x8(x, high, acc[1]);
                }
            }
        }
        acc.map(|acc| acc.map(cast))
    }
}

/// Blocks with fused multiply-adds on one 512-bit vector (a whole panel row) per row.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512Block(V4);

#[cfg(target_arch = "x86_64")]
impl BlockKernel for Avx512Block {
    #[inline(always)]
    fn block<const R: usize, const Q: usize>(
        self,
        rows: [&[f32]; R],
        panels: [&[[f32; PANEL]]; Q],
    ) -> [[[f32; PANEL]; Q]; R] {
        use pulp::{cast, f32x16};
        let v4 = self.0;
        // Rows and panels cut to one length, so that reading them needs no bounds check.
        let k = panels.iter().map(|panel| panel.len()).min().unwrap_or(0);
        let rows = rows.map(|row| &row[..k]);
        let panels = panels.map(|panel| &panel[..k]);
        let mut acc = [[v4.splat_f32x16(0.0); Q]; R];
        for kk in 0..k {
            let w: [f32x16; Q] = std::array::from_fn(|q| cast(panels[q][kk]));
            for (acc, row) in acc.iter_mut().zip(&rows) {
                let x = v4.splat_f32x16(row[kk]);
                for (acc, w) in acc.iter_mut().zip(w) {
                    *acc = v4.mul_add_f32x16(x, w, *acc);
                }
            }
        }
        acc.map(|acc| acc.map(cast))
    }
}

/// How a stride-1 convolution of one image reads its padded input: the padded planes laid end
/// to end, so that the output positions `j` of one output row-major plane whose rows are
/// `padded_width` long (the last columns of each row are discarded) read the tap `t` at
/// `source[offsets[t] + j]`.
#[derive(Debug, Clone)]
pub(super) struct ConvLayout {
    /// Input channels per group.
    pub channels: usize,
    /// Output channels per group.
    pub outputs: usize,
    /// Spatial size of the input, as `[height, width]` (a 1-D input has height 1).
    pub input: [usize; 2],
    /// The window, as 2-D.
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub pads_before: [usize; 2],
    pub pads_after: [usize; 2],
    /// Per tap of the window, where it reads in the padded input (see the type's doc).
    offsets: Vec<usize>,
    /// Whether the windows tile the input ([`Window::tiles`]), read by pooling.
    tiles: bool,
}

impl ConvLayout {
    /// The 2-D layout of a window over 1-D or 2-D data, or `None` for more spatial axes.
    pub(super) fn new(window: &Window, channels: usize, outputs: usize, input: &[usize]) -> Option<Self> {
        let two = |v: &[usize], fill: usize| -> Option<[usize; 2]> {
            match v {
                [w] => Some([fill, *w]),
                [h, w] => Some([*h, *w]),
                _ => None,
            }
        };
        let mut layout = Self {
            channels,
            outputs,
            input: two(input, 1)?,
            kernel: two(&window.kernel, 1)?,
            strides: two(&window.strides, 1)?,
            dilations: two(&window.dilations, 1)?,
            pads_before: two(&window.pads_before, 0)?,
            pads_after: two(&window.pads_after, 0)?,
            offsets: Vec::new(),
            tiles: window.tiles(input),
        };
        let padded_width = layout.padded()[1];
        layout.offsets = (0..layout.kernel[0] * layout.kernel[1])
            .map(|t| {
                let (ky, kx) = (t / layout.kernel[1], t % layout.kernel[1]);
                ky * layout.dilations[0] * padded_width + kx * layout.dilations[1]
            })
            .collect();
        Some(layout)
    }

    fn padded(&self) -> [usize; 2] {
        [0, 1].map(|a| self.input[a] + self.pads_before[a] + self.pads_after[a])
    }

    /// The extent of the window along an axis.
    fn reach(&self, axis: usize) -> usize {
        (self.kernel[axis] - 1) * self.dilations[axis] + 1
    }

    /// The output's spatial size, or `None` when the window does not fit the padded input.
    pub(super) fn output(&self) -> Option<[usize; 2]> {
        let padded = self.padded();
        let mut out = [0; 2];
        for axis in 0..2 {
            if self.kernel[axis] == 0 || self.strides[axis] == 0 || self.dilations[axis] == 0 {
                return None;
            }
            out[axis] = padded[axis].checked_sub(self.reach(axis))? / self.strides[axis] + 1;
        }
        Some(out)
    }
}

/// Scratch space of a convolution, reused across images and groups.
#[derive(Debug, Default)]
pub(super) struct ConvScratch {
    padded: Vec<f32>,
    /// What `padded` is laid out for: length, input size, padding before, padded width.
    padded_for: Option<(usize, [usize; 2], [usize; 2], usize)>,
    sums: Vec<f32>,
}

/// Output positions computed together by the convolution kernel: two vectors of eight.
const CONV_RUN: usize = 16;

/// One image of a convolution in `groups` groups: `input` holds the image's
/// `groups * channels` planes, `weights` the `groups * outputs x channels x kernel` weights, and
/// `out` receives the `groups * outputs` planes, each channel then passed through `epilogue`.
pub(super) fn conv_image(
    layout: &ConvLayout,
    groups: usize,
    input: &[f32],
    weights: &[f32],
    epilogue: &[ChannelOp],
    scratch: &mut ConvScratch,
    out: &mut [f32],
) {
    let [padded_height, padded_width] = layout.padded();
    let plane = padded_height * padded_width;
    // Stride-1 output rows; a larger stride keeps every `stride`-th row and column of them.
    let dense_rows = padded_height + 1 - layout.reach(0);
    let run = (dense_rows * padded_width).div_ceil(CONV_RUN) * CONV_RUN;
    let taps = layout.kernel[0] * layout.kernel[1];
    let offsets = &layout.offsets;
    let longest = offsets.iter().max().copied().unwrap_or(0);
    let channels = groups * layout.channels;
    let outputs = groups * layout.outputs;
    let per_output = layout.channels * taps;
    let group_sums = |g: usize, source: &[f32], sums: &mut [f32]| {
        let taps_of = ConvTaps {
            source,
            plane,
            offsets,
            channels: layout.channels,
        };
        let group_weights = &weights[g * layout.outputs * per_output..][..layout.outputs * per_output];
        let group_epilogue = GroupEpilogue {
            ops: epilogue,
            first_channel: g * layout.outputs,
        };
        conv_sums(&taps_of, group_weights, per_output, run, sums, &group_epilogue);
    };
    if taps == 1 && layout.strides == [1, 1] && plane == layout.input[0] * layout.input[1] && plane == run {
        // A pointwise convolution over planes of whole runs: the kernel reads the input and
        // writes the output where they are, with nothing to pad or to cut off.
        for g in 0..groups {
            group_sums(
                g,
                &input[g * layout.channels * plane..],
                &mut out[g * layout.outputs * plane..][..layout.outputs * plane],
            );
        }
        return;
    }
    let padded_len = (channels - 1) * plane + longest + run;
    // The padding stays zero from one image to the next: only the planes' insides are written.
    let shape = (padded_len, layout.input, layout.pads_before, padded_width);
    if scratch.padded_for != Some(shape) {
        scratch.padded.clear();
        scratch.padded.resize(padded_len, 0.0);
        scratch.padded_for = Some(shape);
    }
    let [height, width] = layout.input;
    if padded_width == width {
        // No padding left or right: each plane is one run.
        for c in 0..channels {
            let to = c * plane + layout.pads_before[0] * width;
            scratch.padded[to..to + height * width].copy_from_slice(&input[c * height * width..][..height * width]);
        }
    } else {
        for c in 0..channels {
            for y in 0..height {
                let from = &input[(c * height + y) * width..][..width];
                let to = c * plane + (y + layout.pads_before[0]) * padded_width + layout.pads_before[1];
                copy_row(&mut scratch.padded[to..to + width], from);
            }
        }
    }
    scratch.sums.resize(outputs * run, 0.0);
    for g in 0..groups {
        group_sums(
            g,
            &scratch.padded[g * layout.channels * plane..],
            &mut scratch.sums[g * layout.outputs * run..][..layout.outputs * run],
        );
    }
    let [out_height, out_width] = layout.output().unwrap_or([0, 0]);
    for o in 0..outputs {
        let sums = &scratch.sums[o * run..][..run];
        let dest = &mut out[o * out_height * out_width..][..out_height * out_width];
        for (y, dest_row) in dest.chunks_exact_mut(out_width.max(1)).enumerate() {
            let source_row = &sums[y * layout.strides[0] * padded_width..];
            if layout.strides[1] == 1 {
                copy_row(dest_row, &source_row[..out_width]);
            } else {
                for (x, d) in dest_row.iter_mut().enumerate() {
                    *d = source_row[x * layout.strides[1]];
                }
            }
        }
    }
}

/// `dest = source` for the short rows of small images, four values at a time through a
/// fixed-size array: `copy_from_slice` calls `memcpy`, whose call costs more than copying a row
/// of four or eight values.
#[inline(always)]
fn copy_row(dest: &mut [f32], source: &[f32]) {
    let mut dest_chunks = dest.chunks_exact_mut(4);
    let mut source_chunks = source.chunks_exact(4);
    for (d, s) in (&mut dest_chunks).zip(&mut source_chunks) {
        if let (Ok(d), Ok(s)) = (<&mut [f32; 4]>::try_from(d), <&[f32; 4]>::try_from(s)) {
            *d = *s;
        }
    }
    for (d, s) in dest_chunks.into_remainder().iter_mut().zip(source_chunks.remainder()) {
        *d = *s;
    }
}

/// Where a convolution's taps read: channel `c`'s tap `t` at `source[c * plane + offsets[t]..]`.
struct ConvTaps<'a> {
    source: &'a [f32],
    plane: usize,
    offsets: &'a [usize],
    channels: usize,
}

/// `sums[o * run + j] = sum over channels and taps of weight * source`, for every output
/// channel `o` (weights `per_output` each) and position `j < run` (a multiple of [`CONV_RUN`]).
fn conv_sums(
    taps: &ConvTaps<'_>,
    weights: &[f32],
    per_output: usize,
    run: usize,
    sums: &mut [f32],
    epilogue: &GroupEpilogue<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxConv {
            v3,
            taps,
            weights,
            per_output,
            run,
            sums,
            epilogue,
        });
    }
    conv_loop(taps, weights, per_output, run, sums, epilogue, PortableConv);
}

/// The epilogue of one group's output channels, the first of which is `first_channel` of the
/// convolution's.
struct GroupEpilogue<'a> {
    ops: &'a [ChannelOp],
    first_channel: usize,
}

impl GroupEpilogue<'_> {
    /// The epilogue applied to the sums of the group's output channel `o`, while they are still
    /// in registers: cheaper than a pass over the output planes afterwards, even though it also
    /// touches the positions of the padding columns that the copy out then drops.
    #[inline(always)]
    fn apply(&self, o: usize, sums: &mut [f32; CONV_RUN]) {
        for e in self.ops {
            let value = e.value(self.first_channel + o);
            for x in sums.iter_mut() {
                *x = binary(e.op, *x, value);
            }
        }
    }
}

/// A kernel for `O` output channels over [`CONV_RUN`] positions.
trait ConvKernel: Copy {
    fn block<const O: usize>(self, taps: &ConvTaps<'_>, weights: [&[f32]; O], first: usize) -> [[f32; CONV_RUN]; O];
}

#[inline(always)]
fn conv_loop(
    taps: &ConvTaps<'_>,
    weights: &[f32],
    per_output: usize,
    run: usize,
    sums: &mut [f32],
    epilogue: &GroupEpilogue<'_>,
    kernel: impl ConvKernel,
) {
    let outputs = sums.len() / run.max(1);
    let weights_of = |o: usize| &weights[o * per_output..][..per_output];
    let mut o = 0;
    while o < outputs {
        let four = outputs - o >= 4;
        for first in (0..run).step_by(CONV_RUN) {
            if four {
                let block = kernel.block(
                    taps,
                    [weights_of(o), weights_of(o + 1), weights_of(o + 2), weights_of(o + 3)],
                    first,
                );
                for (i, mut b) in block.into_iter().enumerate() {
                    epilogue.apply(o + i, &mut b);
                    sums[(o + i) * run + first..][..CONV_RUN].copy_from_slice(&b);
                }
            } else {
                let [mut block] = kernel.block(taps, [weights_of(o)], first);
                epilogue.apply(o, &mut block);
                sums[o * run + first..][..CONV_RUN].copy_from_slice(&block);
            }
        }
        o += if four { 4 } else { 1 };
    }
}

#[derive(Clone, Copy)]
struct PortableConv;

impl ConvKernel for PortableConv {
    #[inline(always)]
    fn block<const O: usize>(self, taps: &ConvTaps<'_>, weights: [&[f32]; O], first: usize) -> [[f32; CONV_RUN]; O] {
        let mut acc = [[0.0f32; CONV_RUN]; O];
        let count = taps.offsets.len();
        for c in 0..taps.channels {
            for (t, offset) in taps.offsets.iter().enumerate() {
                let source: &[f32; CONV_RUN] = taps.source[c * taps.plane + offset + first..][..CONV_RUN]
                    .try_into()
                    .unwrap_or(&[0.0; CONV_RUN]);
                for (acc, w) in acc.iter_mut().zip(&weights) {
                    let w = w[c * count + t];
                    for (s, x) in acc.iter_mut().zip(source) {
                        *s += w * x;
                    }
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
struct AvxConv<'a, 'b> {
    v3: V3,
    taps: &'a ConvTaps<'b>,
    weights: &'a [f32],
    per_output: usize,
    run: usize,
    sums: &'a mut [f32],
    epilogue: &'a GroupEpilogue<'b>,
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AvxConv<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        conv_loop(
            self.taps,
            self.weights,
            self.per_output,
            self.run,
            self.sums,
            self.epilogue,
            AvxConvBlock(self.v3),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct AvxConvBlock(V3);

#[cfg(target_arch = "x86_64")]
impl ConvKernel for AvxConvBlock {
    #[inline(always)]
    fn block<const O: usize>(self, taps: &ConvTaps<'_>, weights: [&[f32]; O], first: usize) -> [[f32; CONV_RUN]; O] {
        use pulp::{cast, f32x8};
        let v3 = self.0;
        let zero = v3.splat_f32x8(0.0);
        let mut acc = [[zero; 2]; O];
        let count = taps.offsets.len();
        for c in 0..taps.channels {
            let base = c * taps.plane + first;
            for (t, offset) in taps.offsets.iter().enumerate() {
                let source = &taps.source[base + offset..][..CONV_RUN];
                let low: f32x8 = cast(<[f32; 8]>::try_from(&source[..8]).unwrap_or([0.0; 8]));
                let high: f32x8 = cast(<[f32; 8]>::try_from(&source[8..]).unwrap_or([0.0; 8]));
                for (acc, w) in acc.iter_mut().zip(&weights) {
                    let w = v3.splat_f32x8(w[c * count + t]);
                    acc[0] = v3.mul_add_f32x8(w, low, acc[0]);
                    acc[1] = v3.mul_add_f32x8(w, high, acc[1]);
                }
            }
        }
        acc.map(cast)
    }
}

/// Max or average pooling of the planes laid end to end in `input` into `out`, compiled with
/// AVX2 where the CPU has it: `average` is `None` for the maximum, else whether padding counts
/// in the divisor.
pub(super) fn pool_planes(
    layout: &ConvLayout,
    input: &[f32],
    average: Option<bool>,
    line: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxPool {
            layout,
            input,
            average,
            line,
            out,
        });
    }
    pool_planes_loop(layout, input, average, line, out);
}

#[cfg(target_arch = "x86_64")]
struct AvxPool<'a> {
    layout: &'a ConvLayout,
    input: &'a [f32],
    average: Option<bool>,
    line: &'a mut Vec<f32>,
    out: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AvxPool<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        pool_planes_loop(self.layout, self.input, self.average, self.line, self.out);
    }
}

#[inline(always)]
fn pool_planes_loop(layout: &ConvLayout, input: &[f32], average: Option<bool>, line: &mut Vec<f32>, out: &mut [f32]) {
    let [height, width] = layout.input;
    let [out_height, out_width] = layout.output().unwrap_or([0, 0]);
    let (plane_in, plane_out) = (height * width, out_height * out_width);
    if plane_in == 0 || plane_out == 0 {
        return;
    }
    if layout.tiles {
        return pool_tiled(layout, input, average, line, out);
    }
    for (source, dest) in input.chunks_exact(plane_in).zip(out.chunks_exact_mut(plane_out)) {
        pool_plane(layout, source, average, line, dest);
    }
}

/// The maximum of two values, a NaN in either passed on (as ONNX's `MaxPool` does).
#[inline(always)]
fn max_or_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() { a } else { b }
}

/// Pooling whose windows tile the planes (no padding or dilation, strides equal to the kernel,
/// each side a whole number of windows), over all planes at once: each output row's input rows
/// are reduced into `line`, then each window's columns, in long loops over every plane that the
/// compiler vectorizes, where one plane of a small image would give loops of a few values.
#[inline(always)]
fn pool_tiled(layout: &ConvLayout, input: &[f32], average: Option<bool>, line: &mut Vec<f32>, out: &mut [f32]) {
    let [window_height, window_width] = layout.kernel;
    let width = layout.input[1];
    let out_rows = input.len() / (window_height * width);
    line.resize(out_rows * width, 0.0);
    for (r, dest) in line.chunks_exact_mut(width).enumerate() {
        let rows = &input[r * window_height * width..][..window_height * width];
        dest.copy_from_slice(&rows[..width]);
        for source in rows.chunks_exact(width).skip(1) {
            if average.is_some() {
                dest.iter_mut().zip(source).for_each(|(d, v)| *d += v);
            } else {
                dest.iter_mut().zip(source).for_each(|(d, v)| *d = max_or_nan(*v, *d));
            }
        }
    }
    let full = (window_height * window_width) as f32;
    let windows = out.iter_mut().zip(line.chunks_exact(window_width));
    match (average, window_width) {
        (Some(_), 2) => windows.for_each(|(o, w)| *o = (w[0] + w[1]) / full),
        (None, 2) => windows.for_each(|(o, w)| *o = max_or_nan(w[1], w[0])),
        (Some(_), _) => windows.for_each(|(o, w)| *o = w.iter().sum::<f32>() / full),
        (None, _) => windows.for_each(|(o, w)| *o = w.iter().fold(f32::NEG_INFINITY, |m, v| max_or_nan(*v, m))),
    }
}

/// Max or average pooling of one plane (`[height, width]`, 1-D as height 1) into `out`:
/// `average` is `None` for the maximum, else whether padding counts in the divisor.
#[inline(always)]
fn pool_plane(layout: &ConvLayout, input: &[f32], average: Option<bool>, line: &mut Vec<f32>, out: &mut [f32]) {
    let [height, width] = layout.input;
    let [out_height, out_width] = layout.output().unwrap_or([0, 0]);
    let full = (layout.kernel[0] * layout.kernel[1]) as f32;
    let max = max_or_nan;
    if layout.pads_before == [0, 0] && layout.pads_after == [0, 0] {
        // Every window lies inside the plane: each output row reduces its input rows into one
        // line (contiguous, so it vectorizes), then each window's columns of that line.
        line.resize(width, 0.0);
        let (stride, dilation, taps) = (layout.strides[1], layout.dilations[1], layout.kernel[1]);
        for (oy, row) in out.chunks_exact_mut(out_width.max(1)).take(out_height).enumerate() {
            for ky in 0..layout.kernel[0] {
                let source = &input[(oy * layout.strides[0] + ky * layout.dilations[0]) * width..][..width];
                if ky == 0 {
                    line.copy_from_slice(source);
                } else if average.is_some() {
                    line.iter_mut().zip(source).for_each(|(l, v)| *l += v);
                } else {
                    line.iter_mut().zip(source).for_each(|(l, v)| *l = max(*v, *l));
                }
            }
            for (ox, o) in row.iter_mut().enumerate() {
                let window = line[ox * stride..].iter().step_by(dilation).take(taps);
                *o = match average {
                    Some(_) => window.sum::<f32>() / full,
                    None if dilation == 1 => line[ox * stride..][..taps]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, v| max(*v, m)),
                    None => window.fold(f32::NEG_INFINITY, |m, v| max(*v, m)),
                };
            }
        }
        return;
    }
    for oy in 0..out_height {
        for ox in 0..out_width {
            let mut best = f32::NEG_INFINITY;
            let mut sum = 0.0f32;
            let mut count = 0usize;
            for ky in 0..layout.kernel[0] {
                let y = (oy * layout.strides[0] + ky * layout.dilations[0]).checked_sub(layout.pads_before[0]);
                let Some(y) = y.filter(|y| *y < height) else { continue };
                for kx in 0..layout.kernel[1] {
                    let x = (ox * layout.strides[1] + kx * layout.dilations[1]).checked_sub(layout.pads_before[1]);
                    let Some(x) = x.filter(|x| *x < width) else { continue };
                    let v = input[y * width + x];
                    if average.is_some() {
                        sum += v;
                        count += 1;
                    } else {
                        best = max(v, best);
                    }
                }
            }
            out[oy * out_width + ox] = match average {
                None => best,
                Some(true) => sum / full,
                Some(false) => sum / count.max(1) as f32,
            };
        }
    }
}

/// `e^x` to within a few units in the last place for `x` at most 0 (softmax's shifted inputs),
/// branch-free so that a loop of it vectorizes: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, then
/// `2^n` times a degree-6 polynomial in `r`.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_145_75;
    const LN2_LOW: f32 = 1.428_606_8e-6;
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer in float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HIGH) - n * LN2_LOW;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` is an integer in -126..=0, so `n + 127` is a valid biased exponent.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `erf(x)` to within 5e-7 (Abramowitz and Stegun 7.1.26 on the fast exponential), branch-free
/// so that a loop of it vectorizes; NaN stays NaN.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_nonpositive(-a * a)).copysign(x)
}

/// `erf` of every value, or the GELU `x (1 + erf(x / sqrt 2)) / 2` when `gelu`.
pub(super) fn erf_values(values: &mut [f32], gelu: bool) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxErf { values, gelu });
    }
    erf_loop(values, gelu);
}

#[cfg(target_arch = "x86_64")]
struct AvxErf<'a> {
    values: &'a mut [f32],
    gelu: bool,
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AvxErf<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        erf_loop(self.values, self.gelu);
    }
}

#[inline(always)]
fn erf_loop(values: &mut [f32], gelu: bool) {
    if gelu {
        values
            .iter_mut()
            .for_each(|x| *x = 0.5 * *x * (1.0 + erf_fast(*x * std::f32::consts::FRAC_1_SQRT_2)));
    } else {
        values.iter_mut().for_each(|x| *x = erf_fast(*x));
    }
}

/// Softmax of each contiguous row of `values`, `width` long.
pub(super) fn softmax_rows(values: &mut [f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxSoftmax { values, width });
    }
    softmax_loop(values, width);
}

#[cfg(target_arch = "x86_64")]
struct AvxSoftmax<'a> {
    values: &'a mut [f32],
    width: usize,
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AvxSoftmax<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        softmax_loop(self.values, self.width);
    }
}

#[inline(always)]
fn softmax_loop(values: &mut [f32], width: usize) {
    for row in values.chunks_exact_mut(width.max(1)) {
        // Without short-circuits, so that the loop vectorizes.
        if row.iter().fold(false, |nan, x| nan | x.is_nan()) {
            row.fill(f32::NAN);
            continue;
        }
        let max = lane_fold(row, f32::NEG_INFINITY, f32::max, f32::max);
        if max == f32::INFINITY {
            // Only the infinite entries share the mass, as exp(x - max) would say in the limit.
            let count = row.iter().filter(|x| **x == f32::INFINITY).count() as f32;
            row.iter_mut()
                .for_each(|x| *x = if *x == f32::INFINITY { 1.0 / count } else { 0.0 });
            continue;
        }
        row.iter_mut().for_each(|x| *x = exp_nonpositive(*x - max));
        let scale = 1.0 / lane_sum(row, |x| x);
        row.iter_mut().for_each(|x| *x *= scale);
    }
}

/// `values` folded by `step` into [`LANES`] running results (so that the loop vectorizes, where
/// one running result would chain every step to the one before), the lanes then merged by
/// `merge`: for sums, a different order of additions than one after another, as onnxruntime's
/// and tract's vectorized reductions also have.
#[inline(always)]
fn lane_fold(values: &[f32], start: f32, step: impl Fn(f32, f32) -> f32, merge: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [start; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane = step(*lane, *x);
        }
    }
    let merged = lanes.into_iter().fold(start, merge);
    rest.iter().fold(merged, |acc, x| step(acc, *x))
}

/// The sum of `values` in [`LANES`] running sums.
#[inline(always)]
fn lane_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let add = |a: f32, b: f32| a + b;
    lane_fold(values, 0.0, |sum, x| sum + term(x), add)
}

/// Running results [`lane_fold`] keeps: two 256-bit or one 512-bit vector.
const LANES: usize = 16;

/// Layer normalization of each row of `width` values (`inverse_width` is `1 / width` as the
/// model wrote it), then the epilogue's per-column operations (the scale and shift).
pub(super) fn layer_norm(values: &mut [f32], width: usize, inverse_width: f32, eps: f32, epilogue: &[ChannelOp]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = V3::try_new() {
        return v3.vectorize(AvxLayerNorm {
            values,
            width,
            inverse_width,
            eps,
            epilogue,
        });
    }
    layer_norm_loop(values, width, inverse_width, eps, epilogue);
}

#[cfg(target_arch = "x86_64")]
struct AvxLayerNorm<'a> {
    values: &'a mut [f32],
    width: usize,
    inverse_width: f32,
    eps: f32,
    epilogue: &'a [ChannelOp],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AvxLayerNorm<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        layer_norm_loop(self.values, self.width, self.inverse_width, self.eps, self.epilogue);
    }
}

#[inline(always)]
fn layer_norm_loop(values: &mut [f32], width: usize, inverse_width: f32, eps: f32, epilogue: &[ChannelOp]) {
    for row in values.chunks_exact_mut(width.max(1)) {
        let mean = lane_sum(row, |x| x) * inverse_width;
        row.iter_mut().for_each(|x| *x -= mean);
        let mean_square = lane_sum(row, |x| x * x) / width as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        row.iter_mut().for_each(|x| *x *= scale);
        for e in epilogue {
            apply_run(e.op, row, &e.values);
        }
    }
}

/// Softmax along an axis whose elements lie `inner` apart, for `outer` blocks of
/// `width * inner` values.
pub(super) fn softmax_strided(values: &mut [f32], width: usize, inner: usize) {
    let mut lane = vec![0.0f32; width];
    for block in values.chunks_exact_mut((width * inner).max(1)) {
        for i in 0..inner {
            for (w, x) in lane.iter_mut().enumerate() {
                *x = block[w * inner + i];
            }
            softmax_rows(&mut lane, width);
            for (w, x) in lane.iter().enumerate() {
                block[w * inner + i] = *x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fast_erf_is_within_5e_7_of_the_true_value() {
        let mut x = -6.0f32;
        while x < 6.0 {
            let mut fast = [x, x];
            erf_values(&mut fast[..1], false);
            erf_loop(&mut fast[1..], false);
            let exact = libm::erf(f64::from(x));
            for value in fast {
                assert!(
                    (f64::from(value) - exact).abs() < 5e-7,
                    "erf({x}) = {value}, not {exact}"
                );
            }
            x += 0.000_731;
        }
        let mut special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0];
        erf_values(&mut special, false);
        assert!(special[0].is_nan());
        assert_eq!(special[1..3], [1.0, -1.0]);
        assert!(special[3].abs() < 5e-7);
    }

    #[test]
    fn the_fast_exponential_is_within_a_few_ulp() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let exact = f64::from(x).exp();
            let fast = f64::from(exp_nonpositive(x));
            assert!(((fast - exact) / exact).abs() < 4e-7, "exp({x}) = {fast}, not {exact}");
            x -= 0.0137;
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    /// Pooling by the definition: each window's values, straight from the input.
    fn reference_pool(input: &[f32], [height, width]: [usize; 2], kernel: [usize; 2], average: bool) -> Vec<f32> {
        let (out_height, out_width) = (height / kernel[0], width / kernel[1]);
        let mut out = Vec::new();
        for plane in input.chunks_exact(height * width) {
            for oy in 0..out_height {
                for ox in 0..out_width {
                    let window = (0..kernel[0])
                        .flat_map(|ky| {
                            (0..kernel[1]).map(move |kx| (oy * kernel[0] + ky) * width + ox * kernel[1] + kx)
                        })
                        .map(|i| plane[i]);
                    out.push(if average {
                        window.sum::<f32>() / (kernel[0] * kernel[1]) as f32
                    } else if window.clone().any(f32::is_nan) {
                        f32::NAN
                    } else {
                        window.fold(f32::NEG_INFINITY, f32::max)
                    });
                }
            }
        }
        out
    }

    #[test]
    fn pooling_windows_that_tile_the_planes_match_the_definition() {
        for (input_size, kernel) in [([4, 6], [2, 2]), ([6, 6], [3, 2]), ([4, 9], [2, 3]), ([2, 8], [1, 4])] {
            let window = Window::tiling(&kernel);
            let layout = ConvLayout::new(&window, 1, 1, &input_size).expect("layout");
            let planes = 3;
            let count = planes * input_size[0] * input_size[1];
            let mut input: Vec<f32> = (0..count).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
            // A NaN in one window of the second plane must come out of that window's maximum.
            input[input_size[0] * input_size[1] + 1] = f32::NAN;
            for average in [None, Some(true)] {
                let expected = reference_pool(&input, input_size, kernel, average.is_some());
                let mut out = vec![0.0f32; expected.len()];
                pool_planes(&layout, &input, average, &mut Vec::new(), &mut out);
                for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (got.is_nan() && want.is_nan()) || (got - want).abs() < 1e-5,
                        "{input_size:?} by {kernel:?}, {average:?}, output {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    fn reference_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] = (0..k)
                    .map(|kk| f64::from(a[r * k + kk]) * f64::from(b[kk * n + c]))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Rows of `width` values spread over a few orders of magnitude, off zero on average.
    fn rows(count: usize, width: usize, seed: u64) -> Vec<f32> {
        let mut value = crate::exec::test_values(seed);
        (0..count * width)
            .map(|_| (value(2000) as f32 - 900.0) / 37.0)
            .collect()
    }

    #[test]
    fn layer_norms_and_softmaxes_match_the_definition() {
        // Widths below, at and off the lane count, and MiniLM's.
        for width in [1usize, 5, 16, 17, 37, 384] {
            let input = rows(3, width, width as u64);
            let scale: Vec<f32> = (0..width).map(|c| 0.5 + c as f32 / 8.0).collect();
            let epilogue = [
                ChannelOp {
                    op: BinaryOp::Mul,
                    values: scale.clone(),
                },
                ChannelOp {
                    op: BinaryOp::Add,
                    values: vec![0.25],
                },
            ];
            let eps = 1e-5;
            let mut normed = input.clone();
            layer_norm(&mut normed, width, 1.0 / width as f32, eps, &epilogue);
            let mut soft = input.clone();
            softmax_rows(&mut soft, width);
            for (r, row) in input.chunks(width).enumerate() {
                let x: Vec<f64> = row.iter().map(|v| f64::from(*v)).collect();
                let mean = x.iter().sum::<f64>() / width as f64;
                let variance = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
                let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = x.iter().map(|v| (v - max).exp()).sum();
                for c in 0..width {
                    let expected_norm = (x[c] - mean) / (variance + f64::from(eps)).sqrt() * f64::from(scale[c]) + 0.25;
                    let expected_soft = (x[c] - max).exp() / total;
                    let got_norm = f64::from(normed[r * width + c]);
                    let got_soft = f64::from(soft[r * width + c]);
                    assert!(
                        (got_norm - expected_norm).abs() <= 1e-4 * expected_norm.abs().max(1.0),
                        "layer norm, width {width}: {got_norm} vs {expected_norm}"
                    );
                    assert!(
                        (got_soft - expected_soft).abs() <= 1e-5,
                        "softmax, width {width}: {got_soft} vs {expected_soft}"
                    );
                }
            }
        }
    }

    fn whole(m: usize, n: usize) -> Tile {
        Tile {
            rows: 0..m,
            columns: 0..n,
        }
    }

    #[test]
    fn products_computed_tile_by_tile_match_the_reference_and_each_other() {
        // 8,200 values a row: chunks of 8 rows, so 21 rows are two chunks and 5 rows left over;
        // 100 columns are six whole panels and a quarter of one (two groups of three and one
        // alone for the AVX-512 kernel). Cut into tiles, rows that were in a block of rows are
        // left over, and panels are grouped otherwise (alone, three and a pair): the sums must
        // still be the same bits.
        let (m, k, n) = (21, 8200, 100);
        let mut value = crate::exec::test_values(3);
        let a: Vec<f32> = (0..m * k).map(|_| value(100) as f32 / 7.0).collect();
        let b: Vec<f32> = (0..k * n).map(|_| value(100) as f32 / 5.0).collect();
        let bias: Vec<f32> = (0..n).map(|c| c as f32 * 100.0).collect();
        let expected: Vec<f32> = reference_matmul(&a, &b, m, k, n)
            .iter()
            .enumerate()
            .map(|(i, x)| x + bias[i % n])
            .collect();
        let epilogue = [ChannelOp {
            op: BinaryOp::Add,
            values: bias,
        }];
        let packed = PackedMatrix::pack(&b, k, n, false);
        let mut results = Vec::new();
        for (row_cuts, column_cuts) in [(vec![0, m], vec![0, n]), (vec![0, 3, 19, m], vec![0, 16, 32, n])] {
            let mut out = vec![0.0f32; m * n];
            for rows in row_cuts.windows(2).map(|w| w[0]..w[1]) {
                for columns in column_cuts.windows(2).map(|w| w[0]..w[1]) {
                    let mut tile = vec![0.0f32; rows.len() * columns.len()];
                    let at = Tile {
                        rows: rows.clone(),
                        columns: columns.clone(),
                    };
                    matmul(&a, at, &packed, &mut tile, &epilogue);
                    for (r, values) in rows.clone().zip(tile.chunks(columns.len())) {
                        out[r * n + columns.start..][..columns.len()].copy_from_slice(values);
                    }
                }
            }
            for (x, e) in out.iter().zip(&expected) {
                assert!(
                    (x - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{x} vs {e} in tiles {row_cuts:?} x {column_cuts:?}"
                );
            }
            results.push(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        assert!(results[0] == results[1], "the same bits however the output is cut");
    }

    proptest! {
        #[test]
        fn products_match_the_reference(m in 1usize..20, k in 1usize..40, n in 1usize..80, seed in 0u64..1000) {
            let mut value = crate::exec::test_values(seed);
            let a: Vec<f32> = (0..m * k).map(|_| value(100) as f32 / 7.0).collect();
            let b: Vec<f32> = (0..k * n).map(|_| value(100) as f32 / 5.0).collect();
            let expected = reference_matmul(&a, &b, m, k, n);
            let transposed: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for packed in [PackedMatrix::pack(&b, k, n, false), PackedMatrix::pack(&transposed, k, n, true)] {
                // Every kernel this machine can run, not only the one `matmul` picks.
                let mut outs = vec![vec![0.0f32; m * n]; 4];
                matmul(&a, whole(m, n), &packed, &mut outs[0], &[]);
                matmul_loop::<ROWS, 1>(&a, whole(m, n), &packed, &mut outs[1], &[], PortableBlock);
                #[cfg(target_arch = "x86_64")]
                if let Some(v3) = V3::try_new() {
                    v3.vectorize(VectorMatmul::<_, ROWS, 1> { kernel: AvxBlock(v3), a: &a, tile: whole(m, n), b: &packed, out: &mut outs[2], epilogue: &[] });
                } else {
                    outs[2] = expected.clone();
                }
                #[cfg(target_arch = "x86_64")]
                if let Some(v4) = V4::try_new() {
                    v4.vectorize(VectorMatmul::<_, ROWS_AVX512, PANELS_AVX512> { kernel: Avx512Block(v4), a: &a, tile: whole(m, n), b: &packed, out: &mut outs[3], epilogue: &[] });
                } else {
                    outs[3] = expected.clone();
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    outs[2] = expected.clone();
                    outs[3] = expected.clone();
                }
                for out in &outs {
                    for (x, e) in out.iter().zip(&expected) {
                        prop_assert!((x - e).abs() <= 1e-3 * e.abs().max(1.0), "{x} vs {e}");
                    }
                }
            }
        }
    }
}
