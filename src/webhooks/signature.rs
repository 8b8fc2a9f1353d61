//! Webhook secrets, the signatures every delivery carries, and the check a
//! Rust receiver runs on them.
//!
//! A webhook secret is `whsec_` followed by 32 random bytes in standard,
//! padded base64, the shape Standard Webhooks uses. Each delivery is signed
//! twice, for two kinds of receiver:
//!
//! - `webhook-signature`, as Standard Webhooks specifies: `v1,` and the
//!   base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, keyed with the decoded
//!   bytes after `whsec_`. Binding the id and timestamp into the signature
//!   is what lets a receiver refuse a replayed delivery.
//! - `x-webhook-signature`: the lowercase hex HMAC-SHA256 of the body alone,
//!   keyed with the secret's whole text. Receivers written for Gabber-style
//!   webhooks check this one; it does not protect against replays.
//!
//! While a secret is being rotated, deliveries carry one Standard Webhooks
//! signature per secret still valid, so receivers holding either the old or
//! the new secret accept them. The hex scheme has room for one signature
//! only, so it is always made with the current secret.

use std::fmt::{self, Write};

use axum::http::header::InvalidHeaderValue;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

const PREFIX: &str = "whsec_";
/// 256 bits, the size of the HMAC-SHA256 output they key.
const RANDOM_BYTES: usize = 32;
/// Standard Webhooks asks for keys of at least 24 bytes; secrets made by
/// other tools at that size are accepted.
const MIN_KEY_BYTES: usize = 24;
/// How far a delivery's timestamp may be from the receiver's clock, either
/// way. Standard Webhooks suggests five minutes: wide enough for retries in
/// flight and loosely synchronised clocks, narrow enough that a captured
/// delivery cannot be replayed later.
const TOLERANCE_SECONDS: i64 = 5 * 60;
const VERSION_PREFIX: &str = "v1,";

const ID: &str = "webhook-id";
const TIMESTAMP: &str = "webhook-timestamp";
const SIGNATURE: &str = "webhook-signature";
const HEX_SIGNATURE: &str = "x-webhook-signature";

type HmacSha256 = Hmac<Sha256>;

