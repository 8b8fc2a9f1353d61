//! Public identifiers of sessions and chat completions: 128 random bits in
//! hex behind a prefix that names the kind. They are shown to clients and
//! logged; unlike usage tokens they grant nothing.

pub fn public_id(prefix: &str) -> String {
    let mut random = [0u8; 16];
    rand::fill(&mut random[..]);
    let hex: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}_{hex}")
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
}
