//! VMCS12: the VMCS the guest hypervisor (L1) manages, as L0 keeps it. Its values live in L0's
//! memory, never in the guest's VMCS region, so the guest cannot change them between L0's checks and
//! their use (the double fetch of CVE-2021-29657 in KVM's nested SVM is the warning); the region holds
//! the revision identifier, and L0's copy of the values once VMCLEAR (or eviction from L0's cache)
//! writes them back, which the next VMPTRLD reads again.
//!
//! Fields are those `ihmi_vmcs` names (`DUMP_FIELDS`: each 64-bit field by its FULL encoding, its
//! HIGH encoding reaching bits 63:32), read and written with their width (SDM 25.11.2).

use ihmi_addr::Gpa;
use ihmi_vmcs::{FieldKind, FieldWidth, VmcsField, DUMP_FIELDS, DUMP_LEN};

/// VMCS12's VM-instruction error field, where VMfailValid puts its number.
pub const VM_INSTRUCTION_ERROR: VmcsField = ihmi_vmcs::fields::ro::VM_INSTRUCTION_ERROR;

/// How many fields a VMCS12 holds.
pub const FIELDS: usize = DUMP_LEN;

/// Where L0's copy of a VMCS12 goes in the guest's region when it leaves L0's cache, after the
/// revision identifier and the abort indicator: a marker, the launch state, the values.
pub const SAVED_AT: usize = 8;
/// "IHMIVM12": the region holds a copy L0 wrote.
pub const SAVED_MAGIC: u64 = 0x3231_4d56_494d_4849;
/// Bytes of a saved copy.
pub const SAVED_LEN: usize = 16 + 8 * FIELDS;
const _: () = assert!(SAVED_AT + SAVED_LEN <= 4096);

/// Why VMREAD or VMWRITE refused a field (SDM 31.4, error numbers 12 and 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldError {
    /// The encoding names no field L0 keeps.
    Unsupported,
    /// VMWRITE of a read-only (VM-exit information) field.
    ReadOnly,
}

/// One VMCS12's values and launch state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vmcs12 {
    values: [u64; FIELDS],
    /// Launched (VMRESUME) or clear (VMLAUNCH).
    pub launched: bool,
}

impl Default for Vmcs12 {
    fn default() -> Self {
        Self {
            values: [0; FIELDS],
            launched: false,
        }
    }
}

/// The slot of `field` (or, for a HIGH encoding, of its FULL field), and whether it is the HIGH half.
fn slot(field: VmcsField) -> Option<(usize, bool)> {
    if !field.is_well_formed() {
        return None;
    }
    let high = field.is_high();
    let full = if high {
        VmcsField::new(field.raw() & !1)
    } else {
        field
    };
    DUMP_FIELDS
        .iter()
        .position(|&f| f == full)
        .map(|i| (i, high))
}

impl Vmcs12 {
    /// VMREAD: the value, cut to the field's width (a HIGH encoding reads bits 63:32).
    pub fn read(&self, field: VmcsField) -> Result<u64, FieldError> {
        let (i, high) = slot(field).ok_or(FieldError::Unsupported)?;
        let v = self.values[i];
        Ok(match (high, field.width()) {
            (true, _) => v >> 32,
            (false, FieldWidth::Bits16) => v & 0xffff,
            (false, FieldWidth::Bits32) => v & 0xffff_ffff,
            (false, FieldWidth::Bits64 | FieldWidth::Natural) => v,
        })
    }

    /// VMWRITE: the value cut to the field's width (a HIGH encoding writes bits 63:32 only). The
    /// guest may not write VM-exit information; L0 does, through [`Vmcs12::set`].
    pub fn write(&mut self, field: VmcsField, value: u64) -> Result<(), FieldError> {
        if slot(field).is_some() && field.kind() == FieldKind::ReadOnly {
            return Err(FieldError::ReadOnly);
        }
        self.set(field, value)
    }

    /// Writes any field, VM-exit information included (L0's own writes).
    pub fn set(&mut self, field: VmcsField, value: u64) -> Result<(), FieldError> {
        let (i, high) = slot(field).ok_or(FieldError::Unsupported)?;
        let old = self.values[i];
        self.values[i] = match (high, field.width()) {
            (true, _) => (old & 0xffff_ffff) | (value << 32),
            (false, FieldWidth::Bits16) => value & 0xffff,
            (false, FieldWidth::Bits32) => value & 0xffff_ffff,
            (false, FieldWidth::Bits64 | FieldWidth::Natural) => value,
        };
        Ok(())
    }

