#![no_std]
#![deny(unsafe_code)]
#![doc = include_str!("../README.md")]

#[cfg(test)]
extern crate std;

mod arena;
mod bitmap;
mod caps;
mod controls;
mod error;
mod exit;
mod field;
mod qual;
mod segment;
mod vmexit;

pub use arena::{ArenaError, Entry, VmcsArena, VmcsId};
pub use bitmap::{IoBitmapPage, IoBitmaps, MsrBitmap, MsrOutOfRange, PortRangeError};
pub use caps::{VmxCapabilities, VmxFeatures, EPTP_LIST_ENTRIES};
pub use controls::{
    adjust_controls, ControlError, ControlKind, EntryControls, ExitControls, PinbasedControls,
    PrimaryControls, SecondaryControls, VmFuncControls,
};
pub use error::VmInstructionError;
pub use exit::{ExitReason, RawExitReason, EXIT_REASON_COUNT};
pub use field::{field_name, fields, FieldKind, FieldWidth, VmcsField, DUMP_FIELDS, DUMP_LEN};
pub use qual::{
    exception_has_error_code, CrAccessQualification, CrAccessType, EptViolationQualification, Gpr,
    InterruptionInfo, InterruptionType, IoQualification,
};
pub use segment::SegmentAccessRights;
pub use vmexit::{
    ExitInformation, Instruction, Vectored, VmExit, VmxInstruction, VmxInstructionInfo,
};
