//! The parser of presented API keys and usage tokens, with any text and
//! with real secrets, as they were handed out or with one byte changed.
//! Beyond not panicking: a text that parses has its kind's shape, parses
//! again to the same hash and never as the other kind; a secret as handed
//! out always parses, to its own hash; and a change to its prefix or its
//! check is always refused.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate::fuzzing::secret_from;
use tollgate::secret::{SecretKind, parse};

/// The length of a secret's check, at its end.
const CHECK_CHARS: usize = 4;

#[derive(Arbitrary, Debug)]
struct Input {
    api_key: bool,
    random: [u8; 32],
    /// Which byte of the secret to change, and what to put there.
    change: Option<(u8, u8)>,
    text: String,
}

fuzz_target!(|input: Input| {
    let (kind, other) = if input.api_key {
        (SecretKind::ApiKey, SecretKind::UsageToken)
    } else {
        (SecretKind::UsageToken, SecretKind::ApiKey)
    };
    any_text(&input.text, kind, other);

    let secret = secret_from(kind, input.random);
    let text = secret.expose();
    assert_eq!(parse(text, kind), Some(secret.hash()), "{text} does not parse");
    assert_eq!(parse(text, other), None, "{text} parses as the other kind");
    if let Some((at, byte)) = input.change {
        changed(text, usize::from(at) % text.len(), byte, kind, other);
    }
});

fn any_text(text: &str, kind: SecretKind, other: SecretKind) {
    let Some(hash) = parse(text, kind) else {
        return;
    };
    assert!(text.starts_with(kind.prefix()) && text.len() == 51, "{text:?}");
    assert_eq!(parse(text, kind), Some(hash), "{text:?} parses to another hash");
    assert_eq!(parse(text, other), None, "{text:?} parses as both kinds");
}

/// The secret with the byte at `at` replaced.
fn changed(text: &str, at: usize, byte: u8, kind: SecretKind, other: SecretKind) {
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = byte;
    let Ok(changed) = String::from_utf8(bytes) else {
        return;
    };
    if changed == text {
        return;
    }
    let in_body = (kind.prefix().len()..text.len() - CHECK_CHARS).contains(&at);
    if !in_body {
        assert_eq!(parse(&changed, kind), None, "{changed} parses, changed at {at}");
    }
    // A changed body passes the 24-bit check once in 16 million.
    any_text(&changed, kind, other);
}
