//! Public identifiers of sessions, chat completions and webhook events: a
//! prefix that names the kind, then the 32 lowercase hex digits of a UUID
//! version 7. They are shown to clients and logged; unlike usage tokens
//! they grant nothing.
//!
//! Version 7 begins with the time in milliseconds, then a counter that
//! keeps the ids one process makes in order, and random bits for the rest,
//! so ids made one after the other sort together. Each table keeps
//! its ids in a unique index; with fully random ids every new row went to
//! a random page of that index, which a store with many rows seldom has in
//! its cache, and so was read back from disk and then written whole to the
//! log again with each commit. Ids in time order go to the index's last
//! pages, which every recent commit has touched. The time in an id is when
//! its row was made, which whoever sees the row is shown anyway.
//!
//! The random bits come from a generator in the process, seeded by the
//! operating system (uuid's `fast-rng`), rather than a system call for
//! each id: every session opened makes one or more ids.

use uuid::Uuid;

pub fn public_id(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::now_v7().simple())
}

/// Whether `id` has the shape [`public_id`] gives ids with this prefix.
pub fn is_public_id(prefix: &str, id: &str) -> bool {
    let hex = id.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('_'));
    hex.is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_id_is_its_prefix_and_32_lowercase_hex_digits() {
        let id = public_id("ses");
        assert!(is_public_id("ses", &id), "{id}");
        assert!(!is_public_id("cmpl", &id));
        assert!(!is_public_id("ses", &id.to_uppercase()));
        assert!(!is_public_id("ses", &id[..id.len() - 1]));
        assert!(!is_public_id("ses", "ses"));
    }

    #[test]
    fn ids_made_one_after_another_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| public_id("ses")).collect();
        assert!(ids.is_sorted(), "out of order");
        let mut distinct = ids.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), ids.len());
    }
}
