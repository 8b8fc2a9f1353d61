//! Public identifiers of sessions and chat completions: 128 random bits in
//! hex behind a prefix that names the kind. They are shown to clients and
//! logged; unlike usage tokens they grant nothing.

pub fn public_id(prefix: &str) -> String {
    let mut random = [0u8; 16];
    rand::fill(&mut random[..]);
    let hex: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}_{hex}")
}
