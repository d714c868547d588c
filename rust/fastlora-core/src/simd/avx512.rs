//! AVX-512 (F+BW+VL) kernels. The 16-entry code table fits one zmm register, so one
//! `vpermps` turns 16 codes into their exact fp32 code values (it reads the low 4 bits of
//! each index: no masking, no blend). A 16-byte chunk becomes its 16 high-nibble values
//! (even elements) and its 16 low-nibble values (odd elements) with one widening load, one
//! shift and two permutes. The block scale multiplies the table once per block (in the
//! fused dot and in decoding), so no product or partial sum is scaled on its own.
//!
//! Callers (`simd::*`) check slice lengths and that the CPU has AVX-512 F, BW and VL.

use std::arch::x86_64::*;

use half::bf16;

use super::{CHUNK_BYTES, GROUP_BYTES, PREFETCH_BYTES};

/// The 16 bytes at `ptr` widened to 32-bit lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn widen16(ptr: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(ptr as *const __m128i))
}

/// The values of the high nibbles (elements 2j) and of the low nibbles (elements 2j+1) of
/// the 16 bytes at `ptr`, looked up in `table`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn decode16(ptr: *const u8, table: __m512) -> (__m512, __m512) {
    let bytes = widen16(ptr);
    (_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table), _mm512_permutexvar_ps(bytes, table))
}

/// Lane indices that interleave two vectors `a`, `b` into `a0 b0 a1 b1 ...`: the first
/// 16 outputs, then the next 16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn interleave_indices() -> (__m512i, __m512i) {
    (
        _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
    )
}

/// Stores `v` at `dst`: a non-temporal store when `stream` (`dst` 64-byte aligned; the
/// caller fences), which writes the line without first reading it into the cache.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store(dst: *mut f32, v: __m512, stream: bool) {
    if stream {
        _mm512_stream_ps(dst, v)
    } else {
        _mm512_storeu_ps(dst, v)
    }
}

/// [`super::decode_blocks`] on AVX-512 (fp32): each block's scale multiplies the table
/// once (`table[code] * scale` rounded once, exactly as the scalar kernel computes it).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL, and the slices must have the lengths
/// [`super::decode_blocks`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn decode_blocks(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    out: &mut [f32],
    stream: bool,
) {
    let table_v = _mm512_loadu_ps(table.as_ptr());
    let (first, second) = interleave_indices();
    let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr());
    // Every block starts 64-byte aligned if the first does (blocks are 16-byte multiples).
    let stream = stream && (dst as usize).is_multiple_of(64);
    for (b, &scale) in scales.iter().enumerate() {
        let scaled = _mm512_mul_ps(table_v, _mm512_set1_ps(scale));
        let end = ((b + 1) * block_bytes).min(bytes.len());
        let mut j = b * block_bytes;
        while j + CHUNK_BYTES <= end {
            let (high, low) = decode16(src.add(j), scaled);
            store(dst.add(2 * j), _mm512_permutex2var_ps(high, first, low), stream);
            store(dst.add(2 * j + 16), _mm512_permutex2var_ps(high, second, low), stream);
            j += CHUNK_BYTES;
        }
        if j < end {
            super::scalar::decode_pairs(table, &bytes[j..end], scale, &mut out[2 * j..2 * end]);
        }
    }
}

/// fp32 lanes rounded to bf16 (nearest, ties to even; a NaN stays a quiet NaN), as
/// `half::bf16::from_f32` rounds, each in the upper 16 bits of its 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn round_to_bf16_high(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)))
}

/// A block's 16 products `table[code] * scale` rounded to bf16, as two tables of 32-bit lanes:
/// each value in the low half of its lane (for high nibbles, the even elements) and in the
/// high half (for low nibbles).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn bf16_pair_tables(table: __m512, scale: f32) -> (__m512i, __m512i) {
    let rounded = round_to_bf16_high(_mm512_mul_ps(table, _mm512_set1_ps(scale)));
    (_mm512_srli_epi32::<16>(rounded), _mm512_and_si512(rounded, _mm512_set1_epi32(0xffff_0000u32 as i32)))
}

/// The 16 bytes at `ptr` as 32 bf16 values in element order ([`bf16_pair_tables`]' lookups
/// OR'd: element 2j, the high nibble, in the low half of 32-bit lane j, little-endian).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn decode_bf16_pairs(ptr: *const u8, even_table: __m512i, odd_table: __m512i) -> __m512i {
    let codes = widen16(ptr);
    // An integer OR: `_mm512_or_ps` needs AVX-512 DQ, and as a call outside this function's
    // features it spilled every value of the loop to the stack.
    _mm512_or_si512(
        _mm512_permutexvar_epi32(_mm512_srli_epi32::<4>(codes), even_table),
        _mm512_permutexvar_epi32(codes, odd_table),
    )
}

