//! Webhooks: their configuration, the outbox and delivery, which are still
//! to come, and in [`signature`] how each delivery is signed and checked.

pub mod signature;
