//! fastlora-core: bitsandbytes-compatible 4-bit (NF4/FP4) blockwise quantization,
//! dequantization and fused 4-bit matmul kernels for CPUs.
//!
//! The crate holds no Python: it works on plain slices and is tested with `cargo test`.
//! The element layout is bitsandbytes' (see `format`): the weight is flattened row-major,
//! cut into blocks of `blocksize` elements that share one fp32 absmax, and two 4-bit codes
//! are packed per byte with the even element in the high nibble.
//!
//! Every entry point checks its slice lengths and returns [`Error`] instead of panicking,
//! and SIMD kernels are picked at run time (see [`simd`]), each with a scalar twin that
//! the tests compare it against.

pub mod codebook;
pub mod element;
pub mod error;
pub mod format;
pub mod gemm_bf16;
pub mod lora;
pub mod matmul;
pub mod parallel;
pub mod quantize;
pub mod simd;

pub use codebook::QuantType;
pub use element::Element;
pub use error::Error;
pub use format::Packed4bit;

#[cfg(test)]
mod testutil;
