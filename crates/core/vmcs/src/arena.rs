//! The VMCSs L0 owns, by typed id, and their launch state (SDM 25.1: a VMCS is entered with
//! VMLAUNCH while its launch state is clear, VMRESUME once launched). L0 has several: the guest's,
//! the out-of-box monitor VM's, and with nested VMX one per L2 (a VMCS02). This is the bookkeeping;
//! `ihmi-vmx` executes VMCLEAR and VMPTRLD around it.

use core::fmt;

/// One VMCS of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmcsId(u8);

impl VmcsId {
    /// Its slot.
    #[must_use]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for VmcsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VMCS #{}", self.0)
    }
}

/// Why the arena refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenaError {
    /// Every slot is taken.
    Full,
    /// No VMCS has this id (it was never added, or belongs to another arena).
    Unknown(VmcsId),
}

impl fmt::Display for ArenaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("no free VMCS slot"),
            Self::Unknown(id) => write!(f, "no {id}"),
        }
    }
}

/// What entering a VMCS takes: its region, and whether the next entry must be VMLAUNCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<R> {
    pub region: R,
    pub launch: bool,
}

/// Up to `N` VMCSs, each a region of type `R` (L0 uses the host-physical address), one of them
/// current.
#[derive(Clone, Copy, Debug)]
pub struct VmcsArena<R, const N: usize> {
    slots: [Option<(R, bool)>; N],
    current: Option<VmcsId>,
}

impl<R: Copy, const N: usize> Default for VmcsArena<R, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Copy, const N: usize> VmcsArena<R, N> {
    /// An empty arena.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            slots: [None; N],
            current: None,
        }
    }

    /// Adds a freshly cleared VMCS (launch state clear) and makes it current, as VMCLEAR + VMPTRLD
    /// leave it.
    pub fn add(&mut self, region: R) -> Result<VmcsId, ArenaError> {
        let index = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(ArenaError::Full)?;
        let id = VmcsId(index as u8);
        self.slots[index] = Some((region, false));
        self.current = Some(id);
        Ok(id)
    }

    /// Makes `id` current for an entry, and records that it has been entered: the returned
    /// [`Entry`] says whether this entry is its first (VMLAUNCH).
    pub fn enter(&mut self, id: VmcsId) -> Result<Entry<R>, ArenaError> {
        let slot = self
            .slots
            .get_mut(id.index())
            .and_then(Option::as_mut)
            .ok_or(ArenaError::Unknown(id))?;
        let entry = Entry {
            region: slot.0,
            launch: !slot.1,
        };
        slot.1 = true;
        self.current = Some(id);
        Ok(entry)
    }

    /// The region of `id`.
    #[must_use]
    pub fn region(&self, id: VmcsId) -> Option<R> {
        self.slots.get(id.index()).copied().flatten().map(|s| s.0)
    }

    /// Whether `id` has been entered.
    #[must_use]
    pub fn launched(&self, id: VmcsId) -> Option<bool> {
        self.slots.get(id.index()).copied().flatten().map(|s| s.1)
    }

    /// The current VMCS.
    #[must_use]
    pub const fn current(&self) -> Option<VmcsId> {
        self.current
    }

    /// How many VMCSs the arena holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vmcs_is_launched_once_then_resumed() {
        let mut a: VmcsArena<u64, 2> = VmcsArena::new();
        let guest = a.add(0x1000).unwrap();
        assert_eq!(a.current(), Some(guest), "a new VMCS is current");
        let monitor = a.add(0x2000).unwrap();
        assert_eq!(a.current(), Some(monitor));
        assert_eq!(a.add(0x3000), Err(ArenaError::Full));
        assert_eq!(
            a.enter(guest),
            Ok(Entry {
                region: 0x1000,
                launch: true
            })
        );
        assert_eq!(a.enter(guest).map(|e| e.launch), Ok(false));
        assert_eq!(a.enter(monitor).map(|e| e.launch), Ok(true));
        assert_eq!(a.current(), Some(monitor));
        assert_eq!(a.enter(monitor).map(|e| e.launch), Ok(false));
        assert_eq!(
            (a.region(monitor), a.launched(guest)),
            (Some(0x2000), Some(true))
        );
        let stranger = VmcsId(5);
        assert_eq!(a.enter(stranger), Err(ArenaError::Unknown(stranger)));
        assert_eq!(a.len(), 2);
    }
}
