//! Berth's HTTP API. It authenticates, validates, records and enqueues; it never
//! talks to the container engine.

pub mod accounts;
pub mod activity;
pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod oidc;
pub mod openapi;
pub mod passwords;
pub mod platform;
pub mod profiles;
pub mod progress;
pub mod proxy;
pub mod reference;
pub mod serve;
pub mod servers;
pub mod tokens;
pub mod users;
pub mod views;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderValue, Method, StatusCode, header},
};
use schema::{Db, StoreError, UserName, accounts::AuditEvent, prelude::*};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    set_header::SetResponseHeaderLayer,
    timeout::TimeoutLayer,
    trace::TraceLayer,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use auth::{ClientAddr, Principal};
pub use config::{ApiConfig, Environment};
use error::ApiError;
use tokens::JwtKeys;

#[derive(Clone)]
pub struct AppState {
    /// The store, on whichever database this Berth runs.
    pub db: Arc<Db>,
    /// The proxy's caches, pool and activity (used where `/user/` is served).
    pub proxy: Arc<proxy::Proxy>,
    pub keys: Arc<JwtKeys>,
    pub config: Arc<ApiConfig>,
    pub started: Instant,
    /// Job ids with new spawn progress, heard from the database.
    pub progress: tokio::sync::broadcast::Sender<uuid::Uuid>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Where users reach Berth (`BERTH_PUBLIC_URL`), without a trailing slash.
    pub origin: Arc<str>,
    /// Who may say who the client is.
    pub trusted: Arc<auth::TrustedProxies>,
    /// Spawn-progress streams open in this process, per caller.
    pub streams: Arc<progress::Streams>,
    /// The server profiles, as this process last read them.
    pub profiles: Arc<profiles::ProfileCache>,
    /// The OpenID Connect providers users may sign in with.
    pub oidc: Arc<oidc::Providers>,
}

impl AppState {
    /// How servers' addresses are shown to anyone: through the proxy only.
    pub fn public_addresses(&self) -> views::Addresses<'_> {
        views::Addresses {
            origin: &self.origin,
            internal: false,
        }
    }

    /// How servers' addresses are shown to `principal`.
    pub fn addresses(&self, principal: &Principal) -> views::Addresses<'_> {
        views::Addresses {
            origin: &self.origin,
            internal: principal.is_admin(),
        }
    }

    /// The limits in force: the configured ones unless an admin overrode them.
    pub async fn limits(&self) -> Result<schema::Limits, StoreError> {
        self.db.limits().await
    }

    /// Records a security event. A failure to write it is logged, not fatal: the
    /// action it describes has already happened.
    pub async fn audit(
        &self,
        actor: Option<&str>,
        action: &str,
        target: Option<&str>,
        addr: &ClientAddr,
        detail: serde_json::Value,
    ) {
        let event = AuditEvent {
            actor,
            action,
            target,
            client_addr: addr.0.as_deref(),
            detail,
        };
        if let Err(e) = self.db.audit(event).await {
            tracing::error!(action, error = %e, "could not write the audit log");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("bootstrapping the admin account: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn router(state: AppState) -> Router {
    let (documented, mut doc) = api_routes().split_for_parts();
    let images = std::iter::once(&state.config.default_image).chain(&state.config.allowed_images);
    openapi::finish(&mut doc, images);
    let doc = openapi::Document(Arc::new(doc));
    let security_headers = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
    ];
    let mut app = documented
        .layer(axum::Extension(doc))
        .nest("/admin", dashboard::router())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this route does not take that method".into())
        })
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(TraceLayer::new_for_http());
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .max_age(Duration::from_secs(3600)),
        );
    }
    for (name, value) in security_headers {
        app = app.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ));
    }
    app.with_state(state)
}

/// The API's routes with their OpenAPI document: one source for both.
pub fn api_routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .merge(accounts::router())
        .merge(admin::router())
        .merge(users::router())
        .merge(servers::router())
        .merge(jobs::router())
        .merge(platform::router())
        .merge(profiles::router())
        .merge(activity::router())
        .merge(progress::router())
        .merge(oidc::router())
        .routes(routes!(openapi::document))
        .routes(routes!(reference::reference))
        .route_layer(axum::middleware::from_fn(metrics::track));
    OpenApiRouter::with_openapi(openapi::base())
        .nest("/api/v1", api)
        .merge(
            health::router()
                .merge(metrics::router())
                .route_layer(axum::middleware::from_fn(metrics::track)),
        )
}

/// Every client error of the API is `{error, message}`: a rejection that axum
/// answered as text (a path that is not UTF-8, a query that does not parse) is
/// turned into one. The dashboard's pages are HTML and stay so.
async fn json_errors(response: axum::response::Response) -> axum::response::Response {
    let status = response.status();
    let is_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain"));
    if !status.is_client_error() || !is_text {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let error = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound(text),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(text),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(text),
        StatusCode::UNAUTHORIZED => ApiError::Unauthorized(text),
        _ => ApiError::BadRequest(text),
    };
    let mut answer = axum::response::IntoResponse::into_response(error);
    if !matches!(
        status,
        StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNAUTHORIZED
    ) {
        *answer.status_mut() = status;
    }
    answer
}

