//! API keys and usage tokens: how they are generated, what they look like,
//! and the hash under which the store knows them.
//!
//! A secret is `<prefix><body><check>`: the prefix names its kind (`tgk_` for
//! API keys, `tgu_` for usage tokens), the body is 32 random bytes in
//! unpadded base64url, and the check is the first three bytes of the
//! SHA-256 of prefix and body, also base64url. The check lets a mistyped or
//! truncated secret be refused before any database lookup. The store only
//! ever sees the SHA-256 of the whole text.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// 256 bits, as much as the hash the store keeps.
const RANDOM_BYTES: usize = 32;
/// 24 bits of check: a random typo slips through once in 16 million.
const CHECK_BYTES: usize = 3;
const BODY_CHARS: usize = 43; // base64url of RANDOM_BYTES, unpadded
const CHECK_CHARS: usize = 4; // base64url of CHECK_BYTES

/// The two kinds of secret Tollgate hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    ApiKey,
    UsageToken,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiKey => "tgk_",
            SecretKind::UsageToken => "tgu_",
        }
    }

    /// The kind a text claims to be by its prefix, if any.
    pub fn of(text: &str) -> Option<SecretKind> {
        [SecretKind::ApiKey, SecretKind::UsageToken]
            .into_iter()
            .find(|kind| text.starts_with(kind.prefix()))
    }
}

/// The plain text of a secret, shown once at creation. Its `Debug` and
/// `Display` never print it: use [`Secret::expose`] where it must leave.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A new random secret of the given kind.
    pub fn generate(kind: SecretKind) -> Secret {
        let mut random = [0u8; RANDOM_BYTES];
        rand::fill(&mut random[..]);
        Secret::from_random(kind, random)
    }

    /// The secret of the given kind with this body.
    pub(crate) fn from_random(kind: SecretKind, random: [u8; RANDOM_BYTES]) -> Secret {
        let mut text = String::from(kind.prefix());
        URL_SAFE_NO_PAD.encode_string(random, &mut text);
        let check = check_of(&text);
        URL_SAFE_NO_PAD.encode_string(check, &mut text);
        Secret(text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The SHA-256 of a secret's whole text: what the store keeps and looks up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    fn of(text: &str) -> SecretHash {
        SecretHash(Sha256::digest(text.as_bytes()).into())
    }

    /// Compares two hashes in constant time. Lookups go through an index on
    /// the hash, which can only leak timing about the hash, never about the
    /// secret; this comparison is the last check on the row found.
    pub fn matches(&self, other: &[u8]) -> bool {
        self.0.as_slice().ct_eq(other).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

/// Checks a presented secret's shape and checksum, without any lookup, and
/// returns the hash to look it up by.
pub fn parse(text: &str, kind: SecretKind) -> Option<SecretHash> {
    let rest = text.strip_prefix(kind.prefix())?;
    if rest.len() != BODY_CHARS + CHECK_CHARS || !rest.is_ascii() {
        return None;
    }
    let (body, check) = text.split_at(kind.prefix().len() + BODY_CHARS);
    URL_SAFE_NO_PAD.decode(&body[kind.prefix().len()..]).ok()?;
    let presented = URL_SAFE_NO_PAD.decode(check).ok()?;
    let expected = check_of(body);
    bool::from(presented.as_slice().ct_eq(&expected)).then(|| SecretHash::of(text))
}

fn check_of(prefix_and_body: &str) -> [u8; CHECK_BYTES] {
    let digest = Sha256::digest(prefix_and_body.as_bytes());
    let mut check = [0u8; CHECK_BYTES];
    check.copy_from_slice(&digest[..CHECK_BYTES]);
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_carry_their_prefix_and_pass_their_own_check() {
        for kind in [SecretKind::ApiKey, SecretKind::UsageToken] {
            let secret = Secret::generate(kind);
            assert!(secret.expose().starts_with(kind.prefix()));
            assert_eq!(SecretKind::of(secret.expose()), Some(kind));
            assert_eq!(parse(secret.expose(), kind), Some(secret.hash()));
        }
    }

    #[test]
    fn two_secrets_differ() {
        let a = Secret::generate(SecretKind::UsageToken);
        let b = Secret::generate(SecretKind::UsageToken);
        assert_ne!(a, b);
    }

    #[test]
    fn a_mistyped_truncated_or_wrong_kind_secret_is_refused() {
        let text = Secret::generate(SecretKind::UsageToken).expose().to_owned();
        let mut typo = text.clone().into_bytes();
        typo[10] = if typo[10] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();

        assert_eq!(parse(&typo, SecretKind::UsageToken), None);
        assert_eq!(parse(&text[..text.len() - 1], SecretKind::UsageToken), None);
        assert_eq!(parse(&text, SecretKind::ApiKey), None);
        assert_eq!(parse("tgu_", SecretKind::UsageToken), None);
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let secret = Secret::generate(SecretKind::ApiKey);
        let shown = format!("{secret:?} {:?}", secret.hash());
        assert!(!shown.contains(secret.expose()));
        assert!(!shown.contains(&secret.expose()[4..12]));
    }
}
