//! Webhooks: what a project's endpoint is told about its humans. The
//! [`events`] and the JSON they are sent as; the [`dispatch`]er, which
//! delivers what the store's outbox holds; in [`signature`] how each
//! delivery is signed, and checked by a receiver; and the [`cli`]. Which events a change
//! causes is decided where the change is written, in the store, so that
//! both are in one transaction.

pub mod cli;
pub mod dispatch;
pub mod events;
pub mod signature;
