#![no_std]
// This file exists so that the crate has a library target for tooling.
