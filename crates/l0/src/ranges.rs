//! Fixed-capacity lists of physical ranges: L0 has no heap.

use ihmi_addr::{Gpa, GpaRange};

use crate::fail;

/// Most ranges one list holds (as many as a memory map has regions).
const MAX: usize = ihmi_hv::memory::MAX_REGIONS;

/// Up to [`MAX`] ranges.
#[derive(Clone, Copy)]
pub struct Ranges {
    items: [GpaRange; MAX],
    len: usize,
}

impl Ranges {
    pub const fn new() -> Self {
        Self {
            items: [GpaRange::new(Gpa::new(0), Gpa::new(0)); MAX],
            len: 0,
        }
    }

    /// Appends `r`; a full list is an L0 bug and stops L0 with a message, never a silent loss.
    pub fn push(&mut self, r: GpaRange) {
        if self.len == MAX {
            fail(format_args!("more than {MAX} physical ranges in one list"));
        }
        self.items[self.len] = r;
        self.len += 1;
    }

    pub fn as_slice(&self) -> &[GpaRange] {
        &self.items[..self.len]
    }
}

impl FromIterator<GpaRange> for Ranges {
    fn from_iter<I: IntoIterator<Item = GpaRange>>(iter: I) -> Self {
        let mut r = Self::new();
        for item in iter {
            r.push(item);
        }
        r
    }
}