/// [`super::decode_blocks_bf16`] on AVX-512. Each block's 16 products `table[code] * scale`
/// are rounded to bf16 once, into [`bf16_pair_tables`]; each 16 bytes decode into 32 bf16
/// values in element order, one 64-byte store.
///
/// # Safety
/// As [`decode_blocks`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn decode_blocks_bf16(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    out: &mut [bf16],
    stream: bool,
) {
    let table_v = _mm512_loadu_ps(table.as_ptr());
    let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr() as *mut f32);
    let stream = stream && (dst as usize).is_multiple_of(64);
    for (b, &scale) in scales.iter().enumerate() {
        let (even_table, odd_table) = bf16_pair_tables(table_v, scale);
        let end = ((b + 1) * block_bytes).min(bytes.len());
        let mut j = b * block_bytes;
        while j + CHUNK_BYTES <= end {
            let pairs = decode_bf16_pairs(src.add(j), even_table, odd_table);
            // 32 bf16 values fill the 64 bytes of 16 fp32 slots.
            store(dst.add(j), _mm512_castsi512_ps(pairs), stream);
            j += CHUNK_BYTES;
        }
        if j < end {
            super::scalar::decode_pairs_bf16(table, &bytes[j..end], scale, &mut out[2 * j..2 * end]);
        }
    }
}

/// [`super::fused_rows_dot`] on AVX-512, activations in its [`super::dot_layout`].
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL, and the slices must have the lengths
/// [`super::fused_rows_dot`] checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn fused_rows_dot(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    by_rows!(xs.len(), rows_dot(table, bytes, scales, row_bytes, block_bytes, xs, out, out_stride))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rows_dot<const ROWS: usize>(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    let table = _mm512_loadu_ps(table.as_ptr());
    let x: [*const f32; ROWS] = std::array::from_fn(|m| xs[m].as_ptr());
    let blocks_per_row = row_bytes / block_bytes;
    // A row's whole 64-byte groups, then (rows of blocks of 16 or 32 bytes) the rest in chunks.
    // A group starts on a block boundary, and a block of 64 bytes or more holds whole groups.
    let groups = row_bytes / GROUP_BYTES;
    let lanes_per_block = block_bytes / 4;
    // Which of a group's scales each lane takes, where its blocks are of 16 bytes (4 lanes each).
    let quarters = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let dst = out.as_mut_ptr();
    for r in 0..bytes.len() / row_bytes {
        let src = bytes.as_ptr().add(r * row_bytes);
        let row_scales = scales.as_ptr().add(r * blocks_per_row);
        // Each group's code values times x, summed over the group in two chains, are scaled
        // once per lane (by its block's scale) into one sum per row. One permute per 16
        // weights (the group shifted by 4 bits at a time): with a widening load per 16 bytes
        // the permutes, on one port, bound the kernel.
        let mut total = [_mm512_setzero_ps(); ROWS];
        for g in 0..groups {
            let at = g * GROUP_BYTES;
            // Past the last row this names memory that is not ours: a prefetch never faults.
            _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(at + PREFETCH_BYTES) as *const i8);
            let codes = _mm512_loadu_si512(src.add(at) as *const __m512i);
            let first = row_scales.add(at / block_bytes);
            let scale = match lanes_per_block {
                4 => _mm512_permutexvar_ps(quarters, _mm512_maskz_loadu_ps(0xf, first)),
                8 => _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(*first), _mm512_set1_ps(*first.add(1))),
                _ => _mm512_set1_ps(*first),
            };
            let mut part = [[_mm512_setzero_ps(); 2]; ROWS];
            macro_rules! nibble {
                ($i:literal, $shift:literal) => {
                    let w = _mm512_permutexvar_ps(_mm512_srli_epi32::<$shift>(codes), table);
                    for m in 0..ROWS {
                        let xm = _mm512_loadu_ps(x[m].add(2 * at + 16 * $i));
                        part[m][$i % 2] = _mm512_fmadd_ps(w, xm, part[m][$i % 2]);
                    }
                };
            }
            nibble!(0, 0);
            nibble!(1, 4);
            nibble!(2, 8);
            nibble!(3, 12);
            nibble!(4, 16);
            nibble!(5, 20);
            nibble!(6, 24);
            nibble!(7, 28);
            for m in 0..ROWS {
                total[m] = _mm512_fmadd_ps(_mm512_add_ps(part[m][0], part[m][1]), scale, total[m]);
            }
        }
        // The rest, 16 bytes at a time: the block's scale applied to the table once. Four
        // chains per row (a chunk's halves, a block's chunks in pairs).
        let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
        let chunk = |j: usize, scaled: __m512, acc: &mut [[__m512; 4]; ROWS], pair: usize| {
            let (high, low) = decode16(src.add(j), scaled);
            for m in 0..ROWS {
                let xm = x[m].add(2 * j);
                acc[m][2 * pair] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xm), acc[m][2 * pair]);
                acc[m][2 * pair + 1] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xm.add(16)), acc[m][2 * pair + 1]);
            }
        };
        for b in groups * GROUP_BYTES / block_bytes..blocks_per_row {
            let scaled = _mm512_mul_ps(table, _mm512_set1_ps(*row_scales.add(b)));
            let (mut j, end) = (b * block_bytes, (b + 1) * block_bytes);
            while j + 2 * CHUNK_BYTES <= end {
                chunk(j, scaled, &mut acc, 0);
                chunk(j + CHUNK_BYTES, scaled, &mut acc, 1);
                j += 2 * CHUNK_BYTES;
            }
            if j < end {
                chunk(j, scaled, &mut acc, 0);
            }
        }
        for (m, a) in acc.iter().enumerate() {
            let rest = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            *dst.add(r * out_stride + m) = _mm512_reduce_add_ps(_mm512_add_ps(total[m], rest));
        }
    }
}

