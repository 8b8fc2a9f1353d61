//! The chat completions proxy: what goes upstream, what comes back, and
//! what is debited, against the built-in echo model and against an
//! OpenAI-compatible service written for the tests.

mod common;

use std::time::Duration;

use axum::http::HeaderValue;
use common::llm::{Behaviour, TestLlm, UsageMode};
use common::{Api, TestServer, assert_ledger_identity};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate::config::LlmUpstream;

const UPSTREAM_KEY: &str = "sk-upstream-secret";

/// A server whose completions go to `llm`, with the upstream key set.
async fn server_for(llm: &TestLlm) -> TestServer {
    let base_url = llm.base_url();
    let ca_file = llm.ca_file();
    TestServer::start_with(move |settings| {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {UPSTREAM_KEY}")).unwrap();
        authorization.set_sensitive(true);
        settings.llm.upstream = Some(LlmUpstream { base_url, authorization: Some(authorization) });
        settings.upstream_ca_file = ca_file;
    })
    .await
}

fn ask(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// Posts a chat completion with a usage token.
async fn chat(api: &Api, token: &str, body: &Value) -> (StatusCode, Value) {
    let request = api.http.post(api.url("/v1/chat/completions")).bearer_auth(token).json(body);
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A streamed answer: the status, every chunk, and whether `[DONE]` came.
async fn chat_stream(api: &Api, token: &str, body: &Value) -> (StatusCode, Vec<Value>, bool) {
    let request = api.http.post(api.url("/v1/chat/completions")).bearer_auth(token).json(body);
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    if status != StatusCode::OK {
        return (status, vec![serde_json::from_str(&text).unwrap()], false);
    }
    let mut chunks = Vec::new();
    let mut done = false;
    for event in text.split("\n\n").filter(|event| !event.trim().is_empty()) {
        let data = event.strip_prefix("data: ").expect("every event is data");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (status, chunks, done)
}

/// Starts a streamed completion and returns its body as it comes.
async fn open_stream(
    server: &Api,
    token: &str,
) -> impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin + use<> {
    let request = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&streaming(ask("test-model", "hi")));
    request.send().await.unwrap().bytes_stream()
}

fn tokens_left(limits: &Value) -> Option<i64> {
    let limits = limits.as_array().unwrap();
    let entry = limits.iter().find(|limit| limit["type"] == "token_cnt")?;
    Some(entry["value"].as_f64().unwrap() as i64)
}

async fn mint_tokens(api: &Api, human: &str, tokens: i64) -> String {
    api.mint(human, json!([{"type": "token_cnt", "value": tokens}])).await
}

/// A completion's row: outcome, prompt and completion tokens, usage source,
/// tokens still held.
type CompletionRow = (Option<String>, Option<i64>, Option<i64>, Option<String>, i64);

fn completion_rows(server: &TestServer) -> Vec<CompletionRow> {
    let rows = server.db().rows(
        "SELECT end_reason, prompt_tokens, completion_tokens, usage_source, reserved
         FROM completions ORDER BY id",
        &[],
    );
    rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))).collect()
}

