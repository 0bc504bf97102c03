//! `/api/v1/admin/profiles` (operators define server profiles) and
//! `/api/v1/profiles` (a user lists those they may pick), the profiles file
//! (`BERTH_PROFILES`), and the choice of a spawn's profile.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use schema::{
    UserName,
    prelude::*,
    profiles::{DEFAULT_PROFILE, Profile, ProfileRow},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{ClientAddr, Principal},
    body::JsonBody,
    error::{ApiError, ApiResult},
    openapi::Errors,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, change, delete))
        .routes(routes!(mine))
}

/// A profile as operators see it: its definition, where it comes from and its use.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileView {
    /// The definition, as `POST` takes it.
    profile: Profile,
    /// `api` (made here or on the dashboard) or `file` (`BERTH_PROFILES`, which
    /// replaces it at the next start).
    source: String,
    /// Servers of this profile pending, running or stopping now.
    active: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    updated_by: Option<String>,
}

impl ProfileView {
    fn new(row: ProfileRow, active: i64) -> Self {
        Self {
            profile: row.profile,
            source: row.source,
            active,
            created_at: row.created_at,
            updated_at: row.updated_at,
            updated_by: row.updated_by,
        }
    }
}

/// A profile as users see it: what it gives, not who else may use it.
#[derive(Debug, Serialize, ToSchema)]
struct OfferedProfile {
    name: String,
    display_name: String,
    description: Option<String>,
    image: Option<String>,
    mem_limit: Option<String>,
    cpu_limit: Option<f64>,
    /// The GPUs it gets, if any.
    gpus: Option<schema::profiles::Gpus>,
    /// The profile a spawn that names none gets.
    default: bool,
}

impl OfferedProfile {
    fn new(p: &Profile) -> Self {
        Self {
            name: p.name.clone(),
            display_name: p.display_name.clone().unwrap_or_else(|| p.name.clone()),
            description: p.description.clone(),
            image: p.image.clone(),
            mem_limit: p.mem_limit.clone(),
            cpu_limit: p.cpu_limit,
            gpus: p.gpus.clone(),
            default: p.name == DEFAULT_PROFILE,
        }
    }
}

fn profile_name(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(name) = path?;
    schema::ServerName::parse(&name).map_err(|e| {
        ApiError::BadRequest(e.to_string().replacen("server name", "profile name", 1))
    })?;
    Ok(name)
}

/// Every profile, with where it comes from and how many servers use it.
#[utoipa::path(get, path = "/admin/profiles", tag = "profiles",
    responses((status = 200, description = "The profiles", body = Vec<ProfileView>), Errors))]
async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<ProfileView>>> {
    principal.require("admin")?;
    let usage = state.db.profile_usage().await?;
    let rows = state.db.list_profiles().await?;
    Ok(Json(
        rows.into_iter()
            .map(|row| {
                let active = usage.get(&row.profile.name).copied().unwrap_or(0);
                ProfileView::new(row, active)
            })
            .collect(),
    ))
}

/// Defines a profile. Every field but `name` may be left out.
#[utoipa::path(post, path = "/admin/profiles", tag = "profiles", request_body = Profile,
    responses((status = 201, description = "The new profile", body = ProfileView), Errors))]
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<ProfileView>)> {
    principal.require("admin")?;
    let row = define(&state, &principal.actor(), &addr, body).await?;
    Ok((StatusCode::CREATED, Json(ProfileView::new(row, 0))))
}

/// Defines a profile from its JSON, audited; for the API and the dashboard.
pub(crate) async fn define(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    body: Value,
) -> ApiResult<ProfileRow> {
    let profile = parse(body)?;
    let row = state.db.create_profile(&profile, actor).await?;
    state.profiles.forget();
    state
        .audit(
            Some(actor),
            "profile_created",
            Some(&profile.name),
            addr,
            json!(profile),
        )
        .await;
    Ok(row)
}

/// A profile definition from a request body, checked.
fn parse(body: Value) -> ApiResult<Profile> {
    let profile: Profile = serde_json::from_value(body)
        .map_err(|e| ApiError::BadRequest(format!("not a profile: {e}")))?;
    profile.validate().map_err(ApiError::BadRequest)?;
    Ok(profile)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct ProfileParam {
    /// The profile's name.
    #[allow(dead_code)]
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 63)]
    name: String,
}

/// One profile.
#[utoipa::path(get, path = "/admin/profiles/{name}", tag = "profiles", params(ProfileParam),
    responses((status = 200, description = "The profile", body = ProfileView), Errors))]
async fn show(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ProfileView>> {
    principal.require("admin")?;
    let name = profile_name(path)?;
    let row = found(&state, &name).await?;
    let active = state
        .db
        .profile_usage()
        .await?
        .get(&name)
        .copied()
        .unwrap_or(0);
    Ok(Json(ProfileView::new(row, active)))
}

pub(crate) async fn found(state: &AppState, name: &str) -> ApiResult<ProfileRow> {
    state
        .db
        .get_profile(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no profile named {name:?}")))
}

/// Changes the fields the body names (`null` clears one); the name stays. Servers
/// already requested keep what they were given: only new spawns see the change.
#[utoipa::path(patch, path = "/admin/profiles/{name}", tag = "profiles", params(ProfileParam),
    request_body(content = Object, description = "Fields of a profile; null clears one"),
    responses((status = 200, description = "The profile now", body = ProfileView), Errors))]
