#![doc = include_str!("../README.md")]

#[path = "../../../core/hv/src/mock.rs"]
mod mock;

pub use mock::*;
