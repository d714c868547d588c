//! The two 4-bit code books of bitsandbytes and the exact rule that maps a scaled value
//! to a code: nearest value, a value exactly on a midpoint going to the lower code.

use crate::error::{ensure, Error};

/// bitsandbytes' NormalFloat4 values, indexed by the 4-bit code. Written with the digits of
/// bitsandbytes' float64 table; each literal rounds to the f32 bitsandbytes stores.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' FP4 values (bit 3 is the sign; the magnitude bits are not monotonic).
/// Code 8, the "negative zero", decodes to +0.0 as in bitsandbytes' table.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// A code book as the fused kernels read it: its values, and the four byte planes of their
/// fp32 bit patterns (`byte_planes[p][c]` is byte `p` of `values[c]`) for kernels that look
/// codes up with byte shuffles; made at compile time, so no call rebuilds them.
#[derive(Debug)]
pub struct CodeBook {
    pub values: [f32; 16],
    pub byte_planes: [[u8; 16]; 4],
}

impl CodeBook {
    pub const fn new(values: [f32; 16]) -> Self {
        let mut byte_planes = [[0u8; 16]; 4];
        let mut c = 0;
        while c < 16 {
            let bytes = values[c].to_bits().to_le_bytes();
            let mut p = 0;
            while p < 4 {
                byte_planes[p][c] = bytes[p];
                p += 1;
            }
            c += 1;
        }
        CodeBook { values, byte_planes }
    }
}

pub static NF4_BOOK: CodeBook = CodeBook::new(NF4_CODE);
pub static FP4_BOOK: CodeBook = CodeBook::new(FP4_CODE);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::InvalidArgument(format!("quant_type must be 'nf4' or 'fp4', got {name:?}"))),
        }
    }

    pub fn code(self) -> &'static [f32; 16] {
        &self.book().values
    }

    pub fn book(self) -> &'static CodeBook {
        match self {
            QuantType::Nf4 => &NF4_BOOK,
            QuantType::Fp4 => &FP4_BOOK,
        }
    }

    /// The code of the value 0.0: what padding and all-zero blocks encode to.
    pub fn zero_code(self) -> u8 {
        match self {
            QuantType::Nf4 => 7,
            QuantType::Fp4 => 0,
        }
    }
}

/// Maps values in [-1, 1] to 4-bit codes with bitsandbytes' tie rule.
///
/// The code values are sorted once; a value's code is the sorted position given by the
/// number of midpoints strictly below it, mapped back to the code's index.
#[derive(Debug, Clone)]
pub struct Encoder4bit {
    midpoints: [f32; 15],
    sorted_to_code: [u8; 16],
}

impl Encoder4bit {
    pub fn new(quant_type: QuantType) -> Self {
        let code = quant_type.code();
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Equal values (FP4's +0.0 and -0.0) keep index order, as bitsandbytes' argsort does.
        order.sort_by(|&a, &b| {
            let (va, vb) = (code[a as usize], code[b as usize]);
            va.partial_cmp(&vb).expect("code values are finite").then(a.cmp(&b))
        });
        let midpoints = std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        Encoder4bit { midpoints, sorted_to_code: order }
    }

    #[inline]
    pub fn encode(&self, scaled: f32) -> u8 {
        let below = self.midpoints.iter().filter(|&&t| t < scaled).count();
        self.sorted_to_code[below]
    }
}

pub(crate) fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    ensure!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "blocksize must be a power of two from 32 to 4096, got {blocksize}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_planes_reassemble_every_code_value() {
        for book in [&NF4_BOOK, &FP4_BOOK] {
            for (c, value) in book.values.iter().enumerate() {
                let bytes = std::array::from_fn(|p| book.byte_planes[p][c]);
                assert_eq!(f32::from_le_bytes(bytes).to_bits(), value.to_bits(), "code {c}");
            }
        }
    }

    #[test]
    fn nf4_encodes_every_code_value_to_itself() {
        let enc = Encoder4bit::new(QuantType::Nf4);
        for (i, &v) in NF4_CODE.iter().enumerate() {
            assert_eq!(enc.encode(v) as usize, i);
        }
    }

    #[test]
    fn fp4_encodes_every_code_value_to_itself_except_the_second_zero() {
        let enc = Encoder4bit::new(QuantType::Fp4);
        for (i, &v) in FP4_CODE.iter().enumerate() {
            let expected = if i == 8 { 0 } else { i };
            assert_eq!(enc.encode(v) as usize, expected, "code {i}");
        }
    }

    #[test]
    fn midpoint_ties_go_to_the_lower_code() {
        let enc = Encoder4bit::new(QuantType::Nf4);
        let mid = (NF4_CODE[9] + NF4_CODE[10]) / 2.0;
        assert_eq!(enc.encode(mid), 9);
        assert_eq!(enc.encode(f32::from_bits(mid.to_bits() + 1)), 10);
    }
}
