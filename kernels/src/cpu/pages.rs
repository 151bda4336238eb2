//! Weights that are streamed from memory on every decode step, kept on 2 MiB pages.
//!
//! Decoding one token reads every weight once (~500 MB for GPT-2-124M), so it runs at the
//! memory's streaming speed. On 4 KiB pages that stream misses the TLB every 4 KiB; on 2 MiB
//! pages almost never. Linux backs memory with transparent huge pages only where asked
//! (`madvise` mode, the common default) and only in 2 MiB-aligned ranges, which `Vec`'s
//! allocations are not: [`HugePageBuf`] is 2 MiB-aligned and asks. Elsewhere, or when the
//! kernel declines, it is ordinary memory.
//!
//! `cargo run --release -p ferrite-inference --example bench_stream` measured the linear
//! layers of a decode step 15–25% faster on this buffer than on a `Vec` (BENCHMARKS.md).

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::matvec::Weight;

/// The alignment (and size granule) of a [`HugePageBuf`]: one x86-64 huge page.
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-length buffer of weights (`f32` or `f16`) on 2 MiB-aligned memory, advised to
/// the kernel as huge-page backed (`MADV_HUGEPAGE`) before it is first written.
pub struct HugePageBuf<W: Weight = f32> {
    ptr: NonNull<W>,
    len: usize,
}

// SAFETY: the buffer owns its memory exclusively, like a `Vec<W>` (and W is Send + Sync).
unsafe impl<W: Weight> Send for HugePageBuf<W> {}
// SAFETY: shared access is read-only through `Deref`.
unsafe impl<W: Weight> Sync for HugePageBuf<W> {}

impl<W: Weight> HugePageBuf<W> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let Some(layout) = Self::layout(len) else {
            return HugePageBuf { ptr: NonNull::dangling(), len: 0 };
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<W>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        // Advised before the first write: pages touched before it stay 4 KiB.
        advise_huge_pages(raw, layout.size());
        // SAFETY: the allocation holds `len` elements; all-zero bits are 0.0 in f32 and f16,
        // the only weight types (the trait is sealed).
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        HugePageBuf { ptr, len }
    }

    /// A copy of `src`.
    pub fn from_slice(src: &[W]) -> Self {
        let mut buf = Self::zeroed(src.len());
        buf.copy_from_slice(src);
        buf
    }

    fn layout(len: usize) -> Option<Layout> {
        if len == 0 {
            return None;
        }
        let bytes = (len * size_of::<W>()).next_multiple_of(HUGE_PAGE);
        Some(Layout::from_size_align(bytes, HUGE_PAGE).expect("a huge-page layout"))
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    // SAFETY: the range is one whole allocation of ours; the advice changes no contents. A
    // refusal (THP disabled) leaves ordinary pages, which is correct, only slower.
    unsafe {
        libc::madvise(ptr.cast(), bytes, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

impl<W: Weight> Drop for HugePageBuf<W> {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `from_slice` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

impl<W: Weight> Deref for HugePageBuf<W> {
    type Target = [W];
    fn deref(&self) -> &[W] {
        // SAFETY: `len` initialised elements (dangling but aligned when empty).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<W: Weight> DerefMut for HugePageBuf<W> {
    fn deref_mut(&mut self) -> &mut [W] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<W: Weight> std::fmt::Debug for HugePageBuf<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugePageBuf({} x {})", self.len, std::any::type_name::<W>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_copy_aligned_to_a_huge_page() {
        let src: Vec<f32> = (0..1_000_003).map(|i| i as f32 * 0.5).collect();
        let mut buf = HugePageBuf::from_slice(&src);
        assert_eq!(&buf[..], &src[..]);
        assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
        buf[7] = -1.0;
        assert_eq!(buf[7], -1.0);
        let empty = HugePageBuf::<f32>::from_slice(&[]);
        assert!(empty.is_empty());
        let halves = HugePageBuf::<half::f16>::zeroed(5);
        assert!(halves.iter().all(|h| h.to_f32() == 0.0));
    }
}
