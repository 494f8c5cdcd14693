//! What L0 knows and changes of a Linux guest: its running task, read from outside (here), the
//! system-call gate it puts in front of the kernel's entry ([`gate`]) and the process-creation hook
//! ([`hooks`]).
//!
//! Reading a running Linux guest's state from outside, through the guest profile the host derived from
//! the kernel's own System.map and BTF: which task is running, its pid, name and parent. L0 uses it to
//! say (and the `linux-boot` verdict to check) which task ended the run; the monitors read the same
//! fields the same way.

use core::fmt;

pub mod gate;
pub mod hooks;

#[cfg(test)]
mod tests;

use ihmi_addr::Gva;
use ihmi_arch::msr::IA32_KERNEL_GSBASE;
use ihmi_paging::{Cr3, WalkError};
use ihmi_vmcs::fields::guest;

use crate::memory::GuestRamReader;
use crate::{cpl, Hypervisor, Platform, Vcpu};
/// Per-CPU symbols are offsets into the per-CPU area below this; kernel addresses are far above it.
const PER_CPU_LIMIT: u64 = 1 << 32;

/// One task, as the guest kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// Its `task_struct` address.
    pub task: u64,
    pub pid: u32,
    pub tgid: u32,
    /// The thread-group id of `real_parent`.
    pub ppid: u32,
    /// `comm`, NUL-padded.
    pub comm: [u8; 16],
}

impl fmt::Display for TaskInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        let comm = core::str::from_utf8(&self.comm[..len]).unwrap_or("?");
        write!(
            f,
            "pid {} (tgid {}) \"{comm}\", parent tgid {}, task_struct at {:#x}",
            self.pid, self.tgid, self.ppid, self.task
        )
    }
}

/// Why the running task could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// No guest profile was given.
    NoProfile,
    /// A guest address did not translate to guest RAM.
    Walk(WalkError),
    /// A field's size is not what the reader expects (the BTF says otherwise).
    FieldSize(&'static str),
}

impl From<WalkError> for TaskError {
    fn from(e: WalkError) -> Self {
        Self::Walk(e)
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoProfile => f.write_str("no guest profile"),
            Self::Walk(e) => write!(f, "guest memory: {e}"),
            Self::FieldSize(name) => write!(f, "task_struct.{name} has an unexpected size"),
        }
    }
}

/// The guest kernel's per-CPU base now: in user mode it waits in IA32_KERNEL_GS_BASE (SWAPGS swaps it
/// in on entry), in the kernel it is GS's.
pub fn percpu_base(vcpu: &mut impl Vcpu, platform: &mut impl Platform) -> u64 {
    if cpl(vcpu) == 3 {
        platform.read_msr(IA32_KERNEL_GSBASE)
    } else {
        vcpu.read(guest::GS_BASE)
    }
}

impl Hypervisor {
    /// The task the guest kernel has running now.
    pub fn current_linux_task(
        &self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
    ) -> Result<TaskInfo, TaskError> {
        let p = self.linux.as_ref().ok_or(TaskError::NoProfile)?;
        for (name, field, size) in [
            ("pid", p.pid, 4),
            ("tgid", p.tgid, 4),
            ("comm", p.comm, 16),
            ("real_parent", p.real_parent, 8),
        ] {
            if field.size != size {
                return Err(TaskError::FieldSize(name));
            }
        }
        let current = if p.current_task < PER_CPU_LIMIT {
            percpu_base(vcpu, platform).wrapping_add(p.current_task)
        } else {
            p.current_task
        };
        let cr3 = Cr3::new(p.kernel_pgd(vcpu.read(guest::CR3)));
        let reader = GuestRamReader {
            map: &self.memory,
            platform,
        };
        let read =
            |gva: u64, buf: &mut [u8]| ihmi_paging::read_virt(&reader, cr3, Gva::new(gva), buf);
        let u64_at = |gva: u64| -> Result<u64, WalkError> {
            let mut b = [0u8; 8];
            read(gva, &mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let u32_at = |gva: u64| -> Result<u32, WalkError> {
            let mut b = [0u8; 4];
            read(gva, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let task = u64_at(current)?;
        let parent = u64_at(task.wrapping_add(p.real_parent.offset))?;
        let mut comm = [0u8; 16];
        read(task.wrapping_add(p.comm.offset), &mut comm)?;
        Ok(TaskInfo {
            task,
            pid: u32_at(task.wrapping_add(p.pid.offset))?,
            tgid: u32_at(task.wrapping_add(p.tgid.offset))?,
            ppid: u32_at(parent.wrapping_add(p.tgid.offset))?,
            comm,
        })
    }
}
