//! Parsing at the edge: request bodies and headers become typed, checked
//! values before any handler logic runs, and every failure is an
//! `invalid_input` that names the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _, MapAccess, Visitor};

use super::error::ApiError;
use crate::limits::{Limit, LimitType};

/// Largest request body accepted. The biggest legitimate body names a human
/// and three limits, well under a kilobyte.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest human identifier accepted, in bytes.
pub const MAX_HUMAN_BYTES: usize = 256;

/// A request's body as bytes, at most [`MAX_BODY_BYTES`]; a longer one, or
/// one that cannot be read, is an `invalid_input` rather than axum's own
/// plain-text rejection.
pub struct BodyBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for BodyBytes {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            let reason = if rejection.into_response().status() == StatusCode::PAYLOAD_TOO_LARGE {
                "larger than the 64 KiB limit"
            } else {
                "could not be read"
            };
            ApiError::InvalidInput(format!("request body: {reason}"))
        })?;
        Ok(BodyBytes(bytes))
    }
}

/// A JSON body, whatever its `Content-Type`, deserialised with the path of
/// any bad field in the error (`limits[1].type: unknown variant ...`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let BodyBytes(bytes) = BodyBytes::from_request(request, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object; derived structs would also take an
    // array of their fields in order.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidInput("request body: must be a JSON object".into()));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        // The path is `.` at the top level, empty for a field named by the
        // empty string, and holds a `?` where the parser gave up before it
        // knew the field (truncated JSON, say).
        let path = error.path().to_string();
        let unnamed = path == "." || path.is_empty() || path.contains('?');
        let message = error.into_inner().to_string();
        if let Some(name) = duplicate_field(&message) {
            // Said of the object that holds the field, so named here.
            let field = if path == "." { name.to_owned() } else { format!("{path}.{name}") };
            return ApiError::InvalidInput(format!("{field}: given more than once"));
        }
        let field = if unnamed { "request body".to_owned() } else { path };
        ApiError::InvalidInput(format!("{field}: {message}"))
    })?;
    deserializer.end().map_err(|error| ApiError::InvalidInput(format!("request body: {error}")))?;
    Ok(value)
}

/// The field serde's derived code names in its "duplicate field `name`"
/// error, which it raises for a field given twice, or once under its name
/// and once under an alias.
fn duplicate_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("duplicate field `")?;
    rest.split_once('`').map(|(name, _)| name)
}

/// A limit as a request carries it: `{"type", "value"}`.
#[derive(Debug)]
pub struct LimitInput {
    pub limit_type: LimitType,
    pub value: f64,
}

impl<'de> Deserialize<'de> for LimitInput {
    /// By hand rather than derived: a derived struct would also take the
    /// array `["token_cnt", 5]`, which no client means.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(LimitVisitor)
    }
}

struct LimitVisitor;

impl<'de> Visitor<'de> for LimitVisitor {
    type Value = LimitInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"an object {"type", "value"}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LimitInput, A::Error> {
        let (mut limit_type, mut value) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" if limit_type.is_none() => limit_type = Some(map.next_value()?),
                "value" if value.is_none() => value = Some(map.next_value()?),
                "type" => return Err(A::Error::duplicate_field("type")),
                "value" => return Err(A::Error::duplicate_field("value")),
                other => return Err(A::Error::unknown_field(other, &["type", "value"])),
            }
        }
        Ok(LimitInput {
            limit_type: limit_type.ok_or_else(|| A::Error::missing_field("type"))?,
            value: value.ok_or_else(|| A::Error::missing_field("value"))?,
        })
    }
}

/// Converts a request's limits to base units, refusing bad values and a
/// type named twice.
pub fn limits(inputs: Vec<LimitInput>) -> Result<Vec<Limit>, ApiError> {
    let mut limits: Vec<Limit> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let value = input
            .limit_type
            .to_base(input.value)
            .map_err(|reason| ApiError::InvalidInput(format!("limits[{i}].value: {reason}")))?;
        if limits.iter().any(|limit| limit.limit_type == input.limit_type) {
            return Err(ApiError::InvalidInput(format!(
                "limits[{i}].type: {} is named twice",
                input.limit_type.as_str()
            )));
        }
        limits.push(Limit { limit_type: input.limit_type, value });
    }
    Ok(limits)
}

/// Checks a human identifier from a body field or header.
///
/// Control characters (which could forge log lines) and white space at
/// either end (which HTTP strips from `x-human-id`, so that such a human
/// could be named in a body but never in a header) are refused.
pub fn human(name: String, field: &str) -> Result<String, ApiError> {
    if name.is_empty() || name.len() > MAX_HUMAN_BYTES {
        return Err(ApiError::InvalidInput(format!(
            "{field}: must be 1 to {MAX_HUMAN_BYTES} bytes long"
        )));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err(ApiError::InvalidInput(format!(
            "{field}: must not contain control characters or start or end with white space"
        )));
    }
    Ok(name)
}

