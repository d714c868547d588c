//! The one error type of the crate: every public function validates its arguments and
//! reports misuse here instead of panicking, so no caller input can abort the process.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument has the wrong length or value; the string names it and says why.
    InvalidArgument(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

/// Returns `Err(InvalidArgument)` with a formatted message when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::InvalidArgument(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
