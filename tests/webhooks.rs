//! Webhooks: their configuration, every event once per cause, signatures
//! under both schemes (checked here with ring, independently of the code
//! under test), retries, a slow receiver that must not slow metering, and
//! a PostgreSQL outbox shared by two dispatchers.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::receiver::{Delivered, Receiver, of_type};
use common::{Api, TestServer, assert_ledger_identity};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate::store::DELIVERY_LEASE;
use tollgate::webhooks::dispatch::DispatchSettings;

/// A server whose webhook retries come quickly.
async fn server() -> TestServer {
    TestServer::start_with(|settings| {
        settings.webhooks = DispatchSettings {
            poll: Duration::from_millis(20),
            first_retry: Duration::from_millis(100),
            ..DispatchSettings::default()
        };
    })
    .await
}

async fn set_webhook(api: &Api, body: Value) -> (StatusCode, Value) {
    api.backend(Method::PUT, "/v1/webhook", body).await
}

/// Sets the project's webhook to `url` and returns its secret.
async fn hook(api: &Api, url: &str, extra: Value) -> String {
    let mut body = json!({ "url": url });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, answer) = set_webhook(api, body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    answer["secret"].as_str().unwrap().to_owned()
}

fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, message).as_ref().to_vec()
}

/// Checks both signatures of a delivery against `secret`, as receivers do.
fn assert_signed(delivered: &Delivered, secret: &str) {
    let hex: String =
        hmac(secret.as_bytes(), &delivered.body).iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(delivered.header("x-webhook-signature"), hex);

    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    assert!(key.len() >= 24, "the secret holds {} bytes", key.len());
    let (id, timestamp) = (delivered.header("webhook-id"), delivered.header("webhook-timestamp"));
    let signed = [id.as_bytes(), b".", timestamp.as_bytes(), b".", &delivered.body].concat();
    let expected = format!("v1,{}", STANDARD.encode(hmac(&key, &signed)));
    let signatures: Vec<&str> = delivered.header("webhook-signature").split(' ').collect();
    assert!(signatures.contains(&expected.as_str()), "{signatures:?} lacks {expected}");
    let now = tollgate::clock::now_millis() / 1000;
    assert!((now - timestamp.parse::<i64>().unwrap()).abs() < 60);
    let event: Value = delivered.json();
    assert_eq!(event["payload"]["id"], id, "webhook-id is the event's id");
}

