//! The many-row bf16 products `y = x @ W.T` and `y = x @ W` (the input gradient) on CPUs with
//! AVX512-BF16, for a packed 4-bit weight `W` of shape `(n, k)`: a GEMM of our own whose
//! weight packing is the dequantize.
//!
//! A BLAS GEMM reads its right-hand matrix once more to pack it; handing it a dequantized bf16
//! weight means writing 2 bytes per weight to memory and reading them back, which left the
//! tiled product (dequantize tiles, torch's bf16 GEMM) at 1.10x the dense product's time.
//! Here each task takes [`PANEL_COLUMNS`] output columns (weight rows for `x @ W.T`, weight
//! columns for `x @ W`), decodes their weights [`PANEL_DEPTH`] summed-over elements at a time
//! into the panel the kernel reads (from the packed half-byte per weight, into a buffer that
//! stays in the core's cache) and multiplies every activation row with it, [`MAX_ROWS`] at
//! a time, accumulating in fp32; each output is rounded to bf16 once. Where the weight's
//! rows are whole 32-element chunks (`k % 32 == 0`, every real model) the bytes decode
//! straight into the panel's layout; other shapes decode each row's span, then lay it out.
//! A [`LowRank`] term (LoRA's) is multiplied into the same fp32 sums first, from a small
//! panel of its factor, so the output is rounded once and never read back.

use std::cell::RefCell;

use half::bf16;

use crate::error::{ensure, Error};
use crate::format::Packed4bit;
use crate::matmul::{check_shapes, rows_of};
use crate::parallel;
use crate::quantize::decode_span;
#[cfg(test)]
use crate::simd;
use crate::simd::Isa;

#[cfg(target_arch = "x86_64")]
use crate::simd::avx512_bf16::{
    decode_16_rows, decode_row_pairs, lay_out_16_rows, panel_product, round_into_bf16, MAX_ROWS, PANEL_COLUMNS,
};

/// Summed-over elements per panel (even): 64 output columns of them fill 256 KiB, a quarter
/// of a Zen 5's L2.
const PANEL_DEPTH: usize = 2048;
/// Activation bytes per pass over the weight: every panel is multiplied with all of a pass's
/// rows, which stay in the L3 between panels (more rows pay another decode of the weight).
const PASS_BYTES: usize = 8 << 20;
/// Most activation rows per pass (the fp32 sums of a panel's 64 columns for each, per task).
const PASS_MAX_ROWS: usize = 1024;

/// Whether [`matmul_4bit_bf16`] runs on this CPU with the instruction set `isa`.
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        return is_x86_feature_detected!("avx512bf16");
    }
    let _ = isa;
    false
}

/// A rank-`rank` term added to the product's fp32 sums before their one rounding: `scale *
/// u @ factor.T` beside `x @ W.T` (u `(m, rank)`, factor `(n, rank)`: LoRA's `x @ A.T` and
/// `B`), `scale * u @ factor` beside `x @ W` (factor `(rank, k)`: `dy @ B` and `A`). The
/// factor has the weight's orientation with `rank` for the summed-over dimension.
pub struct LowRank<'a> {
    pub u: &'a [bf16],
    pub factor: &'a [bf16],
    /// Even: the kernel takes pairs of elements.
    pub rank: usize,
    pub scale: f32,
}

