//! Admission places on SQLite, for the stores not yet written once.

use super::Tx;
use crate::store::StoreError;

/// Gives a server's admission place back.
pub(crate) async fn release_admission(tx: &mut Tx, server_id: i64) -> Result<(), StoreError> {
    sqlx::query("update admission_tokens set server_id = null where server_id = $1")
        .bind(server_id)
        .execute(&mut *tx.tx)
        .await?;
    Ok(())
}

/// Creates the admission places below `limit` that do not exist yet.
pub(crate) async fn provision_admission(tx: &mut Tx, limit: i32) -> Result<(), StoreError> {
    sqlx::query(
        "with recursive n(slot) as (select 0 union all select slot + 1 from n where slot + 1 < $1) \
         insert or ignore into admission_tokens (slot) select slot from n where $1 > 0",
    )
    .bind(limit)
    .execute(&mut *tx.tx)
    .await?;
    Ok(())
}
