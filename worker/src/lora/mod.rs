//! LoRA adapters served over one base model (multi-LoRA): many customers' fine-tunes in the same batch.
//!
//! - [`adapter`]: a PEFT adapter directory loaded as this rank's shard, sharded like the layers it adapts;
//! - [`batch`]: which rows of a batch use which adapter, and adding each one's delta to a projection.
//!
//! The engine keeps the loaded adapters by the id the coordinator gave them; a step names each sequence's
//! adapter by that id (0: the base model alone).

pub mod adapter;
pub mod batch;

pub use adapter::{Adapter, AdapterLimits, LoraPair, Target};
pub use batch::LoraBatch;
