#![doc = include_str!("../README.md")]
#![no_std]

pub mod console;
pub mod cpu;
pub mod entry;
pub mod mem;
pub mod tables;