/// A token lifetime in seconds, checked against the server's maximum, as
/// milliseconds.
pub fn ttl_millis(seconds: f64, max_seconds: f64) -> Result<i64, ApiError> {
    let millis = (seconds * 1000.0).round();
    if !(millis.is_finite() && millis >= 1.0 && seconds <= max_seconds) {
        return Err(ApiError::InvalidInput(format!(
            "ttl_seconds: must be at least 0.001 and at most {max_seconds}"
        )));
    }
    Ok(millis as i64)
}

/// A query string's parameters by name. Each is one the endpoint takes and
/// is given at most once, so that a misspelt filter is refused rather than
/// quietly widening what is read.
pub struct QueryParams(HashMap<&'static str, String>);

impl QueryParams {
    pub fn parse(uri: &Uri, known: &[&'static str]) -> Result<QueryParams, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|_| ApiError::InvalidInput("query string: could not be parsed".into()))?;
        let mut params = HashMap::new();
        for (name, value) in pairs {
            let Some(&known_name) = known.iter().find(|known| **known == name) else {
                return Err(ApiError::InvalidInput(format!(
                    "{name}: unknown parameter; this endpoint takes {}",
                    known.join(", ")
                )));
            };
            if params.insert(known_name, value).is_some() {
                return Err(ApiError::InvalidInput(format!("{name}: given more than once")));
            }
        }
        Ok(QueryParams(params))
    }

    /// The value of a parameter, if it was given.
    pub fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }
}

/// A header's value as UTF-8, if present. A header given twice is refused
/// rather than read one way here and another way by a proxy.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidInput(format!("{name}: given more than once")));
    }
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| ApiError::InvalidInput(format!("{name}: must be UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Body {
        human: String,
        limits: Vec<LimitInput>,
    }

    fn error_of(json: &str) -> String {
        match parse_json::<Body>(json.as_bytes()) {
            Err(ApiError::InvalidInput(message)) => message,
            other => panic!("expected invalid_input, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_field_is_named_in_the_error() {
        let message = error_of(r#"{"human": "a", "limits": [{"type": "bogus", "value": 1}]}"#);
        assert!(message.starts_with("limits[0].type: unknown variant `bogus`"), "{message}");
        let message = error_of(r#"{"human": 7, "limits": []}"#);
        assert!(message.starts_with("human: invalid type"), "{message}");
    }

    #[test]
    fn truncated_and_trailing_json_are_refused() {
        assert!(error_of(r#"{"human": "a", "limits": ["#).starts_with("limits"));
        let truncated = error_of(r#"{"human": "a", "limits": [{"type": "token_cnt", "#);
        assert!(truncated.starts_with("request body: EOF"), "{truncated}");
        assert!(error_of(r#"{"human": "a", "limits": []} x"#).starts_with("request body:"));
        assert!(error_of("").starts_with("request body:"));
    }

    #[test]
    fn a_field_given_twice_is_named_in_the_error() {
        let message = error_of(r#"{"human": "a", "human": "b", "limits": []}"#);
        assert_eq!(message, "human: given more than once");
        let message = error_of(r#"{"human": "a", "limits": [{"type": "token_cnt", "type": 1}]}"#);
        assert_eq!(message, "limits[0].type: given more than once");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        human: String,
    }

    #[test]
    fn a_field_named_by_the_empty_string_is_refused_as_the_body_s_fault() {
        let Err(ApiError::InvalidInput(message)) =
            parse_json::<Strict>(br#"{""usage.limit_low"800}"#)
        else {
            panic!("the empty field name was not refused as invalid_input");
        };
        assert!(message.starts_with("request body: unknown field ``"), "{message}");
    }

    fn query_error(query: &str) -> String {
        let uri: Uri = format!("/v1/x?{query}").parse().unwrap();
        match QueryParams::parse(&uri, &["human", "limit"]) {
            Err(ApiError::InvalidInput(message)) => message,
            Err(other) => panic!("expected invalid_input, got {other:?}"),
            Ok(_) => panic!("{query} was accepted"),
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_unknown_or_repeated_ones_refused() {
        let uri: Uri = "/v1/x?human=ada%20b&limit=5".parse().unwrap();
        let mut params = QueryParams::parse(&uri, &["human", "limit"]).unwrap();
        assert_eq!(params.take("human").as_deref(), Some("ada b"));
        assert_eq!(params.take("limit").as_deref(), Some("5"));
        assert!(QueryParams::parse(&"/v1/x".parse().unwrap(), &["human"]).is_ok());

        let unknown = query_error("humans=ada");
        assert_eq!(unknown, "humans: unknown parameter; this endpoint takes human, limit");
        assert_eq!(query_error("limit=1&limit=2"), "limit: given more than once");
    }

    #[test]
    fn a_type_named_twice_is_refused() {
        let twice = vec![
            LimitInput { limit_type: LimitType::TokenCnt, value: 1.0 },
            LimitInput { limit_type: LimitType::TokenCnt, value: 2.0 },
        ];
        assert!(matches!(limits(twice), Err(ApiError::InvalidInput(m)) if m.contains("twice")));
    }
}
