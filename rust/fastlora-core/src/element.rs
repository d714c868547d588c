//! The activation and output element types: fp32, bf16 and fp16. Kernels compute in fp32;
//! 16-bit types are widened on load and rounded to nearest-even on store.

use half::{bf16, f16};

/// fp32 values, borrowed or widened (`widen`).
pub type Widened<'a> = std::borrow::Cow<'a, [f32]>;

/// `v` as fp32: borrowed when it already is, else widened into a new buffer.
pub fn widen<T: Element>(v: &[T]) -> Widened<'_> {
    match T::as_f32(v) {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => {
            let mut out = vec![0.0f32; v.len()];
            T::widen_into(v, &mut out);
            std::borrow::Cow::Owned(out)
        }
    }
}

pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;

    /// Widens a slice into an fp32 buffer of the same length.
    fn widen_into(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// The slice itself when this type is fp32, so fp32 inputs are used without a copy.
    fn as_f32(_values: &[Self]) -> Option<&[f32]> {
        None
    }

    /// The slice itself when this type is fp32, so fp32 outputs are written in place.
    fn as_f32_mut(_values: &mut [Self]) -> Option<&mut [f32]> {
        None
    }

    /// The slice itself when this type is bf16, so bf16 outputs are decoded in place.
    fn as_bf16_mut(_values: &mut [Self]) -> Option<&mut [bf16]> {
        None
    }

    /// Rounds an fp32 slice into a slice of this type of the same length.
    fn narrow_from(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn widen_into(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]> {
        Some(values)
    }
    fn narrow_from(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn as_bf16_mut(values: &mut [Self]) -> Option<&mut [bf16]> {
        Some(values)
    }
    fn widen_into(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn narrow_from(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn widen_into(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn narrow_from(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}
