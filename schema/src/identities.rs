//! Sign-in with OpenID Connect providers: the identities linked to accounts, and
//! the sign-ins under way (what a callback must match, spent once).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{
    accounts::{NewAccount, insert_account},
    db::{Db, apply, each, execute, now},
    rows::UserRow,
    store::StoreError,
};

text_enum! {
    pub enum FlowKind {
        /// A sign-in that logs in (or creates) the identity's account.
        Login = "login",
        /// A sign-in that links the identity to the account that began it.
        Link = "link",
        /// A finished sign-in waiting for a portal to exchange its code.
        Handoff = "handoff",
    }
}

/// A sign-in under way, or a hand-off waiting for its portal.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OidcFlow {
    pub kind: FlowKind,
    pub provider: String,
    /// The hash of the cookie the browser that began it holds.
    pub browser_hash: Option<String>,
    pub nonce: Option<String>,
    /// The PKCE code verifier.
    pub verifier: Option<String>,
    /// The account linking (`Link`) or signed in (`Handoff`).
    pub user_id: Option<i64>,
    /// Where the browser goes when it is done.
    pub return_to: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// An account's identity at a provider.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IdentityRow {
    pub provider: String,
    pub subject: String,
    pub user_id: i64,
    pub email: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait Identities: Send + Sync + 'static {
    /// Records a sign-in under way by the hash of its `state`.
    async fn begin_flow(&self, state_hash: &str, flow: &OidcFlow) -> Result<(), StoreError>;
    /// Spends a flow: gone whatever comes next; `None` when it is unknown, spent
    /// or expired.
    async fn take_flow(&self, state_hash: &str) -> Result<Option<OidcFlow>, StoreError>;
    /// The account an identity is linked to, noting the sign-in and the email the
    /// provider gave.
    async fn identity_login(
        &self,
        provider: &str,
        subject: &str,
        email: Option<&str>,
    ) -> Result<Option<UserRow>, StoreError>;
    /// Links an identity to an account; a conflict when the identity is linked
    /// to an account already, or the account to another identity there.
    async fn link_identity(
        &self,
        provider: &str,
        subject: &str,
        user_id: i64,
        email: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Creates an account (in `groups`) and links the identity to it, together.
    async fn register_identity(
        &self,
        account: &NewAccount,
        groups: &[String],
        provider: &str,
        subject: &str,
    ) -> Result<UserRow, StoreError>;
    /// The identities linked to an account, by provider.
    async fn identities_of(&self, user_id: i64) -> Result<Vec<IdentityRow>, StoreError>;
    /// Whether there was such a link.
    async fn unlink_identity(&self, user_id: i64, provider: &str) -> Result<bool, StoreError>;
}

/// A conflict that says which side of a link is taken.
fn link_conflict(e: sqlx::Error, provider: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let message = db.message();
            if db.constraint() == Some("identities_user_provider")
                || message.contains("identities.user_id")
            {
                StoreError::Conflict(format!(
                    "this account is linked to another {provider} identity already; unlink it first"
                ))
            } else {
                StoreError::Conflict(format!(
                    "this {provider} identity is linked to another account"
                ))
            }
        }
        _ => StoreError::Database(e),
    }
}

/// Links an identity, signed in with now; a conflict says which side is taken.
async fn insert_identity(
    tx: &mut crate::db::Tx,
    provider: &str,
    subject: &str,
    user_id: i64,
    email: Option<&str>,
) -> Result<(), StoreError> {
    execute!(
        tx.conn(),
        "insert into identities (provider, subject, user_id, email, created_at, \
           last_login_at) values ($1, $2, $3, $4, $5, $5)",
        provider,
        subject,
        user_id,
        email,
        now()
    )
    .map_err(|e| link_conflict(e, provider))?;
    Ok(())
}

#[async_trait]
impl Identities for Db {
    async fn begin_flow(&self, state_hash: &str, flow: &OidcFlow) -> Result<(), StoreError> {
        apply!(
            self,
            "insert into oidc_flows (state_hash, kind, provider, browser_hash, nonce, verifier, \
               user_id, return_to, expires_at) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            state_hash,
            flow.kind.as_str(),
            &flow.provider,
            &flow.browser_hash,
            &flow.nonce,
            &flow.verifier,
            flow.user_id,
            &flow.return_to,
            flow.expires_at
        )
        .map(drop)
    }

    async fn take_flow(&self, state_hash: &str) -> Result<Option<OidcFlow>, StoreError> {
        let flow = self
            .write(async |tx| {
                Ok(each!(tx.conn(), c => sqlx::query_as::<_, OidcFlow>(
                    "delete from oidc_flows where state_hash = $1 returning kind, provider, \
                     browser_hash, nonce, verifier, user_id, return_to, expires_at"
                )
                .bind(state_hash)
                .fetch_optional(c)
                .await)?)
            })
            .await?;
        Ok(flow.filter(|f| f.expires_at > now()))
    }

    async fn identity_login(
        &self,
        provider: &str,
        subject: &str,
        email: Option<&str>,
    ) -> Result<Option<UserRow>, StoreError> {
        self.write(async |tx| {
            let linked = execute!(
                tx.conn(),
                "update identities set last_login_at = $3, email = coalesce($4, email) \
                 where provider = $1 and subject = $2",
                provider,
                subject,
                now(),
                email
            )?;
            if linked == 0 {
                return Ok(None);
            }
            Ok(each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                "select u.* from identities i join users u on u.id = i.user_id \
                 where i.provider = $1 and i.subject = $2"
            )
            .bind(provider)
            .bind(subject)
            .fetch_optional(c)
            .await)?)
        })
        .await
    }

    async fn link_identity(
        &self,
        provider: &str,
        subject: &str,
        user_id: i64,
        email: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(async |tx| insert_identity(tx, provider, subject, user_id, email).await)
            .await
    }

    async fn register_identity(
        &self,
        account: &NewAccount,
        groups: &[String],
        provider: &str,
        subject: &str,
    ) -> Result<UserRow, StoreError> {
        self.write(async |tx| {
            let user = insert_account(tx, account, groups).await?;
            insert_identity(tx, provider, subject, user.id, account.email.as_deref()).await?;
            Ok(user)
        })
        .await
    }

    async fn identities_of(&self, user_id: i64) -> Result<Vec<IdentityRow>, StoreError> {
        Ok(each!(self.pool(), p => sqlx::query_as::<_, IdentityRow>(
            "select * from identities where user_id = $1 order by provider"
        )
        .bind(user_id)
        .fetch_all(p)
        .await)?)
    }

    async fn unlink_identity(&self, user_id: i64, provider: &str) -> Result<bool, StoreError> {
        Ok(apply!(
            self,
            "delete from identities where user_id = $1 and provider = $2",
            user_id,
            provider
        )? > 0)
    }
}