/// The text of a webhook secret, shown once to the app that receives the
/// webhooks. Its `Debug` never prints it: use [`WebhookSecret::expose`]
/// where it must leave.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// A new random secret.
    pub fn generate() -> WebhookSecret {
        let mut random = [0u8; RANDOM_BYTES];
        rand::fill(&mut random[..]);
        let mut text = String::from(PREFIX);
        STANDARD.encode_string(random, &mut text);
        WebhookSecret(text)
    }

    /// A secret from its text, if it has the shape of one.
    pub fn parse(text: &str) -> Option<WebhookSecret> {
        key_of(text).map(|_| WebhookSecret(text.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The HMAC key for Standard Webhooks signatures.
    fn key(&self) -> Vec<u8> {
        key_of(&self.0).expect("a WebhookSecret is only made from a valid text")
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// The decoded bytes after the prefix, if the text is a secret.
fn key_of(text: &str) -> Option<Vec<u8>> {
    let key = STANDARD.decode(text.strip_prefix(PREFIX)?).ok()?;
    (key.len() >= MIN_KEY_BYTES).then_some(key)
}

/// The signatures of one delivery, with the id and timestamp they cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// Lowercase hex, for the `x-webhook-signature` header.
    pub x_webhook_signature: String,
    /// Space-separated `v1,<base64>`, for the `webhook-signature` header.
    pub webhook_signature: String,
    id: String,
    timestamp: i64,
}

impl SignatureHeaders {
    /// Sets `webhook-id`, `webhook-timestamp`, `webhook-signature` and
    /// `x-webhook-signature`, replacing any already there. Fails only if
    /// the id cannot be a header value.
    pub fn insert_into(&self, headers: &mut HeaderMap) -> Result<(), InvalidHeaderValue> {
        let name = HeaderName::from_static;
        headers.insert(name(ID), HeaderValue::try_from(&self.id)?);
        headers.insert(name(TIMESTAMP), HeaderValue::from(self.timestamp));
        headers.insert(name(SIGNATURE), HeaderValue::try_from(&self.webhook_signature)?);
        headers.insert(name(HEX_SIGNATURE), HeaderValue::try_from(&self.x_webhook_signature)?);
        Ok(())
    }
}

/// Signs one delivery. `secrets[0]` is the current secret; any others are
/// previous ones still in their rotation grace period.
///
/// # Panics
///
/// If `secrets` is empty: a delivery always has a current secret.
pub fn sign(secrets: &[&WebhookSecret], id: &str, timestamp: i64, body: &[u8]) -> SignatureHeaders {
    let current = secrets.first().expect("a delivery is signed with its current secret");
    let timestamp_text = timestamp.to_string();
    let webhook_signature = secrets
        .iter()
        .map(|secret| {
            let mac = standard_mac(&secret.key(), id.as_bytes(), timestamp_text.as_bytes(), body);
            format!("{VERSION_PREFIX}{}", STANDARD.encode(mac))
        })
        .collect::<Vec<_>>()
        .join(" ");
    SignatureHeaders {
        x_webhook_signature: hex(&hmac_sha256(current.expose().as_bytes(), &[body])),
        webhook_signature,
        id: id.to_owned(),
        timestamp,
    }
}

/// Why a delivery was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the secret is not a webhook secret (whsec_ and base64 of 24 bytes or more)")]
    BadSecret,
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the webhook-timestamp header is not a whole number of seconds")]
    BadTimestamp,
    #[error("the delivery is more than {TOLERANCE_SECONDS} seconds old")]
    TooOld,
    #[error("the delivery is timestamped more than {TOLERANCE_SECONDS} seconds ahead")]
    TooNew,
    #[error("no signature matches the secret")]
    NoMatchingSignature,
}

/// Checks a delivery's Standard Webhooks headers against `secret`: the
/// timestamp must be within five minutes of `now_unix_seconds`, and one of
/// the `v1` signatures must match.
pub fn verify(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_unix_seconds: i64,
) -> Result<(), VerifyError> {
    let key = key_of(secret).ok_or(VerifyError::BadSecret)?;
    let id = header(headers, ID)?;
    let timestamp = header(headers, TIMESTAMP)?;
    let signatures = header(headers, SIGNATURE)?;

    check_timestamp(timestamp, now_unix_seconds)?;

    // The signature covers the timestamp as sent, not as parsed.
    let expected = standard_mac(&key, id, timestamp, body);
    let matches = signatures
        .split(|&byte| byte == b' ')
        .filter_map(|entry| entry.strip_prefix(VERSION_PREFIX.as_bytes()))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|presented| bool::from(presented.ct_eq(&expected)));
    matches.then_some(()).ok_or(VerifyError::NoMatchingSignature)
}

/// Checks an `x-webhook-signature` value against `secret`. This scheme
/// covers the body only: it cannot tell a replayed delivery from a new one.
pub fn verify_hex(secret: &str, x_webhook_signature: &str, body: &[u8]) -> Result<(), VerifyError> {
    key_of(secret).ok_or(VerifyError::BadSecret)?;
    let expected = hex(&hmac_sha256(secret.as_bytes(), &[body]));
    let presented = x_webhook_signature.trim().to_ascii_lowercase();
    let matches = bool::from(presented.as_bytes().ct_eq(expected.as_bytes()));
    matches.then_some(()).ok_or(VerifyError::NoMatchingSignature)
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a [u8], VerifyError> {
    let value = headers.get(name).ok_or(VerifyError::MissingHeader(name))?;
    Ok(value.as_bytes())
}

fn check_timestamp(timestamp: &[u8], now: i64) -> Result<(), VerifyError> {
    let timestamp: i64 = std::str::from_utf8(timestamp)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(VerifyError::BadTimestamp)?;
    // Saturating, so that an absurd timestamp is refused rather than wrapping.
    match now.saturating_sub(timestamp) {
        age if age > TOLERANCE_SECONDS => Err(VerifyError::TooOld),
        age if age < -TOLERANCE_SECONDS => Err(VerifyError::TooNew),
        _ => Ok(()),
    }
}

/// The Standard Webhooks MAC: over `{id}.{timestamp}.{body}`.
fn standard_mac(key: &[u8], id: &[u8], timestamp: &[u8], body: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[id, b".", timestamp, b".", body])
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        write!(text, "{byte:02x}").expect("writing to a String cannot fail");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"type":"session.closed","data":{"human":"ada"}}"#;

    /// What a dispatcher would send: the body's headers, signed at `NOW`.
    fn delivery(secrets: &[&WebhookSecret]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        sign(secrets, "msg_1", NOW, BODY).insert_into(&mut headers).unwrap();
        headers
    }

    /// HMAC-SHA256 by ring, so that the reference does not share code with
    /// what it checks.
    fn ring_hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        ring::hmac::sign(&key, message).as_ref().to_vec()
    }

    #[test]
    fn generated_secrets_have_the_standard_webhooks_shape_and_parse_back() {
        let secret = WebhookSecret::generate();
        let encoded = secret.expose().strip_prefix("whsec_").unwrap();
        assert_eq!(STANDARD.decode(encoded).unwrap().len(), 32);
        assert!(encoded.ends_with('='), "padded base64 of 32 bytes ends in one =");
        assert_eq!(WebhookSecret::parse(secret.expose()), Some(secret));
        assert_ne!(WebhookSecret::generate(), WebhookSecret::generate());
    }

    #[test]
    fn a_text_without_the_prefix_base64_or_enough_bytes_is_not_a_secret() {
        let short = format!("whsec_{}", STANDARD.encode([7u8; 23]));
        let unprefixed = STANDARD.encode([7u8; 32]);
        for text in ["", "whsec_", "whsec_not base64!", &short, &unprefixed] {
            assert_eq!(WebhookSecret::parse(text), None, "{text}");
        }
        assert!(WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 24]))).is_some());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let secret = WebhookSecret::generate();
        let shown = format!("{secret:?}");
        assert!(!shown.contains(&secret.expose()[6..14]));
    }

    #[test]
    fn the_specification_example_signs_to_its_published_signature() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signed = sign(&[&secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signed.webhook_signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn the_standard_signature_matches_ring_keyed_with_the_decoded_secret() {
        let secret = WebhookSecret::generate();
        let key = STANDARD.decode(&secret.expose()[6..]).unwrap();
        let mut message = b"msg_1.1700000000.".to_vec();
        message.extend_from_slice(BODY);
        let expected = format!("v1,{}", STANDARD.encode(ring_hmac(&key, &message)));

        assert_eq!(sign(&[&secret], "msg_1", NOW, BODY).webhook_signature, expected);
    }

    #[test]
    fn the_hex_signature_matches_ring_keyed_with_the_secrets_whole_text() {
        let secret = WebhookSecret::generate();
        let mac = ring_hmac(secret.expose().as_bytes(), BODY);
        let expected: String = mac.iter().map(|byte| format!("{byte:02x}")).collect();

        let signed = sign(&[&secret], "msg_1", NOW, BODY);
        assert_eq!(signed.x_webhook_signature, expected);
        assert_eq!(verify_hex(secret.expose(), &expected, BODY), Ok(()));
        assert_eq!(verify_hex(secret.expose(), &expected.to_uppercase(), BODY), Ok(()));
    }

    #[test]
    fn a_delivery_carries_all_four_headers() {
        let headers = delivery(&[&WebhookSecret::generate()]);
        assert_eq!(headers["webhook-id"], "msg_1");
        assert_eq!(headers["webhook-timestamp"], "1700000000");
        assert!(headers["webhook-signature"].to_str().unwrap().starts_with("v1,"));
        assert_eq!(headers["x-webhook-signature"].len(), 64);
    }

    #[test]
    fn a_delivery_verifies_with_its_secret() {
        let secret = WebhookSecret::generate();
        assert_eq!(verify(secret.expose(), &delivery(&[&secret]), BODY, NOW), Ok(()));
    }

    #[test]
    fn during_rotation_either_secret_verifies_and_the_hex_uses_the_current_one() {
        let (current, previous) = (WebhookSecret::generate(), WebhookSecret::generate());
        let signed = sign(&[&current, &previous], "msg_1", NOW, BODY);
        let entries: Vec<&str> = signed.webhook_signature.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], sign(&[&current], "msg_1", NOW, BODY).webhook_signature);

        let headers = delivery(&[&current, &previous]);
        assert_eq!(verify(current.expose(), &headers, BODY, NOW), Ok(()));
        assert_eq!(verify(previous.expose(), &headers, BODY, NOW), Ok(()));
        let other = WebhookSecret::generate();
        let refused = verify(other.expose(), &headers, BODY, NOW);
        assert_eq!(refused, Err(VerifyError::NoMatchingSignature));

        let hex = &signed.x_webhook_signature;
        assert_eq!(verify_hex(current.expose(), hex, BODY), Ok(()));
        assert_eq!(verify_hex(previous.expose(), hex, BODY), Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn a_tampered_body_or_timestamp_is_refused() {
        let secret = WebhookSecret::generate();
        let mut headers = delivery(&[&secret]);
        let tampered = br#"{"type":"session.closed","data":{"human":"eve"}}"#;
        let refused = Err(VerifyError::NoMatchingSignature);
        assert_eq!(verify(secret.expose(), &headers, tampered, NOW), refused);
        let hex = headers["x-webhook-signature"].to_str().unwrap();
        assert_eq!(verify_hex(secret.expose(), hex, tampered), refused);

        headers.insert("webhook-timestamp", HeaderValue::from(NOW + 1));
        assert_eq!(verify(secret.expose(), &headers, BODY, NOW), refused);
    }

    #[test]
    fn a_delivery_outside_five_minutes_either_way_is_refused_as_a_replay() {
        let secret = WebhookSecret::generate();
        let headers = delivery(&[&secret]);
        let check = |now| verify(secret.expose(), &headers, BODY, now);
        assert_eq!(check(NOW + 300), Ok(()));
        assert_eq!(check(NOW - 300), Ok(()));
        assert_eq!(check(NOW + 301), Err(VerifyError::TooOld));
        assert_eq!(check(NOW - 301), Err(VerifyError::TooNew));
        assert_eq!(check(i64::MIN), Err(VerifyError::TooNew));
    }

    #[test]
    fn missing_headers_a_bad_timestamp_and_a_bad_secret_are_named() {
        let secret = WebhookSecret::generate();
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut headers = delivery(&[&secret]);
            headers.remove(name);
            let refused = verify(secret.expose(), &headers, BODY, NOW);
            assert_eq!(refused, Err(VerifyError::MissingHeader(name)));
        }

        let mut headers = delivery(&[&secret]);
        headers.insert("webhook-timestamp", HeaderValue::from_static("soon"));
        let refused = verify(secret.expose(), &headers, BODY, NOW);
        assert_eq!(refused, Err(VerifyError::BadTimestamp));

        let headers = delivery(&[&secret]);
        let refused = verify("whsec_short", &headers, BODY, NOW);
        assert_eq!(refused, Err(VerifyError::BadSecret));
        assert_eq!(verify_hex("not a secret", "00", BODY), Err(VerifyError::BadSecret));
    }
}
