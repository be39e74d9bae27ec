//! The coordinator's view of a replica's KV cache pool: which blocks are free.
//!
//! Workers hold the memory; the coordinator decides which sequence uses which block and sends the block
//! tables with every step.

/// A free list of block ids `0..num_blocks`.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so that allocation hands out low ids first (easier to read in logs).
        BlockAllocator { free: (0..num_blocks as u32).rev().collect(), num_blocks }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Takes `n` blocks, or none if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Returns blocks to the pool.
    pub fn free(&mut self, blocks: &[u32]) {
        debug_assert!(blocks.iter().all(|&b| (b as usize) < self.num_blocks && !self.free.contains(&b)));
        self.free.extend(blocks.iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_freed_blocks() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, [0, 1, 2]);
        assert!(a.allocate(2).is_none(), "only one left");
        assert_eq!(a.num_free(), 1);
        a.free(&x);
        assert_eq!(a.num_free(), 4);
        let mut all = a.allocate(4).unwrap();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3]);
    }
}
