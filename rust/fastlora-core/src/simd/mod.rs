//! Run-time choice of the instruction set for the hot loops.
//!
//! Every kernel here has a scalar version (`scalar`) that is the definition, and an AVX2+FMA
//! (`avx2`) and an AVX-512 F+BW+VL (`avx512`) version that the tests compare against it.
//! [`active`] picks the widest set the CPU has once per process, capped by
//! `FASTLORA_MAX_ISA` (`scalar`, `avx2`, `avx512`: so a machine with a wider set also runs,
//! and CI tests, the narrower paths) or forced to scalar by `FASTLORA_FORCE_SCALAR=1`.
//! Callers pass the [`Isa`] explicitly so tests can run every set.

use std::sync::OnceLock;

use half::bf16;

use crate::codebook::CodeBook;

/// `$kernel::<R>(args)` for a group of `$rows` activation rows (1 to [`MAX_ROWS`]): the
/// SIMD kernels are made once per row count, so their accumulators stay in registers.
macro_rules! by_rows {
    ($rows:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            _ => $kernel::<4>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod avx512_bf16;
pub mod scalar;

/// The largest number of activation rows one fused kernel call handles at once.
pub const MAX_ROWS: usize = 4;

/// Ordered from narrowest to widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Every set this build has kernels for, narrowest first.
    pub fn all() -> Vec<Isa> {
        vec![
            Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512,
        ]
    }
}

/// The widest instruction set this CPU supports, ignoring `FASTLORA_FORCE_SCALAR`.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        return if avx512 { Isa::Avx512 } else { Isa::Avx2 };
    }
    Isa::Scalar
}

/// Whether the CPU multiplies bf16 natively and the kernels may use it ([`active`] is
/// AVX-512): then bf16 weight tiles are worth handing to torch's bf16 GEMM (oneDNN), which
/// on other CPUs widens them and runs slower than in fp32. AVX512-BF16 is the test: every
/// CPU with AMX-BF16 has it too, and AMX's detection is not stable Rust.
pub fn native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    if active() >= Isa::Avx512 {
        return is_x86_feature_detected!("avx512bf16");
    }
    false
}

/// Whether the CPU has AMX-BF16 tiles (CPUID leaf 7, EDX bit 22: `is_x86_feature_detected!`
/// has no stable name for it), which torch's bf16 GEMM (oneDNN) runs on.
pub fn amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX2, and on older ones reads zeros.
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        leaf7.edx & (1 << 22) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instruction set the settings ask for on this CPU: the widest it has, at most
/// `max_isa` (`FASTLORA_MAX_ISA`), scalar when `force_scalar`. A cap that names no set of
/// this build, or one the CPU lacks, is an error naming the value.
pub fn choose(max_isa: Option<&str>, force_scalar: bool) -> Result<Isa, String> {
    let widest = detected();
    let chosen = match max_isa.filter(|v| !v.is_empty()) {
        None => widest,
        Some(name) => {
            let names: Vec<&str> = Isa::all().into_iter().map(Isa::name).collect();
            let cap = Isa::all()
                .into_iter()
                .find(|isa| isa.name() == name)
                .ok_or_else(|| format!("FASTLORA_MAX_ISA={name:?}: expected one of {}", names.join(", ")))?;
            if cap > widest {
                return Err(format!(
                    "FASTLORA_MAX_ISA={name:?}: this CPU does not have {name} (its widest set is {})",
                    widest.name()
                ));
            }
            cap
        }
    };
    Ok(if force_scalar { Isa::Scalar } else { chosen })
}

/// [`choose`] from the process's environment, once.
pub fn configured() -> Result<Isa, String> {
    static CONFIGURED: OnceLock<Result<Isa, String>> = OnceLock::new();
    CONFIGURED
        .get_or_init(|| {
            let forced = std::env::var("FASTLORA_FORCE_SCALAR").is_ok_and(|v| !v.is_empty() && v != "0");
            choose(std::env::var("FASTLORA_MAX_ISA").ok().as_deref(), forced)
        })
        .clone()
}

/// The instruction set the kernels use in this process ([`configured`]; scalar when the
/// settings are invalid, which the Python binding refuses at import).
pub fn active() -> Isa {
    configured().unwrap_or(Isa::Scalar)
}

/// Every instruction set usable on this CPU, narrowest first (for tests that compare them).
pub fn available() -> Vec<Isa> {
    Isa::all().into_iter().filter(|&isa| isa <= detected()).collect()
}

