//! A fixed-capacity list (L0 has no heap), for the ranges and entries its boot stages collect.

/// Up to `N` items.
#[derive(Clone, Copy)]
pub struct List<T: Copy + Default, const N: usize> {
    items: [T; N],
    len: usize,
}

/// The list is full: the item was not added (the caller says what that means).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl<T: Copy + Default, const N: usize> List<T, N> {
    pub fn new() -> Self {
        Self {
            items: [T::default(); N],
            len: 0,
        }
    }

    /// Appends `item`, or says the list is full.
    pub fn push(&mut self, item: T) -> Result<(), Full> {
        let slot = self.items.get_mut(self.len).ok_or(Full)?;
        *slot = item;
        self.len += 1;
        Ok(())
    }

    pub fn as_slice(&self) -> &[T] {
        &self.items[..self.len]
    }

    /// Removes item `i`, if it exists; the later ones move up one.
    pub fn remove(&mut self, i: usize) {
        if i < self.len {
            self.items.copy_within(i + 1..self.len, i);
            self.len -= 1;
        }
    }

    /// Replaces item `i` (which must exist).
    pub fn set(&mut self, i: usize, item: T) {
        if let Some(slot) = self.items[..self.len].get_mut(i) {
            *slot = item;
        }
    }
}

impl<T: Copy + Default, const N: usize> Default for List<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default, const N: usize> List<T, N> {
    /// All of `iter`, or `Full` if it has more than `N` items.
    pub fn collect(iter: impl IntoIterator<Item = T>) -> Result<Self, Full> {
        let mut l = Self::new();
        for item in iter {
            l.push(item)?;
        }
        Ok(l)
    }
}

/// Guest-physical ranges: as many as a memory map has regions.
pub type Ranges = List<ihmi_addr::GpaRange, { ihmi_hv::memory::MAX_REGIONS }>;
