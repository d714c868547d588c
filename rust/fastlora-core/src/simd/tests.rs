use super::*;
use crate::codebook::{FP4_BOOK, FP4_CODE, NF4_BOOK, NF4_CODE};
use crate::testutil::{assert_close, Rng};

/// `len` values of `buffer` from its first 64-byte aligned one (where streaming stores go).
fn aligned_64<T>(buffer: &mut [T], len: usize) -> &mut [T] {
    let skip = buffer.as_ptr().align_offset(64);
    &mut buffer[skip..skip + len]
}

/// Per-block scalar decode: the definition of a run of blocks.
fn scalar_blocks(table: &[f32; 16], bytes: &[u8], scales: &[f32], block_bytes: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; 2 * bytes.len()];
    for ((src, &scale), dst) in bytes.chunks(block_bytes).zip(scales).zip(out.chunks_mut(2 * block_bytes)) {
        scalar::decode_pairs(table, src, scale, dst);
    }
    out
}

/// Runs of whole blocks, runs ending in a short block (a span's partly covered last block),
/// and a lone short block (its partly covered first block).
const RUNS: [(usize, usize); 7] = [(16, 0), (16, 16), (32, 100), (32, 7), (2048, 4100), (64, 31), (16, 512)];

#[test]
fn every_isa_decodes_like_scalar_bit_for_bit() {
    let mut rng = Rng::new(1);
    for table in [&NF4_CODE, &FP4_CODE] {
        for (block_bytes, len) in RUNS {
            let bytes = rng.bytes(len);
            let scales = rng.floats(len.div_ceil(block_bytes), 2.0);
            let expected = scalar_blocks(table, &bytes, &scales, block_bytes);
            for (isa, stream) in available().into_iter().flat_map(|isa| [(isa, false), (isa, true)]) {
                let mut buffer = vec![f32::NAN; 2 * len + 16];
                let out = aligned_64(&mut buffer, 2 * len);
                decode_blocks(isa, table, &bytes, &scales, block_bytes, out, stream);
                store_fence();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{} blocks of {block_bytes} bytes, {len} bytes, stream {stream}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn every_isa_decodes_to_bf16_as_half_rounds() {
    let mut rng = Rng::new(5);
    for table in [&NF4_CODE, &FP4_CODE] {
        for (block_bytes, len) in RUNS {
            let bytes = rng.bytes(len);
            // Scales whose products need rounding, one that overflows some to infinity, a NaN.
            let mut scales = rng.floats(len.div_ceil(block_bytes), 2.0);
            for (scale, special) in scales.iter_mut().zip([3.4e38, f32::NAN]) {
                *scale = special;
            }
            let expected: Vec<u16> = scalar_blocks(table, &bytes, &scales, block_bytes)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            for (isa, stream) in available().into_iter().flat_map(|isa| [(isa, false), (isa, true)]) {
                let mut buffer = vec![half::bf16::from_bits(0x7fbf); 2 * len + 32];
                let out = aligned_64(&mut buffer, 2 * len);
                decode_blocks_bf16(isa, table, &bytes, &scales, block_bytes, out, stream);
                store_fence();
                let got: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, expected, "{} blocks of {block_bytes} bytes, {len} bytes, stream {stream}", isa.name());
            }
        }
    }
}

#[test]
fn every_isa_dot_layout_is_a_permutation_of_each_chunk() {
    for isa in available() {
        let mut slots: Vec<usize> =
            (0..CHUNK_BYTES).flat_map(|j| [dot_slot(isa, j, false), dot_slot(isa, j, true)]).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..2 * CHUNK_BYTES).collect::<Vec<_>>(), "{}", isa.name());
    }
}

#[test]
fn every_isa_fused_dot_matches_the_plain_definition() {
    let mut rng = Rng::new(2);
    for book in [&NF4_BOOK, &FP4_BOOK] {
        for (block_bytes, blocks, weight_rows) in
            [(16usize, 1usize, 1usize), (16, 5, 2), (32, 3, 2), (32, 4, 3), (32, 9, 2), (64, 2, 5), (2048, 1, 3)]
        {
            let row_bytes = block_bytes * blocks;
            let bytes = rng.bytes(row_bytes * weight_rows);
            let scales = rng.floats(blocks * weight_rows, 2.0);
            let mut weights = vec![0.0f32; 2 * bytes.len()];
            for (b, &scale) in scales.iter().enumerate() {
                let range = b * block_bytes..(b + 1) * block_bytes;
                scalar::decode_pairs(
                    &book.values,
                    &bytes[range.clone()],
                    scale,
                    &mut weights[2 * range.start..2 * range.end],
                );
            }
            for rows in 1..=MAX_ROWS {
                let plain: Vec<Vec<f32>> = (0..rows).map(|_| rng.floats(2 * row_bytes, 1.0)).collect();
                // A stride wider than the group: the slots between groups stay untouched.
                let stride = rows + 1;
                let mut expected = vec![f32::NAN; weight_rows * stride];
                for r in 0..weight_rows {
                    for (q, x) in plain.iter().enumerate() {
                        expected[r * stride + q] = scalar::dot(x, &weights[2 * r * row_bytes..2 * (r + 1) * row_bytes]);
                    }
                }
                for isa in available() {
                    let laid: Vec<Vec<f32>> = plain.iter().map(|x| dot_layout(isa, x)).collect();
                    let xs: Vec<&[f32]> = laid.iter().map(|v| v.as_slice()).collect();
                    let mut out = vec![f32::NAN; weight_rows * stride];
                    fused_rows_dot(isa, book, &bytes, &scales, row_bytes, block_bytes, &xs, &mut out, stride);
                    for r in 0..weight_rows {
                        assert!(out[r * stride + rows].is_nan(), "{} wrote past its group", isa.name());
                        let (got, want) =
                            (&out[r * stride..r * stride + rows], &expected[r * stride..r * stride + rows]);
                        assert_close(got, want, 1e-4, 1e-3, isa.name());
                    }
                }
            }
        }
    }
}

#[test]
fn every_isa_fused_axpy_matches_scalar() {
    let mut rng = Rng::new(3);
    for table in [&NF4_CODE, &FP4_CODE] {
        for (block_bytes, blocks) in [(16usize, 2usize), (128, 1)] {
            let len = block_bytes * blocks;
            let bytes = rng.bytes(len);
            let scales = rng.floats(blocks, 2.0);
            for rows in 1..=MAX_ROWS {
                let coef = rng.floats(rows, 1.5);
                let start: Vec<Vec<f32>> = (0..2 * rows).map(|_| rng.floats(len, 1.0)).collect();
                let run = |isa: Option<Isa>| {
                    let mut acc = start.clone();
                    let (e, o) = acc.split_at_mut(rows);
                    let mut e: Vec<&mut [f32]> = e.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let mut o: Vec<&mut [f32]> = o.iter_mut().map(|v| v.as_mut_slice()).collect();
                    match isa {
                        None => scalar::fused_row_axpy(table, &bytes, &scales, block_bytes, &coef, &mut e, &mut o),
                        Some(isa) => fused_row_axpy(isa, table, &bytes, &scales, block_bytes, &coef, &mut e, &mut o),
                    }
                    acc.concat()
                };
                let expected = run(None);
                for isa in available() {
                    assert_close(&run(Some(isa)), &expected, 1e-5, 1e-5, isa.name());
                }
            }
        }
    }
}

#[test]
fn every_isa_dot_matches_the_f64_sum() {
    let mut rng = Rng::new(4);
    // Every tail length of both kernels, a rank-16 row, and a long one.
    for len in (0usize..=33).chain([48, 576, 1000]) {
        let a = rng.floats(len, 1.0);
        let b = rng.floats(len, 1.0);
        let expected: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        for isa in available() {
            let got = dot(isa, &a, &b) as f64;
            assert!((got - expected).abs() < 1e-4, "{isa:?} len {len}: {got} vs {expected}");
        }
    }
}

#[test]
fn the_isa_settings_cap_force_and_refuse() {
    assert_eq!(choose(None, false), Ok(detected()));
    assert_eq!(choose(Some(""), false), Ok(detected()));
    assert_eq!(choose(None, true), Ok(Isa::Scalar));
    for isa in available() {
        assert_eq!(choose(Some(isa.name()), false), Ok(isa));
        assert_eq!(choose(Some(isa.name()), true), Ok(Isa::Scalar));
    }
    let unknown = choose(Some("avx9"), false).unwrap_err();
    assert!(unknown.contains("FASTLORA_MAX_ISA=\"avx9\": expected one of scalar"), "{unknown}");
    for isa in Isa::all().into_iter().filter(|&isa| isa > detected()) {
        let lacking = choose(Some(isa.name()), false).unwrap_err();
        assert!(lacking.contains("this CPU does not have"), "{lacking}");
    }
}

#[test]
fn every_isa_dots_match_the_f64_sums() {
    let mut rng = Rng::new(5);
    // Ranks below, at and past one register; row counts below, at and past a block of 16.
    for r in [1usize, 7, 16, 17, 64] {
        for rows in [1usize, 15, 16, 33] {
            let u = rng.floats(r, 1.0);
            let b = rng.floats(rows * r, 1.0);
            for isa in available() {
                let mut out = vec![f32::NAN; rows];
                dots(isa, &u, &b, &mut out);
                for (i, &got) in out.iter().enumerate() {
                    let expected: f64 = (0..r).map(|t| u[t] as f64 * b[i * r + t] as f64).sum();
                    assert!((got as f64 - expected).abs() < 1e-4, "{isa:?} r={r} rows={rows} row {i}");
                }
            }
        }
    }
}
