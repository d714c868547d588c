//! The scalar kernels: the definition every SIMD kernel is tested against.

pub fn decode_pairs(table: &[f32; 16], bytes: &[u8], scale: f32, out: &mut [f32]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = table[(b >> 4) as usize] * scale;
        pair[1] = table[(b & 0x0f) as usize] * scale;
    }
}

pub fn fused_row_dot(
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    x_even: &[&[f32]],
    x_odd: &[&[f32]],
    out: &mut [f32],
) {
    for (m, o) in out.iter_mut().enumerate() {
        let mut total = 0.0f32;
        for (b, (block, &scale)) in bytes.chunks_exact(block_bytes).zip(scales).enumerate() {
            let base = b * block_bytes;
            let mut sum = 0.0f32;
            for (j, &byte) in block.iter().enumerate() {
                sum += table[(byte >> 4) as usize] * x_even[m][base + j];
                sum += table[(byte & 0x0f) as usize] * x_odd[m][base + j];
            }
            total += scale * sum;
        }
        *o = total;
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