/// Waits until every completion has ended, and returns their rows.
async fn rows_once_ended(server: &TestServer) -> Vec<CompletionRow> {
    for _ in 0..200 {
        let rows = completion_rows(server);
        if !rows.is_empty() && rows.iter().all(|row| row.0.is_some()) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("completions still running: {:?}", completion_rows(server));
}

fn count_tokens(text: &str) -> i64 {
    tiktoken_rs::o200k_base_singleton().encode_ordinary(text).len() as i64
}

#[tokio::test]
async fn the_echo_model_answers_and_its_reported_usage_is_debited_exactly() {
    let server = TestServer::start().await;
    let token = mint_tokens(&server, "ann", 1000).await;

    let (status, answer) = chat(&server, &token, &ask("echo", "Hello there, echo")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello there, echo");
    let usage = &answer["usage"];
    let total = usage["total_tokens"].as_i64().unwrap();
    assert_eq!(usage["completion_tokens"].as_i64().unwrap(), count_tokens("Hello there, echo"));
    assert_eq!(tokens_left(&server.limits_of("ann").await), Some(1000 - total));

    let (status, chunks, done) =
        chat_stream(&server, &token, &streaming(ask("echo", "Again"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(done);
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Again");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "usage chunk not asked for");
    let rows = rows_once_ended(&server).await;
    let streamed = rows[1].1.unwrap() + rows[1].2.unwrap();
    assert_eq!(tokens_left(&server.limits_of("ann").await), Some(1000 - total - streamed));
    assert_eq!(rows[1].3.as_deref(), Some("upstream"));
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_stream_that_asks_for_usage_gets_it_and_is_debited_before_done() {
    let server = TestServer::start().await;
    let token = mint_tokens(&server, "bo", 500).await;
    let mut body = streaming(ask("echo", "Count me"));
    body["stream_options"] = json!({"include_usage": true});

    let (_, chunks, done) = chat_stream(&server, &token, &body).await;
    assert!(done);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let total = last["usage"]["total_tokens"].as_i64().unwrap();
    // No waiting: the debit is recorded before [DONE] goes out.
    assert_eq!(tokens_left(&server.limits_of("bo").await), Some(500 - total));
}

#[tokio::test]
async fn the_upstream_gets_the_human_its_own_key_and_never_the_usage_token() {
    let llm = TestLlm::start(Behaviour::default()).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "cy", 10_000).await;
    let mut body = ask("test-model", "hi");
    body["user"] = json!("someone-else");
    body["temperature"] = json!(0.5);

    let (status, answer) = chat(&server, &token, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], " one two three four five");

    let received = llm.requests().pop().unwrap();
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(received.header("authorization"), Some(&*format!("Bearer {UPSTREAM_KEY}")));
    assert_eq!(received.body["user"], "cy");
    assert_eq!(received.body["temperature"], 0.5);
    let everything = format!("{:?} {}", received.headers, received.body);
    assert!(!everything.contains(&token), "the usage token went upstream");
    // Limited tokens and no cap asked for: the default cap was added, so
    // that the answer fits what is held for it.
    assert_eq!(received.body["max_tokens"], 4096);
    // The upstream's usage, 7 + 5, is what was debited.
    assert_eq!(tokens_left(&server.limits_of("cy").await), Some(10_000 - 12));
}

#[tokio::test]
async fn usage_is_read_wherever_the_upstream_reports_it() {
    for mode in [UsageMode::Reported, UsageMode::OnLastChoiceChunk] {
        let llm = TestLlm::start(Behaviour { usage: mode, ..Behaviour::default() }).await;
        let server = server_for(&llm).await;
        let token = mint_tokens(&server, "di", 1000).await;

        let (status, chunks, done) =
            chat_stream(&server, &token, &streaming(ask("test-model", "hi"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(done, "{mode:?}");
        let received = llm.requests().pop().unwrap();
        assert_eq!(received.body["stream_options"]["include_usage"], true);
        if mode == UsageMode::Reported {
            // The usage chunk was asked for by Tollgate, not the client.
            assert!(chunks.iter().all(|c| c["choices"] != json!([])), "{chunks:?}");
        }
        assert_eq!(tokens_left(&server.limits_of("di").await), Some(1000 - 12), "{mode:?}");

        let (status, _) = chat(&server, &token, &ask("test-model", "hi")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(tokens_left(&server.limits_of("di").await), Some(1000 - 24), "{mode:?}");
        assert_ledger_identity(&server.db());
    }
}

#[tokio::test]
async fn without_reported_usage_tollgate_counts_the_tokens_itself() {
    let llm = TestLlm::start(Behaviour { usage: UsageMode::Absent, ..Behaviour::default() }).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "ed", 1000).await;

    let (status, _, _) = chat_stream(&server, &token, &streaming(ask("test-model", "hi"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = chat(&server, &token, &ask("test-model", "hi")).await;
    assert_eq!(status, StatusCode::OK);

    let rows = rows_once_ended(&server).await;
    let answer_tokens = count_tokens(" one two three four five");
    let mut debited = 0;
    for (outcome, prompt, completion, source, held) in &rows {
        assert_eq!(outcome.as_deref(), Some("completed"));
        assert_eq!(source.as_deref(), Some("counted"));
        assert_eq!(*completion, Some(answer_tokens));
        assert!(prompt.unwrap() > 0, "a prompt is never free");
        assert_eq!(*held, 0);
        debited += prompt.unwrap() + completion.unwrap();
    }
    assert_eq!(tokens_left(&server.limits_of("ed").await), Some(1000 - debited));
    assert_ledger_identity(&server.db());
}

/// The prompt estimate of `body`, learnt from the cap Tollgate sends when
/// the human has 1000 tokens and the request asks for far more.
async fn prompt_estimate(server: &TestServer, llm: &TestLlm, body: &Value) -> i64 {
    let token = mint_tokens(server, "calibration", 1000).await;
    let mut body = body.clone();
    body["max_tokens"] = json!(100_000);
    let (status, _) = chat(server, &token, &body).await;
    assert_eq!(status, StatusCode::OK);
    1000 - llm.requests().pop().unwrap().body["max_tokens"].as_i64().unwrap()
}

#[tokio::test]
async fn a_cap_is_lowered_to_what_remains_and_nothing_left_is_refused_with_429() {
    let llm = TestLlm::start(Behaviour::default()).await;
    let server = server_for(&llm).await;
    let body = ask("test-model", "hi");
    let estimate = prompt_estimate(&server, &llm, &body).await;
    assert!(estimate >= 7, "the estimate covers what the upstream counts");

    let token = mint_tokens(&server, "fay", estimate + 3).await;
    let mut asked = body.clone();
    asked["max_completion_tokens"] = json!(50);
    let (status, _) = chat(&server, &token, &asked).await;
    assert_eq!(status, StatusCode::OK);
    let sent = llm.requests().pop().unwrap().body;
    assert_eq!(sent["max_completion_tokens"], 3);
    assert!(sent.get("max_tokens").is_none(), "only the client's own field is lowered");

    // 7 + 3 were used; what is left does not cover the prompt.
    let (status, error) = chat(&server, &token, &body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["error"]["code"], "usage_limit_exceeded");
    assert_eq!(error["error"]["type"], "insufficient_quota");
    assert_eq!(tokens_left(&server.limits_of("fay").await), Some(estimate + 3 - 10));
}

#[tokio::test]
async fn ten_concurrent_requests_against_a_budget_for_three_never_overspend() {
    let behaviour = Behaviour { chunk_delay: Duration::from_millis(5), ..Behaviour::default() };
    let llm = TestLlm::start(behaviour).await;
    let server = server_for(&llm).await;
    let mut body = streaming(ask("test-model", "hi"));
    body["max_tokens"] = json!(5);
    let estimate = prompt_estimate(&server, &llm, &body).await;
    // Three holds of estimate + 5 fit; what is left then covers no answer.
    let budget = 3 * (estimate + 5) + estimate;

    for round in 0..15 {
        let human = format!("round-{round}");
        let token = mint_tokens(&server, &human, budget).await;
        let requests = (0..10).map(|_| chat_stream(&server, &token, &body));
        let answers = futures::future::join_all(requests).await;
        let served = answers.iter().filter(|(status, _, _)| *status == StatusCode::OK).count();
        let refused = answers
            .iter()
            .filter(|(status, _, _)| *status == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert_eq!((served, refused), (3, 7), "round {round}");
        assert_eq!(tokens_left(&server.limits_of(&human).await), Some(budget - 3 * 12));
    }
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_charged_what_the_upstream_produced() {
    let pieces: Vec<String> = (0..40).map(|i| format!(" word{i}")).collect();
    let behaviour = Behaviour {
        usage: UsageMode::Reported,
        pieces: pieces.clone(),
        chunk_delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    let llm = TestLlm::start(behaviour).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "gus", 10_000).await;
    let mut body = open_stream(&server, &token).await;
    let mut seen = String::new();
    while seen.matches("word").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    drop(body);

    let rows = rows_once_ended(&server).await;
    let (outcome, prompt, completion, source, held) = &rows[0];
    assert_eq!(outcome.as_deref(), Some("client_gone"));
    assert_eq!(source.as_deref(), Some("counted"));
    assert_eq!(*held, 0);
    let produced = llm.chunks_sent();
    assert!(produced < 40, "the upstream was not stopped: {produced} chunks");
    let at_least = count_tokens(&pieces[..3].concat());
    let at_most = count_tokens(&pieces[..produced].concat());
    let completion = completion.unwrap();
    assert!((at_least..=at_most).contains(&completion), "{at_least} <= {completion} <= {at_most}");
    let debited = prompt.unwrap() + completion;
    assert_eq!(tokens_left(&server.limits_of("gus").await), Some(10_000 - debited));
    for _ in 0..100 {
        if llm.saw_disconnect() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(llm.saw_disconnect(), "the upstream connection was left open");
}

#[tokio::test]
async fn upstream_errors_are_passed_on_in_openai_shape_and_charge_nothing() {
    let error = json!({"error": {"message": "bad model", "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}});
    let cases = [
        (400, error.clone(), StatusCode::BAD_REQUEST, Some(error.clone())),
        (500, error.clone(), StatusCode::BAD_GATEWAY, Some(error.clone())),
        // A refusal of Tollgate's own key is not passed on: it may quote it.
        (401, error.clone(), StatusCode::BAD_GATEWAY, None),
        (503, json!("overloaded"), StatusCode::BAD_GATEWAY, None),
    ];
    for (upstream_status, upstream_body, expected, passed) in cases {
        let behaviour =
            Behaviour { fail: Some((upstream_status, upstream_body)), ..Behaviour::default() };
        let llm = TestLlm::start(behaviour).await;
        let server = server_for(&llm).await;
        let token = mint_tokens(&server, "hal", 100).await;

        let (status, body) = chat(&server, &token, &ask("test-model", "hi")).await;
        assert_eq!(status, expected, "{upstream_status}: {body}");
        match passed {
            Some(passed) => assert_eq!(body, passed),
            None => assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}"),
        }
        assert_eq!(tokens_left(&server.limits_of("hal").await), Some(100));
        let rows = rows_once_ended(&server).await;
        assert_eq!(rows[0].0.as_deref(), Some("upstream_failed"));
        assert_eq!(rows[0].4, 0, "the hold was released");
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_charges_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let server = TestServer::start_with(move |settings| {
        settings.llm.upstream = Some(LlmUpstream { base_url, authorization: None });
    })
    .await;
    let token = mint_tokens(&server, "ida", 100).await;

    let (status, body) = chat(&server, &token, &ask("test-model", "hi")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert_eq!(tokens_left(&server.limits_of("ida").await), Some(100));
}

#[tokio::test]
async fn a_tls_upstream_is_reached_with_the_extra_ca() {
    let llm = TestLlm::start_tls(Behaviour::default()).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "jo", 100).await;

    let (status, answer) = chat(&server, &token, &ask("test-model", "hi")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(tokens_left(&server.limits_of("jo").await), Some(100 - 12));

    let models = server.http.get(server.url("/v1/models")).bearer_auth(&token).send().await;
    let models: Value = models.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "test-model");
}

#[tokio::test]
async fn bad_credentials_and_requests_get_openai_errors() {
    let server = TestServer::start().await;
    let token = mint_tokens(&server, "kim", 100).await;

    let response = server.http.post(server.url("/v1/chat/completions")).json(&ask("echo", "x"));
    let response = response.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["code"], "unauthorized");

    let (status, body) = chat(&server, &token, &ask("gpt-4o", "x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");

    for (bad, param) in [
        (json!({"model": "echo"}), json!("messages")),
        (json!({"model": "echo", "messages": [{}], "max_tokens": "5"}), json!("max_tokens")),
        (json!({"model": "echo", "messages": [{}], "stream": 1}), json!("stream")),
    ] {
        let (status, body) = chat(&server, &token, &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], param);
    }
    assert_eq!(tokens_left(&server.limits_of("kim").await), Some(100));
    assert!(completion_rows(&server).is_empty(), "a refused request left a row");
}

#[tokio::test]
async fn a_backend_may_call_for_a_human_with_its_key_and_usage_is_metered() {
    let server = TestServer::start().await;
    let request = server
        .http
        .post(server.url("/v1/chat/completions"))
        .header("x-api-key", &server.key)
        .header("x-human-id", "new-human")
        .json(&ask("echo", "metered anyway"));
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let rows = rows_once_ended(&server).await;
    let used = rows[0].1.unwrap() + rows[0].2.unwrap();
    let db = server.db();
    let row = db.row("SELECT balance, limited FROM limits WHERE limit_type = 'token_cnt'", &[]);
    let (balance, limited): (i64, bool) = (row.get(0), row.get(1));
    assert_eq!((balance, limited), (-used, false));
    assert_eq!(tokens_left(&server.limits_of("new-human").await), None);
    assert_ledger_identity(&db);
}

#[tokio::test]
async fn a_shutdown_mid_stream_settles_what_came_and_does_not_wait_for_the_upstream() {
    let pieces: Vec<String> = (0..100).map(|i| format!(" w{i}")).collect();
    let behaviour =
        Behaviour { pieces, chunk_delay: Duration::from_millis(100), ..Behaviour::default() };
    let llm = TestLlm::start(behaviour).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "liv", 10_000).await;
    let mut body = open_stream(&server, &token).await;
    body.next().await.unwrap().unwrap();

    let stopped = tokio::time::timeout(Duration::from_secs(8), server.shutdown()).await;
    let database = stopped.expect("the shutdown waited for the upstream's stream");
    let db = database.db();
    let row = db.row("SELECT end_reason, reserved, usage_source FROM completions", &[]);
    let (outcome, held, source): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((outcome.as_str(), held, source.as_str()), ("server_shutdown", 0, "counted"));
    assert_ledger_identity(&db);
}

#[tokio::test]
async fn every_field_that_reaches_the_model_counts_against_the_budget() {
    let server = TestServer::start().await;
    let token = mint_tokens(&server, "max", 50).await;
    let mut body = ask("echo", "hi");
    let long_schema: Vec<String> = (0..2000).map(|i| format!("field_{i}")).collect();
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"enum": long_schema}});

    let (status, error) = chat(&server, &token, &body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{error}");
    assert_eq!(tokens_left(&server.limits_of("max").await), Some(50));
}

#[tokio::test]
async fn an_absurd_reported_usage_is_cut_and_the_completion_still_ends() {
    let behaviour = Behaviour { prompt_tokens: i64::MAX as u64, ..Behaviour::default() };
    let llm = TestLlm::start(behaviour).await;
    let server = server_for(&llm).await;
    let token = mint_tokens(&server, "ned", 100).await;

    let (status, _) = chat(&server, &token, &ask("test-model", "hi")).await;
    assert_eq!(status, StatusCode::OK);
    let rows = rows_once_ended(&server).await;
    assert_eq!(rows[0].1, Some(1_000_000_000));
    assert_eq!(tokens_left(&server.limits_of("ned").await), Some(100 - 1_000_000_005));
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_wrong_method_gets_an_openai_error() {
    let server = TestServer::start().await;
    let response = server.http.get(server.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn a_completion_left_running_by_a_kill_9_is_charged_its_prompt_at_the_restart() {
    let pieces: Vec<String> = (0..100).map(|i| format!(" w{i}")).collect();
    let behaviour =
        Behaviour { pieces, chunk_delay: Duration::from_millis(100), ..Behaviour::default() };
    let llm = TestLlm::start(behaviour).await;
    let database = common::TestDatabase::create().await;
    let db = database.setting();
    let args = ["--llm-upstream", &llm.base_url()];
    let process = common::binary::spawn(&db, &args, "info");
    let api = Api::new(process.base.trim_start_matches("http://"), process.api_key());
    let token = mint_tokens(&api, "kim", 10_000).await;
    let mut body = open_stream(&api, &token).await;
    body.next().await.unwrap().unwrap();
    process.kill();

    let restarted = common::binary::spawn(&db, &args, "info");
    let api = Api::new(restarted.base.trim_start_matches("http://"), api.key.clone());
    let db = database.db();
    common::database::until_nothing_left_open(&db).await;
    let row = db.row("SELECT end_reason, prompt_tokens, reserved FROM completions", &[]);
    let (outcome, prompt, held): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((outcome.as_str(), held), (common::database::left_open_reason(), 0));
    assert!(prompt > 0, "the prompt was given away");
    assert_eq!(tokens_left(&api.limits_of("kim").await), Some(10_000 - prompt));
    assert_ledger_identity(&db);
}
