//! Blockwise quantization to 4 bits and back, and the 8-bit blockwise quantization of the
//! scales themselves ("double quantization"), with bitsandbytes' CPU arithmetic so that
//! the bytes are identical: full blocks scale by a reciprocal then multiply, the short last
//! block divides, and an all-zero block's scale is clamped to 1e-38.

use half::bf16;

use crate::codebook::{check_blocksize, Encoder4bit, QuantType};
use crate::element::Element;
use crate::error::{ensure, Error};
use crate::format::Packed4bit;
use crate::parallel;
use crate::simd::{self, Isa};

/// Elements per parallel task: whole blocks, at least this many elements.
const TASK_ELEMENTS: usize = 1 << 15;
const MIN_SCALE: f32 = 1e-38;

fn blocks_per_task(blocksize: usize) -> usize {
    TASK_ELEMENTS.div_ceil(blocksize)
}

/// Quantizes `src` (any length) into `packed` (`(n + 1) / 2` bytes) and `absmax`
/// (one fp32 scale per block). Values must be finite; the caller checks that.
pub fn quantize_4bit<T: Element>(
    src: &[T],
    blocksize: usize,
    quant_type: QuantType,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    let n = src.len();
    ensure!(packed.len() == n.div_ceil(2), "packed must hold {} bytes, got {}", n.div_ceil(2), packed.len());
    ensure!(
        absmax.len() == n.div_ceil(blocksize),
        "absmax must hold {} scales, got {}",
        n.div_ceil(blocksize),
        absmax.len()
    );
    let encoder = Encoder4bit::new(quant_type);
    let task_blocks = blocks_per_task(blocksize);
    let task_elements = task_blocks * blocksize;
    parallel::for_each_chunk_mut2(packed, task_elements / 2, absmax, task_blocks, |t, bytes, scales| {
        let values = &src[t * task_elements..((t + 1) * task_elements).min(n)];
        let mut scaled = vec![0.0f32; blocksize];
        for ((block, scale), block_bytes) in
            values.chunks(blocksize).zip(scales.iter_mut()).zip(bytes.chunks_mut(blocksize / 2))
        {
            let scaled = &mut scaled[..block.len()];
            *scale = scale_block(block, scaled, block.len() < blocksize);
            for (byte, pair) in block_bytes.iter_mut().zip(scaled.chunks(2)) {
                let high = encoder.encode(pair[0]);
                let low = encoder.encode(pair.get(1).copied().unwrap_or(0.0));
                *byte = (high << 4) | low;
            }
        }
    });
    Ok(())
}

/// Writes the block's values scaled into [-1, 1] and returns the scale to store.
fn scale_block<T: Element>(block: &[T], scaled: &mut [f32], short_last_block: bool) -> f32 {
    T::widen_into(block, scaled);
    let absmax = scaled.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if short_last_block {
        // bitsandbytes divides in the short last block and stores the clamped scale.
        let stored = absmax.max(MIN_SCALE);
        scaled.iter_mut().for_each(|v| *v = (*v / stored).clamp(-1.0, 1.0));
        stored
    } else {
        let inverse = 1.0 / absmax.max(MIN_SCALE);
        scaled.iter_mut().for_each(|v| *v = (*v * inverse).clamp(-1.0, 1.0));
        absmax
    }
}

/// Dequantizes elements `start .. start + out.len()` of `weight` into `out`.
pub fn dequantize_4bit<T: Element>(
    isa: Isa,
    weight: &Packed4bit<'_>,
    start: usize,
    out: &mut [T],
) -> Result<(), Error> {
    ensure!(
        start.checked_add(out.len()).is_some_and(|end| end <= weight.numel),
        "elements {start}..{} are out of range for a tensor of {} elements",
        start.saturating_add(out.len()),
        weight.numel
    );
    parallel::for_each_chunk_mut(out, TASK_ELEMENTS, |t, chunk| {
        let chunk_start = start + t * TASK_ELEMENTS;
        // The output goes straight to memory: a dequantized weight or tile is larger than
        // the caches, and its reader (a GEMM) comes later.
        if let Some(values) = T::as_f32_mut(chunk) {
            decode_span(isa, weight, chunk_start, values, true);
            simd::store_fence();
        } else if let Some(values) = T::as_bf16_mut(chunk) {
            decode_span(isa, weight, chunk_start, values, true);
            simd::store_fence();
        } else {
            let mut values = vec![0.0f32; chunk.len()];
            decode_span(isa, weight, chunk_start, &mut values, false);
            T::narrow_from(&values, chunk);
        }
    });
    Ok(())
}

