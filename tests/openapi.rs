//! The OpenAPI document: served to anyone, 3.1, and it lists every route the API
//! serves, with the methods it serves them by.

mod common;

use common::{TOKEN, TestEnv};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Status and, for a JSON answer, the body; streams are not read.
async fn send(env: &TestEnv, method: &str, path: &str) -> (StatusCode, Value) {
    let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
    let response = env
        .http()
        .request(method, format!("{}{path}", env.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the API answers");
    let status = response.status();
    let json = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let body = if json {
        response.json().await.unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    (status, body)
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_with_its_methods() {
    let env = TestEnv::start().await;
    let user = env.user("oas");
    env.create_user(&user).await;

    let response = env
        .http()
        .get(format!("{}/api/v1/openapi.json", env.base))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "served without credentials"
    );
    let doc: Value = response.json().await.expect("JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let paths = doc["paths"].as_object().expect("paths");
    for needed in [
        "/api/v1/users/{user}/server",
        "/api/v1/users/{user}/servers/{name}/progress",
        "/api/v1/auth/login",
        "/api/v1/admin/limits",
        "/api/v1/openapi.json",
        "/health",
        "/metrics",
    ] {
        assert!(paths.contains_key(needed), "{needed} is in the document");
    }

    let mut operations = 0;
    for (template, item) in paths {
        let path = template
            .replace("{user}", &user)
            .replace("{name}", "lab")
            .replace("{id}", "0190a0b0-0000-7000-8000-000000000000");
        for method in METHODS {
            let (status, body) = send(&env, method, &path).await;
            let Some(operation) = item.get(method) else {
                // A method the document does not list is not served.
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template} is not documented but answered {status}: {body}"
                );
                continue;
            };
            operations += 1;
            // The router's own answers for what it does not serve.
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {template}: {body}"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND && body["message"] == "no such route"),
                "{method} {template} is documented but not served"
            );
            // What it answered is documented, and every operation documents its errors.
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                responses.contains_key(status.as_str()) || responses.contains_key("default"),
                "{method} {template} answered {status}, which it does not document: {body}"
            );
            assert!(
                responses.contains_key("default"),
                "{method} {template} documents its errors"
            );
            let public = operation["security"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|r| r.as_object().is_some_and(|r| r.is_empty()))
            });
            if !public {
                let (status, body) = env
                    .call_with(
                        Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                        &path,
                        None,
                        None,
                    )
                    .await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {template} needs credentials, as documented: {body}"
                );
            }
        }
    }
    assert!(operations >= 40, "{operations} operations");
}

/// What fuzzing against the document found, each refused before its fix although
/// the document allowed it (or allowed where the document says it is refused).
#[tokio::test]
async fn requests_the_document_allows_are_taken_as_documented() {
    let env = TestEnv::start().await;
    let user = env.user("oasfix");

    // An optional body may be `null`: nothing chosen.
    let (status, body) = env
        .call(Method::POST, &format!("/api/v1/users/{user}"), Some("null"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A whole number is a whole number, written `4` or `4.0`.
    let (status, body) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/limits",
            Some(r#"{"active_server_limit": 40.0}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active_server_limit"], 40, "{body}");
    let (status, body) = env
        .call(
            Method::PATCH,
            "/api/v1/admin/limits",
            Some(r#"{"active_server_limit": 40.5}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // A token's name is up to 100 characters, not bytes.
    let name = "é".repeat(100);
    let (status, body) = env
        .call(
            Method::POST,
            "/api/v1/admin/tokens",
            Some(&serde_json::json!({"name": name, "scopes": ["users:read"]}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], name.as_str());

    // A change names a field with a value: `null` changes nothing and is refused.
    let (status, body) = env
        .call(
            Method::PATCH,
            &format!("/api/v1/admin/users/{user}"),
            Some(r#"{"active": null, "role": null}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "bad_request", "{body}");

    // Only a login session logs out: a service token may not (it is revoked instead).
    let (status, body) = env.call(Method::POST, "/api/v1/auth/logout", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// The document as a page to read: every operation and schema on it, served
/// without credentials and without any script.
#[tokio::test]
async fn the_reference_page_shows_every_operation_and_schema() {
    let env = TestEnv::start().await;
    let doc: Value = env
        .http()
        .get(format!("{}/api/v1/openapi.json", env.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response = env
        .http()
        .get(format!("{}/api/v1/reference", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let page = response.text().await.unwrap();
    assert!(!page.contains("<script"), "no script on the page");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            assert!(
                page.contains(&format!("id=\"{method}-{path}\"")),
                "{method} {path} is on the page"
            );
        }
    }
    for schema in doc["components"]["schemas"].as_object().unwrap().keys() {
        assert!(
            page.contains(&format!("id=\"schema-{schema}\"")),
            "{schema}"
        );
    }
    // Names link to their schemas.
    assert!(page.contains("href=\"#schema-ServerView\""));
}