/// What one process serves on its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// `berth api`: the API and the dashboard.
    Api,
    /// `berth proxy`: users' servers under `/user/`.
    Proxy,
    /// `berth up`: both on one address.
    Both,
}

/// Checks the configuration, bootstraps the admin account (unless it serves the
/// proxy only), then serves what `serve` names on `listener` until `shutdown`
/// fires and open requests have drained.
pub async fn run(
    config: ApiConfig,
    store: Arc<Db>,
    listener: TcpListener,
    shutdown: CancellationToken,
    serve: Serve,
) -> Result<(), StartError> {
    config.validate().map_err(StartError::Config)?;
    passwords::set_concurrency(config.password_checks);
    let keys = match &config.jwt_private_key {
        Some(pem) => JwtKeys::from_pem(pem).map_err(StartError::Config)?,
        None => {
            tracing::warn!(
                "BERTH_JWT_PRIVATE_KEY is not set: signing with a key generated for this process; \
                 tokens stop working when it restarts and are not accepted by other API processes"
            );
            JwtKeys::generate().map_err(StartError::Config)?
        }
    };
    if serve != Serve::Proxy {
        bootstrap(&config, &store).await?;
    }
    let (progress, _) = tokio::sync::broadcast::channel(1024);
    tokio::spawn({
        let store = store.clone();
        let progress = progress.clone();
        let shutdown = shutdown.clone();
        async move { store.relay_progress(progress, shutdown).await }
    });
    let address = listener.local_addr()?;
    let origin: Arc<str> = config.public_origin(address).into();
    let config_trusted = config.trusted_proxies.clone();
    let oidc = oidc::Providers::from_setting(config.oidc_providers.as_deref())
        .map_err(StartError::Config)?;
    let state = AppState {
        db: store,
        proxy: Arc::new(proxy::Proxy::new(&config, &origin)),
        keys: Arc::new(keys),
        config: Arc::new(config),
        started: Instant::now(),
        progress,
        metrics: schema::telemetry::install(),
        origin,
        trusted: Arc::new(
            auth::TrustedProxies::parse(&config_trusted).map_err(StartError::Config)?,
        ),
        streams: Arc::default(),
        profiles: Arc::default(),
        oidc: Arc::new(oidc),
    };
    let app = match serve {
        Serve::Api => router(state.clone()),
        Serve::Proxy => Router::from(health::router().merge(metrics::router()))
            .route_layer(axum::middleware::from_fn(metrics::track))
            .fallback(|| async { ApiError::NotFound("no such route".into()) })
            .with_state(state.clone()),
        Serve::Both => router(state.clone()),
    };
    // Requests under /user/ go straight to the proxy, past the router.
    let proxied = (serve != Serve::Api).then(|| Arc::new(state.clone()));
    let background = match serve {
        Serve::Api => None,
        Serve::Proxy | Serve::Both => {
            tracing::info!(%address, origin = %state.origin, "proxy serving /user/");
            Some(tokio::spawn(proxy::background(
                state.clone(),
                shutdown.clone(),
            )))
        }
    };
    if serve != Serve::Proxy {
        tracing::info!(%address, "api listening");
    }
    let limits = serve::Limits {
        connections: state.config.max_connections,
        header_timeout: Duration::from_secs(state.config.header_timeout),
        loopback_hosts_only: address.ip().is_loopback() && !state.config.has_public_url(),
    };
    serve::serve(listener, app, proxied, limits, shutdown).await?;
    if let Some(background) = background {
        let _ = background.await;
    }
    Ok(())
}

/// The bootstrap admin (created when its name is free) and the admission places.
async fn bootstrap(config: &ApiConfig, store: &Db) -> Result<(), StartError> {
    if let (Some(name), Some(password)) = (&config.admin_user, &config.admin_password) {
        let name = UserName::parse(name)
            .map_err(|e| StartError::Config(format!("BERTH_ADMIN_USER: {e}")))?;
        let hash = passwords::hash(password.clone())
            .await
            .map_err(|e| StartError::Bootstrap(e.to_string()))?;
        match store.bootstrap_admin(&name, &hash).await? {
            Some(_) => tracing::info!(admin = %name, "admin account created"),
            None => match store.get_user(&name).await? {
                Some(existing) if existing.is_admin() && existing.active => {
                    tracing::info!(admin = %name, "admin account exists; left as it is")
                }
                _ => tracing::warn!(
                    admin = %name,
                    "an account named BERTH_ADMIN_USER exists but is not an active admin; \
                     it is left as it is (start-up never promotes or re-activates an account)"
                ),
            },
        }
    }
    let limits = store.limits().await?;
    store
        .ensure_admission_places(limits.active_server_limit)
        .await?;
    if let Some(file) = &config.profiles_file {
        profiles::load_file(store, file)
            .await
            .map_err(StartError::Config)?;
    }
    Ok(())
}