#[tokio::test]
async fn a_webhook_is_set_shown_changed_and_removed_and_its_secret_shown_once() {
    let server = server().await;
    let (status, created) = set_webhook(
        &server,
        json!({"url": "https://hooks.example/a",
        "events": ["usage.tracked"], "thresholds": [{"type": "token_cnt", "value": 500}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    assert!(STANDARD.decode(&secret[6..]).unwrap().len() >= 24);

    let (status, shown) = server.backend(Method::GET, "/v1/webhook", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert!(shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["thresholds"], json!([{"type": "token_cnt", "value": 500.0}]));
    assert_eq!(shown["events"], json!(["usage.tracked"]));

    let (status, changed) = set_webhook(&server, json!({"url": "https://hooks.example/b"})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(changed.get("secret").is_none(), "a change keeps the secret");
    assert_eq!(
        (changed["url"].as_str(), &changed["events"]),
        (Some("https://hooks.example/b"), &Value::Null)
    );

    for (bad, field) in [
        (json!({"url": "ftp://x"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "https://x", "events": ["usage.everything"]}), "events[0]"),
        (json!({"url": "https://x", "events": []}), "events"),
        (
            json!({"url": "https://x", "thresholds": [{"type": "minutes", "value": 1}]}),
            "thresholds",
        ),
        (json!({"url": "https://x", "secret": "mine"}), "secret"),
    ] {
        let (status, answer) = set_webhook(&server, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(field), "{bad}: {answer}");
    }

    let (status, _) = server.backend(Method::DELETE, "/v1/webhook", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.backend(Method::GET, "/v1/webhook", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.backend(Method::DELETE, "/v1/webhook", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_event_arrives_once_per_cause_signed_under_both_schemes() {
    let receiver = Receiver::start().await;
    let server = server().await;
    let thresholds = json!({"thresholds": [{"type": "conversational_seconds", "value": 1}]});
    let secret = hook(&server, &receiver.url, thresholds).await;

    let token = server.mint_seconds("ada", 1.5).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    server
        .put(
            "/v1/usage/token",
            json!({"human": "ada",
        "limits": [{"type": "token_cnt", "value": 100}]}),
        )
        .await;
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
    let response = server.http.post(server.url("/v1/chat/completions")).bearer_auth(&token);
    assert_eq!(response.json(&chat).send().await.unwrap().status(), StatusCode::OK);
    let report = json!({"human": "ada", "type": "token_cnt", "value": 5, "idempotency_key": "r1",
                        "metadata": {"job": 7}});
    assert_eq!(server.post("/v1/usage/report", report).await.0, StatusCode::OK);
    assert_eq!(
        server.post("/v1/usage/token/revoke", json!({"human": "ada"})).await.0,
        StatusCode::OK
    );

    receiver.until(|events| of_type(events, "usage_token.revoked").len() == 1).await;
    // Nothing more comes: each cause once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = receiver.events().into_iter().collect::<Vec<_>>();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(count("realtime_session.state_changed"), 2, "{kinds:?}");
    assert_eq!(count("usage.limit_low"), 1, "{kinds:?}");
    assert_eq!(count("usage.limit_exhausted"), 1, "{kinds:?}");
    assert_eq!(count("usage.tracked"), 3, "session, completion, report: {kinds:?}");
    assert_eq!(count("usage_token.revoked"), 1);

    let states = of_type(&events, "realtime_session.state_changed");
    assert_eq!(states[0]["payload"]["state"], "started");
    let ended = &states[1]["payload"];
    assert_eq!(
        (ended["state"].as_str(), ended["end_reason"].as_str()),
        (Some("ended"), Some("usage_limit_exceeded"))
    );
    assert!((ended["seconds_used"].as_f64().unwrap() - 1.5).abs() < 0.001);
    let tracked = of_type(&events, "usage.tracked");
    let session_usage = &tracked[0]["payload"];
    assert_eq!(session_usage["type"], "conversational_seconds");
    assert_eq!(session_usage["value"], ended["seconds_used"]);
    assert_eq!(session_usage["metadata"]["session"], ended["session"]);
    assert_eq!(tracked[1]["payload"]["type"], "token_cnt");
    assert!(tracked[1]["payload"]["metadata"]["completion"].is_string());
    assert_eq!(tracked[2]["payload"]["metadata"]["idempotency_key"], "r1");
    assert_eq!(tracked[2]["payload"]["metadata"]["metadata"], json!({"job": 7}));
    for event in &events {
        let payload = &event["payload"];
        assert_eq!(
            (payload["human"].as_str(), payload["human_id"].as_str()),
            (Some("ada"), Some("ada"))
        );
        assert_eq!(payload["project"], "default");
    }
    for delivered in receiver.got() {
        assert_signed(&delivered, &secret);
    }
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_the_same_event_three_times() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[500, 500]);
    let server = server().await;
    hook(&server, &receiver.url, json!({"events": ["usage_token.revoked"]})).await;
    server.mint_seconds("bo", 10.0).await;
    server.post("/v1/usage/token/revoke", json!({"human": "bo"})).await;

    receiver.until(|events| events.len() == 3).await;
    let ids: Vec<String> =
        receiver.got().iter().map(|d| d.header("webhook-id").to_owned()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let (_, page) =
        server.backend(Method::GET, "/v1/webhook/deliveries?status=delivered", Value::Null).await;
    let deliveries = page["data"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{page}");
    assert_eq!(
        (deliveries[0]["id"].as_str(), deliveries[0]["attempts"].as_i64()),
        (Some(&*ids[0]), Some(3))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 3, "delivered once it was taken");
}

#[tokio::test]
async fn running_low_and_exhausted_fire_once_per_crossing_and_again_after_a_top_up() {
    let receiver = Receiver::start().await;
    let server = server().await;
    let extra = json!({"events": ["usage.limit_low", "usage.limit_exhausted"],
                       "thresholds": [{"type": "token_cnt", "value": 50}]});
    hook(&server, &receiver.url, extra).await;
    server.mint("cy", json!([{"type": "token_cnt", "value": 100}])).await;
    let spend = |n: u32| {
        let api = &server.api;
        async move {
            let body = json!({"human": "cy", "type": "token_cnt", "value": 10,
                              "idempotency_key": format!("spend-{n}")});
            assert_eq!(api.post("/v1/usage/report", body).await.0, StatusCode::OK);
        }
    };
    for n in 0..12 {
        spend(n).await; // 100 down to -20: below 50 once, to zero once
    }
    let events = receiver.until(|events| events.len() == 2).await;
    assert_eq!(events[0]["type"], "usage.limit_low");
    assert_eq!(events[0]["payload"]["remaining"], 40.0);
    assert_eq!(events[1]["type"], "usage.limit_exhausted");
    assert_eq!(events[1]["payload"]["remaining"], 0.0);

    server
        .put(
            "/v1/usage/token",
            json!({"human": "cy", "mode": "add",
        "limits": [{"type": "token_cnt", "value": 120}]}),
        )
        .await; // back to 100
    for n in 12..24 {
        spend(n).await;
    }
    let events = receiver.until(|events| events.len() == 4).await;
    assert_eq!(
        (events[2]["type"].as_str(), events[3]["type"].as_str()),
        (Some("usage.limit_low"), Some("usage.limit_exhausted"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.events().len(), 4);
}

#[tokio::test]
async fn after_a_rotation_both_secrets_sign_for_the_grace_period() {
    let receiver = Receiver::start().await;
    let server = server().await;
    let old = hook(&server, &receiver.url, json!({"events": ["usage_token.revoked"]})).await;
    let (status, rotated) = server.post("/v1/webhook/rotate", json!({"grace_seconds": 3600})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);

    server.mint_seconds("di", 10.0).await;
    server.post("/v1/usage/token/revoke", json!({"human": "di"})).await;
    receiver.until(|events| events.len() == 1).await;
    let delivered = &receiver.got()[0];
    assert_eq!(delivered.header("webhook-signature").split(' ').count(), 2);
    assert_signed(delivered, &new);
    let old_key = STANDARD.decode(old.strip_prefix("whsec_").unwrap()).unwrap();
    let signed = [
        delivered.header("webhook-id").as_bytes(),
        b".",
        delivered.header("webhook-timestamp").as_bytes(),
        b".",
        &delivered.body,
    ]
    .concat();
    let old_signature = format!("v1,{}", STANDARD.encode(hmac(&old_key, &signed)));
    assert!(delivered.header("webhook-signature").contains(&old_signature));
    let now = tollgate::clock::now_millis() / 1000;
    assert!(tollgate::verify(&old, &delivered.headers, &delivered.body, now).is_ok());
    assert!(tollgate::verify(&new, &delivered.headers, &delivered.body, now).is_ok());
}

#[tokio::test]
async fn a_receiver_that_never_answers_does_not_slow_metering() {
    let receiver = Receiver::start().await;
    receiver.hang();
    let server = server().await;
    hook(&server, &receiver.url, json!({})).await;
    let humans: Vec<String> = (0..20).map(|i| format!("h{i}")).collect();
    let tokens =
        futures::future::join_all(humans.iter().map(|h| server.mint_seconds(h, 1.0))).await;
    let sessions = futures::future::join_all(tokens.iter().map(|t| server.connect(t))).await;
    let closed = futures::future::join_all(
        sessions.into_iter().map(|mut s| async move { s.until_closed().await }),
    )
    .await;
    for closed in closed {
        assert_eq!(closed.code, Some(4001));
        assert!((closed.after - 1.0).abs() < 0.1, "cut off after {} s", closed.after);
    }
    assert!(!receiver.got().is_empty(), "the receiver was being sent events");
}

#[tokio::test]
async fn a_failed_delivery_can_be_retried_by_hand() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[500; 100]);
    let server = TestServer::start_with(|settings| {
        settings.webhooks = DispatchSettings {
            poll: Duration::from_millis(20),
            first_retry: Duration::from_millis(50),
            give_up_after: Duration::from_millis(300),
            ..DispatchSettings::default()
        };
    })
    .await;
    hook(&server, &receiver.url, json!({"events": ["usage_token.revoked"]})).await;
    server.mint_seconds("ed", 10.0).await;
    server.post("/v1/usage/token/revoke", json!({"human": "ed"})).await;

    let failed = loop {
        let (_, page) =
            server.backend(Method::GET, "/v1/webhook/deliveries?status=failed", Value::Null).await;
        if let Some(first) = page["data"].as_array().unwrap().first() {
            break first.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failed["last_error"].as_str().unwrap().contains("500"), "{failed}");
    receiver.answer_with(&[]);
    let before = receiver.got().len();
    let id = failed["id"].as_str().unwrap();
    let (status, retried) =
        server.post(&format!("/v1/webhook/deliveries/{id}/retry"), Value::Null).await;
    assert_eq!((status, retried["status"].as_str()), (StatusCode::OK, Some("pending")));
    receiver.until(|events| events.len() > before).await;
    let (status, _) = server.post("/v1/webhook/deliveries/evt_nope/retry", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        server.backend(Method::GET, "/v1/webhook/deliveries?status=lost", Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn pending_deliveries_survive_a_kill_9_and_are_sent_after_the_restart() {
    let database = common::TestDatabase::create().await;
    let db = database.setting();
    // An address with nothing listening yet: every attempt fails.
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", address.local_addr().unwrap());
    drop(address);

    let process = common::binary::spawn(&db, &[], "info");
    let api = Api::new(process.base.trim_start_matches("http://"), process.api_key());
    hook(&api, &url, json!({"events": ["usage_token.revoked"]})).await;
    for human in ["ada", "bob", "cy"] {
        api.mint_seconds(human, 10.0).await;
        assert_eq!(
            api.post("/v1/usage/token/revoke", json!({"human": human})).await.0,
            StatusCode::OK
        );
    }
    let (_, pending) =
        api.backend(Method::GET, "/v1/webhook/deliveries?status=pending", Value::Null).await;
    let ids: Vec<String> = pending["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{pending}");
    process.kill();

    let listener =
        tokio::net::TcpListener::bind(url.trim_start_matches("http://").trim_end_matches("/hook"))
            .await
            .unwrap();
    let receiver = Receiver::on(listener);
    let _restarted = common::binary::spawn(&db, &[], "info");
    // On PostgreSQL an event whose attempt the kill cut short stays claimed
    // by the dead server until its lease runs out.
    let wait = DELIVERY_LEASE + Duration::from_secs(20);
    let events = receiver.until_within(wait, |events| events.len() >= 3).await;
    let mut delivered: Vec<String> =
        events.iter().map(|e| e["payload"]["id"].as_str().unwrap().to_owned()).collect();
    delivered.sort();
    delivered.dedup();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(delivered, expected);
}

#[tokio::test]
async fn a_long_session_is_tracked_once_a_minute_and_the_rest_at_its_end() {
    let receiver = Receiver::start().await;
    let server = server().await;
    hook(&server, &receiver.url, json!({"events": ["usage.tracked"]})).await;
    let token = server.mint_seconds("fay", 61.0).await;
    let closed = server.connect(&token).await.until_closed().await;
    assert_eq!(closed.code, Some(4001));

    let events = receiver.until(|events| events.len() == 2).await;
    let values: Vec<f64> = events.iter().map(|e| e["payload"]["value"].as_f64().unwrap()).collect();
    // Open sessions are recorded once a minute, at the first tick after it.
    assert!((60.0..=61.0).contains(&values[0]), "{values:?}");
    assert!((values[0] + values[1] - 61.0).abs() < 0.001, "{values:?}");
}

/// Runs `tollgate webhooks ...` against the server.
async fn cli(server: &TestServer, args: &[&str]) -> (bool, Value) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("webhooks")
        .args(["--server", &server.base])
        .args(args)
        .env("TOLLGATE_API_KEY", &server.key)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    (output.status.success(), serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_command_line_sets_shows_rotates_and_removes_the_webhook() {
    let server = server().await;
    let set = [
        "set",
        "--endpoint",
        "https://hooks.example/x",
        "--events",
        "usage.tracked,usage.limit_low",
    ];
    let (ok, created) = cli(&server, &[&set[..], &["--threshold", "token_cnt=250"]].concat()).await;
    assert!(ok, "{created}");
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["events"], json!(["usage.tracked", "usage.limit_low"]));

    let (ok, shown) = cli(&server, &["show"]).await;
    assert!(ok && shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["thresholds"], json!([{"type": "token_cnt", "value": 250.0}]));
    let (ok, rotated) = cli(&server, &["rotate", "--grace-seconds", "60"]).await;
    assert!(ok && rotated["secret"] != created["secret"], "{rotated}");
    let (ok, listed) = cli(&server, &["deliveries", "--status", "pending"]).await;
    assert!(ok && listed["data"] == json!([]), "{listed}");
    let (ok, _) = cli(&server, &["delete"]).await;
    assert!(ok);
    let (ok, _) = cli(&server, &["show"]).await;
    assert!(!ok, "a removed webhook is shown");
}

#[tokio::test]
async fn thresholds_crossed_by_ticks_fire_once_and_again_after_a_top_up() {
    let receiver = Receiver::start().await;
    let server = server().await;
    let extra = json!({"events": ["usage.limit_low", "usage.limit_exhausted"],
                       "thresholds": [{"type": "conversational_seconds", "value": 1}]});
    hook(&server, &receiver.url, extra).await;
    let token = server.mint_seconds("gil", 2.0).await;
    for round in 1..=2 {
        // About forty ticks of 50 ms from 2 s to 0: under 1 s once, at 0 once.
        let closed = server.connect(&token).await.until_closed().await;
        assert_eq!(closed.code, Some(4001), "round {round}");
        let events = receiver.until(|events| events.len() == 2 * round).await;
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds.len(), 2 * round, "{kinds:?}");
        assert_eq!(&kinds[2 * round - 2..], ["usage.limit_low", "usage.limit_exhausted"]);
        server
            .put(
                "/v1/usage/token",
                json!({"human": "gil", "mode": "add",
                 "limits": [{"type": "conversational_seconds", "value": 2}]}),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.events().len(), 4, "{:#?}", receiver.events());
}

#[tokio::test]
async fn running_low_fires_while_the_session_runs_not_when_it_is_next_recorded() {
    let receiver = Receiver::start().await;
    let server = server().await;
    let extra = json!({"events": ["usage.limit_low"],
                       "thresholds": [{"type": "conversational_seconds", "value": 2}]});
    hook(&server, &receiver.url, extra).await;
    let token = server.mint_seconds("hal", 3.0).await;
    let mut client = server.connect(&token).await;
    // The pool falls below 2 s about 1 s in, long before the meter would
    // record the session of its own accord (once a minute).
    receiver.until(|events| !events.is_empty()).await;
    let after = client.opened.elapsed();
    assert!(after < Duration::from_millis(2500), "limit_low came {after:?} after the start");
    let event = &receiver.events()[0];
    assert!(event["payload"]["remaining"].as_f64().unwrap() < 2.0, "{event}");
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
}

#[tokio::test]
async fn one_projects_backlog_does_not_hold_up_anothers_deliveries() {
    let stuck = Receiver::start().await;
    stuck.hang();
    let healthy = Receiver::start().await;
    let server = server().await;
    hook(&server, &stuck.url, json!({"events": ["usage.tracked"]})).await;
    // More due events than one read of the outbox takes.
    let reports = (0..300).map(|n| {
        let body = json!({"human": "ada", "type": "token_cnt", "value": 1,
                          "idempotency_key": format!("r{n}")});
        server.post("/v1/usage/report", body)
    });
    futures::future::join_all(reports).await;

    let other_key = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let other = Api::new(server.base.trim_start_matches("http://"), other_key.expose().to_owned());
    hook(&other, &healthy.url, json!({"events": ["usage_token.revoked"]})).await;
    other.mint_seconds("bo", 1.0).await;
    other.post("/v1/usage/token/revoke", json!({"human": "bo"})).await;
    let events = healthy.until(|events| !events.is_empty()).await;
    assert_eq!(events[0]["payload"]["project"], "other");
    assert!(events[0]["payload"]["created_at"].is_string());
}

#[tokio::test]
async fn urls_that_cannot_be_delivered_to_are_refused_and_events_named_once() {
    let server = server().await;
    for url in ["http://127.0.0.1:99999/", "https://user:pw@hooks.example/", "https://h.example/#a"]
    {
        let (status, body) = set_webhook(&server, json!({"url": url})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
    }
    let zero =
        json!({"url": "https://h.example/", "thresholds": [{"type": "token_cnt", "value": 0}]});
    assert_eq!(set_webhook(&server, zero).await.0, StatusCode::BAD_REQUEST);
    let twice = json!({"url": "https://h.example/", "events": ["usage.tracked", "usage.tracked"]});
    let (status, body) = set_webhook(&server, twice).await;
    assert_eq!((status, &body["events"]), (StatusCode::CREATED, &json!(["usage.tracked"])));
}
