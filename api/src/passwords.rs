//! Password hashing with argon2id, off the async runtime.

use std::{
    sync::{LazyLock, OnceLock},
    time::Duration,
};

use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
};

use crate::error::ApiError;

/// Refuses passwords that are too short to be worth hashing.
pub fn check_strength(password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < 10 {
        return Err("a password needs at least 10 characters".into());
    }
    if chars > 256 {
        return Err("a password may have at most 256 characters".into());
    }
    if password
        .chars()
        .all(|c| c == password.chars().next().unwrap_or(' '))
    {
        return Err("a password of one repeated character is too weak".into());
    }
    Ok(())
}

/// At most this many password hashes run at once: each takes argon2's 19 MiB, and
/// unbounded, 120 concurrent bogus logins took a process to 3 GiB. A check waits
/// up to `TURN_WAIT` for its turn, then is told to come back (503).
static TURNS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
const TURN_WAIT: Duration = Duration::from_secs(1);

/// Two per core.
pub fn default_concurrency() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets the bound once, at start-up (the first call wins).
pub fn set_concurrency(n: usize) {
    let _ = TURNS.set(tokio::sync::Semaphore::new(n.max(1)));
}

async fn turn() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    let turns = TURNS.get_or_init(|| tokio::sync::Semaphore::new(default_concurrency()));
    match tokio::time::timeout(TURN_WAIT, turns.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::Overloaded {
            message: "too many password checks at once; try again in a second".into(),
            retry_after: 1,
        }),
    }
}

pub async fn hash(password: String) -> Result<String, ApiError> {
    let permit = turn().await?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::Internal)
}

/// A hash of nothing, verified against when the account does not exist, so an
/// unknown name costs as much time as a wrong password.
static DECOY: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::encode_b64(b"berth-decoy-salt").expect("static salt");
    Argon2::default()
        .hash_password(b"decoy", &salt)
        .expect("hashing")
        .to_string()
});

/// Whether `password` matches `stored`; `Overloaded` while too many checks run.
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    let permit = turn().await?;
    Ok(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| DECOY.clone());
        let Ok(parsed) = PasswordHash::new(&stored) else {
            return false;
        };
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        known && matches
    })
    .await
    .unwrap_or(false))
}
