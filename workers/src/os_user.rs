//! The OS user local-process servers run as (`BERTH_PROCESS_USER`), so that a
//! user's code cannot read Berth's own files: resolved from `/etc/passwd` and
//! `/etc/group`, applied with the standard library's `CommandExt::uid/gid` (which
//! also drops root's supplementary groups).

use std::path::Path;

/// A user and group to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// `name`, `uid`, `name:group` or `uid:gid`; without a group, the user's own.
    pub fn resolve(spec: &str) -> Result<Self, String> {
        let (user, group) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let entry = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && (f[0] == user || f[2] == user));
        let uid = match (user.parse::<u32>(), &entry) {
            (Ok(uid), _) => uid,
            (Err(_), Some(f)) => f[2].parse().map_err(|_| format!("{spec}: a bad uid"))?,
            (Err(_), None) => return Err(format!("no user {user:?} in /etc/passwd")),
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                    groups
                        .lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.len() > 2 && f[0] == group)
                        .and_then(|f| f[2].parse().ok())
                        .ok_or_else(|| format!("no group {group:?} in /etc/group"))?
                }
            },
            None => entry
                .and_then(|f| f[3].parse().ok())
                .ok_or_else(|| format!("{user:?} has no group: give one as {user}:GROUP"))?,
        };
        if uid == 0 {
            return Err("BERTH_PROCESS_USER must not be root".into());
        }
        Ok(Self { uid, gid })
    }

    /// Makes `dir` (and everything in it) this user's.
    pub fn own(&self, dir: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid))?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                self.own(&path)?;
            } else {
                std::os::unix::fs::lchown(&path, Some(self.uid), Some(self.gid))?;
            }
        }
        Ok(())
    }
}

/// The effective uid of this process, from `/proc/self/status`.
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The name of this process's user, for messages.
pub fn own_name() -> String {
    let uid = effective_uid();
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && uid.is_some_and(|u| f[2] == u.to_string()))
        .map(|f| f[0].to_owned())
        .unwrap_or_else(|| format!("uid {}", uid.map_or("?".into(), |u| u.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_or_number_and_root_is_refused() {
        let nobody = OsUser::resolve("nobody").expect("Debian has nobody");
        assert_eq!(nobody.uid, 65534);
        assert_eq!(OsUser::resolve("65534:65534").unwrap(), nobody);
        assert!(OsUser::resolve("root").is_err());
        assert!(OsUser::resolve("0").is_err());
        assert!(OsUser::resolve("no-such-user-here").is_err());
    }
}
