//! A batch's adapters: which rows (tokens) use which adapter, and adding each adapter's low-rank delta
//! `scale · x·Aᵀ·Bᵀ` to a projection's output for its rows only, grouped by adapter as S-LoRA and Punica
//! do (`ops::add_lora`: on the CPU straight from the rows, on a GPU a gather, two GEMMs and a scaled add
//! per adapter). Rows of the base model are untouched, and a batch without adapters costs nothing.

use tessera_kernels::{
    Tensor,
    ops::{self, LoraJob},
};

use super::adapter::{Adapter, Target};
use crate::error::ModelError;

/// One adapter's rows of the batch, in increasing order.
struct Group<'a> {
    adapter: &'a Adapter,
    rows: Vec<u32>,
}

/// The adapters of one forward pass.
#[derive(Default)]
pub struct LoraBatch<'a> {
    groups: Vec<Group<'a>>,
}

impl<'a> LoraBatch<'a> {
    /// From each sequence's adapter (none: the base model) and its number of rows, in batch order.
    pub fn new(seqs: impl IntoIterator<Item = (Option<&'a Adapter>, usize)>) -> Self {
        let mut groups: Vec<Group<'a>> = Vec::new();
        let mut row = 0u32;
        for (adapter, n) in seqs {
            if let Some(a) = adapter {
                let rows = row..row + n as u32;
                match groups.iter_mut().find(|g| std::ptr::eq(g.adapter, a)) {
                    Some(g) => g.rows.extend(rows),
                    None => groups.push(Group { adapter: a, rows: rows.collect() }),
                }
            }
            row += n as u32;
        }
        LoraBatch { groups }
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds, for every adapter of the batch, its delta for each of `targets` to `y`: `x` is the
    /// projection's input `[rows, in]`, `y` its (fused) output `[rows, out]`, and each target's output
    /// starts at column `col0` of `y`. One call for all of them: on the CPU their deltas are computed in
    /// parallel.
    pub fn apply(
        &self,
        y: &mut Tensor,
        x: &Tensor,
        layer: usize,
        targets: &[(Target, usize)],
    ) -> Result<(), ModelError> {
        let jobs: Vec<LoraJob<'_>> = self
            .groups
            .iter()
            .flat_map(|g| {
                targets.iter().filter_map(move |&(t, col0)| {
                    let p = g.adapter.pair(layer, t)?;
                    Some(LoraJob { rows: &g.rows, col0, a: &p.a, b: &p.b, scale: g.adapter.scale })
                })
            })
            .collect();
        if !jobs.is_empty() {
            ops::add_lora(y, x, &jobs)?;
        }
        Ok(())
    }
}
