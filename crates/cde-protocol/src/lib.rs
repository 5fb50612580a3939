//! cde's ingest protocol, version 1, and the delivery logic that needs no database.
//!
//! Everything here is pure: it builds request bodies, cuts batches, classifies responses and
//! decides what happens to each item. The extension's worker and the project's sink both use it,
//! so the two sides of the wire cannot drift apart, and plain `cargo test` covers it.
//!
//! The protocol itself is documented in `docs/protocol.md`.

pub mod batch;
pub mod destination;
pub mod hash;
pub mod response;
pub mod sign;
pub mod wire;

pub use batch::{cut_batches, Batch};
pub use hash::{document_hash, lane};
pub use response::{classify, parse_retry_after, Classified, Rejection};
pub use wire::{gunzip, gzip, idempotency_key, Body, Item, ItemRef};

pub mod deliver;
pub use deliver::{deliver_with_split, Delivery, ItemOutcome, SendResult};
