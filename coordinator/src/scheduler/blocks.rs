//! The paged KV block manager: which blocks of a replica's KV cache pool are in use, by how many
//! sequences, and which hold a reusable prefix.
//!
//! Workers hold the memory; the coordinator decides which sequence uses which block and sends the block
//! tables with every step. A block that is full and computed is registered under a hash of its tokens
//! chained with the hash of everything before it, so a later request with the same prefix maps the same
//! block instead of recomputing it (prefix caching). Blocks nobody references stay cached until the pool
//! runs dry; then the least recently released is evicted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The hash a prefix chain starts from: `0` for the base model, and for a LoRA adapter one of its own, so
/// that blocks computed under one adapter (or the base) are never served to a sequence of another. Adapter
/// ids are never reused, so a cached block cannot outlive the adapter it was computed with under its id.
pub fn prefix_root(adapter: u32) -> u64 {
    if adapter == 0 {
        return 0;
    }
    let mut h = DefaultHasher::new();
    ("lora adapter", adapter).hash(&mut h);
    h.finish()
}

/// Hash of a full block given the hash of the prefix before it ([`prefix_root`] for the first block).
pub fn block_hash(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

struct Cached {
    hash: u64,
    /// The block's tokens, compared on every hit: a 64-bit hash collision must not serve wrong KV.
    tokens: Vec<u32>,
    prev: u64,
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Full prompt blocks looked up in the prefix cache.
    pub queries: u64,
    /// Of those, found.
    pub hits: u64,
}

pub struct BlockManager {
    block_size: usize,
    ref_count: Vec<u32>,
    /// Blocks holding nothing reusable.
    free: VecDeque<u32>,
    /// Registered blocks: hash → block, and block → what it holds.
    by_hash: HashMap<u64, u32>,
    cached: HashMap<u32, Cached>,
    /// Cached blocks with no references, by release time (oldest first): the eviction order.
    evictable: BTreeMap<u64, u32>,
    released_at: HashMap<u32, u64>,
    clock: u64,
    pub stats: CacheStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            ref_count: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            by_hash: HashMap::new(),
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: HashMap::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that can be handed out now (never used, or cached but unreferenced).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes one block: a never-used one first, else the least recently released cached one.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (&t, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&t);
                self.released_at.remove(&b);
                if let Some(c) = self.cached.remove(&b) {
                    self.by_hash.remove(&c.hash);
                }
                b
            }
        };
        self.ref_count[b as usize] = 1;
        Some(b)
    }

    /// Takes `n` blocks, or none (and changes nothing) if fewer are available.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_free() {
            return None;
        }
        Some((0..n).map(|_| self.allocate().expect("counted above")).collect())
    }

    /// Drops one reference to each block; unreferenced cached blocks become evictable, others free.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let rc = &mut self.ref_count[b as usize];
            debug_assert!(*rc > 0, "block {b} released more often than taken");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.cached.contains_key(&b) {
                    self.clock += 1;
                    self.evictable.insert(self.clock, b);
                    self.released_at.insert(b, self.clock);
                } else {
                    self.free.push_back(b);
                }
            }
        }
    }

    /// Maps as many leading full blocks of `tokens` as the cache holds, at most `max_blocks`, taking a
    /// reference to each, the chain starting from `root` ([`prefix_root`]). Returns the blocks (in order)
    /// and the prefix hash after the last one.
    pub fn lookup_prefix(&mut self, root: u64, tokens: &[u32], max_blocks: usize) -> (Vec<u32>, u64) {
        let mut prev = root;
        let mut found = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            self.stats.queries += 1;
            let h = block_hash(prev, chunk);
            let Some(&b) = self.by_hash.get(&h) else { break };
            let c = &self.cached[&b];
            if c.tokens != chunk || c.prev != prev {
                break;
            }
            self.stats.hits += 1;
            if self.ref_count[b as usize] == 0
                && let Some(t) = self.released_at.remove(&b)
            {
                self.evictable.remove(&t);
            }
            self.ref_count[b as usize] += 1;
            found.push(b);
            prev = h;
        }
        (found, prev)
    }

    /// Registers a full, computed block as holding `tokens` after the prefix hashed `prev`; returns its
    /// hash. A prefix some other block already holds stays registered to that block.
    pub fn register(&mut self, block: u32, prev: u64, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len(), self.block_size);
        let h = block_hash(prev, tokens);
        if !self.by_hash.contains_key(&h) && !self.cached.contains_key(&block) {
            self.by_hash.insert(h, block);
            self.cached.insert(block, Cached { hash: h, tokens: tokens.to_vec(), prev });
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_released_blocks() {
        let mut m = BlockManager::new(4, 2);
        let x = m.allocate_n(3).unwrap();
        assert_eq!(x, [0, 1, 2]);
        assert!(m.allocate_n(2).is_none(), "only one left");
        assert_eq!((m.num_free(), m.num_used()), (1, 3));
        m.release(&x);
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.num_used(), 0, "cached-but-idle blocks count as free");
    }

    #[test]
    fn prefix_hits_share_blocks_and_count_references() {
        let mut m = BlockManager::new(8, 2);
        let toks = [1, 2, 3, 4, 5];
        let a = m.allocate_n(3).unwrap();
        let h0 = m.register(a[0], 0, &toks[0..2]);
        m.register(a[1], h0, &toks[2..4]);
        // Same first two blocks, different third token.
        let (hit, _) = m.lookup_prefix(0, &[1, 2, 3, 4, 9], 8);
        assert_eq!(hit, a[..2]);
        assert_eq!(m.stats, CacheStats { queries: 2, hits: 2 });
        // A different first block misses everything after it, even with equal later tokens.
        let (miss, _) = m.lookup_prefix(0, &[7, 7, 3, 4], 8);
        assert!(miss.is_empty());
        // Both users must release before the block is reusable; then it stays cached (evictable).
        m.release(&a);
        assert_eq!(m.num_used(), 2, "still held by the second user");
        m.release(&hit);
        assert_eq!(m.num_used(), 0);
        let (again, _) = m.lookup_prefix(0, &toks, 8);
        assert_eq!(again, a[..2], "cached blocks survive release");
        m.release(&again);
    }

    #[test]
    fn blocks_of_one_adapter_are_never_served_to_another_or_to_the_base() {
        let mut m = BlockManager::new(8, 2);
        let toks = [1, 2, 3, 4, 5];
        let a = m.allocate_n(2).unwrap();
        let h0 = m.register(a[0], prefix_root(3), &toks[0..2]);
        m.register(a[1], h0, &toks[2..4]);
        assert!(m.lookup_prefix(prefix_root(0), &toks, 8).0.is_empty(), "the base model");
        assert!(m.lookup_prefix(prefix_root(4), &toks, 8).0.is_empty(), "another adapter");
        let (hit, _) = m.lookup_prefix(prefix_root(3), &toks, 8);
        assert_eq!(hit, a, "the same adapter");
        assert_ne!(prefix_root(3), prefix_root(4));
        assert_eq!(prefix_root(0), 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_and_forgets_its_hash() {
        let mut m = BlockManager::new(2, 1);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        m.register(a, 0, &[10]);
        m.register(b, 0, &[20]);
        m.release(&[a]);
        m.release(&[b]);
        // Pool is all evictable; allocating evicts `a` (released first).
        let c = m.allocate().unwrap();
        assert_eq!(c, a);
        assert!(m.lookup_prefix(0, &[10], 1).0.is_empty(), "evicted prefix must miss");
        assert_eq!(m.lookup_prefix(0, &[20], 1).0, [b]);
    }

    #[test]
    fn a_hash_collision_is_caught_by_the_token_check() {
        let mut m = BlockManager::new(2, 2);
        let a = m.allocate().unwrap();
        let h = m.register(a, 0, &[1, 2]);
        // Forge an entry whose hash matches but whose tokens do not.
        m.cached.get_mut(&a).unwrap().tokens = vec![9, 9];
        assert_eq!(m.by_hash[&h], a);
        assert!(m.lookup_prefix(0, &[1, 2], 1).0.is_empty());
    }
}
