//! What the guest is answered for each exit that is not about protecting a monitor: CPUID, MSRs,
//! port I/O, the hypercall ABI (with its benchmark marks), XSETBV, HLT and reflected exceptions.

pub mod bench;
mod cpuid;
pub mod exception;
mod hypercall;
pub mod io;
pub mod msr;
pub mod nmi;
pub mod xsetbv;

#[cfg(test)]
mod tests;