    /// The copy L0 writes into the guest's region at [`SAVED_AT`].
    #[must_use]
    pub fn save(&self) -> [u8; SAVED_LEN] {
        let mut out = [0u8; SAVED_LEN];
        out[..8].copy_from_slice(&SAVED_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&u64::from(self.launched).to_le_bytes());
        for (chunk, v) in out[16..].chunks_exact_mut(8).zip(self.values) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// A VMCS12 from what a region holds at [`SAVED_AT`]: L0's copy if it wrote one (the guest may
    /// have changed it since: it is data the guest could have written with VMWRITE anyway, and every
    /// VM entry checks it), else a clear VMCS with every field 0.
    #[must_use]
    pub fn load(saved: &[u8; SAVED_LEN]) -> Self {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&saved[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if word(0) != SAVED_MAGIC {
            return Self::default();
        }
        let mut v = Self {
            launched: word(8) & 1 != 0,
            ..Self::default()
        };
        for (i, slot) in v.values.iter_mut().enumerate() {
            *slot = word(16 + 8 * i);
        }
        v
    }
}

/// Slots in L0's cache of VMCS12s.
pub const CACHED: usize = 4;

/// The VMCS12s L0 holds, by the guest-physical address of their regions; the least recently used
/// one goes back to its region when a fifth is loaded.
#[derive(Clone, Debug, Default)]
pub struct Vmcs12Cache {
    entries: [Option<(Gpa, Vmcs12, u64)>; CACHED],
    clock: u64,
}

impl Vmcs12Cache {
    /// The VMCS12 of the region at `gpa`, if cached (and marks it used).
    pub fn get_mut(&mut self, gpa: Gpa) -> Option<&mut Vmcs12> {
        self.clock += 1;
        let clock = self.clock;
        self.entries
            .iter_mut()
            .flatten()
            .find(|(g, ..)| *g == gpa)
            .map(|(_, v, used)| {
                *used = clock;
                v
            })
    }

    /// Takes the VMCS12 of the region at `gpa` out of the cache.
    pub fn take(&mut self, gpa: Gpa) -> Option<Vmcs12> {
        self.entries
            .iter_mut()
            .find(|e| e.as_ref().is_some_and(|(g, ..)| *g == gpa))
            .and_then(Option::take)
            .map(|(_, v, _)| v)
    }

    /// Puts `vmcs` in, for the region at `gpa`; returns the entry it replaced to make room (the least
    /// recently used), for its region.
    pub fn insert(&mut self, gpa: Gpa, vmcs: Vmcs12) -> Option<(Gpa, Vmcs12)> {
        self.clock += 1;
        let at = match self.entries.iter().position(Option::is_none) {
            Some(free) => free,
            None => self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.as_ref().map_or(0, |(.., used)| *used))
                .map_or(0, |(i, _)| i),
        };
        self.entries[at]
            .replace((gpa, vmcs, self.clock))
            .map(|(g, v, _)| (g, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ihmi_vmcs::fields::{control, guest, host, ro};

    #[test]
    fn fields_keep_their_width_and_read_only_ones_refuse_the_guest() {
        let mut v = Vmcs12::default();
        assert_eq!(FIELDS, DUMP_FIELDS.len());
        v.write(guest::CS_SELECTOR, 0xdead_beef).unwrap();
        assert_eq!(v.read(guest::CS_SELECTOR), Ok(0xbeef));
        v.write(control::PINBASED_EXEC_CONTROLS, u64::MAX).unwrap();
        assert_eq!(v.read(control::PINBASED_EXEC_CONTROLS), Ok(0xffff_ffff));
        v.write(host::RIP, u64::MAX).unwrap();
        assert_eq!(v.read(host::RIP), Ok(u64::MAX));
        // A 64-bit field: FULL is all of it, HIGH bits 63:32, and writing HIGH keeps bits 31:0.
        v.write(control::EPTP_FULL, 0x1111_2222_3333_4444).unwrap();
        assert_eq!(v.read(control::EPTP_HIGH), Ok(0x1111_2222));
        v.write(control::EPTP_HIGH, 0x5555_6666).unwrap();
        assert_eq!(v.read(control::EPTP_FULL), Ok(0x5555_6666_3333_4444));
        // VM-exit information: read-only to the guest, written by L0.
        assert_eq!(v.write(ro::EXIT_REASON, 1), Err(FieldError::ReadOnly));
        v.set(ro::EXIT_REASON, 0x8000_0021).unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(0x8000_0021));
        // No such field: a reserved bit, HIGH of a field that is not 64-bit, an unknown index.
        for raw in [1 << 15, guest::RIP.raw() | 1, 0x0bfe] {
            let f = VmcsField::new(raw);
            assert_eq!(v.read(f), Err(FieldError::Unsupported), "{raw:#x}");
            assert_eq!(v.write(f, 0), Err(FieldError::Unsupported), "{raw:#x}");
        }
    }

    #[test]
    fn a_saved_copy_loads_back_and_anything_else_loads_clear() {
        let mut v = Vmcs12::default();
        v.write(guest::RIP, 0x1234).unwrap();
        v.launched = true;
        let saved = v.save();
        assert_eq!(Vmcs12::load(&saved), v);
        let mut other = saved;
        other[0] ^= 1;
        assert_eq!(Vmcs12::load(&other), Vmcs12::default());
    }

    #[test]
    fn the_cache_gives_back_its_least_recently_used_entry_for_its_region() {
        let mut c = Vmcs12Cache::default();
        let gpa = |n: u64| Gpa::new(n << 12);
        for n in 0..CACHED as u64 {
            assert!(c.insert(gpa(n), Vmcs12::default()).is_none());
        }
        // Region 0 used last: region 1 goes.
        c.get_mut(gpa(0)).unwrap().launched = true;
        let (evicted, _) = c.insert(gpa(9), Vmcs12::default()).unwrap();
        assert_eq!(evicted, gpa(1));
        assert!(c.get_mut(gpa(1)).is_none());
        assert!(c.get_mut(gpa(0)).unwrap().launched);
        assert!(c.take(gpa(0)).is_some());
        assert!(c.take(gpa(0)).is_none());
        assert!(
            c.insert(gpa(10), Vmcs12::default()).is_none(),
            "a free slot first"
        );
    }
}
