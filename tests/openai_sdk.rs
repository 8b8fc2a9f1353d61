//! A client no one here wrote: the async-openai crate, pointed at Tollgate
//! with a usage token as its API key, as a frontend's OpenAI SDK would be.

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use common::TestServer;
use futures::StreamExt;
use serde_json::json;

fn sdk(server: &TestServer, token: &str) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new().with_api_base(server.url("/v1")).with_api_key(token);
    Client::with_config(config)
}

fn request(text: &str, stream: bool) -> CreateChatCompletionRequest {
    let message = ChatCompletionRequestUserMessageArgs::default().content(text).build().unwrap();
    CreateChatCompletionRequestArgs::default()
        .model("echo")
        .messages([message.into()])
        .stream(stream)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_openai_crate_completes_streams_lists_models_and_sees_the_exhausted_budget() {
    let server = TestServer::start().await;
    let token = server.mint("sdk-user", json!([{"type": "token_cnt", "value": 60}])).await;
    let client = sdk(&server, &token);

    let answer = client.chat().create(request("Hello from the SDK", false)).await.unwrap();
    assert_eq!(answer.choices[0].message.content.as_deref(), Some("Hello from the SDK"));
    let used = answer.usage.unwrap().total_tokens as f64;
    assert_eq!(server.remaining("sdk-user", "token_cnt").await, 60.0 - used);

    let mut stream = client.chat().create_stream(request("Streamed", true)).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(choice) = chunk.choices.first() {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(text, "Streamed");

    let models = client.models().list().await.unwrap();
    assert_eq!(models.data[0].id, "echo");

    // Spend the rest, then see the refusal as the SDK reports it.
    server
        .put(
            "/v1/usage/token",
            json!({"human": "sdk-user",
        "limits": [{"type": "token_cnt", "value": 0}]}),
        )
        .await;
    match client.chat().create(request("one more", false)).await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.status_code.as_u16(), 429);
            assert_eq!(error.api_error.code.as_deref(), Some("usage_limit_exceeded"));
        }
        other => panic!("expected the budget to be spent, got {other:?}"),
    }
}

#[tokio::test]
async fn the_openai_crate_reports_a_bad_key_as_an_api_error() {
    let server = TestServer::start().await;
    let client = sdk(&server, "tgu_not-a-real-token");
    match client.chat().create(request("hi", false)).await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.status_code.as_u16(), 401);
            assert_eq!(error.api_error.r#type.as_deref(), Some("authentication_error"));
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
}
