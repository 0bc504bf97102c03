//! Platform-wide limits, spawn slots, the worker registry and reconciliation.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    rows::ServerRow,
    store::{ServerLock, StoreError},
};

/// The limits in force: the configured ones unless an admin overrode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub concurrent_spawn_limit: u32,
    pub active_server_limit: u32,
}

/// What an admin set at runtime; `None` falls back to the configuration.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct LimitOverrides {
    pub concurrent_spawn_limit: Option<i32>,
    pub active_server_limit: Option<i32>,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<String>,
}

impl LimitOverrides {
    pub fn apply(&self, configured: Limits) -> Limits {
        Limits {
            concurrent_spawn_limit: self
                .concurrent_spawn_limit
                .map_or(configured.concurrent_spawn_limit, |v| v as u32),
            active_server_limit: self
                .active_server_limit
                .map_or(configured.active_server_limit, |v| v as u32),
        }
    }
}

/// A change of one limit: keep it, set it, or reset it to the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub enum LimitChange {
    #[default]
    Keep,
    Set(i32),
    Reset,
}

impl LimitChange {
    /// As the stores bind it: whether to write the column, and its new value.
    pub fn parts(self) -> (bool, Option<i32>) {
        match self {
            LimitChange::Keep => (false, None),
            LimitChange::Set(v) => (true, Some(v)),
            LimitChange::Reset => (true, None),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub spawns_in_flight: i64,
    pub active_servers: i64,
    pub waiting_spawns: i64,
}

#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub backend: String,
    pub version: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub backend: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub jobs_in_flight: i32,
    pub stopped_at: Option<DateTime<Utc>>,
}

/// What a spawn waiting for a slot is told.
pub enum SlotAnswer {
    Granted(Box<dyn SpawnSlot>),
    /// Not yet: older spawns wait, or every slot is taken.
    Wait,
    /// Another delivery of this job holds a live claim on it.
    Duplicate,
}

/// A held spawn slot (a session advisory lock). Releasing records the end of the
/// spawn; a worker that dies frees the slot with its connection.
#[async_trait]
pub trait SpawnSlot: Send {
    fn slot(&self) -> i32;
    async fn release(self: Box<Self>);
}

#[async_trait]
pub trait Platform: Send + Sync + 'static {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError>;
    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError>;
    async fn usage(&self) -> Result<Usage, StoreError>;
    /// Creates the admission places below `limit` ahead of time, so that a burst of
    /// first requests does not queue on creating them.
    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError>;

    /// Takes a slot if one is free and no older spawn is waiting for it, on behalf
    /// of one delivery of the job (`delivery`), whose claim on the job it renews.
    async fn try_spawn_slot(
        &self,
        job_id: Uuid,
        created_at: DateTime<Utc>,
        limit: u32,
        worker: &str,
        delivery: Uuid,
    ) -> Result<SlotAnswer, StoreError>;
    /// A worker has just fetched this queued spawn: it counts as waiting for a slot
    /// (older than spawns fetched after it) until its delivery claims it.
    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError>;
    /// The worker's authoritative check: is this server within the active-server
    /// limit, counting only servers admitted before it?
    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError>;

    async fn register_worker(&self, worker: &WorkerInfo) -> Result<(), StoreError>;
    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError>;
    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError>;
    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError>;

    /// One reconciler at a time, platform-wide; `None` while another runs.
    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError>;
    /// The server's lock if nobody holds it now.
    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError>;
    /// Servers that should have a container: pending spawn, running, pending stop.
    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError>;
    /// `running → stopped` (or `failed` with `error`) when its container is gone.
    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError>;
    /// Closes slot records left open by workers that died.
    async fn close_stale_attempts(&self) -> Result<u64, StoreError>;
}
