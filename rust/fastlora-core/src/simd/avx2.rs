//! AVX2+FMA kernels. A byte's two codes become fp32 values through two 8-entry
//! `vpermps` table lookups and a blend on the code's top bit: exact code-book values,
//! accumulated in fp32, so results agree with the scalar kernels to float rounding.
//!
//! Callers (`simd::*`) check slice lengths and that the CPU has AVX2 and FMA.

use std::arch::x86_64::*;

use half::bf16;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_tables(table: &[f32; 16]) -> (__m256, __m256) {
    (_mm256_loadu_ps(table.as_ptr()), _mm256_loadu_ps(table.as_ptr().add(8)))
}

/// Decodes 8 packed bytes into the code values of their high nibbles (elements 2j) and
/// of their low nibbles (elements 2j+1).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode8(ptr: *const u8, low_table: __m256, high_table: __m256) -> (__m256, __m256) {
    let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ptr as *const __m128i));
    // vpermps reads the low 3 bits of each index; the code's bit 3 picks the table half.
    let high_codes = _mm256_srli_epi32::<4>(bytes);
    let high = _mm256_blendv_ps(
        _mm256_permutevar8x32_ps(low_table, high_codes),
        _mm256_permutevar8x32_ps(high_table, high_codes),
        _mm256_castsi256_ps(_mm256_slli_epi32::<24>(bytes)),
    );
    let low = _mm256_blendv_ps(
        _mm256_permutevar8x32_ps(low_table, bytes),
        _mm256_permutevar8x32_ps(high_table, bytes),
        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(bytes)),
    );
    (high, low)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// [`super::decode_blocks`] on AVX2 (fp32; no streaming stores: not measured on an AVX2 CPU).
///
/// # Safety
/// The CPU must have AVX2 and FMA, and the slices must have the lengths
/// [`super::decode_blocks`] checks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_blocks(table: &[f32; 16], bytes: &[u8], scales: &[f32], block_bytes: usize, out: &mut [f32]) {
    for ((src, &scale), dst) in bytes.chunks(block_bytes).zip(scales).zip(out.chunks_mut(2 * block_bytes)) {
        decode_pairs(table, src, scale, dst);
    }
}

/// One block of [`decode_blocks`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_pairs(table: &[f32; 16], bytes: &[u8], scale: f32, out: &mut [f32]) {
    let (low_table, high_table) = load_tables(table);
    let scale_v = _mm256_set1_ps(scale);
    let whole = bytes.len() / 8 * 8;
    let src = bytes.as_ptr();
    let dst = out.as_mut_ptr();
    let mut j = 0;
    while j < whole {
        let (high, low) = decode8(src.add(j), low_table, high_table);
        let high = _mm256_mul_ps(high, scale_v);
        let low = _mm256_mul_ps(low, scale_v);
        // Interleave back to element order: h0 l0 h1 l1 ... h7 l7.
        let a = _mm256_unpacklo_ps(high, low);
        let b = _mm256_unpackhi_ps(high, low);
        _mm256_storeu_ps(dst.add(2 * j), _mm256_permute2f128_ps::<0x20>(a, b));
        _mm256_storeu_ps(dst.add(2 * j + 8), _mm256_permute2f128_ps::<0x31>(a, b));
        j += 8;
    }
    super::scalar::decode_pairs(table, &bytes[whole..], scale, &mut out[2 * whole..]);
}

/// fp32 lanes rounded to bf16 (nearest, ties to even; a NaN stays a quiet NaN), as
/// `half::bf16::from_f32` rounds, each in the upper 16 bits of its 32-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_to_bf16_high(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

/// The 16-entry integer table `(low, high)` looked up at the low 4 bits of each lane of
/// `codes`, whose bit 3 is also in the lane's sign bit `top`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lookup16(table: (__m256i, __m256i), codes: __m256i, top: __m256i) -> __m256i {
    _mm256_blendv_epi8(
        _mm256_permutevar8x32_epi32(table.0, codes),
        _mm256_permutevar8x32_epi32(table.1, codes),
        _mm256_srai_epi32::<31>(top),
    )
}

