//! Memory functions for freestanding binaries.
//!
//! The copies use `rep movsb`/`rep stosb` rather than Rust loops: the compiler recognises such loops and
//! would turn them back into calls to `memcpy` itself.

/// Defines `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp` in the invoking binary crate, plus an
/// inert `rust_eh_personality`: the host target's prebuilt `core` refers to it from its unwind tables,
/// and our binaries abort on panic, so it is never called.
#[macro_export]
macro_rules! provide_mem_functions {
    () => {
        #[no_mangle]
        extern "C" fn rust_eh_personality() {}

        /// # Safety
        /// `dest` and `src` are valid for `n` bytes and do not overlap.
        #[no_mangle]
        pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
            // SAFETY: the caller guarantees both ranges are valid and disjoint.
            unsafe { $crate::mem::copy_forward(dest, src, n) };
            dest
        }

        /// # Safety
        /// `dest` and `src` are valid for `n` bytes; they may overlap.
        #[no_mangle]
        pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
            if (dest as usize) <= (src as usize)
                || (dest as usize) >= (src as usize).wrapping_add(n)
            {
                // SAFETY: valid ranges (caller); a forward copy is correct when dest is below src or past it.
                unsafe { $crate::mem::copy_forward(dest, src, n) };
            } else {
                // SAFETY: valid ranges (caller); dest overlaps the tail of src, so copy backwards.
                unsafe { $crate::mem::copy_backward(dest, src, n) };
            }
            dest
        }

        /// # Safety
        /// `dest` is valid for `n` bytes.
        #[no_mangle]
        pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
            // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
            unsafe { $crate::mem::fill(dest, c as u8, n) };
            dest
        }

        /// # Safety
        /// `a` and `b` are valid for `n` bytes.
        #[no_mangle]
        pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            // SAFETY: the caller guarantees both ranges are readable for `n` bytes.
            unsafe { $crate::mem::compare(a, b, n) }
        }

        /// # Safety
        /// `a` and `b` are valid for `n` bytes.
        #[no_mangle]
        pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            // SAFETY: the caller guarantees both ranges are readable for `n` bytes.
            unsafe { $crate::mem::compare(a, b, n) }
        }
    };
}

/// Copies `n` bytes upwards.
///
/// # Safety
/// `dest` is writable and `src` readable for `n` bytes; if they overlap, `dest <= src`.
#[inline(always)]
pub unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees the ranges; DF is clear (the ABI requires it at calls).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
}

/// Copies `n` bytes downwards, for overlapping moves with `dest > src`.
///
/// # Safety
/// `dest` is writable and `src` readable for `n` bytes.
#[inline(always)]
pub unsafe fn copy_backward(dest: *mut u8, src: *const u8, n: usize) {
    if n == 0 {
        return;
    }
    // SAFETY: `n > 0` and both ranges hold `n` bytes (caller), so the last byte is in bounds.
    let last_dest = unsafe { dest.add(n - 1) };
    // SAFETY: as above.
    let last_src = unsafe { src.add(n - 1) };
    // SAFETY: the caller guarantees the ranges; DF is set only for this instruction and cleared again.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") last_dest => _, inout("rsi") last_src => _, options(nostack));
    }
}

/// Fills `n` bytes with `value`.
///
/// # Safety
/// `dest` is writable for `n` bytes.
#[inline(always)]
pub unsafe fn fill(dest: *mut u8, value: u8, n: usize) {
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _,
            in("al") value, options(nostack, preserves_flags));
    }
}

/// Compares `n` bytes, C `memcmp` style.
///
/// # Safety
/// `a` and `b` are readable for `n` bytes.
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // `wrapping_add` stays in bounds here: `i < n` and both ranges hold `n` bytes (caller).
        let (pa, pb) = (a.wrapping_add(i), b.wrapping_add(i));
        // SAFETY: `pa` points at one of the `n` readable bytes behind `a` (caller).
        let x = unsafe { pa.read() };
        // SAFETY: the same for `pb` and `b`.
        let y = unsafe { pb.read() };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}
