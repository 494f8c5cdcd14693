//! Where a guest kernel keeps what the monitor reads: its current-process pointer, the layout of a
//! process record, the names of its system calls. The monitor reads the guest's own structures
//! through these and takes nothing about the guest from its caller.

use ihmi_abi::guest_os::{process_layout, COMM_LEN};
use ihmi_addr::Gva;
use ihmi_paging::GuestPhysRead;

use crate::introspect::{IntrospectError, Introspector};

/// Which kernel family the profile describes (for system-call names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsFamily {
    /// ihmi's own test guest (`ihmi_abi::guest_os`).
    TestGuest,
}

/// How to find the parent's pid from a process record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentField {
    /// A `u32` pid stored in the record at this offset.
    Pid(u64),
}

/// Offsets and addresses of one guest kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsProfile {
    /// The kernel family.
    pub family: OsFamily,
    /// Address of the kernel global that points at the current process record (0 = none running).
    pub current_ptr: Gva,
    /// Offset of the `u32` pid.
    pub pid: u64,
    /// Where the parent is.
    pub parent: ParentField,
    /// Offset of the NUL-padded name of [`COMM_LEN`] bytes.
    pub comm: u64,
    /// Alignment every record address must have.
    pub record_align: u64,
}

/// What the monitor knows of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Parent's process id.
    pub ppid: u32,
    /// Name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

impl OsProfile {
    /// The test guest, whose current-process pointer is the kernel symbol `CURRENT_PROCESS` (L0 finds
    /// its address in the guest image's symbol table).
    #[must_use]
    pub const fn testguest(current_ptr: Gva) -> Self {
        Self {
            family: OsFamily::TestGuest,
            current_ptr,
            pid: process_layout::PID,
            parent: ParentField::Pid(process_layout::PPID),
            comm: process_layout::COMM,
            record_align: 8,
        }
    }

    /// The system call's name, where the profile knows it.
    #[must_use]
    pub const fn syscall_name(&self, nr: u64) -> Option<&'static str> {
        use ihmi_abi::guest_os::{SYS_EXIT, SYS_GETPID, SYS_SPAWN, SYS_WRITE};
        match self.family {
            OsFamily::TestGuest => match nr {
                SYS_WRITE => Some("write"),
                SYS_GETPID => Some("getpid"),
                SYS_SPAWN => Some("spawn"),
                SYS_EXIT => Some("exit"),
                _ => None,
            },
        }
    }

    /// The record of the running process, or `None` when the kernel runs none.
    pub fn current_process<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
    ) -> Result<Option<Gva>, IntrospectError> {
        let ptr = intro.read_u64(self.current_ptr)?;
        Ok((ptr != 0).then_some(Gva::new(ptr)))
    }

    /// Reads a process record. A misaligned address is refused before anything is read.
    pub fn read_process<M: GuestPhysRead>(
        &self,
        intro: &Introspector<'_, M>,
        record: Gva,
    ) -> Result<ProcessInfo, IntrospectError> {
        if !record.is_aligned(self.record_align) {
            return Err(IntrospectError::Misaligned(record));
        }
        let at = |off: u64| {
            record
                .checked_add(off)
                .ok_or(IntrospectError::Overflow(record))
        };
        let pid = intro.read_u32(at(self.pid)?)?;
        let ppid = match self.parent {
            ParentField::Pid(off) => intro.read_u32(at(off)?)?,
        };
        let mut comm = [0u8; COMM_LEN];
        intro.read_gva(at(self.comm)?, &mut comm)?;
        Ok(ProcessInfo { pid, ppid, comm })
    }
}
