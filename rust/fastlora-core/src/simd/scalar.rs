//! The scalar kernels: the definition every SIMD kernel is tested against.

use half::bf16;

pub fn decode_pairs(table: &[f32; 16], bytes: &[u8], scale: f32, out: &mut [f32]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = table[(b >> 4) as usize] * scale;
        pair[1] = table[(b & 0x0f) as usize] * scale;
    }
}

pub fn decode_pairs_bf16(table: &[f32; 16], bytes: &[u8], scale: f32, out: &mut [bf16]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = bf16::from_f32(table[(b >> 4) as usize] * scale);
        pair[1] = bf16::from_f32(table[(b & 0x0f) as usize] * scale);
    }
}

pub fn decode_blocks(table: &[f32; 16], bytes: &[u8], scales: &[f32], block_bytes: usize, out: &mut [f32]) {
    for ((src, &scale), dst) in bytes.chunks(block_bytes).zip(scales).zip(out.chunks_mut(2 * block_bytes)) {
        decode_pairs(table, src, scale, dst);
    }
}

pub fn decode_blocks_bf16(table: &[f32; 16], bytes: &[u8], scales: &[f32], block_bytes: usize, out: &mut [bf16]) {
    for ((src, &scale), dst) in bytes.chunks(block_bytes).zip(scales).zip(out.chunks_mut(2 * block_bytes)) {
        decode_pairs_bf16(table, src, scale, dst);
    }
}

/// Activations in element order (the scalar [`super::dot_layout`]).
#[allow(clippy::too_many_arguments)]
pub fn fused_rows_dot(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    let blocks_per_row = row_bytes / block_bytes;
    for (r, row) in bytes.chunks_exact(row_bytes).enumerate() {
        let row_scales = &scales[r * blocks_per_row..(r + 1) * blocks_per_row];
        for (q, x) in xs.iter().enumerate() {
            let mut total = 0.0f32;
            for (b, (block, &scale)) in row.chunks_exact(block_bytes).zip(row_scales).enumerate() {
                let xb = &x[2 * b * block_bytes..];
                let mut sum = 0.0f32;
                for (j, &byte) in block.iter().enumerate() {
                    sum += table[(byte >> 4) as usize] * xb[2 * j];
                    sum += table[(byte & 0x0f) as usize] * xb[2 * j + 1];
                }
                total += scale * sum;
            }
            out[r * out_stride + q] = total;
        }
    }
}

pub fn fused_row_axpy(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    coef: &[f32],
    acc_even: &mut [&mut [f32]],
    acc_odd: &mut [&mut [f32]],
) {
    for (b, (block, &scale)) in bytes.chunks_exact(block_bytes).zip(scales).enumerate() {
        let base = b * block_bytes;
        for (j, &byte) in block.iter().enumerate() {
            let hi = table[(byte >> 4) as usize] * scale;
            let lo = table[(byte & 0x0f) as usize] * scale;
            for (m, &c) in coef.iter().enumerate() {
                acc_even[m][base + j] += c * hi;
                acc_odd[m][base + j] += c * lo;
            }
        }
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorize without reassociating.
    let mut acc = [0.0f32; 8];
    let whole = a.len() / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
