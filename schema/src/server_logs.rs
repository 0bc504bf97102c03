//! Where the local-process spawner keeps a server's output, and reading its end:
//! the worker writes these files and the API shows them, so both name them here.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use crate::{ServerName, UserName};

/// `{logs}/{user}/_default.log` for the default server, `{logs}/{user}/{server}.log`
/// for a named one (`_` is never part of a name, so they cannot meet). Kept
/// across stops and spawns, removed with the user.
pub fn path(logs: &Path, user: &UserName, server: &ServerName) -> PathBuf {
    let file = if server.is_default() {
        "_default.log".to_owned()
    } else {
        format!("{}.log", server.as_str())
    };
    logs.join(user.as_str()).join(file)
}

/// The directory of one user's logs.
pub fn user_dir(logs: &Path, user: &UserName) -> PathBuf {
    logs.join(user.as_str())
}

/// The last `max_bytes` of the file (from the start of a line when it is cut),
/// as text; invalid UTF-8 is replaced.
pub fn tail(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let start = length.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((length - start) as usize);
    file.read_to_end(&mut bytes)?;
    if start > 0
        && let Some(newline) = bytes.iter().position(|b| *b == b'\n')
    {
        bytes.drain(..=newline);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