/// [`super::decode_blocks_bf16`] on AVX2, as on AVX-512: each block's 16 products
/// `table[code] * scale` are rounded to bf16 once, into a table of each value in the low
/// half of its 32-bit lane (for high nibbles, the even elements) and one in the high half
/// (low nibbles); the two lookups of 8 bytes OR into 16 bf16 values in element order.
///
/// # Safety
/// As [`decode_blocks`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_blocks_bf16(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    out: &mut [bf16],
) {
    let (low_table, high_table) = load_tables(table);
    let high_half = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr() as *mut __m256i);
    for (b, &scale) in scales.iter().enumerate() {
        let scale_v = _mm256_set1_ps(scale);
        let rounded = (
            round_to_bf16_high(_mm256_mul_ps(low_table, scale_v)),
            round_to_bf16_high(_mm256_mul_ps(high_table, scale_v)),
        );
        let even = (_mm256_srli_epi32::<16>(rounded.0), _mm256_srli_epi32::<16>(rounded.1));
        let odd = (_mm256_and_si256(rounded.0, high_half), _mm256_and_si256(rounded.1, high_half));
        let end = ((b + 1) * block_bytes).min(bytes.len());
        let mut j = b * block_bytes;
        while j + 8 <= end {
            let codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.add(j) as *const __m128i));
            let pairs = _mm256_or_si256(
                lookup16(even, _mm256_srli_epi32::<4>(codes), _mm256_slli_epi32::<24>(codes)),
                lookup16(odd, codes, _mm256_slli_epi32::<28>(codes)),
            );
            // 8 bytes, 16 bf16 values: the 32 bytes at element 2j.
            _mm256_storeu_si256(dst.byte_add(4 * j), pairs);
            j += 8;
        }
        if j < end {
            super::scalar::decode_pairs_bf16(table, &bytes[j..end], scale, &mut out[2 * j..2 * end]);
        }
    }
}

/// A code book's byte planes (`CodeBook::byte_planes`) as `vpshufb` tables, each repeated
/// in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane_registers(byte_planes: &[[u8; 16]; 4]) -> [__m256i; 4] {
    std::array::from_fn(|p| _mm256_broadcastsi128_si256(_mm_loadu_si128(byte_planes[p].as_ptr() as *const __m128i)))
}

/// Decodes 16 packed bytes (32 weights) into four vectors of exact code values, in
/// [`super::dot_layout`] order: each 128-bit lane of a vector holds 4 weights, low lane
/// the low nibbles (odd elements), high lane the high nibbles (even elements).
/// Byte shuffles (two per cycle) replace the lane-crossing permutes of `decode8`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode32(ptr: *const u8, planes: &[__m256i; 4]) -> [__m256; 4] {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(ptr as *const __m128i));
    let codes =
        _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0f));
    let b0 = _mm256_shuffle_epi8(planes[0], codes);
    let b1 = _mm256_shuffle_epi8(planes[1], codes);
    let b2 = _mm256_shuffle_epi8(planes[2], codes);
    let b3 = _mm256_shuffle_epi8(planes[3], codes);
    let low01 = _mm256_unpacklo_epi8(b0, b1);
    let high01 = _mm256_unpackhi_epi8(b0, b1);
    let low23 = _mm256_unpacklo_epi8(b2, b3);
    let high23 = _mm256_unpackhi_epi8(b2, b3);
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23)),
    ]
}

