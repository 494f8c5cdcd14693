//! Boot stage 2: the memory plan. L0 keeps its image, the boot information, the modules and a frame
//! pool; everything else the firmware calls RAM is the guest's (minus, later, the monitor's region);
//! a Linux guest also gets every address below 4 GiB that is neither RAM nor L0's, as devices.

use ihmi_addr::{Gpa, Hpa, HpaRange, LARGE_PAGE_SIZE};
use ihmi_hv::MemoryMap;

use crate::boot_info::{BootInfo, MAPPED_LIMIT};
use crate::error::LoadError;
use crate::frames::Pool;
use crate::log;

/// L0's frame pool: EPT tables, VMXON/VMCS regions, bitmaps.
const POOL_SIZE: u64 = 4 * 1024 * 1024;

/// The devices every PC has that a guest is given even without the rest of the machine: legacy
/// VGA, the I/O APIC, the local APIC.
const DEVICES: [HpaRange; 3] = [
    HpaRange::new(Hpa::new(0xa_0000), Hpa::new(0xc_0000)),
    HpaRange::new(Hpa::new(0xfec0_0000), Hpa::new(0xfec0_1000)),
    HpaRange::new(Hpa::new(0xfee0_0000), Hpa::new(0xfee0_1000)),
];

/// The guest's memory map and L0's pool.
pub struct MemoryPlan {
    pub memory: MemoryMap,
    pub frames: Pool,
}

/// Plans memory for the boot loader's map; `devices_below_4g` passes every gap through (a
/// commodity kernel owns the machine's devices and firmware tables); the pool keeps clear of
/// `keep_free` (where a multiboot kernel loads).
pub fn plan(
    boot: &mut BootInfo,
    devices_below_4g: bool,
    keep_free: Option<HpaRange>,
) -> Result<MemoryPlan, LoadError> {
    let mut taken = boot.owned;
    if let Some(r) = keep_free {
        taken.push(r).map_err(|_| LoadError::TooManyModules {
            max: crate::boot_info::MAX_OWNED - 3,
        })?;
    }
    let pool = ihmi_hv::memory::choose_pool(
        boot.available.as_slice(),
        taken.as_slice(),
        POOL_SIZE,
        LARGE_PAGE_SIZE,
    )
    .ok_or(LoadError::NoPool {
        mib: POOL_SIZE >> 20,
    })?;
    boot.owned
        .push(pool)
        .map_err(|_| LoadError::TooManyModules {
            max: crate::boot_info::MAX_OWNED - 3,
        })?;
    let mut memory = MemoryMap::build(boot.available.as_slice(), boot.owned.as_slice(), &DEVICES)?;
    if devices_below_4g {
        memory.fill_gaps_as_mmio(Gpa::new(MAPPED_LIMIT))?;
    }
    for (range, kind) in memory.regions() {
        log!(
            "memory: {:#011x}-{:#011x} {}",
            range.start.raw(),
            range.end.raw(),
            kind.name()
        );
    }
    let frames = Pool::new(pool).map_err(|_| LoadError::NoPool {
        mib: POOL_SIZE >> 20,
    })?;
    Ok(MemoryPlan { memory, frames })
}
