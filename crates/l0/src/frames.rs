//! L0's frame pool: the bitmap allocator of `ihmi-frames` over identity-mapped memory, and the table
//! allocator the EPT builder needs.

use core::cell::UnsafeCell;

use ihmi_addr::{Hpa, HpaRange, PAGE_SIZE};
use ihmi_ept::{EptAlloc, EptTable};
use ihmi_frames::FrameAllocator;

use crate::fail;

const MAX_FRAMES: usize = 1024;

struct BitmapCell(UnsafeCell<[u64; ihmi_frames::bitmap_words(MAX_FRAMES)]>);
// SAFETY: borrowed exactly once, by `Pool::new`, on the only CPU during boot.
unsafe impl Sync for BitmapCell {}
static BITMAP: BitmapCell = BitmapCell(UnsafeCell::new([0; ihmi_frames::bitmap_words(MAX_FRAMES)]));

/// L0's frames.
pub struct Pool {
    alloc: FrameAllocator<'static>,
}

impl Pool {
    /// Takes `range` (page-aligned, at most 4 MiB, owned by L0, identity-mapped) as the pool.
    pub fn new(range: HpaRange) -> Self {
        let frames = ((range.len() / PAGE_SIZE) as usize).min(MAX_FRAMES);
        // SAFETY: called once at boot on the only CPU, so this is the only reference to the bitmap.
        let bitmap = unsafe { &mut *BITMAP.0.get() };
        match FrameAllocator::new(range.start, frames, bitmap) {
            Ok(alloc) => Self { alloc },
            Err(e) => fail(format_args!("frame pool: {e}")),
        }
    }

    /// A zeroed frame; running out of L0 frames is fatal (the pool is sized for the worst case).
    pub fn alloc_zeroed(&mut self) -> Hpa {
        match self.try_alloc_zeroed() {
            Some(f) => f,
            None => fail(format_args!("L0 frame pool exhausted")),
        }
    }

    fn try_alloc_zeroed(&mut self) -> Option<Hpa> {
        let frame = self.alloc.alloc()?;
        // SAFETY: the frame comes from L0's pool: L0 owns it, nothing else uses it, and it is
        // identity-mapped by L0's page tables.
        unsafe { core::ptr::write_bytes(frame.raw() as *mut u8, 0, PAGE_SIZE as usize) };
        Some(frame)
    }

    /// `count` contiguous zeroed frames.
    pub fn alloc_contiguous_zeroed(&mut self, count: usize) -> Hpa {
        let Some(base) = self.alloc.alloc_contiguous(count, 1) else {
            fail(format_args!(
                "L0 frame pool exhausted ({count} contiguous frames)"
            ))
        };
        // SAFETY: as in `try_alloc_zeroed`, for `count` frames.
        unsafe { core::ptr::write_bytes(base.raw() as *mut u8, 0, count * PAGE_SIZE as usize) };
        base
    }

    /// Frames in use.
    pub fn used(&self) -> usize {
        self.alloc.total() - self.alloc.free_count()
    }

    /// Frames in the pool.
    pub fn total(&self) -> usize {
        self.alloc.total()
    }
}

impl EptAlloc for Pool {
    fn alloc_zeroed(&mut self) -> Option<Hpa> {
        self.try_alloc_zeroed()
    }

    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable> {
        if !self.alloc.owns(hpa) || !hpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        // SAFETY: the frame is in L0's pool (checked), page-aligned, identity-mapped, and `&mut self`
        // guarantees no other reference to the pool's tables is live.
        Some(unsafe { &mut *(hpa.raw() as *mut EptTable) })
    }

    fn table(&self, hpa: Hpa) -> Option<&EptTable> {
        if !self.alloc.owns(hpa) || !hpa.is_aligned(PAGE_SIZE) {
            return None;
        }
        // SAFETY: as in `table_mut`, shared.
        Some(unsafe { &*(hpa.raw() as *const EptTable) })
    }
}