async fn change(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<ProfileView>> {
    principal.require("admin")?;
    let name = profile_name(path)?;
    let Value::Object(changes) = body else {
        return Err(ApiError::BadRequest(
            "the body must be an object of profile fields".into(),
        ));
    };
    let row = change_fields(&state, &principal.actor(), &addr, &name, changes).await?;
    let active = state
        .db
        .profile_usage()
        .await?
        .get(&name)
        .copied()
        .unwrap_or(0);
    Ok(Json(ProfileView::new(row, active)))
}

/// Changes the fields `changes` names (`null` clears one), audited; for the API
/// and the dashboard.
pub(crate) async fn change_fields(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    name: &str,
    changes: serde_json::Map<String, Value>,
) -> ApiResult<ProfileRow> {
    if changes.is_empty() {
        return Err(ApiError::BadRequest("change at least one field".into()));
    }
    if changes
        .get("name")
        .is_some_and(|n| n.as_str() != Some(name))
    {
        return Err(ApiError::BadRequest(
            "a profile cannot be renamed: define a new one and delete this one".into(),
        ));
    }
    let current = found(state, name).await?;
    let Value::Object(mut merged) = json!(current.profile) else {
        unreachable!("a profile serialises to an object")
    };
    for (field, value) in changes.clone() {
        if value.is_null() {
            merged.remove(&field);
        } else {
            merged.insert(field, value);
        }
    }
    let profile = parse(Value::Object(merged))?;
    let row = state.db.replace_profile(&profile, actor).await?;
    state.profiles.forget();
    state
        .audit(
            Some(actor),
            "profile_changed",
            Some(name),
            addr,
            Value::Object(changes),
        )
        .await;
    Ok(row)
}

/// Removes a profile; its servers keep running with what they were given.
#[utoipa::path(delete, path = "/admin/profiles/{name}", tag = "profiles", params(ProfileParam),
    responses((status = 204, description = "Removed"), Errors))]
async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    addr: ClientAddr,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    principal.require("admin")?;
    let name = profile_name(path)?;
    remove(&state, &principal.actor(), &addr, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a profile, audited; for the API and the dashboard.
pub(crate) async fn remove(
    state: &AppState,
    actor: &str,
    addr: &ClientAddr,
    name: &str,
) -> ApiResult<()> {
    if !state.db.delete_profile(name).await? {
        return Err(ApiError::NotFound(format!("no profile named {name:?}")));
    }
    state.profiles.forget();
    state
        .audit(Some(actor), "profile_deleted", Some(name), addr, json!({}))
        .await;
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct MineQuery {
    /// Whose choices (a portal asking for a user); the caller when absent.
    #[param(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 32)]
    user: Option<String>,
}

/// The profiles the user may pick when spawning (an operator's token without
/// `user`: all of them); the one marked `default` is used when a spawn names none.
#[utoipa::path(get, path = "/profiles", tag = "profiles", params(MineQuery),
    responses((status = 200, description = "The profiles open to the user",
        body = Vec<OfferedProfile>), Errors))]
async fn mine(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<MineQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<OfferedProfile>>> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let user = match (&query.user, &principal) {
        (Some(name), _) => {
            let name = UserName::parse(name)?;
            principal.may("servers:read", &name)?;
            state
                .db
                .get_user(&name)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no user named {name:?}")))?
        }
        (None, Principal::User { user, .. }) => user.clone(),
        // An operator's token that names no user: every profile.
        (None, _) if principal.is_admin() => {
            let profiles = state.profiles.all(&state.db).await?;
            return Ok(Json(profiles.values().map(OfferedProfile::new).collect()));
        }
        (None, _) => {
            return Err(ApiError::BadRequest(
                "name the user whose profiles to list: ?user=NAME".into(),
            ));
        }
    };
    let profiles = state.profiles.all(&state.db).await?;
    Ok(Json(
        profiles
            .values()
            .filter(|p| p.allows(&user))
            .map(OfferedProfile::new)
            .collect(),
    ))
}

/// The profiles as this process last read them. A spawn request consults them
/// without a query: read again after `FRESH`, and at once after a change made
/// through this process. Another API process sees a change within `FRESH`.
/// One request reads them at a time; those that find them stale meanwhile wait
/// for its read (in a storm after an idle spell, every request found them stale
/// at once and each read them, 200 queries queueing for the pool before the
/// first spawn was decided).
#[derive(Default)]
pub struct ProfileCache {
    read: RwLock<Read>,
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Read {
    profiles: Option<(Instant, ProfileMap)>,
    /// Changes made through this process so far: a read that began before one
    /// may hold the profiles as they were, and is not kept.
    changes: u64,
}

type ProfileMap = Arc<BTreeMap<String, Profile>>;

const FRESH: Duration = Duration::from_secs(1);

impl ProfileCache {
    fn fresh(&self) -> (Option<ProfileMap>, u64) {
        let read = self.read.read().expect("profile cache lock");
        let profiles = match &read.profiles {
            Some((at, profiles)) if at.elapsed() < FRESH => Some(profiles.clone()),
            _ => None,
        };
        (profiles, read.changes)
    }

