use super::*;
use crate::simd::available;
use crate::testutil::Rng;
use half::{bf16, f16};

fn quantize(values: &[f32], blocksize: usize, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    let mut packed = vec![0xAAu8; values.len().div_ceil(2)];
    let mut absmax = vec![f32::NAN; values.len().div_ceil(blocksize)];
    quantize_4bit(values, blocksize, qt, &mut packed, &mut absmax).unwrap();
    (packed, absmax)
}

#[test]
fn reference_examples_pack_as_bitsandbytes_does() {
    let (packed, absmax) = quantize(&[1.0, -1.0], 64, QuantType::Nf4);
    assert_eq!(packed, vec![0xf0]);
    assert_eq!(absmax, vec![1.0]);
    let (packed, _) = quantize(&[1.0, -1.0, 0.5, -0.25], 64, QuantType::Fp4);
    assert_eq!(packed, vec![0x3b, 0x5f]);
}

#[test]
fn odd_length_pads_with_the_zero_code_and_all_zero_blocks_encode_zero() {
    let (packed, _) = quantize(&[0.5, -0.25, 1.0], 32, QuantType::Nf4);
    assert_eq!(packed[1] & 0x0f, 7);
    let mut values = vec![0.0f32; 64];
    values.extend([0.3f32, -0.9]);
    let (packed, absmax) = quantize(&values, 32, QuantType::Nf4);
    assert!(packed[..32].iter().all(|&b| b == 0x77));
    assert_eq!(absmax[0], 0.0, "a full all-zero block stores 0");
    let (_, absmax) = quantize(&[0.0f32; 40], 32, QuantType::Nf4);
    assert_eq!(absmax[1], 1e-38, "the short last block stores its clamped scale");
}

#[test]
fn round_trip_error_is_within_half_a_code_step() {
    let mut rng = Rng::new(10);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for &(n, blocksize) in &[(1usize, 32usize), (63, 32), (1000, 64), (4097, 128), (9000, 4096)] {
            let values = rng.floats(n, 3.0);
            let (packed, absmax) = quantize(&values, blocksize, qt);
            let weight = Packed4bit::new(&packed, &absmax, n, blocksize, qt).unwrap();
            let code = qt.code();
            let mut sorted = code.to_vec();
            sorted.sort_by(f32::total_cmp);
            let max_gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0.0f32, f32::max);
            for isa in available() {
                let mut out = vec![f32::NAN; n];
                dequantize_4bit(isa, &weight, 0, &mut out).unwrap();
                for (i, (&v, &d)) in values.iter().zip(&out).enumerate() {
                    let scale = absmax[i / blocksize];
                    assert!((v - d).abs() <= max_gap / 2.0 * scale + 1e-6, "{qt:?} n={n} i={i}: {v} vs {d}");
                }
            }
        }
    }
}

#[test]
fn dequantize_any_range_matches_elementwise_definition() {
    let mut rng = Rng::new(11);
    let n = 3 * 64 + 17;
    let values = rng.floats(n, 2.0);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let (packed, absmax) = quantize(&values, 64, qt);
        let weight = Packed4bit::new(&packed, &absmax, n, 64, qt).unwrap();
        for isa in available() {
            for (start, len) in [(0usize, n), (1, 10), (63, 3), (64, 64), (5, n - 5), (n - 1, 1), (7, 0)] {
                let mut out = vec![f32::NAN; len];
                dequantize_4bit(isa, &weight, start, &mut out).unwrap();
                for (j, &o) in out.iter().enumerate() {
                    assert_eq!(o.to_bits(), weight.value_at(start + j).to_bits(), "{} start {start} j {j}", isa.name());
                }
            }
            let mut halfs = vec![bf16::NAN; n];
            dequantize_4bit(isa, &weight, 0, &mut halfs).unwrap();
            assert!(halfs.iter().enumerate().all(|(i, h)| *h == bf16::from_f32(weight.value_at(i))));
            let mut halfs = vec![f16::NAN; n];
            dequantize_4bit(isa, &weight, 0, &mut halfs).unwrap();
            assert!(halfs.iter().enumerate().all(|(i, h)| *h == f16::from_f32(weight.value_at(i))));
        }
    }
}

#[test]
fn sixteen_bit_inputs_quantize_like_their_fp32_values() {
    let mut rng = Rng::new(12);
    let values: Vec<bf16> = rng.floats(333, 4.0).into_iter().map(bf16::from_f32).collect();
    let widened: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
    let mut packed = vec![0u8; 167];
    let mut absmax = vec![0.0f32; 6];
    quantize_4bit(&values, 64, QuantType::Nf4, &mut packed, &mut absmax).unwrap();
    assert_eq!((packed, absmax), quantize(&widened, 64, QuantType::Nf4));
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let mut packed = vec![0u8; 2];
    let mut absmax = vec![0.0f32; 1];
    assert!(quantize_4bit(&[1.0f32; 4], 48, QuantType::Nf4, &mut packed, &mut absmax).is_err());
    assert!(quantize_4bit(&[1.0f32; 5], 64, QuantType::Nf4, &mut packed, &mut absmax).is_err());
    assert!(Packed4bit::new(&packed, &absmax, 4, 64, QuantType::Nf4).is_ok());
    assert!(Packed4bit::new(&packed, &absmax, 5, 64, QuantType::Nf4).is_err());
    let weight = Packed4bit::new(&packed, &absmax, 4, 64, QuantType::Nf4).unwrap();
    assert!(dequantize_4bit(crate::simd::Isa::Scalar, &weight, 3, &mut [0.0f32; 2]).is_err());
    assert!(dequantize_4bit(crate::simd::Isa::Scalar, &weight, usize::MAX, &mut [0.0f32; 2]).is_err());
}

fn dynamic_like_map() -> Vec<f32> {
    let mut code: Vec<f32> = (0..256).map(|i| (i as f32 - 127.0) / 128.0).collect();
    code[0] = -1.0;
    code
}

#[test]
fn blockwise_8bit_round_trip_and_zero_blocks() {
    let mut rng = Rng::new(13);
    let code = dynamic_like_map();
    let values = rng.floats(700, 0.01);
    let mut q = vec![0u8; 700];
    let mut absmax = vec![0.0f32; 3];
    quantize_blockwise_8bit(&values, &code, 256, &mut q, &mut absmax).unwrap();
    let mut out = vec![f32::NAN; 700];
    dequantize_blockwise_8bit(&q, &code, &absmax, 256, 0.5, &mut out).unwrap();
    for (i, (&v, &o)) in values.iter().zip(&out).enumerate() {
        let scale = absmax[i / 256];
        assert!((v + 0.5 - o).abs() <= scale / 128.0 + 1e-6, "{i}: {v} {o}");
    }
    assert!(quantize_blockwise_8bit(&values, &code[..255], 256, &mut q, &mut absmax).is_err());
    let mut zeros = vec![0.0f32; 300];
    zeros[299] = 0.25;
    quantize_blockwise_8bit(&zeros, &code, 256, &mut q[..300], &mut absmax[..2]).unwrap();
    assert_eq!(absmax[0], 0.0);
    assert!(q[..256].iter().all(|&c| c == 0));
}
