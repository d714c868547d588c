//! The many-row bf16 product `y = x @ W.T` on CPUs with AVX512-BF16, for a packed 4-bit
//! weight `W` of shape `(n, k)`: a GEMM of our own whose weight packing is the dequantize.
//!
//! A BLAS GEMM reads its right-hand matrix once more to pack it; handing it a dequantized bf16
//! weight means writing 2 bytes per weight to memory and reading them back, which left the
//! tiled product (dequantize tiles, torch's bf16 GEMM) at 1.10x the dense product's time.
//! Here each task decodes [`PANEL_COLUMNS`] weight rows, up to [`PANEL_DEPTH`] columns at a
//! time, into the panel the kernel reads (from the packed half-byte per weight, into a
//! buffer that stays in the core's cache) and multiplies every activation row with it,
//! [`MAX_ROWS`] at a time, accumulating in fp32; each output is rounded to bf16 once. Where
//! `k % 32 == 0` (every real model) the bytes decode straight into the panel's layout;
//! other shapes decode each row, then lay the rows out.

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
    decode_16_rows, lay_out_16_rows, panel_product, round_into_bf16, MAX_ROWS, PANEL_COLUMNS,
};

/// Weight columns per panel (even): 64 rows of them fill 256 KiB, a quarter of a Zen 5's L2.
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

/// `y = x @ W.T` with bf16 `x` of shape `(m, k)` and `y` of shape `(m, n)`, row-major, the
/// weight's values rounded to bf16 as the dequantize rounds them and the sums kept in fp32.
/// `k` must be even (each kernel step takes two columns); an error where not [`available`].
pub fn matmul_4bit_bf16(
    isa: Isa,
    x: &[bf16],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    y: &mut [bf16],
) -> Result<(), Error> {
    ensure!(available(isa), "the bf16 GEMM needs AVX-512 with AVX512-BF16");
    check_shapes(weight, n, k)?;
    ensure!(k.is_multiple_of(2), "the bf16 GEMM needs an even number of columns, got {k}");
    let m = rows_of(x.len(), k, "x")?;
    ensure!(y.len() == m * n, "y holds {} values, expected {m} x {n}", y.len());
    #[cfg(target_arch = "x86_64")]
    {
        let pass_rows = (PASS_BYTES / (2 * k)).clamp(MAX_ROWS, PASS_MAX_ROWS);
        let panels = n.div_ceil(PANEL_COLUMNS);
        for first_row in (0..m).step_by(pass_rows) {
            let rows = pass_rows.min(m - first_row);
            let x = &x[first_row * k..(first_row + rows) * k];
            let y = Output(y[first_row * n..(first_row + rows) * n].as_mut_ptr());
            parallel::for_each_task(panels, |panel| {
                // SAFETY: `available` checked the CPU; each task writes its own columns of
                // the pass's `rows` output rows.
                unsafe { multiply_panel(isa, x, weight, n, k, panel * PANEL_COLUMNS, &y) }
            });
        }
    }
    Ok(())
}

/// The output rows of a pass, which tasks write in disjoint columns.
struct Output(*mut bf16);

// SAFETY: tasks write through it only to their own panel's columns.
unsafe impl Sync for Output {}

/// One task's buffers, kept per thread between calls (allocating them per task paid their
/// pages' faults each time).
#[derive(Default)]
struct Scratch {
    /// The panel's weight rows decoded to bf16, `PANEL_DEPTH` apart (shapes with `k % 32 != 0`).
    rows: Vec<bf16>,
    /// The panel in the kernel's layout.
    panel: Vec<u32>,
    /// fp32 sums, `PANEL_COLUMNS` per activation row.
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Output columns `first_column ..` (up to [`PANEL_COLUMNS`]) of `y = x @ W.T`.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16, and no other task may write these columns.
#[cfg(target_arch = "x86_64")]
unsafe fn multiply_panel(
    isa: Isa,
    x: &[bf16],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    first_column: usize,
    y: &Output,
) {
    let m = x.len() / k;
    let columns = PANEL_COLUMNS.min(n - first_column);
    SCRATCH.with_borrow_mut(|s| {
        s.panel.resize(PANEL_COLUMNS * PANEL_DEPTH / 2, 0);
        s.sums.resize(m * PANEL_COLUMNS, 0.0);
        let aligned = k.is_multiple_of(32);
        if !aligned {
            s.rows.resize(PANEL_COLUMNS * PANEL_DEPTH, bf16::ZERO);
            // Rows past the weight's last multiply as zeros (their sums are not written out).
            s.rows[columns * PANEL_DEPTH..].fill(bf16::ZERO);
        }
        for depth_start in (0..k).step_by(PANEL_DEPTH) {
            let depth = PANEL_DEPTH.min(k - depth_start);
            let pairs = depth / 2;
            if aligned {
                let starts: [usize; PANEL_COLUMNS] = std::array::from_fn(|c| (first_column + c) * k + depth_start);
                for group in 0..PANEL_COLUMNS / 16 {
                    let live = &starts[16 * group..columns.clamp(16 * group, 16 * group + 16)];
                    let (table, panel) = (weight.quant_type.code(), s.panel.as_mut_ptr().add(16 * group));
                    decode_16_rows(table, weight.packed, weight.absmax, weight.blocksize, live, depth / 32, panel);
                }
            } else {
                for (c, row) in s.rows.chunks_mut(PANEL_DEPTH).take(columns).enumerate() {
                    decode_span(isa, weight, (first_column + c) * k + depth_start, &mut row[..depth], false);
                }
                for group in 0..PANEL_COLUMNS / 16 {
                    let rows: [&[u32]; 16] = std::array::from_fn(|r| {
                        let row = &s.rows[(16 * group + r) * PANEL_DEPTH..][..2 * pairs];
                        // SAFETY: two bf16 values are one u32 (bf16 is 2-byte aligned, u32 reads
                        // below are unaligned loads).
                        std::slice::from_raw_parts(row.as_ptr() as *const u32, pairs)
                    });
                    lay_out_16_rows(&rows, pairs, s.panel.as_mut_ptr().add(16 * group));
                }
            }
            let xs = x.as_ptr().add(depth_start) as *const u16;
            let mut i = 0;
            while i < m {
                let r = MAX_ROWS.min(m - i);
                let (xi, sums) = (xs.add(i * k), s.sums.as_mut_ptr().add(i * PANEL_COLUMNS));
                let first = depth_start == 0;
                let panel = s.panel.as_ptr();
                match r {
                    6 => panel_product::<6>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                    5 => panel_product::<5>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                    4 => panel_product::<4>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                    3 => panel_product::<3>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                    2 => panel_product::<2>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                    _ => panel_product::<1>(xi, k, panel, pairs, sums, PANEL_COLUMNS, first),
                }
                i += r;
            }
        }
        for (i, sums) in s.sums.chunks(PANEL_COLUMNS).enumerate() {
            round_into_bf16(sums.as_ptr(), y.0.add(i * n + first_column), columns);
        }
    });
}

#[cfg(test)]
mod tests;
