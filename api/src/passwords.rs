//! Password hashing with argon2id, off the async runtime.

use std::{
    cell::RefCell,
    sync::{
        LazyLock, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{Output, PasswordHash, Salt, SaltString},
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

/// Password checks run on a few long-lived threads of their own, each hashing into
/// one block buffer it keeps (argon2's 19 MiB). Hashing with a fresh buffer every
/// time was measured to keep another 19.5 MiB per check (120 concurrent bogus
/// logins: 34 → 680 MiB), whichever thread ran it; with the buffer reused, memory
/// stays at the threads' buffers while checks keep coming (`WANTED`). At most one check per thread runs; a check waits
/// up to `TURN_WAIT` for a thread, then is told to come back (503).
struct Checkers {
    turns: tokio::sync::Semaphore,
    work: Mutex<mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

static CHECKERS: OnceLock<Checkers> = OnceLock::new();
const TURN_WAIT: Duration = Duration::from_secs(1);
/// Checks asked for and not yet begun. A thread keeps its buffer while more are
/// coming and frees it after its last one: 19 MiB a thread is most of an idle
/// Berth's memory (the embedded store's `berth up` hashes its admin password at
/// its first start; `ops/bench/src/up.rs` measured 46 MiB idle with the buffer
/// kept, 30 MiB without). A lone check then allocates its buffer again, a few
/// milliseconds of page faults beside tens of hashing.
static WANTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This checking thread's argon2 memory, kept between checks.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// One per core: hashing is all computation, so more threads only add waiting and
/// memory.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts the checking threads, once, at start-up (the first call wins).
pub fn set_concurrency(n: usize) {
    let _ = CHECKERS.get_or_init(|| Checkers::start(n));
}

impl Checkers {
    fn start(n: usize) -> Self {
        let n = n.max(1);
        let (work, jobs) = mpsc::channel::<Job>();
        let jobs = std::sync::Arc::new(Mutex::new(jobs));
        for i in 0..n {
            let jobs = jobs.clone();
            let started = std::thread::Builder::new()
                .name(format!("berth-password-{i}"))
                .spawn(move || {
                    loop {
                        let job = jobs.lock().map(|jobs| jobs.recv());
                        match job {
                            Ok(Ok(job)) => job(),
                            _ => return,
                        }
                    }
                });
            if let Err(e) = started {
                tracing::error!(error = %e, "could not start a password-checking thread");
            }
        }
        Self {
            turns: tokio::sync::Semaphore::new(n),
            work: Mutex::new(work),
        }
    }
}

/// Runs `check` on a checking thread once one is free within `TURN_WAIT`.
async fn checked<T: Send + 'static>(
    check: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let checkers = CHECKERS.get_or_init(|| Checkers::start(default_concurrency()));
    WANTED.fetch_add(1, Ordering::SeqCst);
    let Ok(Ok(permit)) = tokio::time::timeout(TURN_WAIT, checkers.turns.acquire()).await else {
        WANTED.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::Overloaded {
            message: "too many password checks at once; try again in a second".into(),
            retry_after: 1,
        });
    };
    let (done, answer) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        WANTED.fetch_sub(1, Ordering::SeqCst);
        let _ = done.send(check());
        if WANTED.load(Ordering::SeqCst) == 0 {
            BLOCKS.with_borrow_mut(|blocks| *blocks = Vec::new());
        }
    });
    let sent = match checkers.work.lock() {
        Ok(work) => work
            .send(job)
            .map_err(|_| ApiError::Internal("the password checkers are gone".into())),
        Err(_) => Err(ApiError::Internal("the password checkers failed".into())),
    };
    if let Err(e) = sent {
        WANTED.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    let result = answer
        .await
        .map_err(|_| ApiError::Internal("a password check was lost".into()));
    drop(permit);
    result
}

/// argon2 of `password` with `salt`, as `PasswordHasher::hash_password` makes it,
/// but in this thread's kept block buffer.
fn compute<'a>(
    argon2: &Argon2<'_>,
    params: &Params,
    password: &[u8],
    salt: Salt<'a>,
) -> Result<Output, argon2::password_hash::Error> {
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf)?;
    let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    BLOCKS.with_borrow_mut(|blocks| {
        blocks.resize(params.block_count(), Block::default());
        Output::init_with(output_len, |out| {
            Ok(argon2.hash_password_into_with_memory(password, salt_bytes, out, &mut *blocks)?)
        })
    })
}

/// A new PHC string for `password` with the default parameters and a random salt.
fn hash_now(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)?;
    let argon2 = Argon2::default();
    let params = argon2.params().clone();
    let output = compute(&argon2, &params, password, salt.as_salt())?;
    Ok(PasswordHash {
        algorithm: Algorithm::default().ident(),
        version: Some(Version::default().into()),
        params: (&params).try_into()?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    }
    .to_string())
}

/// Whether `password` gives the hash in `stored`, with its own parameters; the
/// outputs are compared in constant time (`Output`'s `==`).
fn matches(password: &[u8], stored: &PasswordHash<'_>) -> bool {
    let check = || -> Result<bool, argon2::password_hash::Error> {
        let algorithm = Algorithm::try_from(stored.algorithm)?;
        let version = stored
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(stored)?;
        let (Some(salt), Some(expected)) = (stored.salt, stored.hash) else {
            return Ok(false);
        };
        let argon2 = Argon2::new(algorithm, version, params.clone());
        Ok(compute(&argon2, &params, password, salt)? == expected)
    };
    check().unwrap_or(false)
}

pub async fn hash(password: String) -> Result<String, ApiError> {
    checked(move || hash_now(password.as_bytes()).map_err(|e| e.to_string()))
        .await?
        .map_err(ApiError::Internal)
}

/// A hash of nothing, verified against when the account does not exist, so an
/// unknown name costs as much time as a wrong password.
static DECOY: LazyLock<String> = LazyLock::new(|| hash_now(b"decoy").expect("hashing"));

/// Whether `password` matches `stored`; `Overloaded` while too many checks run.
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    checked(move || {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| DECOY.clone());
        let Ok(parsed) = PasswordHash::new(&stored) else {
            return false;
        };
        let matches = matches(password.as_bytes(), &parsed);
        known && matches
    })
    .await
}

#[cfg(test)]
mod tests {
    use argon2::{
        Argon2,
        password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    };

    #[test]
    fn hashes_agree_with_the_argon2_crates_own_both_ways() {
        // Ours verified by the crate's verifier.
        let ours = super::hash_now(b"correct horse battery").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
        assert!(super::matches(b"correct horse battery", &parsed));
        assert!(!super::matches(b"correct horse battery!", &parsed));
        // The crate's hash (what accounts made before hold) verified by ours.
        let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"an older password", &salt)
            .unwrap()
            .to_string();
        let parsed = PasswordHash::new(&theirs).unwrap();
        assert!(super::matches(b"an older password", &parsed));
        assert!(!super::matches(b"An older password", &parsed));
        assert_eq!(
            PasswordHash::new(&ours).unwrap().params,
            parsed.params,
            "the same parameters"
        );
    }
}