/// Decodes `bytes` (two codes each, high nibble first) into `2 * bytes.len()` values
/// `table[code] * scales[b]`, where `bytes` is consecutive blocks of `block_bytes` bytes
/// (the last one possibly shorter) and `b` the block a byte is in. One call for a run of
/// blocks: a per-block call cost as much as the decode of a 64-element block. With `stream`,
/// AVX-512 writes an aligned `out` with non-temporal stores (for outputs too large to stay in
/// cache: a dequantized weight, which the writes would otherwise first read in); the caller
/// then calls [`store_fence`] before another thread reads `out`.
pub fn decode_blocks(
    isa: Isa,
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    out: &mut [f32],
    stream: bool,
) {
    check_blocks(bytes, scales, block_bytes, out.len());
    match isa {
        Isa::Scalar => scalar::decode_blocks(table, bytes, scales, block_bytes, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2` and `Avx512` are only used where `detected()` found them; the
        // lengths were checked above.
        Isa::Avx2 => unsafe { avx2::decode_blocks(table, bytes, scales, block_bytes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::decode_blocks(table, bytes, scales, block_bytes, out, stream) },
    }
}

/// [`decode_blocks`] rounded to bf16 (nearest, ties to even), without an fp32 copy in memory.
pub fn decode_blocks_bf16(
    isa: Isa,
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    out: &mut [bf16],
    stream: bool,
) {
    check_blocks(bytes, scales, block_bytes, out.len());
    match isa {
        Isa::Scalar => scalar::decode_blocks_bf16(table, bytes, scales, block_bytes, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `decode_blocks`.
        Isa::Avx512 => unsafe { avx512::decode_blocks_bf16(table, bytes, scales, block_bytes, out, stream) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `decode_blocks`.
        Isa::Avx2 => unsafe { avx2::decode_blocks_bf16(table, bytes, scales, block_bytes, out) },
    }
}

fn check_blocks(bytes: &[u8], scales: &[f32], block_bytes: usize, out_len: usize) {
    assert!(block_bytes > 0 && scales.len() == bytes.len().div_ceil(block_bytes));
    assert_eq!(out_len, 2 * bytes.len());
}

/// Orders the non-temporal stores of a `stream` decode before the stores that follow (the
/// parallel loop's join), so the threads that read the output see it.
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

/// How far ahead of their decode the fused dot kernels prefetch packed bytes: a weight read
/// after other work has left the caches otherwise waits on memory at every row (one-row
/// 11008x4096 right after a dense product of that shape on an Intel Xeon: AVX-512 3.0 ->
/// 1.6 ms, AVX2 5.4 -> 2.1 ms; 1-8 KiB measured alike, `benches/CPU_NOTES.md`).
const PREFETCH_BYTES: usize = 4096;

/// Packed bytes per chunk of the fused dot kernels (32 weights).
pub const CHUNK_BYTES: usize = 16;

/// Packed bytes per group of the AVX-512 fused dot: one 64-byte load, whose 16 lanes of 32
/// bits hold 8 codes each (128 weights).
pub const GROUP_BYTES: usize = 64;

/// Lays out an activation row (length a multiple of 32) for `isa`'s [`fused_rows_dot`], in
/// the order in which that set's decode produces weights: on AVX-512, each whole group of
/// 128 elements from the row's start by [`group_slot`], the rest (and on the other sets the
/// whole row) chunk by chunk of 32 elements by [`dot_slot`].
pub fn dot_layout(isa: Isa, x: &[f32]) -> Vec<f32> {
    assert_eq!(x.len() % (2 * CHUNK_BYTES), 0);
    let mut out = vec![0.0f32; x.len()];
    let grouped = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x.len() / (2 * GROUP_BYTES) * (2 * GROUP_BYTES),
        _ => 0,
    };
    let (group_out, chunk_out) = out.split_at_mut(grouped);
    for (g_out, g) in group_out.chunks_exact_mut(2 * GROUP_BYTES).zip(x.chunks_exact(2 * GROUP_BYTES)) {
        for j in 0..GROUP_BYTES {
            g_out[group_slot(j, false)] = g[2 * j];
            g_out[group_slot(j, true)] = g[2 * j + 1];
        }
    }
    for (c_out, chunk) in chunk_out.chunks_exact_mut(2 * CHUNK_BYTES).zip(x[grouped..].chunks_exact(2 * CHUNK_BYTES)) {
        for j in 0..CHUNK_BYTES {
            c_out[dot_slot(isa, j, false)] = chunk[2 * j];
            c_out[dot_slot(isa, j, true)] = chunk[2 * j + 1];
        }
    }
    out
}

/// Where [`dot_layout`] puts the element of byte `j` of an AVX-512 group: its low nibble (odd
/// element) when `low`, else its high nibble (even element). Byte `j` is byte `j % 4` of lane
/// `j / 4`; the kernel's `i`-th permute (the group shifted right by `4 i` bits) looks up
/// nibble `i` of every lane, so slot `16 i + lane`.
#[inline(always)]
pub fn group_slot(j: usize, low: bool) -> usize {
    let nibble = 2 * (j % 4) + usize::from(!low);
    16 * nibble + j / 4
}

/// Where [`dot_layout`] puts the element of byte `j` of a chunk: its low nibble (odd
/// element) when `low`, else its high nibble (even element). Scalar: element order. AVX2:
/// groups of 8 holding 4 odd elements then 4 even ones (its byte-shuffle decode). AVX-512
/// (past the row's whole groups): the 16 even elements, then the 16 odd ones (its two `vpermps`).
#[inline(always)]
pub fn dot_slot(isa: Isa, j: usize, low: bool) -> usize {
    match isa {
        Isa::Scalar => 2 * j + usize::from(low),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => 8 * (j / 4) + j % 4 + if low { 0 } else { 4 },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => j + if low { CHUNK_BYTES } else { 0 },
    }
}

/// Consecutive packed weight rows of `row_bytes` bytes each against up to [`MAX_ROWS`]
/// activation rows: for weight row `r` and activation row `q`,
/// `out[r * out_stride + q] = sum_b scales_r[b] * sum_{i in block b} book.values[code_i] * x_q[i]`,
/// with each `x_q` in `isa`'s [`dot_layout`]. `block_bytes` (blocksize / 2) is a multiple of
/// [`CHUNK_BYTES`] dividing `row_bytes`; `scales` holds every block's scale, row after row.
/// One call for many weight rows, since a row of a small layer (64 weights: one block) costs
/// less than a call's set-up.
#[allow(clippy::too_many_arguments)]
pub fn fused_rows_dot(
    isa: Isa,
    book: &CodeBook,
    bytes: &[u8],
    scales: &[f32],
    row_bytes: usize,
    block_bytes: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    let group = xs.len();
    assert!((1..=MAX_ROWS).contains(&group) && group <= out_stride);
    assert!(
        block_bytes.is_multiple_of(CHUNK_BYTES)
            && block_bytes > 0
            && row_bytes.is_multiple_of(block_bytes)
            && row_bytes > 0
    );
    assert!(bytes.len().is_multiple_of(row_bytes) && bytes.len() == scales.len() * block_bytes);
    let rows = bytes.len() / row_bytes;
    assert!(rows == 0 || out.len() >= (rows - 1) * out_stride + group);
    assert!(xs.iter().all(|x| x.len() >= 2 * row_bytes));
    match isa {
        Isa::Scalar => scalar::fused_rows_dot(&book.values, bytes, scales, row_bytes, block_bytes, xs, out, out_stride),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `decode_blocks`; slice lengths were checked above.
        Isa::Avx2 => unsafe {
            avx2::fused_rows_dot(&book.byte_planes, bytes, scales, row_bytes, block_bytes, xs, out, out_stride)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe {
            avx512::fused_rows_dot(&book.values, bytes, scales, row_bytes, block_bytes, xs, out, out_stride)
        },
    }
}

/// Adds one packed weight row, scaled, into up to [`MAX_ROWS`] accumulators:
/// `acc_even[m][j] += coef[m] * w[2j]`, `acc_odd[m][j] += coef[m] * w[2j + 1]` where
/// `w = table[code] * scales[block]`. The transpose of [`fused_rows_dot`].
#[allow(clippy::too_many_arguments)]
pub fn fused_row_axpy(
    isa: Isa,
    table: &[f32; 16],
    bytes: &[u8],
    scales: &[f32],
    block_bytes: usize,
    coef: &[f32],
    acc_even: &mut [&mut [f32]],
    acc_odd: &mut [&mut [f32]],
) {
    let rows = coef.len();
    assert!((1..=MAX_ROWS).contains(&rows) && acc_even.len() == rows && acc_odd.len() == rows);
    assert_eq!(bytes.len(), scales.len() * block_bytes);
    assert!(acc_even.iter().chain(acc_odd.iter()).all(|a| a.len() >= bytes.len()));
    match isa {
        Isa::Scalar => scalar::fused_row_axpy(table, bytes, scales, block_bytes, coef, acc_even, acc_odd),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `decode_blocks`; slice lengths were checked above.
        Isa::Avx2 => unsafe { avx2::fused_row_axpy(table, bytes, scales, block_bytes, coef, acc_even, acc_odd) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::fused_row_axpy(table, bytes, scales, block_bytes, coef, acc_even, acc_odd) },
    }
}

/// fp32 dot product of two equal-length slices on `isa`: the LoRA products' inner loop (a
/// rank-16 up-projection is one 16-long dot per output value, so the final horizontal sum
/// costs as much as the products) and the fallback paths'.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    match isa {
        Isa::Scalar => scalar::dot(a, b),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2` and `Avx512` are only used where `detected()` found them; the
        // lengths were checked above.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { avx512::dot(a, b) },
    }
}

/// `out[i] = dot(u, rows[i * r..(i + 1) * r])` for `r = u.len()`: the up-projection of a
/// LoRA adapter (`rows` its `B`), whose short rows make a dot per output value mostly
/// horizontal sum.
pub fn dots(isa: Isa, u: &[f32], rows: &[f32], out: &mut [f32]) {
    assert!(!u.is_empty() && rows.len() == u.len() * out.len(), "dots: rows must hold out.len() rows of u.len()");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx512` is only used where `detected()` found it; lengths were checked above.
        Isa::Avx512 => unsafe { avx512::dots(u, rows, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(u.len())) {
                *o = dot(isa, u, row);
            }
        }
    }
}

#[cfg(test)]
mod tests;