/// [`super::fused_rows_dot`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA, and the slices must have the lengths
/// [`super::fused_rows_dot`] checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn fused_rows_dot(
    byte_planes: &[[u8; 16]; 4],
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    by_rows!(xs.len(), rows_dot(byte_planes, bytes, scales, row_bytes, block_bytes, xs, out, out_stride))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dot<const ROWS: usize>(
    byte_planes: &[[u8; 16]; 4],
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    let planes = plane_registers(byte_planes);
    let x: [*const f32; ROWS] = std::array::from_fn(|m| xs[m].as_ptr());
    let blocks_per_row = row_bytes / block_bytes;
    let dst = out.as_mut_ptr();
    for r in 0..bytes.len() / row_bytes {
        let src = bytes.as_ptr().add(r * row_bytes);
        let row_scales = scales.as_ptr().add(r * blocks_per_row);
        let mut total = [_mm256_setzero_ps(); ROWS];
        for b in 0..blocks_per_row {
            // Two chains per row hide the FMA latency.
            let mut acc_a = [_mm256_setzero_ps(); ROWS];
            let mut acc_b = [_mm256_setzero_ps(); ROWS];
            let start = b * block_bytes;
            let mut j = start;
            while j < start + block_bytes {
                // Past the last row this names memory that is not ours: a prefetch never faults.
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(j + super::PREFETCH_BYTES) as *const i8);
                let w = decode32(src.add(j), &planes);
                for m in 0..ROWS {
                    let xm = x[m].add(2 * j);
                    acc_a[m] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xm), acc_a[m]);
                    acc_b[m] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm.add(8)), acc_b[m]);
                    acc_a[m] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm.add(16)), acc_a[m]);
                    acc_b[m] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm.add(24)), acc_b[m]);
                }
                j += super::CHUNK_BYTES;
            }
            let scale_v = _mm256_set1_ps(*row_scales.add(b));
            for m in 0..ROWS {
                total[m] = _mm256_fmadd_ps(_mm256_add_ps(acc_a[m], acc_b[m]), scale_v, total[m]);
            }
        }
        for (m, &sum) in total.iter().enumerate() {
            *dst.add(r * out_stride + m) = horizontal_sum(sum);
        }
    }
}

/// [`super::fused_row_axpy`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA, and the slices must have the lengths
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

#[target_feature(enable = "avx2,fma")]
unsafe fn row_axpy<const ROWS: usize>(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    coef: &[f32],
    acc_even: &mut [&mut [f32]],
    acc_odd: &mut [&mut [f32]],
) {
    let (low_table, high_table) = load_tables(table);
    let even: [*mut f32; ROWS] = std::array::from_fn(|m| acc_even[m].as_mut_ptr());
    let odd: [*mut f32; ROWS] = std::array::from_fn(|m| acc_odd[m].as_mut_ptr());
    let coef_v: [__m256; ROWS] = std::array::from_fn(|m| _mm256_set1_ps(coef[m]));
    let src = bytes.as_ptr();
    for (b, &scale) in scales.iter().enumerate() {
        let scale_v = _mm256_set1_ps(scale);
        let start = b * block_bytes;
        let mut j = start;
        while j < start + block_bytes {
            let (high, low) = decode8(src.add(j), low_table, high_table);
            let high = _mm256_mul_ps(high, scale_v);
            let low = _mm256_mul_ps(low, scale_v);
            for m in 0..ROWS {
                let e = even[m].add(j);
                _mm256_storeu_ps(e, _mm256_fmadd_ps(coef_v[m], high, _mm256_loadu_ps(e)));
                let o = odd[m].add(j);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(coef_v[m], low, _mm256_loadu_ps(o)));
            }
            j += 8;
        }
    }
}

/// [`super::dot`] on AVX2: two chains of 8-lane fused multiply-adds, a scalar tail, one
/// horizontal sum.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` and `b` must have the same length.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (pa, pb, len) = (a.as_ptr(), b.as_ptr(), a.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= len {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
        i += 16;
    }
    if i + 8 <= len {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let s = _mm256_add_ps(s0, s1);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    let tail: f32 = a[i..].iter().zip(&b[i..]).map(|(x, y)| x * y).sum();
    _mm_cvtss_f32(s) + tail
}