/// `y = x @ W.T` with bf16 `x` of shape `(m, k)` and `y` of shape `(m, n)`, or with
/// `transposed`, `y = x @ W` with `x` of shape `(m, n)` and `y` of shape `(m, k)`; row-major,
/// the weight's values rounded to bf16 as the dequantize rounds them and the sums kept in
/// fp32, `low_rank`'s term added to them. The summed-over dimension (`k`, or `n` when
/// `transposed`) must be even: each kernel step takes a pair of elements. An error where not
/// [`available`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_4bit_bf16(
    isa: Isa,
    x: &[bf16],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    transposed: bool,
    low_rank: Option<&LowRank<'_>>,
    y: &mut [bf16],
) -> Result<(), Error> {
    ensure!(available(isa), "the bf16 GEMM needs AVX-512 with AVX512-BF16");
    check_shapes(weight, n, k)?;
    let (depth, columns) = if transposed { (n, k) } else { (k, n) };
    if transposed {
        ensure!(n.is_multiple_of(2), "the transposed bf16 GEMM needs an even number of weight rows, got {n}");
    } else {
        ensure!(k.is_multiple_of(2), "the bf16 GEMM needs an even number of columns, got {k}");
    }
    let m = rows_of(x.len(), depth, "x")?;
    ensure!(y.len() == m * columns, "y holds {} values, expected {m} x {columns}", y.len());
    if let Some(term) = low_rank {
        let rank = term.rank;
        ensure!(rank > 0 && rank.is_multiple_of(2), "the low-rank term needs an even rank, got {rank}");
        ensure!(term.u.len() == m * rank, "u holds {} values, expected {m} x {rank}", term.u.len());
        ensure!(
            term.factor.len() == columns * rank,
            "factor holds {} values, expected {columns} x {rank}",
            term.factor.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        let shape = Shape { k, transposed, depth, columns };
        let pass_rows = (PASS_BYTES / (2 * depth)).clamp(MAX_ROWS, PASS_MAX_ROWS);
        let panels = columns.div_ceil(PANEL_COLUMNS);
        for first_row in (0..m).step_by(pass_rows) {
            let rows = pass_rows.min(m - first_row);
            let x = &x[first_row * depth..(first_row + rows) * depth];
            let y = Output(y[first_row * columns..(first_row + rows) * columns].as_mut_ptr());
            let term = low_rank.map(|t| (&t.u[first_row * t.rank..(first_row + rows) * t.rank], t));
            parallel::for_each_task(panels, |panel| {
                // SAFETY: `available` checked the CPU; each task writes its own columns of
                // the pass's `rows` output rows.
                unsafe { multiply_panel(isa, x, weight, &shape, term, panel * PANEL_COLUMNS, &y) }
            });
        }
    }
    Ok(())
}

/// Which product, of which weight: `depth` elements summed per output, `columns` outputs per
/// activation row.
#[cfg(target_arch = "x86_64")]
struct Shape {
    k: usize,
    transposed: bool,
    depth: usize,
    columns: usize,
}

/// The output rows of a pass, which tasks write in disjoint columns.
struct Output(*mut bf16);

// SAFETY: tasks write through it only to their own panel's columns.
unsafe impl Sync for Output {}

/// One task's buffers, kept per thread between calls (allocating them per task paid their
/// pages' faults each time).
#[derive(Default)]
struct Scratch {
    /// Weight spans decoded to bf16 before their layout (shapes with `k % 32 != 0`):
    /// `PANEL_DEPTH` apart for `x @ W.T`, a pair of `PANEL_COLUMNS` for `x @ W`.
    rows: Vec<bf16>,
    /// The panel in the kernel's layout.
    panel: Vec<u32>,
    /// The low-rank factor's panel, in the same layout.
    factor_panel: Vec<u32>,
    /// fp32 sums, `PANEL_COLUMNS` per activation row.
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Output columns `first_column ..` (up to [`PANEL_COLUMNS`]) of the product, with the
/// pass's rows of the low-rank term's `u`.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16, and no other task may write these columns.
#[cfg(target_arch = "x86_64")]
unsafe fn multiply_panel(
    isa: Isa,
    x: &[bf16],
    weight: &Packed4bit<'_>,
    shape: &Shape,
    low_rank: Option<(&[bf16], &LowRank<'_>)>,
    first_column: usize,
    y: &Output,
) {
    let m = x.len() / shape.depth;
    let columns = PANEL_COLUMNS.min(shape.columns - first_column);
    SCRATCH.with_borrow_mut(|s| {
        s.panel.resize(PANEL_COLUMNS * PANEL_DEPTH / 2, 0);
        s.sums.resize(m * PANEL_COLUMNS, 0.0);
        if let Some((u, term)) = low_rank {
            fill_factor_panel(term, shape, first_column, columns, &mut s.factor_panel);
            let pairs = term.rank / 2;
            multiply_rows(u.as_ptr() as *const u16, term.rank, s.factor_panel.as_ptr(), pairs, m, &mut s.sums, true);
            s.sums.iter_mut().for_each(|v| *v *= term.scale);
        }
        for depth_start in (0..shape.depth).step_by(PANEL_DEPTH) {
            let depth = PANEL_DEPTH.min(shape.depth - depth_start);
            let pairs = depth / 2;
            if shape.transposed {
                fill_panel_transposed(isa, weight, shape.k, depth_start, pairs, first_column, columns, s);
            } else {
                fill_panel(isa, weight, shape.k, depth_start, depth, first_column, columns, s);
            }
            let xs = x.as_ptr().add(depth_start) as *const u16;
            let first = depth_start == 0 && low_rank.is_none();
            multiply_rows(xs, shape.depth, s.panel.as_ptr(), pairs, m, &mut s.sums, first);
        }
        for (i, sums) in s.sums.chunks(PANEL_COLUMNS).enumerate() {
            round_into_bf16(sums.as_ptr(), y.0.add(i * shape.columns + first_column), columns);
        }
    });
}

/// `sums` (`PANEL_COLUMNS` per row) of `m` rows of `x` (`ldx` apart) times a panel of
/// `pairs` pairs: set where `first`, else added to.
///
/// # Safety
/// As [`multiply_panel`]; `x` covers the rows' `2 * pairs` elements.
#[cfg(target_arch = "x86_64")]
unsafe fn multiply_rows(
    x: *const u16,
    ldx: usize,
    panel: *const u32,
    pairs: usize,
    m: usize,
    sums: &mut [f32],
    first: bool,
) {
    let mut i = 0;
    while i < m {
        let r = MAX_ROWS.min(m - i);
        let (xi, sums) = (x.add(i * ldx), sums.as_mut_ptr().add(i * PANEL_COLUMNS));
        match r {
            6 => panel_product::<6>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
            5 => panel_product::<5>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
            4 => panel_product::<4>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
            3 => panel_product::<3>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
            2 => panel_product::<2>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
            _ => panel_product::<1>(xi, ldx, panel, pairs, sums, PANEL_COLUMNS, first),
        }
        i += r;
    }
}

/// The low-rank factor's panel for output columns `first_column ..` (`columns` of them):
/// pairs of its `rank` elements, columns past the last zeros.
#[cfg(target_arch = "x86_64")]
fn fill_factor_panel(term: &LowRank<'_>, shape: &Shape, first_column: usize, columns: usize, panel: &mut Vec<u32>) {
    let (rank, factor) = (term.rank, term.factor);
    // Element `d` of output column `c`: along B's rows for `x @ W.T`, down A's columns for `x @ W`.
    let at = |d: usize, c: usize| {
        let index = if shape.transposed { d * shape.columns + c } else { c * rank + d };
        u32::from(factor[index].to_bits())
    };
    panel.clear();
    panel.resize(rank / 2 * PANEL_COLUMNS, 0);
    for (p, lanes) in panel.chunks_mut(PANEL_COLUMNS).enumerate() {
        for (lane, c) in lanes.iter_mut().zip(first_column..first_column + columns) {
            *lane = at(2 * p, c) | (at(2 * p + 1, c) << 16);
        }
    }
}

/// The panel of `x @ W.T`: weight rows `first_column ..` (`columns` of them), their
/// `depth` elements from column `depth_start`; rows past the weight's last are zeros.
///
/// # Safety
/// As [`multiply_panel`]; `s.panel` holds a whole panel.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
unsafe fn fill_panel(
    isa: Isa,
    weight: &Packed4bit<'_>,
    k: usize,
    depth_start: usize,
    depth: usize,
    first_column: usize,
    columns: usize,
    s: &mut Scratch,
) {
    let pairs = depth / 2;
    if k.is_multiple_of(32) {
        let starts: [usize; PANEL_COLUMNS] = std::array::from_fn(|c| (first_column + c) * k + depth_start);
        for group in 0..PANEL_COLUMNS / 16 {
            let live = &starts[16 * group..columns.clamp(16 * group, 16 * group + 16)];
            let (table, panel) = (weight.quant_type.code(), s.panel.as_mut_ptr().add(16 * group));
            decode_16_rows(table, weight.packed, weight.absmax, weight.blocksize, live, depth / 32, panel);
        }
        return;
    }
    s.rows.resize(PANEL_COLUMNS * PANEL_DEPTH, bf16::ZERO);
    // Rows past the weight's last multiply as zeros (their sums are not written out).
    s.rows[columns * PANEL_DEPTH..].fill(bf16::ZERO);
    for (c, row) in s.rows.chunks_mut(PANEL_DEPTH).take(columns).enumerate() {
        decode_span(isa, weight, (first_column + c) * k + depth_start, &mut row[..depth], false);
    }
    for group in 0..PANEL_COLUMNS / 16 {
        let rows: [&[u32]; 16] = std::array::from_fn(|r| {
            let row = &s.rows[(16 * group + r) * PANEL_DEPTH..][..2 * pairs];
            // SAFETY: two bf16 values are one u32 (bf16 is 2-byte aligned, u32 reads below
            // are unaligned loads).
            std::slice::from_raw_parts(row.as_ptr() as *const u32, pairs)
        });
        lay_out_16_rows(&rows, pairs, s.panel.as_mut_ptr().add(16 * group));
    }
}

/// The panel of `x @ W`: weight columns `first_column ..` (`columns` of them) of the `2 *
/// pairs` weight rows from `first_row`, a pair of rows per panel row; columns past the
/// weight's last are zeros.
///
/// # Safety
/// As [`fill_panel`].
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
unsafe fn fill_panel_transposed(
    isa: Isa,
    weight: &Packed4bit<'_>,
    k: usize,
    first_row: usize,
    pairs: usize,
    first_column: usize,
    columns: usize,
    s: &mut Scratch,
) {
    if k.is_multiple_of(32) {
        let (table, chunks) = (weight.quant_type.code(), columns.div_ceil(32));
        let panel = s.panel.as_mut_ptr();
        decode_row_pairs(
            table,
            weight.packed,
            weight.absmax,
            weight.blocksize,
            k,
            first_row,
            pairs,
            first_column,
            chunks,
            panel,
        );
        return;
    }
    if s.rows.len() < 2 * PANEL_COLUMNS {
        s.rows.resize(2 * PANEL_COLUMNS, bf16::ZERO);
    }
    let (even, odd) = s.rows[..2 * PANEL_COLUMNS].split_at_mut(PANEL_COLUMNS);
    even[columns..].fill(bf16::ZERO);
    odd[columns..].fill(bf16::ZERO);
    for (q, lanes) in s.panel.chunks_mut(PANEL_COLUMNS).take(pairs).enumerate() {
        let start = (first_row + 2 * q) * k + first_column;
        decode_span(isa, weight, start, &mut even[..columns], false);
        decode_span(isa, weight, start + k, &mut odd[..columns], false);
        for ((lane, low), high) in lanes.iter_mut().zip(even.iter()).zip(odd.iter()) {
            *lane = u32::from(low.to_bits()) | (u32::from(high.to_bits()) << 16);
        }
    }
}

#[cfg(test)]
mod tests;
