//! Interim: the interfaces not yet written once, passed to each dialect's store.
//! Each one moves into its aggregate's module as it is written once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    accounts::*,
    db::{Db, Dialect},
    names::*,
    platform::*,
    rows::*,
    store::*,
};

#[async_trait]
impl crate::accounts::Accounts for Db {
    async fn register(&self, account: &NewAccount) -> Result<UserRow, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.register(account).await,
            Dialect::Lite(s) => s.register(account).await,
        }
    }

    async fn find_login(&self, login: &str) -> Result<Option<UserRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.find_login(login).await,
            Dialect::Lite(s) => s.find_login(login).await,
        }
    }

    async fn user_by_id(&self, id: i64) -> Result<Option<UserRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.user_by_id(id).await,
            Dialect::Lite(s) => s.user_by_id(id).await,
        }
    }

    async fn users_page(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<Page<UserRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.users_page(search, offset, limit).await,
            Dialect::Lite(s) => s.users_page(search, offset, limit).await,
        }
    }

    async fn set_role(&self, user: &UserName, role: Role) -> Result<UserRow, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.set_role(user, role).await,
            Dialect::Lite(s) => s.set_role(user, role).await,
        }
    }

    async fn set_active(&self, user: &UserName, active: bool) -> Result<UserRow, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.set_active(user, active).await,
            Dialect::Lite(s) => s.set_active(user, active).await,
        }
    }

    async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        keep: Option<Uuid>,
    ) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.set_password(user_id, hash, keep).await,
            Dialect::Lite(s) => s.set_password(user_id, hash, keep).await,
        }
    }

    async fn bootstrap_admin(
        &self,
        name: &UserName,
        password_hash: &str,
    ) -> Result<UserRow, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.bootstrap_admin(name, password_hash).await,
            Dialect::Lite(s) => s.bootstrap_admin(name, password_hash).await,
        }
    }

    async fn create_session(
        &self,
        jti: Uuid,
        user_id: i64,
        expires_at: DateTime<Utc>,
        client_addr: Option<&str>,
    ) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => {
                s.create_session(jti, user_id, expires_at, client_addr)
                    .await
            }
            Dialect::Lite(s) => {
                s.create_session(jti, user_id, expires_at, client_addr)
                    .await
            }
        }
    }

    async fn session_user(&self, jti: Uuid) -> Result<Option<UserRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.session_user(jti).await,
            Dialect::Lite(s) => s.session_user(jti).await,
        }
    }

    async fn revoke_session(&self, jti: Uuid) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.revoke_session(jti).await,
            Dialect::Lite(s) => s.revoke_session(jti).await,
        }
    }

    async fn create_api_token(
        &self,
        row: &ApiTokenRow,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.create_api_token(row, token_hash).await,
            Dialect::Lite(s) => s.create_api_token(row, token_hash).await,
        }
    }

    async fn use_api_token(&self, token_hash: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.use_api_token(token_hash).await,
            Dialect::Lite(s) => s.use_api_token(token_hash).await,
        }
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.list_api_tokens().await,
            Dialect::Lite(s) => s.list_api_tokens().await,
        }
    }

    async fn revoke_api_token(&self, id: Uuid) -> Result<bool, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.revoke_api_token(id).await,
            Dialect::Lite(s) => s.revoke_api_token(id).await,
        }
    }

    async fn server_by_token(&self, token_hash: &str) -> Result<Option<ServerRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.server_by_token(token_hash).await,
            Dialect::Lite(s) => s.server_by_token(token_hash).await,
        }
    }

    async fn create_sso(
        &self,
        token_hash: &str,
        user_id: i64,
        server_name: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => {
                s.create_sso(token_hash, user_id, server_name, expires_at)
                    .await
            }
            Dialect::Lite(s) => {
                s.create_sso(token_hash, user_id, server_name, expires_at)
                    .await
            }
        }
    }

    async fn consume_sso(&self, token_hash: &str) -> Result<Option<SsoGrant>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.consume_sso(token_hash).await,
            Dialect::Lite(s) => s.consume_sso(token_hash).await,
        }
    }

    async fn throttled(&self, keys: &[String]) -> Result<Option<i64>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.throttled(keys).await,
            Dialect::Lite(s) => s.throttled(keys).await,
        }
    }

    async fn record_failure(&self, key: &str, rule: ThrottleRule) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.record_failure(key, rule).await,
            Dialect::Lite(s) => s.record_failure(key, rule).await,
        }
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.clear_failures(key).await,
            Dialect::Lite(s) => s.clear_failures(key).await,
        }
    }

    async fn audit(&self, event: AuditEvent<'_>) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.audit(event).await,
            Dialect::Lite(s) => s.audit(event).await,
        }
    }

    async fn audit_page(&self, offset: i64, limit: i64) -> Result<Page<AuditRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.audit_page(offset, limit).await,
            Dialect::Lite(s) => s.audit_page(offset, limit).await,
        }
    }
}

