//! The engine side of the coordinator: what runs requests once the API has validated them.
//!
//! - [`contract`]: what the HTTP side and an engine loop exchange (the request, its events, the finish
//!   reason, sequence ids): the one file to read first;
//! - [`engine_loop`]: the thread that owns a replica's backend and scheduler and turns requests into steps;
//! - [`link`]: what connects a loop to the server around it (commands in, numbers and failures out);
//! - [`postman`]: delivery of the loops' events to request handlers, a batch per step, off their threads;
//! - [`backend`]: where steps run (the [`backend::Backend`] trait) and what a model tells the scheduler;
//! - [`group`]: the backend that is a tensor-parallel group of worker processes over gRPC, whose steps
//!   carry only what changed ([`step_delta`]).

pub mod backend;
pub mod contract;
pub mod engine_loop;
pub mod group;
pub mod link;
pub mod postman;
pub mod step_delta;
