#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

use ihmi_addr::{Hpa, HpaRange, PAGE_SIZE};

const WORD_BITS: usize = u64::BITS as usize;

/// Number of `u64` bitmap words needed to track `frames` frames.
#[must_use]
pub const fn bitmap_words(frames: usize) -> usize {
    frames.div_ceil(WORD_BITS)
}

/// Why the allocator refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The bitmap has fewer than [`bitmap_words`] words for the pool.
    BitmapTooSmall,
    /// An address that must be a frame boundary is not.
    Unaligned,
    /// The frame lies outside this allocator's pool.
    NotOwned(Hpa),
    /// The frame is already free.
    DoubleFree(Hpa),
    /// No free frame is left.
    Empty,
    /// The pool's end does not fit in the physical address space.
    Overflow,
    /// `reserve` found the frame already in use.
    InUse(Hpa),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BitmapTooSmall => f.write_str("frame bitmap too small for the pool"),
            Self::Unaligned => f.write_str("address is not 4 KiB aligned"),
            Self::NotOwned(a) => write!(f, "frame {a} is outside the pool"),
            Self::DoubleFree(a) => write!(f, "frame {a} is already free"),
            Self::Empty => f.write_str("no free frame left"),
            Self::Overflow => f.write_str("pool end overflows the address space"),
            Self::InUse(a) => write!(f, "frame {a} is already in use"),
        }
    }
}

/// One 4 KiB frame an allocator handed out. It is owned, not `Copy`: whoever holds it is its one user
/// (a VMXON region, a VMCS, a bitmap, an EPTP list), and its address reaches hardware structures only
/// through [`Frame::start`].
#[derive(Debug, PartialEq, Eq)]
pub struct Frame(Hpa);

impl Frame {
    /// The frame's first byte.
    #[must_use]
    pub const fn start(&self) -> Hpa {
        self.0
    }
}

/// Bitmap allocator over the frames `[base, base + frames * 4 KiB)`.
pub struct FrameAllocator<'a> {
    base: Hpa,
    frames: usize,
    bitmap: &'a mut [u64],
    free: usize,
    /// Word index where the last single-frame search succeeded; searching from there keeps `alloc`
    /// close to O(1) while the low part of the pool is full.
    hint: usize,
}

impl fmt::Debug for FrameAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("base", &self.base)
            .field("frames", &self.frames)
            .field("free", &self.free)
            .finish_non_exhaustive()
    }
}

impl<'a> FrameAllocator<'a> {
    /// Takes over `bitmap` for the pool at `base`. Bits already set on entry mark frames in use, so a
    /// caller can pre-reserve frames; an all-zero bitmap means every frame is free.
    pub fn new(base: Hpa, frames: usize, bitmap: &'a mut [u64]) -> Result<Self, FrameError> {
        if !base.is_aligned(PAGE_SIZE) {
            return Err(FrameError::Unaligned);
        }
        let words = bitmap_words(frames);
        if bitmap.len() < words {
            return Err(FrameError::BitmapTooSmall);
        }
        (frames as u64)
            .checked_mul(PAGE_SIZE)
            .and_then(|len| base.checked_add(len))
            .ok_or(FrameError::Overflow)?;
        let bitmap = &mut bitmap[..words];
        // Bits past the last frame are marked used so the searches need no end-of-pool special case.
        let tail = frames % WORD_BITS;
        if tail != 0 {
            if let Some(last) = bitmap.last_mut() {
                *last |= !0u64 << tail;
            }
        }
        let used: usize = bitmap.iter().map(|w| w.count_ones() as usize).sum();
        let free = words * WORD_BITS - used;
        Ok(Self {
            base,
            frames,
            bitmap,
            free,
            hint: 0,
        })
    }

    /// One free 4 KiB frame, or `None` if the pool is exhausted.
    pub fn alloc(&mut self) -> Option<Hpa> {
        let words = self.bitmap.len();
        for step in 0..words {
            let w = (self.hint + step) % words;
            let word = self.bitmap[w];
            if word != u64::MAX {
                let bit = word.trailing_ones() as usize;
                self.bitmap[w] |= 1 << bit;
                self.free -= 1;
                self.hint = w;
                return Some(self.frame_addr(w * WORD_BITS + bit));
            }
        }
        None
    }

    /// One free frame as an owned [`Frame`], or `None` if the pool is exhausted.
    pub fn alloc_frame(&mut self) -> Option<Frame> {
        self.alloc().map(Frame)
    }

    /// Like [`alloc`](Self::alloc), but says [`FrameError::Empty`] instead of `None`.
    pub fn try_alloc(&mut self) -> Result<Hpa, FrameError> {
        self.alloc().ok_or(FrameError::Empty)
    }

