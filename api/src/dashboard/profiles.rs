//! The profiles page: what users may pick when spawning, who may, how many run,
//! and forms to define, change and remove profiles (their JSON, as the API takes).

use std::collections::HashMap;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use maud::html;
use schema::prelude::*;
use serde_json::Value;

use super::{Form, Operator, layout, rows_or_page, say, when};
use crate::{AppState, auth::ClientAddr, error::ApiError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/profiles", get(profiles).post(add))
        .route("/profiles/{name}", post(change))
        .route("/profiles/{name}/delete", post(delete))
}

const BACK: &str = "/admin/profiles";

async fn profiles(
    State(state): State<AppState>,
    operator: Operator,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (list, usage) = match (
        state.db.list_profiles().await,
        state.db.profile_usage().await,
    ) {
        (Ok(l), Ok(u)) => (l, u),
        (Err(e), _) | (_, Err(e)) => return ApiError::from(e).into_response(),
    };
    let rows = html! {
        @for row in &list {
            @let p = &row.profile;
            @let active = usage.get(&p.name).copied().unwrap_or(0);
            tr data-profile=(p.name) {
                td { code { (p.name) } br; (p.display_name.as_deref().unwrap_or("")) }
                td { (p.image.as_deref().or(p.command.as_deref()).unwrap_or("the worker's")) }
                td {
                    (p.mem_limit.as_deref().unwrap_or("—")) ", "
                    (p.cpu_limit.map_or("—".to_owned(), |c| format!("{c} CPU")))
                    @if let Some(g) = &p.gpus { ", GPUs: " (g.count.map_or_else(|| g.device_ids.join(","), |c| c.to_string())) }
                }
                td {
                    @if p.roles.is_empty() && p.groups.is_empty() { span.muted { "everyone" } }
                    @else {
                        (p.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))
                        @if !p.groups.is_empty() { " groups: " (p.groups.join(", ")) }
                    }
                }
                td { a href=(format!("/admin/servers?profile={}", super::encode(&p.name))) { (active) } " of " (p.max_active.map_or("∞".to_owned(), |m| m.to_string())) }
                td { (row.source) }
                td { (when(Some(row.updated_at))) br; span.muted { (row.updated_by.as_deref().unwrap_or("")) } }
                td {
                    details {
                        summary { "Edit" }
                        form method="post" action=(format!("/admin/profiles/{}", super::encode(&p.name))) {
                            textarea name="definition" rows="10" cols="60" { (serde_json::to_string_pretty(p).unwrap_or_default()) }
                            br;
                            button type="submit" { "Save" }
                        }
                    }
                    form method="post" action=(format!("/admin/profiles/{}/delete", super::encode(&p.name))) data-confirm="Remove this profile? Its servers keep running." {
                        button type="submit" { "Remove" }
                    }
                }
            }
        }
    };
    rows_or_page(&query, rows, |rows| {
        layout(
            "Profiles",
            &operator,
            &query,
            html! {
                p.muted { "What users may pick when they start a server. A server keeps the profile it was started with; a change applies to new starts. Profiles from BERTH_PROFILES are replaced at every start." }
                table {
                    thead { tr { th { "Profile" } th { "Image or command" } th { "Limits" } th { "Who" } th { "Active" } th { "Source" } th { "Changed" } th {} } }
                    tbody data-live { (rows) }
                }
                h2 { "Define a profile" }
                form #add-profile method="post" action=(BACK) {
                    textarea name="definition" rows="8" cols="60" placeholder=r#"{"name": "small", "display_name": "Python, 2 GB", "mem_limit": "2G", "cpu_limit": 1.0}"# {}
                    br;
                    button type="submit" { "Define" }
                }
            },
        )
    })
}

/// The form's `definition`, as JSON.
fn definition(form: &Form) -> Result<Value, String> {
    let text = form.get("definition").ok_or("write the profile as JSON")?;
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

async fn add(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let body = match definition(&form) {
        Ok(v) => v,
        Err(e) => return operator.back(BACK, Err(e)),
    };
    match crate::profiles::define(&state, &operator.actor(), &addr, body).await {
        Ok(row) => operator.back(BACK, Ok(format!("Profile {} defined", row.profile.name))),
        Err(e) => operator.back(BACK, Err(say(e))),
    }
}

/// Replaces a profile's definition with the form's: fields left out are cleared.
async fn change(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let Ok(Value::Object(mut changes)) = definition(&form) else {
        return operator.back(BACK, Err("write the profile as a JSON object".into()));
    };
    let current = match crate::profiles::found(&state, &name).await {
        Ok(row) => row,
        Err(e) => return operator.back(BACK, Err(say(e))),
    };
    if let Value::Object(fields) = serde_json::json!(current.profile) {
        for field in fields.keys() {
            changes.entry(field.clone()).or_insert(Value::Null);
        }
    }
    if changes.get("name").is_none_or(Value::is_null) {
        changes.insert("name".into(), Value::String(name.clone()));
    }
    match crate::profiles::change_fields(&state, &operator.actor(), &addr, &name, changes).await {
        Ok(_) => operator.back(BACK, Ok(format!("Profile {name} saved; new starts use it"))),
        Err(e) => operator.back(BACK, Err(say(e))),
    }
}

async fn delete(
    State(state): State<AppState>,
    operator: Operator,
    addr: ClientAddr,
    Path(name): Path<String>,
) -> Response {
    match crate::profiles::remove(&state, &operator.actor(), &addr, &name).await {
        Ok(()) => operator.back(BACK, Ok(format!("Profile {name} removed"))),
        Err(e) => operator.back(BACK, Err(say(e))),
    }
}