    /// After a change made through this process has committed.
    pub(crate) fn forget(&self) {
        let mut read = self.read.write().expect("profile cache lock");
        read.profiles = None;
        read.changes += 1;
    }

    pub(crate) async fn all(
        &self,
        db: &schema::Db,
    ) -> Result<Arc<BTreeMap<String, Profile>>, schema::StoreError> {
        if let (Some(profiles), _) = self.fresh() {
            return Ok(profiles);
        }
        let _reading = self.reading.lock().await;
        let changes = match self.fresh() {
            (Some(profiles), _) => return Ok(profiles),
            (None, changes) => changes,
        };
        let profiles: Arc<BTreeMap<String, Profile>> = Arc::new(
            db.list_profiles()
                .await?
                .into_iter()
                .map(|row| (row.profile.name.clone(), row.profile))
                .collect(),
        );
        let mut read = self.read.write().expect("profile cache lock");
        if read.changes == changes {
            read.profiles = Some((Instant::now(), profiles.clone()));
        }
        Ok(profiles)
    }
}

/// The profile a spawn for `user` gets: the one it names (unknown: 400; not open
/// to the user: 403), else the `default` profile if there is one, else none (the
/// workers' configuration). `caller` is the requesting account, when it is the user.
pub(crate) async fn choose(
    state: &AppState,
    user: &UserName,
    caller: Option<&schema::UserRow>,
    named: Option<&str>,
) -> ApiResult<Option<Profile>> {
    let profiles = state.profiles.all(&state.db).await?;
    let profile = match named {
        Some(name) => profiles.get(name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "there is no profile named {name:?}; GET /api/v1/profiles lists yours"
            ))
        })?,
        None => match profiles.get(DEFAULT_PROFILE) {
            Some(profile) => profile,
            None => return Ok(None),
        },
    };
    if !(profile.roles.is_empty() && profile.groups.is_empty()) {
        let owner = match caller {
            Some(row) if row.name == user.as_str() => row.clone(),
            _ => state
                .db
                .get_user(user)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no user named {user:?}")))?,
        };
        if !profile.allows(&owner) {
            return Err(ApiError::Forbidden(format!(
                "profile {:?} is not open to {user:?}; GET /api/v1/profiles lists those that are",
                profile.name
            )));
        }
    }
    Ok(Some(profile.clone()))
}

/// The profile a server is started with again (the stopped page, an operator's
/// start or retry): the one it last ran with while that still exists, else the
/// default, under the same rules as a user's request.
pub(crate) async fn again(
    state: &AppState,
    user: &UserName,
    server: &schema::ServerName,
) -> ApiResult<Option<Profile>> {
    let last = state
        .db
        .get_server(user, server)
        .await?
        .and_then(|row| row.profile);
    let profiles = state.profiles.all(&state.db).await?;
    let named = last.filter(|name| profiles.contains_key(name));
    choose(state, user, None, named.as_deref()).await
}

/// Loads `BERTH_PROFILES` (a JSON list of profiles, or `{"profiles": [...]}`):
/// its profiles replace those of the same name, and profiles an earlier file
/// defined that it no longer does are removed. Says what it did.
pub(crate) async fn load_file(db: &schema::Db, path: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("BERTH_PROFILES {}: {e}", path.display()))?;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<Profile>),
        Wrapped { profiles: Vec<Profile> },
    }
    let profiles = match serde_json::from_str::<File>(&text) {
        Ok(File::List(p) | File::Wrapped { profiles: p }) => p,
        Err(_) => {
            // Again as a list, for the message that names what is wrong.
            let e = serde_json::from_str::<Vec<Profile>>(&text).err();
            return Err(format!(
                "BERTH_PROFILES {}: not a JSON list of profiles{}",
                path.display(),
                e.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
    };
    let mut names = std::collections::HashSet::new();
    for profile in &profiles {
        profile.validate().map_err(|e| {
            format!(
                "BERTH_PROFILES {}: profile {:?}: {e}",
                path.display(),
                profile.name
            )
        })?;
        if !names.insert(profile.name.as_str()) {
            return Err(format!(
                "BERTH_PROFILES {}: profile {:?} is defined twice",
                path.display(),
                profile.name
            ));
        }
    }
    let sync = db
        .sync_file_profiles(&profiles)
        .await
        .map_err(|e| format!("BERTH_PROFILES: {e}"))?;
    tracing::info!(
        file = %path.display(),
        profiles = ?names,
        replaced = ?sync.replaced,
        removed = ?sync.removed,
        "profiles loaded from BERTH_PROFILES; the file wins over the API for these names"
    );
    for name in &sync.replaced {
        tracing::warn!(
            profile = %name,
            "BERTH_PROFILES replaces profile {name:?}, which was defined through the API"
        );
    }
    Ok(())
}