    /// `count` physically contiguous free frames whose first address is a multiple of
    /// `align_frames * 4 KiB` (0 and 1 both mean no alignment), or `None` if no such run exists.
    pub fn alloc_contiguous(&mut self, count: usize, align_frames: usize) -> Option<Hpa> {
        if count == 0 || count > self.free {
            return None;
        }
        let align = align_frames.max(1) as u64;
        // Alignment is of the physical address, not of the bitmap index, so it depends on `base`.
        let base_frame = self.base.raw() / PAGE_SIZE;
        let skew = ((align - base_frame % align) % align) as usize;
        let align = align as usize;
        let mut start = skew;
        while start.checked_add(count)? <= self.frames {
            match (start..start + count).rev().find(|&i| self.is_used(i)) {
                None => {
                    for i in start..start + count {
                        self.set(i, true);
                    }
                    self.free -= count;
                    return Some(self.frame_addr(start));
                }
                // No run can start at or before the used frame; jump to the next aligned slot after it.
                Some(used) => {
                    let past = used + 1 - skew;
                    start = skew + past.div_ceil(align).checked_mul(align)?;
                }
            }
        }
        None
    }

    /// Returns `frame` to the pool.
    pub fn free(&mut self, frame: Hpa) -> Result<(), FrameError> {
        let index = self.index_of(frame)?;
        if !self.is_used(index) {
            return Err(FrameError::DoubleFree(frame));
        }
        self.set(index, false);
        self.free += 1;
        Ok(())
    }

    /// Marks a free `frame` as in use without handing it out, e.g. a frame firmware already owns.
    pub fn reserve(&mut self, frame: Hpa) -> Result<(), FrameError> {
        let index = self.index_of(frame)?;
        if self.is_used(index) {
            return Err(FrameError::InUse(frame));
        }
        self.set(index, true);
        self.free -= 1;
        Ok(())
    }

    /// How many frames are free.
    #[must_use]
    pub fn free_count(&self) -> usize {
        self.free
    }

    /// How many frames the pool holds.
    #[must_use]
    pub fn total(&self) -> usize {
        self.frames
    }

    /// The bytes the pool covers.
    #[must_use]
    pub fn range(&self) -> HpaRange {
        // `new` checked that the end fits.
        HpaRange {
            start: self.base,
            end: Hpa::new(self.base.raw() + self.frames as u64 * PAGE_SIZE),
        }
    }

    /// Whether `addr` (any byte, not only a frame start) lies inside the pool.
    #[must_use]
    pub fn owns(&self, addr: Hpa) -> bool {
        self.range().contains(addr)
    }

    fn index_of(&self, frame: Hpa) -> Result<usize, FrameError> {
        if !self.owns(frame) {
            return Err(FrameError::NotOwned(frame));
        }
        if !frame.is_aligned(PAGE_SIZE) {
            return Err(FrameError::Unaligned);
        }
        Ok(((frame.raw() - self.base.raw()) / PAGE_SIZE) as usize)
    }

    fn frame_addr(&self, index: usize) -> Hpa {
        Hpa::new(self.base.raw() + index as u64 * PAGE_SIZE)
    }

    fn is_used(&self, index: usize) -> bool {
        self.bitmap[index / WORD_BITS] & (1 << (index % WORD_BITS)) != 0
    }

    fn set(&mut self, index: usize, used: bool) {
        let mask = 1u64 << (index % WORD_BITS);
        if used {
            self.bitmap[index / WORD_BITS] |= mask;
        } else {
            self.bitmap[index / WORD_BITS] &= !mask;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use super::*;

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_words(0), 0);
        assert_eq!(bitmap_words(1), 1);
        assert_eq!(bitmap_words(64), 1);
        assert_eq!(bitmap_words(65), 2);
    }

    #[test]
    fn construction_checks() {
        let mut bm = [0u64; 1];
        assert_eq!(
            FrameAllocator::new(Hpa::new(0x1001), 8, &mut bm).unwrap_err(),
            FrameError::Unaligned
        );
        assert_eq!(
            FrameAllocator::new(Hpa::new(0x1000), 65, &mut bm).unwrap_err(),
            FrameError::BitmapTooSmall
        );
        assert_eq!(
            FrameAllocator::new(Hpa::new(u64::MAX - 0xfff), 2, &mut bm).unwrap_err(),
            FrameError::Overflow
        );
    }

