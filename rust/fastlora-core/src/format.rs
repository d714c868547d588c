//! `Packed4bit`: a borrowed view of a bitsandbytes 4-bit tensor (packed codes plus one fp32
//! scale per block), validated once so the kernels can index it without further checks.

use crate::codebook::{check_blocksize, QuantType};
use crate::error::{ensure, Error};

#[derive(Debug, Clone, Copy)]
pub struct Packed4bit<'a> {
    /// Two codes per byte, element `2i` in the high nibble; `(numel + 1) / 2` bytes.
    pub packed: &'a [u8],
    /// One fp32 scale per block of `blocksize` consecutive elements (the last may be short).
    pub absmax: &'a [f32],
    pub numel: usize,
    pub blocksize: usize,
    pub quant_type: QuantType,
}

impl<'a> Packed4bit<'a> {
    pub fn new(
        packed: &'a [u8],
        absmax: &'a [f32],
        numel: usize,
        blocksize: usize,
        quant_type: QuantType,
    ) -> Result<Self, Error> {
        check_blocksize(blocksize)?;
        ensure!(
            packed.len() == numel.div_ceil(2),
            "packed holds {} bytes but {numel} elements need {}",
            packed.len(),
            numel.div_ceil(2)
        );
        ensure!(
            absmax.len() == numel.div_ceil(blocksize),
            "absmax holds {} scales but {numel} elements in blocks of {blocksize} need {}",
            absmax.len(),
            numel.div_ceil(blocksize)
        );
        Ok(Packed4bit { packed, absmax, numel, blocksize, quant_type })
    }

    /// The 4-bit code of element `i`.
    #[inline(always)]
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The dequantized value of element `i`: `code[nibble] * absmax[block]` in fp32.
    #[inline(always)]
    pub fn value_at(&self, i: usize) -> f32 {
        self.quant_type.code()[self.code_at(i) as usize] * self.absmax[i / self.blocksize]
    }

    /// A weight of shape `(rows, cols)` is "block aligned" when every row starts a block,
    /// which lets the fused kernels walk whole blocks (and whole bytes) per row.
    pub fn rows_are_block_aligned(&self, cols: usize) -> bool {
        cols.is_multiple_of(self.blocksize)
    }
}
