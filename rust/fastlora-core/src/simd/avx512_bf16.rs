//! The bf16 GEMM's kernels on AVX-512 with AVX512-BF16 (`vdpbf16ps`: 16 fp32 lanes, each
//! adding the products of one pair of bf16 values): decoding or laying weight rows out as the
//! kernel reads them (for `x @ W.T` and for `x @ W`), and the register-blocked product of up
//! to [`MAX_ROWS`] activation rows with one panel of [`PANEL_COLUMNS`] output columns.
//! `gemm_bf16` drives them.

use std::arch::x86_64::*;

use super::avx512::{bf16_pair_tables, decode_bf16_pairs};

/// Weight rows per panel: the kernel's output columns, four registers of 16.
pub const PANEL_COLUMNS: usize = 64;
/// Activation rows per kernel call: 6 x 4 accumulators, 4 weight registers and a broadcast
/// fill 29 of the 32 registers.
pub const MAX_ROWS: usize = 6;

/// Lays 16 weight rows out as the kernel reads them: `rows[r]` holds row `r`'s bf16 values
/// in pairs (one `u32` per two consecutive columns), and pair `p` of row `r` goes to
/// `panel[p * PANEL_COLUMNS + r]`, so that one 64-byte load gives 16 rows' pair `p`.
/// Whole 16x16 squares are transposed in registers; a ragged last square goes one by one.
///
/// # Safety
/// The CPU must have AVX-512 F; every row must hold `pairs` values, and `panel` must hold
/// `pairs * PANEL_COLUMNS` values from its start.
#[target_feature(enable = "avx512f")]
pub unsafe fn lay_out_16_rows(rows: &[&[u32]; 16], pairs: usize, panel: *mut u32) {
    let mut p = 0;
    while p + 16 <= pairs {
        let mut v = [_mm512_setzero_si512(); 16];
        for (reg, row) in v.iter_mut().zip(rows) {
            *reg = _mm512_loadu_si512(row.as_ptr().add(p) as *const _);
        }
        let t = transpose_16x16(v);
        for (c, reg) in t.iter().enumerate() {
            _mm512_storeu_si512(panel.add((p + c) * PANEL_COLUMNS) as *mut _, *reg);
        }
        p += 16;
    }
    for p in p..pairs {
        for (r, row) in rows.iter().enumerate() {
            *panel.add(p * PANEL_COLUMNS + r) = row[p];
        }
    }
}

/// Decodes up to 16 weight rows straight into the panel layout of [`lay_out_16_rows`] (one
/// pass over the packed bytes, no decoded copy in memory): row `r` is the `32 * chunks`
/// elements from `starts[r]` of the packed tensor (`packed`, fp32 `absmax` per `blocksize`
/// elements, `table` its code), rounded to bf16 as the dequantize rounds them. Each
/// `starts[r]` is a multiple of 32, so every 32-element chunk lies in one block; panel rows
/// past `starts.len()` are zeros.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; `panel` must hold `16 * chunks * PANEL_COLUMNS`
/// values from its start. (Rows past the tensor's end panic.)
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn decode_16_rows(
    table: &[f32; 16],
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    starts: &[usize],
    chunks: usize,
    panel: *mut u32,
) {
    let table_v = _mm512_loadu_ps(table.as_ptr());
    let rows = starts.len().min(16);
    let shift = blocksize.trailing_zeros();
    // Each row's current block and its two lookup tables, rebuilt when the block changes.
    let mut blocks = [usize::MAX; 16];
    let mut tables = [(_mm512_setzero_si512(), _mm512_setzero_si512()); 16];
    for c in 0..chunks {
        let mut v = [_mm512_setzero_si512(); 16];
        for r in 0..rows {
            let element = starts[r] + 32 * c;
            let block = element >> shift;
            if block != blocks[r] {
                blocks[r] = block;
                tables[r] = bf16_pair_tables(table_v, absmax[block]);
            }
            let bytes = &packed[element / 2..element / 2 + 16];
            v[r] = decode_bf16_pairs(bytes.as_ptr(), tables[r].0, tables[r].1);
        }
        for (j, reg) in transpose_16x16(v).iter().enumerate() {
            _mm512_storeu_si512(panel.add((16 * c + j) * PANEL_COLUMNS) as *mut _, *reg);
        }
    }
}

