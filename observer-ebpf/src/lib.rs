//! Library target: lets `observer` declare this crate as a build dependency,
//! so cargo rebuilds the loader when the kernel programs change.
#![no_std]