/// What [`decode_span`] decodes into: fp32, or bf16 rounded in the kernel.
pub(crate) trait Decoded: Copy {
    fn decode_blocks(isa: Isa, weight: &Packed4bit<'_>, bytes: &[u8], scales: &[f32], out: &mut [Self], stream: bool);
    fn from_value(value: f32) -> Self;
}

impl Decoded for f32 {
    fn decode_blocks(isa: Isa, weight: &Packed4bit<'_>, bytes: &[u8], scales: &[f32], out: &mut [f32], stream: bool) {
        simd::decode_blocks(isa, weight.quant_type.code(), bytes, scales, weight.blocksize / 2, out, stream);
    }
    fn from_value(value: f32) -> Self {
        value
    }
}

impl Decoded for bf16 {
    fn decode_blocks(isa: Isa, weight: &Packed4bit<'_>, bytes: &[u8], scales: &[f32], out: &mut [bf16], stream: bool) {
        simd::decode_blocks_bf16(isa, weight.quant_type.code(), bytes, scales, weight.blocksize / 2, out, stream);
    }
    fn from_value(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

/// Serially decodes elements `start .. start + out.len()`: a ragged first or last element
/// one at a time, the rest of a partly covered first block, then every further block in one
/// kernel call; `stream` as in [`simd::decode_blocks`].
pub(crate) fn decode_span<O: Decoded>(isa: Isa, weight: &Packed4bit<'_>, start: usize, out: &mut [O], stream: bool) {
    let blocksize = weight.blocksize;
    let end = start + out.len();
    let mut i = start;
    while i < end {
        // From inside a block, up to its end; from a block's start, through to `end`.
        let limit = if i.is_multiple_of(blocksize) { end } else { ((i / blocksize + 1) * blocksize).min(end) };
        let pairs = (limit - i) / 2;
        if i.is_multiple_of(2) && pairs > 0 {
            let (first_block, last_block) = (i / blocksize, (i + 2 * pairs - 1) / blocksize);
            let bytes = &weight.packed[i / 2..i / 2 + pairs];
            let scales = &weight.absmax[first_block..=last_block];
            O::decode_blocks(isa, weight, bytes, scales, &mut out[i - start..i - start + 2 * pairs], stream);
            i += 2 * pairs;
        } else {
            out[i - start] = O::from_value(weight.value_at(i));
            i += 1;
        }
    }
}

/// Points of the grid over [-1, 1] that bitsandbytes' CPU 8-bit quantizer snaps to.
const GRID_POINTS: usize = 65536;

/// bitsandbytes' 8-bit blockwise quantization (CPU semantics), used for the scales in
/// double quantization. Per block `absmax = max |x|`; each value is scaled by the
/// reciprocal, clamped to [-1, 1] and snapped to the nearest point of a 65536-point grid,
/// whose code is the number of `code` midpoints strictly below it. This is not always the
/// nearest code (within half a grid step of a midpoint), but it is bitsandbytes' byte.
/// An all-zero block stores absmax 0 and code 0.
pub fn quantize_blockwise_8bit(
    values: &[f32],
    code: &[f32],
    blocksize: usize,
    quantized: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    check_code_256(code)?;
    ensure!(blocksize > 0, "blocksize must be positive");
    ensure!(quantized.len() == values.len(), "quantized must hold {} bytes, got {}", values.len(), quantized.len());
    ensure!(
        absmax.len() == values.len().div_ceil(blocksize),
        "absmax must hold {} scales, got {}",
        values.len().div_ceil(blocksize),
        absmax.len()
    );
    let code_of_grid_point = grid_codes(code);
    let task_blocks = blocks_per_task(blocksize);
    let task_elements = task_blocks * blocksize;
    parallel::for_each_chunk_mut2(quantized, task_elements, absmax, task_blocks, |t, q_task, scales| {
        let start = t * task_elements;
        let blocks = values[start..start + q_task.len()].chunks(blocksize);
        for ((q, block), scale) in q_task.chunks_mut(blocksize).zip(blocks).zip(scales.iter_mut()) {
            *scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if *scale == 0.0 {
                q.fill(0);
                continue;
            }
            let inverse = 1.0 / *scale;
            for (qi, &v) in q.iter_mut().zip(block) {
                let normed = (v * inverse).clamp(-1.0, 1.0);
                let point = ((normed + 1.0) * 0.5 * (GRID_POINTS - 1) as f32 + 0.5) as usize;
                *qi = code_of_grid_point[point.min(GRID_POINTS - 1)];
            }
        }
    });
    Ok(())
}

/// For every grid point, the number of midpoints of the sorted `code` strictly below it.
fn grid_codes(code: &[f32]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    (0..GRID_POINTS)
        .map(|i| {
            let point = -1.0 + (2.0 * i as f32) / (GRID_POINTS - 1) as f32;
            midpoints.partition_point(|&m| m < point) as u8
        })
        .collect()
}

/// Inverse of [`quantize_blockwise_8bit`] plus the mean that double quantization removed:
/// `out[i] = code[q[i]] * absmax[i / blocksize] + offset`, rounded twice as torch does.
pub fn dequantize_blockwise_8bit(
    quantized: &[u8],
    code: &[f32],
    absmax: &[f32],
    blocksize: usize,
    offset: f32,
    out: &mut [f32],
) -> Result<(), Error> {
    check_code_256(code)?;
    ensure!(blocksize > 0, "blocksize must be positive");
    ensure!(out.len() == quantized.len(), "out must hold {} values, got {}", quantized.len(), out.len());
    ensure!(
        absmax.len() == quantized.len().div_ceil(blocksize),
        "absmax must hold {} scales, got {}",
        quantized.len().div_ceil(blocksize),
        absmax.len()
    );
    // As an array, a code's index needs no bounds check in the loop.
    let code: &[f32; 256] = code.try_into().expect("checked: 256 values");
    for ((o, q), &scale) in out.chunks_mut(blocksize).zip(quantized.chunks(blocksize)).zip(absmax) {
        for (oi, &qi) in o.iter_mut().zip(q) {
            *oi = code[qi as usize] * scale + offset;
        }
    }
    Ok(())
}

fn check_code_256(code: &[f32]) -> Result<(), Error> {
    ensure!(code.len() == 256, "code must hold 256 values, got {}", code.len());
    ensure!(code.windows(2).all(|w| w[0] <= w[1]), "code must be sorted ascending");
    Ok(())
}

#[cfg(test)]
mod tests;