/// Decodes pairs of weight rows into the panel layout for the transposed product `x @ W`,
/// whose sums run over the weight's rows: lane `j` of panel row `q` holds column
/// `first_column + j` of weight row `first_row + 2q` in its low half and of the next row in
/// its high half, as the activation's pair of elements `2q, 2q + 1` is laid out. Each row
/// gives `32 * chunks` columns (`chunks` 1 or 2) of a weight with `k` columns, decoded from
/// the packed tensor as [`decode_16_rows`] decodes; `k` and `first_column` are multiples of
/// 32, so every chunk lies in one block. Lanes past the chunks are zeros.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; `panel` must hold `pairs * PANEL_COLUMNS` values
/// from its start. (Rows past the tensor's end panic.)
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn decode_row_pairs(
    table: &[f32; 16],
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    k: usize,
    first_row: usize,
    pairs: usize,
    first_column: usize,
    chunks: usize,
    panel: *mut u32,
) {
    let table_v = _mm512_loadu_ps(table.as_ptr());
    let shift = blocksize.trailing_zeros();
    // unpacklo/hi interleave within 128-bit lanes: `low` lane L holds columns 8L .. 8L + 4 of
    // the chunk, `high` 8L + 4 .. 8L + 8; these pick the lanes back into column order.
    let first_half = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    let second_half = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    // The even and the odd row's current block and its lookup tables.
    let mut blocks = [usize::MAX; 2];
    let mut tables = [(_mm512_setzero_si512(), _mm512_setzero_si512()); 2];
    for q in 0..pairs {
        let row_start = (first_row + 2 * q) * k + first_column;
        let out = panel.add(q * PANEL_COLUMNS);
        for c in 0..2 {
            if c >= chunks {
                _mm512_storeu_si512(out.add(32 * c) as *mut _, _mm512_setzero_si512());
                _mm512_storeu_si512(out.add(32 * c + 16) as *mut _, _mm512_setzero_si512());
                continue;
            }
            let mut rows = [_mm512_setzero_si512(); 2];
            for (r, reg) in rows.iter_mut().enumerate() {
                let element = row_start + r * k + 32 * c;
                let block = element >> shift;
                if block != blocks[r] {
                    blocks[r] = block;
                    tables[r] = bf16_pair_tables(table_v, absmax[block]);
                }
                let bytes = &packed[element / 2..element / 2 + 16];
                *reg = decode_bf16_pairs(bytes.as_ptr(), tables[r].0, tables[r].1);
            }
            let low = _mm512_unpacklo_epi16(rows[0], rows[1]);
            let high = _mm512_unpackhi_epi16(rows[0], rows[1]);
            _mm512_storeu_si512(out.add(32 * c) as *mut _, _mm512_permutex2var_epi64(low, first_half, high));
            _mm512_storeu_si512(out.add(32 * c + 16) as *mut _, _mm512_permutex2var_epi64(low, second_half, high));
        }
    }
}

/// `out[c]` lane `r` = `v[r]` lane `c`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(v: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane L: after two interleaves, u[4g + c] holds element 4L + c of
    // rows 4g .. 4g + 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let b = 4 * g;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // Then gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into out[4L + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let even_lo = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let even_hi = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_lo = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
        let odd_hi = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(even_lo, even_hi);
        out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(even_lo, even_hi);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(odd_lo, odd_hi);
        out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(odd_lo, odd_hi);
    }
    out
}

/// `acc[i][j] (+)= sum over p of x_i[2p] * W_j[2p] + x_i[2p + 1] * W_j[2p + 1]` for the `R`
/// activation rows `x + i * ldx` (bf16, `2 * pairs` values each) and the panel's 64 weight
/// rows `j` ([`lay_out_16_rows`]), in fp32: `acc` is `R` rows of 64 values, `ldacc` apart,
/// read first unless `first`.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; the pointers must cover what is read and written.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn panel_product<const R: usize>(
    x: *const u16,
    ldx: usize,
    panel: *const u32,
    pairs: usize,
    acc: *mut f32,
    ldacc: usize,
    first: bool,
) {
    let mut c = [[_mm512_setzero_ps(); 4]; R];
    if !first {
        for (i, row) in c.iter_mut().enumerate() {
            for (j, reg) in row.iter_mut().enumerate() {
                *reg = _mm512_loadu_ps(acc.add(i * ldacc + 16 * j));
            }
        }
    }
    let mut rows = [x as *const i32; R];
    for (i, row) in rows.iter_mut().enumerate() {
        *row = x.add(i * ldx) as *const i32;
    }
    let mut w = panel;
    for p in 0..pairs {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w as *const _));
        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(16) as *const _));
        let w2: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(32) as *const _));
        let w3: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(48) as *const _));
        for i in 0..R {
            let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(rows[i].add(p).read_unaligned()));
            c[i][0] = _mm512_dpbf16_ps(c[i][0], pair, w0);
            c[i][1] = _mm512_dpbf16_ps(c[i][1], pair, w1);
            c[i][2] = _mm512_dpbf16_ps(c[i][2], pair, w2);
            c[i][3] = _mm512_dpbf16_ps(c[i][3], pair, w3);
        }
        w = w.add(PANEL_COLUMNS);
    }
    for (i, row) in c.iter().enumerate() {
        for (j, reg) in row.iter().enumerate() {
            _mm512_storeu_ps(acc.add(i * ldacc + 16 * j), *reg);
        }
    }
}

/// `out[..count] = sums[..count]` rounded to bf16 (nearest, ties to even), as the other
/// kernels round (in integer arithmetic: `vcvtneps2bf16` flushes subnormals to zero).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; the pointers must cover `count` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn round_into_bf16(sums: *const f32, out: *mut half::bf16, count: usize) {
    let mut i = 0;
    while i < count {
        let mask: __mmask16 = if count - i >= 16 { 0xffff } else { (1u16 << (count - i)) - 1 };
        let high = super::avx512::round_to_bf16_high(_mm512_maskz_loadu_ps(mask, sums.add(i)));
        _mm512_mask_cvtepi32_storeu_epi16(out.add(i) as *mut i16, mask, _mm512_srli_epi32::<16>(high));
        i += 16;
    }
}