    #[test]
    fn allocates_every_frame_once_then_runs_dry() {
        let mut bm = vec![0u64; bitmap_words(100)];
        let mut a = FrameAllocator::new(Hpa::new(0x10_0000), 100, &mut bm).unwrap();
        assert_eq!(a.total(), 100);
        assert_eq!(a.free_count(), 100);
        let mut got: Vec<u64> = (0..100).map(|_| a.alloc().unwrap().raw()).collect();
        assert_eq!(a.alloc(), None);
        assert_eq!(a.try_alloc(), Err(FrameError::Empty));
        assert_eq!(a.free_count(), 0);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 100);
        assert_eq!(got[0], 0x10_0000);
        assert_eq!(got[99], 0x10_0000 + 99 * 0x1000);
    }

    #[test]
    fn free_and_reuse() {
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(Hpa::new(0x2000), 3, &mut bm).unwrap();
        let f = [a.alloc().unwrap(), a.alloc().unwrap(), a.alloc().unwrap()];
        assert_eq!(a.alloc(), None);
        a.free(f[1]).unwrap();
        assert_eq!(a.free_count(), 1);
        assert_eq!(a.alloc(), Some(f[1]));
        a.free(f[0]).unwrap();
        assert_eq!(a.free(f[0]), Err(FrameError::DoubleFree(f[0])));
        assert_eq!(
            a.free(Hpa::new(0x1000)),
            Err(FrameError::NotOwned(Hpa::new(0x1000)))
        );
        assert_eq!(
            a.free(Hpa::new(0x5000)),
            Err(FrameError::NotOwned(Hpa::new(0x5000)))
        );
        assert_eq!(a.free(Hpa::new(0x2008)), Err(FrameError::Unaligned));
    }

    #[test]
    fn ownership_and_range() {
        let mut bm = [0u64; 1];
        let a = FrameAllocator::new(Hpa::new(0x4000), 2, &mut bm).unwrap();
        assert_eq!(
            a.range(),
            HpaRange::from_len(Hpa::new(0x4000), 0x2000).unwrap()
        );
        assert!(a.owns(Hpa::new(0x4000)));
        assert!(a.owns(Hpa::new(0x5fff)));
        assert!(!a.owns(Hpa::new(0x6000)));
        assert!(!a.owns(Hpa::new(0x3fff)));
    }

    #[test]
    fn preset_bits_are_in_use() {
        let mut bm = [0b101u64];
        let mut a = FrameAllocator::new(Hpa::new(0), 4, &mut bm).unwrap();
        assert_eq!(a.free_count(), 2);
        assert_eq!(a.alloc(), Some(Hpa::new(0x1000)));
        assert_eq!(a.alloc(), Some(Hpa::new(0x3000)));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn reserve_marks_used() {
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(Hpa::new(0), 2, &mut bm).unwrap();
        a.reserve(Hpa::new(0)).unwrap();
        assert_eq!(a.reserve(Hpa::new(0)), Err(FrameError::InUse(Hpa::new(0))));
        assert_eq!(a.alloc(), Some(Hpa::new(0x1000)));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn contiguous_respects_physical_alignment() {
        // The pool starts one frame below a 2 MiB boundary, so the aligned run starts at index 1.
        let frames = 1000;
        let mut bm = vec![0u64; bitmap_words(frames)];
        let mut a = FrameAllocator::new(Hpa::new(0x1f_f000), frames, &mut bm).unwrap();
        let run = a.alloc_contiguous(512, 512).unwrap();
        assert_eq!(run, Hpa::new(0x20_0000));
        assert_eq!(a.free_count(), frames - 512);
        // The next aligned slot (0x40_0000) would end past the pool.
        assert_eq!(a.alloc_contiguous(512, 512), None);
        assert_eq!(a.alloc(), Some(Hpa::new(0x1f_f000)));
        assert_eq!(a.alloc(), Some(Hpa::new(0x40_0000)));
    }

    #[test]
    fn contiguous_skips_used_frames() {
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(Hpa::new(0), 16, &mut bm).unwrap();
        a.reserve(Hpa::new(0x2000)).unwrap();
        assert_eq!(a.alloc_contiguous(4, 1), Some(Hpa::new(0x3000)));
        assert_eq!(a.alloc_contiguous(2, 4), Some(Hpa::new(0)));
        assert_eq!(a.alloc_contiguous(2, 4), Some(Hpa::new(0x8000)));
        assert_eq!(a.alloc_contiguous(2, 0), Some(Hpa::new(0xa000)));
        assert_eq!(a.alloc_contiguous(0, 1), None);
        assert_eq!(a.alloc_contiguous(17, 1), None);
        assert_eq!(a.free_count(), 16 - 1 - 4 - 2 - 2 - 2);
    }
}
