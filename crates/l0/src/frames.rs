//! L0's frame pool: the bitmap allocator of `ihmi-frames` over identity-mapped memory, the typed pages
//! L0 fills for the CPU (bitmaps, the EPTP list), and the table allocator the EPT builder needs.

use core::cell::UnsafeCell;

use ihmi_addr::{Hpa, HpaRange, PAGE_SIZE};
use ihmi_ept::{EptAlloc, EptTable, EptpList};
use ihmi_frames::{Frame, FrameAllocator, FrameError};
use ihmi_hv::nested::ept::Ept02Tables;
use ihmi_vmcs::{IoBitmaps, MsrBitmap};

use crate::error::LoadError;

const MAX_FRAMES: usize = 1024;

struct BitmapCell(UnsafeCell<[u64; ihmi_frames::bitmap_words(MAX_FRAMES)]>);
// SAFETY: borrowed exactly once, by `Pool::new`, on the only CPU during boot.
unsafe impl Sync for BitmapCell {}
static BITMAP: BitmapCell = BitmapCell(UnsafeCell::new([0; ihmi_frames::bitmap_words(MAX_FRAMES)]));

/// A hardware structure that fills whole pages and that L0 builds in pool frames.
///
/// # Safety
/// 1. The type's size is exactly `PAGES` pages and its alignment at most 4 KiB.
/// 2. All-zero bytes are a valid value (a fresh frame is zeroed).
pub unsafe trait PageLayout {
    /// How many contiguous pages the structure spans.
    const PAGES: usize;
}

// SAFETY: one page of bytes (SDM 25.6.9), `#[repr(C, align(4096))]`; zeros intercept nothing.
unsafe impl PageLayout for MsrBitmap {
    const PAGES: usize = 1;
}
// SAFETY: two pages of bytes, bitmaps A and B (SDM 25.6.4); zeros intercept nothing.
unsafe impl PageLayout for IoBitmaps {
    const PAGES: usize = 2;
}
// SAFETY: 512 EPTPs in one page (SDM 25.6.14); zeros are invalid (unused) entries.
unsafe impl PageLayout for EptpList {
    const PAGES: usize = 1;
}

const _: () = assert!(core::mem::size_of::<MsrBitmap>() == PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<IoBitmaps>() == 2 * PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<EptpList>() == PAGE_SIZE as usize);

/// L0's frames.
pub struct Pool {
    alloc: FrameAllocator<'static>,
}

impl Pool {
    /// Takes `range` (page-aligned, L0-owned, identity-mapped) as the pool, up to 4 MiB of it.
    pub fn new(range: HpaRange) -> Result<Self, FrameError> {
        let frames = ((range.len() / PAGE_SIZE) as usize).min(MAX_FRAMES);
        // SAFETY: called once at boot on the only CPU, so this is the only reference to the bitmap.
        let bitmap = unsafe { &mut *BITMAP.0.get() };
        Ok(Self {
            alloc: FrameAllocator::new(range.start, frames, bitmap)?,
        })
    }

    /// A zeroed frame.
    pub fn frame(&mut self) -> Result<Frame, LoadError> {
        let frame = self.alloc.alloc_frame().ok_or(LoadError::OutOfFrames)?;
        zero(frame.start(), 1);
        Ok(frame)
    }

    /// A zeroed structure of type `T` in fresh pool frames, filled by `fill`; its address, which
    /// belongs to the CPU structure it is handed to from now on.
    pub fn page<T: PageLayout>(&mut self, fill: impl FnOnce(&mut T)) -> Result<Hpa, LoadError> {
        let start = self
            .alloc
            .alloc_contiguous(T::PAGES, 1)
            .ok_or(LoadError::OutOfFrames)?;
        zero(start, T::PAGES);
        // SAFETY: `T::PAGES` fresh, zeroed, page-aligned, contiguous pool frames that nothing else
        // references; `PageLayout` promises the size, the alignment and that zeros are a valid `T`.
        fill(unsafe { &mut *(start.raw() as *mut T) });
        Ok(start)
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

/// Zeroes `pages` pages at `start`.
fn zero(start: Hpa, pages: usize) {
    // SAFETY: callers pass frames just taken from L0's pool: L0 owns them, nothing else uses them, and
    // they are identity-mapped by L0's page tables.
    unsafe { core::ptr::write_bytes(start.raw() as *mut u8, 0, pages * PAGE_SIZE as usize) };
}

impl EptAlloc for Pool {
    fn alloc_zeroed(&mut self) -> Option<Hpa> {
        let frame = self.alloc.alloc()?;
        zero(frame, 1);
        Some(frame)
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

/// How many frames EPT02 (nested EPT) gets: 512 KiB of tables, enough for a few hundred MiB of L2
/// memory touched in 4 KiB pages before EPT02 starts over.
pub const EPT02_TABLES: usize = 128;

/// The frames of EPT02's tables: contiguous pool frames of their own, handed out in order and all
/// taken back at once when EPT02 is emptied (INVEPT, a new EPTP12, a full pool).
pub struct Ept02Pool {
    base: Hpa,
    total: usize,
    used: usize,
}

impl Ept02Pool {
    /// `count` contiguous frames of `pool`.
    pub fn new(pool: &mut Pool, count: usize) -> Result<Self, LoadError> {
        let base = pool
            .alloc
            .alloc_contiguous(count, 1)
            .ok_or(LoadError::OutOfFrames)?;
        Ok(Self {
            base,
            total: count,
            used: 0,
        })
    }

    /// Where the first frame is.
    pub const fn base(&self) -> Hpa {
        self.base
    }

    /// How many frames it has.
    pub const fn total(&self) -> usize {
        self.total
    }

    /// Whether `hpa` is a table handed out since the last reset.
    fn handed_out(&self, hpa: Hpa) -> bool {
        hpa.is_aligned(PAGE_SIZE)
            && hpa.raw() >= self.base.raw()
            && (hpa.raw() - self.base.raw()) / PAGE_SIZE < self.used as u64
    }
}

impl Ept02Tables for Ept02Pool {
    fn alloc_zeroed(&mut self) -> Option<Hpa> {
        if self.used == self.total {
            return None;
        }
        let frame = Hpa::new(self.base.raw() + self.used as u64 * PAGE_SIZE);
        self.used += 1;
        zero(frame, 1);
        Some(frame)
    }

    fn table_mut(&mut self, hpa: Hpa) -> Option<&mut EptTable> {
        if !self.handed_out(hpa) {
            return None;
        }
        // SAFETY: one of this pool's frames (checked): L0's, page-aligned, identity-mapped, used
        // for nothing but EPT02's tables; `&mut self` guarantees no other reference to them.
        Some(unsafe { &mut *(hpa.raw() as *mut EptTable) })
    }

    fn table(&self, hpa: Hpa) -> Option<&EptTable> {
        if !self.handed_out(hpa) {
            return None;
        }
        // SAFETY: as in `table_mut`, shared.
        Some(unsafe { &*(hpa.raw() as *const EptTable) })
    }

    fn reset(&mut self) {
        self.used = 0;
    }
}
