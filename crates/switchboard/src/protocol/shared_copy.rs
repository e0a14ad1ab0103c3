//! A copy of a message's bytes that any number of frames share, in one
//! heap allocation.
//!
//! `Bytes::copy_from_slice` allocates the bytes, and the first clone of
//! the result allocates again (the shared reference count `bytes` adds
//! when a buffer gets a second owner): two allocations per relayed
//! message, which every recipient's frame clones (heaptrack on
//! `tests/allocations.rs`). A small payload is copied here into a
//! fixed-size buffer that `Bytes::from_owner` boxes together with its
//! reference count: one allocation, and clones only count.

use bytes::Bytes;

/// A payload of up to `N` bytes, inline.
struct Inline<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> Inline<N> {
    fn copy(from: &[u8]) -> Bytes {
        let mut inline = Self {
            len: from.len(),
            bytes: [0; N],
        };
        inline.bytes[..from.len()].copy_from_slice(from);
        Bytes::from_owner(inline)
    }
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `from`, copied once into a buffer that clones share.
///
/// Up to 1,008 B the copy sits in one allocation with its reference count
/// (`bytes`' box holds 8 B of count and 8 B of length beside the
/// buffer): 64, 128, 256, 512 or 1,024 B, a size class of the allocator,
/// so at most half of it is unused — what rounding a `Vec` up to the
/// allocator's bins would leave too, give or take. Larger payloads are
/// copied as before: one more allocation is nothing beside copying them.
pub(crate) fn shared_copy(from: &[u8]) -> Bytes {
    match from.len() {
        0 => Bytes::new(),
        1..=48 => Inline::<48>::copy(from),
        49..=112 => Inline::<112>::copy(from),
        113..=240 => Inline::<240>::copy(from),
        241..=496 => Inline::<496>::copy(from),
        497..=1008 => Inline::<1008>::copy(from),
        _ => Bytes::copy_from_slice(from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_exactly_and_clones_share_it() {
        for len in [
            0, 1, 47, 48, 49, 112, 113, 240, 241, 496, 497, 1008, 1009, 5000,
        ] {
            let from: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let copy = shared_copy(&from);
            assert_eq!(&copy[..], &from[..], "{len} bytes");
            let clone = copy.clone();
            assert_eq!(clone.as_ptr(), copy.as_ptr(), "{len} bytes: a clone copied");
            drop(copy);
            assert_eq!(&clone[..], &from[..]);
        }
    }
}
