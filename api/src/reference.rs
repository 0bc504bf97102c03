//! `GET /api/v1/reference`: the OpenAPI document as a page to read, rendered on the
//! server from the document itself (no viewer is downloaded, at build or run time).

use axum::{
    Extension,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::openapi::{Document, Errors};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The API reference, from this document.
#[utoipa::path(
    get, path = "/reference", tag = "health", security(()),
    responses((status = 200, description = "The OpenAPI document as HTML",
        content_type = "text/html", body = String), Errors),
)]
pub async fn reference(Extension(doc): Extension<Document>) -> Response {
    let doc = serde_json::to_value(&*doc.0).unwrap_or_default();
    let mut response = page(&doc).into_response();
    // Its own style sheet only: the API's policy would refuse that too.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; frame-ancestors 'none'"),
    );
    response
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// `#/components/schemas/Name` → `Name`.
fn ref_name(v: &Value) -> Option<&str> {
    v["$ref"].as_str().and_then(|r| r.rsplit('/').next())
}

/// A schema's type in a few words, with links to the named schemas it uses.
fn kind(schema: &Value) -> Markup {
    if let Some(name) = ref_name(schema) {
        return html! { a href=(format!("#schema-{name}")) { (name) } };
    }
    for combinator in ["oneOf", "anyOf", "allOf"] {
        if let Some(parts) = schema[combinator].as_array() {
            return html! {
                @for (i, part) in parts.iter().enumerate() {
                    @if i > 0 { " | " } (kind(part))
                }
            };
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    html! {
        @for (i, t) in types.iter().enumerate() {
            @if i > 0 { " | " }
            @if *t == "array" { "array of " (kind(&schema["items"])) }
            @else if *t == "object" && schema["additionalProperties"].is_object() {
                "map of " (kind(&schema["additionalProperties"]))
            }
            @else { (t) }
        }
        @if types.is_empty() { "any" }
        @if let Some(format) = schema["format"].as_str() { " (" (format) ")" }
    }
}

/// What a schema allows beyond its type.
fn constraints(schema: &Value) -> String {
    let mut said = Vec::new();
    if let Some(values) = schema["enum"].as_array() {
        let words: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        said.push(format!("one of {}", words.join(", ")));
    }
    for (key, words) in [
        ("minimum", "at least"),
        ("maximum", "at most"),
        ("minLength", "length at least"),
        ("maxLength", "length at most"),
        ("minItems", "items at least"),
        ("minProperties", "fields at least"),
        ("pattern", "matches"),
    ] {
        if !schema[key].is_null() {
            let value = schema[key]
                .as_str()
                .map_or(schema[key].to_string(), str::to_owned);
            said.push(format!("{words} {value}"));
        }
    }
    said.join("; ")
}

fn page(doc: &Value) -> Markup {
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let tags = doc["tags"].as_array().cloned().unwrap_or_default();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "API reference · Berth" }
                link rel="stylesheet" href="/admin/static/app.css";
            }
            body {
                header { span.brand { "Berth" } nav { a href="/api/v1/openapi.json" { "openapi.json" } } }
                main.reference {
                    h1 { (text(&doc["info"]["title"])) " API " (text(&doc["info"]["version"])) }
                    p { (text(&doc["info"]["description"])) }
                    h2 { "Authentication" }
                    p { (text(&doc["components"]["securitySchemes"]["bearer"]["description"])) }
                    p { "Every error is " a href="#schema-ErrorBody" { "ErrorBody" } ": " code { "{error, message}" } "." }
                    @for tag in &tags {
                        @let name = text(&tag["name"]);
                        section id=(format!("tag-{name}")) {
                            h2 { (name) ": " span.muted { (text(&tag["description"])) } }
                            @for (path, item) in &paths {
                                @for method in METHODS {
                                    @let op = &item[method];
                                    @if op.is_object() && op["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == name)) {
                                        (operation(method, path, op))
                                    }
                                }
                            }
                        }
                    }
                    h2 { "Schemas" }
                    @for (name, schema) in &schemas {
                        section.schema id=(format!("schema-{name}")) {
                            h3 { (name) }
                            @if let Some(d) = schema["description"].as_str() { p { (d) } }
                            @if let Some(props) = schema["properties"].as_object() {
                                @let required = schema["required"].as_array().cloned().unwrap_or_default();
                                table {
                                    thead { tr { th { "field" } th { "type" } th { "" } th { "about" } } }
                                    tbody {
                                        @for (field, p) in props {
                                            tr {
                                                td { code { (field) } }
                                                td { (kind(p)) }
                                                td.muted { @if required.iter().any(|r| r == field.as_str()) { "required" } }
                                                td { (text(&p["description"])) " " span.muted { (constraints(p)) } }
                                            }
                                        }
                                    }
                                }
                            } @else {
                                p { (kind(schema)) " " span.muted { (constraints(schema)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn is_success(status: &str) -> bool {
    matches!(status.as_bytes().first(), Some(b'1'..=b'3'))
}

fn operation(method: &str, path: &str, op: &Value) -> Markup {
    let public = op["security"].as_array().is_some_and(|s| {
        s.iter()
            .any(|r| r.as_object().is_some_and(|r| r.is_empty()))
    });
    let parameters = op["parameters"].as_array().cloned().unwrap_or_default();
    let responses = op["responses"].as_object().cloned().unwrap_or_default();
    html! {
        article.operation id=(format!("{method}-{path}")) {
            h3 { span class=(format!("badge {method}")) { (method.to_uppercase()) } " " code { (path) }
                @if public { " " span.muted { "no credentials" } } }
            @if let Some(s) = op["summary"].as_str() { p { (s) } }
            @if let Some(d) = op["description"].as_str() { p.muted { (d) } }
            @if !parameters.is_empty() {
                table {
                    thead { tr { th { "parameter" } th { "in" } th { "type" } th { "about" } } }
                    tbody {
                        @for p in &parameters {
                            tr {
                                td { code { (text(&p["name"])) } @if p["required"] == true { " *" } }
                                td { (text(&p["in"])) }
                                td { (kind(&p["schema"])) }
                                td { (text(&p["description"])) " " span.muted { (constraints(&p["schema"])) } }
                            }
                        }
                    }
                }
            }
            @if let Some(content) = op["requestBody"]["content"].as_object() {
                @for (media, body) in content {
                    p { "Body (" (media) @if op["requestBody"]["required"] != true { ", optional" } "): " (kind(&body["schema"])) }
                }
            }
            ul.responses {
                @for (status, r) in responses.iter().filter(|(s, _)| is_success(s)) {
                    li {
                        code { (status) } " " (text(&r["description"]))
                        @if let Some(content) = r["content"].as_object() {
                            @for (media, body) in content { " — " (media) ": " (kind(&body["schema"])) }
                        }
                    }
                }
                li.muted {
                    "Errors: "
                    @for (status, r) in responses.iter().filter(|(s, _)| !is_success(s)) {
                        abbr title=(text(&r["description"])) { (status) } " "
                    }
                }
            }
        }
    }
}
