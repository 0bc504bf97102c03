//! The API's OpenAPI 3.1 document, derived from the code. Every route of `/api/v1`,
//! `/health`, `/ready` and `/metrics` is registered through `utoipa_axum::routes!`,
//! which takes its path and methods from the same `#[utoipa::path]` attribute that
//! documents it, and the bodies are the handlers' own types: the router and the
//! document cannot part. Served at `/api/v1/openapi.json`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Extension, Json, response::IntoResponse};
use serde::Serialize;
use utoipa::{
    IntoParams, Modify, OpenApi, ToSchema,
    openapi::{
        ContentBuilder, Ref, RefOr, ResponseBuilder,
        response::Response,
        schema::Schema,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

/// Every error of the API, whatever its status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What kind of error, for programs.
    #[schema(value_type = String, example = "not_found")]
    pub error: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

// Names are DNS labels (`schema::names`): lowercase letters, digits and single
// hyphens, starting and ending with a letter or digit; users at most 32, servers 63.

/// A user in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct UserParam {
    /// The user's name.
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    user: String,
}

/// A user's named server in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ServerParams {
    /// The user's name.
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    user: String,
    /// The server's name (the default server has its own route without one).
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 63)]
    name: String,
}

/// The answers an operation may give besides its own: each is an [`ErrorBody`].
pub struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            ("400", "the request is malformed or names something invalid"),
            ("401", "no credentials, or credentials that are not valid"),
            ("403", "the caller may not do this"),
            ("404", "what the path names does not exist"),
            ("409", "the state of what it names does not allow this now"),
            ("413", "the body is too large"),
            ("429", "over a limit; `Retry-After` says when to try again"),
            (
                "503",
                "the database or a worker pool is unavailable or busy",
            ),
            ("default", "any other error, with the same body"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build();
            (status.to_owned(), RefOr::T(response))
        })
        .collect()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Berth",
        description = "A job-queue control plane for per-user container workspaces: \
            requests enqueue spawn, stop and cleanup jobs that workers carry out within \
            global limits.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody, crate::progress::Progress)),
    modifiers(&Security),
    security(("bearer" = [])),
    tags(
        (name = "auth", description = "Accounts and sessions"),
        (name = "users", description = "Users and their servers, as JupyterHub's REST API"),
        (name = "servers", description = "Start, show, stop and reach a user's servers"),
        (name = "jobs", description = "The jobs requests become"),
        (name = "profiles", description = "Server profiles: what users may pick when spawning"),
        (name = "admin", description = "Operators: accounts, tokens, limits, workers, schedules, audit"),
        (name = "health", description = "Liveness, readiness and metrics"),
    ),
)]
struct Base;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <token>`: a session token from \
                         `POST /api/v1/auth/login`, an API token an admin issued \
                         (`POST /api/v1/admin/tokens`, or the one `berth up` writes), \
                         or a server's own token (`BERTH_API_TOKEN` in its environment).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document's frame: title, security schemes, tags. Paths are added by the
/// routers that serve them.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

/// What the derive cannot say. Which images a spawn may name is configuration:
/// the document lists this process's, so a client can check before it asks. A
/// change names at least one field (`min_properties` of utoipa 5.5's derive
/// writes `maxProperties`).
pub fn finish<'a>(doc: &mut utoipa::openapi::OpenApi, images: impl Iterator<Item = &'a String>) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    for change in ["LimitsBody", "UserChange"] {
        if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut(change) {
            body.max_properties = None;
            body.min_properties = Some(1);
        }
    }
    if let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut("SpawnBody")
        && let Some(RefOr::T(Schema::Object(image))) = body.properties.get_mut("image")
    {
        let mut allowed: Vec<serde_json::Value> = images.map(|i| i.as_str().into()).collect();
        allowed.push(serde_json::Value::Null);
        image.enum_values = Some(allowed);
    }
}

/// The document, as the router built it.
#[derive(Clone)]
pub struct Document(pub Arc<utoipa::openapi::OpenApi>);

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        content_type = "application/json", body = Object), Errors),
)]
pub async fn document(Extension(doc): Extension<Document>) -> impl IntoResponse {
    Json(doc.0)
}

#[cfg(test)]
mod tests {
    /// Every route of the API is registered through `routes!` (which documents it):
    /// a plain `route` call anywhere but the dashboard's HTML pages would serve a
    /// path the document does not list.
    #[test]
    fn api_routes_are_only_registered_documented() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let needles = [[".", "route("].concat(), [".", "route_service("].concat()];
        let mut plain = Vec::new();
        for entry in std::fs::read_dir(&src).expect("reads src") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("reads a source file");
                for (n, line) in text.lines().enumerate() {
                    if needles.iter().any(|n| line.contains(n.as_str())) {
                        plain.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            plain.is_empty(),
            "routes registered without a document entry:\n{}",
            plain.join("\n")
        );
    }
}