#[async_trait]
impl crate::platform::Platform for Db {
    async fn limit_overrides(&self) -> Result<LimitOverrides, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.limit_overrides().await,
            Dialect::Lite(s) => s.limit_overrides().await,
        }
    }

    async fn set_limits(
        &self,
        spawn: LimitChange,
        active: LimitChange,
        by: &str,
    ) -> Result<LimitOverrides, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.set_limits(spawn, active, by).await,
            Dialect::Lite(s) => s.set_limits(spawn, active, by).await,
        }
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.usage().await,
            Dialect::Lite(s) => s.usage().await,
        }
    }

    async fn ensure_admission_places(&self, limit: u32) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.ensure_admission_places(limit).await,
            Dialect::Lite(s) => s.ensure_admission_places(limit).await,
        }
    }

    async fn try_spawn_slot(
        &self,
        job_id: Uuid,
        created_at: DateTime<Utc>,
        limit: u32,
        worker: &str,
        delivery: Uuid,
    ) -> Result<SlotAnswer, StoreError> {
        match self.on() {
            Dialect::Pg(s) => {
                s.try_spawn_slot(job_id, created_at, limit, worker, delivery)
                    .await
            }
            Dialect::Lite(s) => {
                s.try_spawn_slot(job_id, created_at, limit, worker, delivery)
                    .await
            }
        }
    }

    async fn mark_fetched(&self, job_id: Uuid) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.mark_fetched(job_id).await,
            Dialect::Lite(s) => s.mark_fetched(job_id).await,
        }
    }

    async fn within_active_limit(&self, server_id: i64, limit: u32) -> Result<bool, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.within_active_limit(server_id, limit).await,
            Dialect::Lite(s) => s.within_active_limit(server_id, limit).await,
        }
    }

    async fn register_worker(&self, worker: &WorkerInfo) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.register_worker(worker).await,
            Dialect::Lite(s) => s.register_worker(worker).await,
        }
    }

    async fn worker_heartbeat(&self, name: &str, jobs_in_flight: i32) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.worker_heartbeat(name, jobs_in_flight).await,
            Dialect::Lite(s) => s.worker_heartbeat(name, jobs_in_flight).await,
        }
    }

    async fn worker_stopped(&self, name: &str) -> Result<(), StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.worker_stopped(name).await,
            Dialect::Lite(s) => s.worker_stopped(name).await,
        }
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.list_workers().await,
            Dialect::Lite(s) => s.list_workers().await,
        }
    }

    async fn try_reconcile_lock(&self) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.try_reconcile_lock().await,
            Dialect::Lite(s) => s.try_reconcile_lock().await,
        }
    }

    async fn try_lock_server(
        &self,
        server_id: i64,
    ) -> Result<Option<Box<dyn ServerLock>>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.try_lock_server(server_id).await,
            Dialect::Lite(s) => s.try_lock_server(server_id).await,
        }
    }

    async fn live_servers(&self) -> Result<Vec<ServerRow>, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.live_servers().await,
            Dialect::Lite(s) => s.live_servers().await,
        }
    }

    async fn mark_lost(
        &self,
        server_id: i64,
        failed: bool,
        error: &str,
    ) -> Result<bool, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.mark_lost(server_id, failed, error).await,
            Dialect::Lite(s) => s.mark_lost(server_id, failed, error).await,
        }
    }

    async fn close_stale_attempts(&self) -> Result<u64, StoreError> {
        match self.on() {
            Dialect::Pg(s) => s.close_stale_attempts().await,
            Dialect::Lite(s) => s.close_stale_attempts().await,
        }
    }
}