/// [`super::fused_row_axpy`] on AVX-512.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL, and the slices must have the lengths
/// [`super::fused_row_axpy`] checks.
pub unsafe fn fused_row_axpy(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    coef: &[f32],
    acc_even: &mut [&mut [f32]],
    acc_odd: &mut [&mut [f32]],
) {
    by_rows!(coef.len(), row_axpy(table, bytes, scales, block_bytes, coef, acc_even, acc_odd))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_axpy<const ROWS: usize>(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    coef: &[f32],
    acc_even: &mut [&mut [f32]],
    acc_odd: &mut [&mut [f32]],
) {
    let table_v = _mm512_loadu_ps(table.as_ptr());
    let even: [*mut f32; ROWS] = std::array::from_fn(|m| acc_even[m].as_mut_ptr());
    let odd: [*mut f32; ROWS] = std::array::from_fn(|m| acc_odd[m].as_mut_ptr());
    let src = bytes.as_ptr();
    for (b, &scale) in scales.iter().enumerate() {
        // The block's scale folded into each row's coefficient: one multiply per block.
        let coef_v: [__m512; ROWS] = std::array::from_fn(|m| _mm512_set1_ps(coef[m] * scale));
        let end = (b + 1) * block_bytes;
        let mut j = b * block_bytes;
        while j + CHUNK_BYTES <= end {
            let (high, low) = decode16(src.add(j), table_v);
            for m in 0..ROWS {
                let e = even[m].add(j);
                _mm512_storeu_ps(e, _mm512_fmadd_ps(coef_v[m], high, _mm512_loadu_ps(e)));
                let o = odd[m].add(j);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(coef_v[m], low, _mm512_loadu_ps(o)));
            }
            j += CHUNK_BYTES;
        }
        for (i, &byte) in bytes[j..end].iter().enumerate() {
            let (hi, lo) = (table[(byte >> 4) as usize] * scale, table[(byte & 0x0f) as usize] * scale);
            for m in 0..ROWS {
                *even[m].add(j + i) += coef[m] * hi;
                *odd[m].add(j + i) += coef[m] * lo;
            }
        }
    }
}

/// [`super::dot`] on AVX-512: two chains of 16-lane fused multiply-adds, the tail in one
/// masked load (which reads nothing past the slices), one horizontal sum.
///
/// # Safety
/// The CPU must have AVX-512 F; `a` and `b` must have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (pa, pb, len) = (a.as_ptr(), b.as_ptr(), a.len());
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= len {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), s1);
        i += 32;
    }
    if i + 16 <= len {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        i += 16;
    }
    if i < len {
        let mask: __mmask16 = (1u16 << (len - i)) - 1;
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i)), s1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

/// [`super::dots`] on AVX-512, 16 rows at a time: each row's lane-wise products in one
/// register (an adapter's rank is usually 8-64: one to four fused multiply-adds), then one
/// tree of permutes and adds turns the 16 registers into the 16 sums, lane `i` row `i`
/// (30 permutes for 16 sums, where a horizontal sum per row takes 8 steps).
///
/// # Safety
/// The CPU must have AVX-512 F; `rows` must hold `out.len()` rows of `u.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dots(u: &[f32], rows: &[f32], out: &mut [f32]) {
    let r = u.len();
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let chunks = r.div_ceil(16);
    let tail: __mmask16 = if r.is_multiple_of(16) { 0xffff } else { (1u16 << (r % 16)) - 1 };
    for (block, out16) in out.chunks_mut(16).enumerate() {
        let mut p = [_mm512_setzero_ps(); 16];
        for (i, pi) in p.iter_mut().enumerate().take(out16.len()) {
            let row = rows.as_ptr().add((block * 16 + i) * r);
            for c in 0..chunks {
                let mask = if c + 1 == chunks { tail } else { 0xffff };
                let (uc, bc) =
                    (_mm512_maskz_loadu_ps(mask, u.as_ptr().add(16 * c)), _mm512_maskz_loadu_ps(mask, row.add(16 * c)));
                *pi = _mm512_fmadd_ps(uc, bc, *pi);
            }
        }
        // Each level adds neighbouring lanes of two registers: lanes 0-7 of the result hold
        // the first's pair sums, lanes 8-15 the second's, so after four levels lane i is row i.
        let mut width = 16;
        while width > 1 {
            for i in 0..width / 2 {
                let (a, b) = (p[2 * i], p[2 * i + 1]);
                p[i] = _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
            }
            width /= 2;
        }
        let mask: __mmask16 = if out16.len() == 16 { 0xffff } else { (1u16 << out16.len()) - 1 };
        _mm512_mask_storeu_ps(out16.as_mut_ptr(), mask, p[0]);
    }
}
