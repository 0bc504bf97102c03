//! Server profiles: the environments a user may pick when spawning ("Python,
//! 2 GB", "GPU, 16 GB"), who may pick each, and how many of each may run at once.
//!
//! A profile is kept as its JSON definition; a spawn request copies the definition
//! onto the server (`servers.profile_spec`), so a profile changed or removed while
//! servers run affects only spawns requested afterwards.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    accounts::Role,
    db::{Db, each, execute, now},
    names::UserName,
    rows::UserRow,
    store::StoreError,
};

/// The profile a spawn gets when it names none, if an operator defined it.
pub const DEFAULT_PROFILE: &str = "default";

/// Environment variables Berth sets for every server; a profile may not change them.
const RESERVED_ENV: [&str; 3] = ["BERTH_", "JUPYTER_TOKEN", "JUPYTERHUB_SERVICE_PREFIX"];

/// One environment a user may pick. Every field but `name` may be left out: the
/// worker's configuration (`BERTH_IMAGE`, `BERTH_MEM_LIMIT`, …) fills in the rest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// A DNS label: lowercase letters, digits and single hyphens, at most 63.
    #[schema(pattern = "^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 63)]
    pub name: String,
    /// What users see in lists ("Python, 2 GB"); the name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The container image (Docker spawner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The command, with `{port}`, `{user}`, `{server}` and `{base_url}` filled in:
    /// what the process spawner runs, and the container's command on Docker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Memory, as `2G`, `512M` or bytes; at least 6M (Docker's minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9]+([kKmMgGtT][bB]?)?$")]
    pub mem_limit: Option<String>,
    /// CPUs, 0.01 to 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.01, maximum = 1024)]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub pids_limit: Option<i64>,
    /// Extra environment, after `BERTH_SERVER_ENV`; Berth's own variables are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Extra mounts beside the user's home volume (Docker spawner).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ProfileMount>,
    /// GPUs handed to the container (a Docker device request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Gpus>,
    /// Seconds a server may take to answer; `BERTH_START_TIMEOUT` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub start_timeout: Option<u64>,
    /// Seconds without activity before the culler stops the server; 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub idle_timeout: Option<i64>,
    /// Seconds a server may run at most; 0: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub max_age: Option<i64>,
    /// Roles that may use it; with `groups` also empty, everyone may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// Groups whose members may use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<GroupName>)]
    pub groups: Vec<String>,
    /// At most this many servers of this profile active at once, on top of the
    /// platform's limits; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_active: Option<i32>,
}

/// A group's name: 1 to 64 letters, digits, `-`, `_` or `.`.
#[derive(ToSchema)]
#[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
#[allow(dead_code)]
pub struct GroupName(String);

/// A mount a profile adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileMount {
    /// `bind` (a path on the engine's host) or `volume` (a named volume).
    #[serde(rename = "type", default = "bind")]
    pub kind: String,
    /// The host path or the volume's name.
    pub source: String,
    /// An absolute path in the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

fn bind() -> String {
    "bind".into()
}

/// GPUs, as Docker's device requests take them: a number of devices or their ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpus {
    /// How many; -1 for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_ids: Vec<String>,
    /// The engine's device driver; `nvidia` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

impl Profile {
    /// Checks every field; the message says which one is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        crate::names::ServerName::parse(&self.name)
            .map_err(|e| e.to_string().replacen("server name", "profile name", 1))?;
        let text = |field: &str, value: &Option<String>, most: usize| match value {
            Some(v) if v.trim().is_empty() || v.chars().count() > most => Err(format!(
                "{field} must be 1 to {most} characters, not only spaces"
            )),
            _ => Ok(()),
        };
        text("display_name", &self.display_name, 100)?;
        text("description", &self.description, 2000)?;
        text("image", &self.image, 255)?;
        text("command", &self.command, 4000)?;
        if let Some(mem) = &self.mem_limit {
            parse_bytes(mem).map_err(|e| format!("mem_limit: {e}"))?;
        }
        if let Some(cpus) = self.cpu_limit {
            check_cpus(cpus).map_err(|e| format!("cpu_limit: {e}"))?;
        }
        if let Some(pids) = self.pids_limit
            && pids < 1
        {
            return Err("pids_limit must be at least 1".into());
        }
        for key in self.env.keys() {
            let valid = key.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if key.is_empty() || !valid {
                return Err(format!(
                    "env: {key:?} is not a variable name (letters, digits and _, not first a digit)"
                ));
            }
            if RESERVED_ENV.iter().any(|r| key.starts_with(r)) {
                return Err(format!(
                    "env: {key:?} is set by Berth and cannot be changed"
                ));
            }
        }
        for mount in &self.mounts {
            if !mount.target.starts_with('/') || mount.target.contains("..") {
                return Err(format!(
                    "mounts: target {:?} must be an absolute path without ..",
                    mount.target
                ));
            }
            match mount.kind.as_str() {
                "bind" if !mount.source.starts_with('/') || mount.source.contains("..") => {
                    return Err(format!(
                        "mounts: a bind's source {:?} must be an absolute path without ..",
                        mount.source
                    ));
                }
                "volume" if mount.source.is_empty() || mount.source.contains('/') => {
                    return Err(format!(
                        "mounts: a volume's source {:?} must be a volume name",
                        mount.source
                    ));
                }
                "bind" | "volume" => {}
                other => {
                    return Err(format!(
                        "mounts: type {other:?} is neither \"bind\" nor \"volume\""
                    ));
                }
            }
        }
        if let Some(gpus) = &self.gpus {
            match (gpus.count, gpus.device_ids.is_empty()) {
                (Some(_), false) => {
                    return Err("gpus: give a count or device_ids, not both".into());
                }
                (None, true) => return Err("gpus: give a count or device_ids".into()),
                (Some(n), _) if n == 0 || n < -1 => {
                    return Err("gpus: count must be at least 1, or -1 for all".into());
                }
                _ => {}
            }
        }
        let seconds = |field: &str, value: Option<i64>, zero: bool| match value {
            Some(v) if v < 0 || (v == 0 && !zero) => Err(format!(
                "{field} must be a number of seconds{}",
                if zero { ", 0 or more" } else { ", at least 1" }
            )),
            _ => Ok(()),
        };
        seconds(
            "start_timeout",
            self.start_timeout.map(|s| i64::try_from(s).unwrap_or(-1)),
            false,
        )?;
        seconds("idle_timeout", self.idle_timeout, true)?;
        seconds("max_age", self.max_age, true)?;
        for group in &self.groups {
            check_group(group)?;
        }
        if let Some(most) = self.max_active
            && most < 1
        {
            return Err("max_active must be at least 1".into());
        }
        Ok(())
    }

    /// Whether `user` may spawn with it: anyone when it names no role and no group,
    /// else a user of a listed role or in a listed group.
    pub fn allows(&self, user: &UserRow) -> bool {
        if self.roles.is_empty() && self.groups.is_empty() {
            return true;
        }
        self.roles.contains(&user.role) || user.groups().iter().any(|g| self.groups.contains(g))
    }

    /// Bytes of memory, if the profile sets them (checked when it was saved).
    pub fn mem_bytes(&self) -> Option<i64> {
        self.mem_limit.as_deref().and_then(|m| parse_bytes(m).ok())
    }

    /// The definition as stored on a server and in the profiles table.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a profile serialises")
    }

    /// A stored definition; a malformed one is a store error.
    pub fn from_json(text: &str) -> Result<Self, StoreError> {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("a stored profile is malformed: {e}")))
    }
}

/// A group name: 1 to 64 characters of letters, digits, `-`, `_` and `.`.
pub fn check_group(group: &str) -> Result<(), String> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "group {group:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// `2G`, `512M`, `1024k` or plain bytes; at least Docker's minimum of 6M.
pub fn parse_bytes(value: &str) -> Result<i64, String> {
    let value = value.trim();
    let (digits, unit) = match value.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => value.split_at(i),
        None => (value, ""),
    };
    let number: i64 = digits
        .parse()
        .map_err(|_| format!("{value:?} is not a size such as 2G or 512M"))?;
    let shift = match unit.to_ascii_lowercase().trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{value:?} has an unknown unit; use K, M, G or T")),
    };
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{value:?} is too large"))?;
    if bytes < 6 << 20 {
        return Err(format!("{value:?} is below Docker's minimum of 6M"));
    }
    Ok(bytes)
}

/// A number of CPUs between 0.01 and 1024.
pub fn check_cpus(cpus: f64) -> Result<f64, String> {
    if !(0.01..=1024.0).contains(&cpus) {
        return Err(format!("{cpus} must be between 0.01 and 1024 cores"));
    }
    Ok(cpus)
}

/// A stored profile and its bookkeeping.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub profile: Profile,
    /// `api` or `file` (`BERTH_PROFILES`).
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: Option<String>,
}

type RawProfile = (String, String, DateTime<Utc>, DateTime<Utc>, Option<String>);

fn row(
    (definition, source, created_at, updated_at, updated_by): RawProfile,
) -> Result<ProfileRow, StoreError> {
    Ok(ProfileRow {
        profile: Profile::from_json(&definition)?,
        source,
        created_at,
        updated_at,
        updated_by,
    })
}

const PROFILE_COLUMNS: &str =
    "select definition, source, created_at, updated_at, updated_by from profiles";

/// What loading the profiles file changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileSync {
    /// Profiles of the file that replaced one made through the API.
    pub replaced: Vec<String>,
    /// Profiles an earlier file defined that this one no longer does: removed.
    pub removed: Vec<String>,
}

#[async_trait]
pub trait Profiles {
    /// Every profile, by name.
    async fn list_profiles(&self) -> Result<Vec<ProfileRow>, StoreError>;
    async fn get_profile(&self, name: &str) -> Result<Option<ProfileRow>, StoreError>;
    /// Conflict when the name is taken.
    async fn create_profile(&self, profile: &Profile, by: &str) -> Result<ProfileRow, StoreError>;
    /// Replaces a profile's definition; NotFound when there is none of that name.
    async fn replace_profile(&self, profile: &Profile, by: &str) -> Result<ProfileRow, StoreError>;
    /// Whether there was one. Servers of it keep running with what they were given.
    async fn delete_profile(&self, name: &str) -> Result<bool, StoreError>;
    /// Makes the store's file profiles those of `profiles` (the file wins: a
    /// profile of the same name made through the API is replaced).
    async fn sync_file_profiles(&self, profiles: &[Profile]) -> Result<FileSync, StoreError>;
    /// How many servers of each profile hold one of its places now.
    async fn profile_usage(&self) -> Result<BTreeMap<String, i64>, StoreError>;
    /// Sets an account's groups.
    async fn set_groups(&self, user: &UserName, groups: &[String]) -> Result<UserRow, StoreError>;
}

#[async_trait]
impl Profiles for Db {
    async fn list_profiles(&self) -> Result<Vec<ProfileRow>, StoreError> {
        let raw: Vec<RawProfile> = each!(self.pool(), p => sqlx::query_as(
            sqlx::AssertSqlSafe(format!("{PROFILE_COLUMNS} order by name"))
        )
        .fetch_all(p)
        .await)?;
        raw.into_iter().map(row).collect()
    }

    async fn get_profile(&self, name: &str) -> Result<Option<ProfileRow>, StoreError> {
        let raw: Option<RawProfile> = each!(self.pool(), p => sqlx::query_as(
            sqlx::AssertSqlSafe(format!("{PROFILE_COLUMNS} where name = $1"))
        )
        .bind(name)
        .fetch_optional(p)
        .await)?;
        raw.map(row).transpose()
    }

    async fn create_profile(&self, profile: &Profile, by: &str) -> Result<ProfileRow, StoreError> {
        let at = now();
        let inserted = self
            .write(async |tx| {
                Ok(execute!(
                    tx.conn(),
                    "insert into profiles (name, definition, max_active, source, created_at, \
                     updated_at, updated_by) values ($1, $2, $3, 'api', $4, $4, $5) \
                     on conflict (name) do nothing",
                    &profile.name,
                    profile.to_json(),
                    profile.max_active,
                    at,
                    by
                )?)
            })
            .await?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "a profile named {:?} already exists",
                profile.name
            )));
        }
        self.get_profile(&profile.name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no profile named {:?}", profile.name)))
    }

    async fn replace_profile(&self, profile: &Profile, by: &str) -> Result<ProfileRow, StoreError> {
        let changed = self
            .write(async |tx| {
                Ok(execute!(
                    tx.conn(),
                    "update profiles set definition = $2, max_active = $3, updated_at = $4, \
                     updated_by = $5 where name = $1",
                    &profile.name,
                    profile.to_json(),
                    profile.max_active,
                    now(),
                    by
                )?)
            })
            .await?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!(
                "no profile named {:?}",
                profile.name
            )));
        }
        self.get_profile(&profile.name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no profile named {:?}", profile.name)))
    }

    async fn delete_profile(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self
            .write(async |tx| {
                Ok(execute!(
                    tx.conn(),
                    "delete from profiles where name = $1",
                    name
                )?)
            })
            .await?;
        Ok(deleted > 0)
    }

    async fn sync_file_profiles(&self, profiles: &[Profile]) -> Result<FileSync, StoreError> {
        let at = now();
        self.write(async |tx| {
            let existing: Vec<(String, String)> = each!(tx.conn(), c => sqlx::query_as(
                "select name, source from profiles"
            )
            .fetch_all(c)
            .await)?;
            let wanted: HashSet<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
            let mut sync = FileSync::default();
            for (name, source) in &existing {
                if source == "file" && !wanted.contains(name.as_str()) {
                    execute!(tx.conn(), "delete from profiles where name = $1", name)?;
                    sync.removed.push(name.clone());
                } else if source == "api" && wanted.contains(name.as_str()) {
                    sync.replaced.push(name.clone());
                }
            }
            for profile in profiles {
                execute!(
                    tx.conn(),
                    "insert into profiles (name, definition, max_active, source, created_at, \
                     updated_at, updated_by) values ($1, $2, $3, 'file', $4, $4, 'BERTH_PROFILES') \
                     on conflict (name) do update set definition = $2, max_active = $3, \
                     source = 'file', updated_at = $4, updated_by = 'BERTH_PROFILES'",
                    &profile.name,
                    profile.to_json(),
                    profile.max_active,
                    at
                )?;
            }
            Ok(sync)
        })
        .await
    }

    async fn profile_usage(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = each!(self.pool(), p => sqlx::query_as(
            "select profile, count(*) from servers \
             where profile is not null and state in ('pending_spawn', 'running', 'pending_stop') \
             group by profile"
        )
        .fetch_all(p)
        .await)?;
        Ok(rows.into_iter().collect())
    }

    async fn set_groups(&self, user: &UserName, groups: &[String]) -> Result<UserRow, StoreError> {
        let mut groups = groups.to_vec();
        groups.sort();
        groups.dedup();
        let list = crate::db::json_list(&groups);
        let row = self
            .write(async |tx| {
                Ok(each!(tx.conn(), c => sqlx::query_as::<_, UserRow>(
                    "update users set groups = $2 where name = $1 returning *"
                )
                .bind(user.as_str())
                .bind(&list)
                .fetch_optional(c)
                .await)?)
            })
            .await?;
        row.ok_or_else(|| StoreError::no_user(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_powers_of_1024() {
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("64MB"), Ok(64 << 20));
        assert!(parse_bytes("1k").is_err());
        assert!(parse_bytes("2X").is_err());
        assert!(parse_bytes("G").is_err());
    }

    fn profile(json: serde_json::Value) -> Result<Profile, String> {
        let p: Profile = serde_json::from_value(json).map_err(|e| e.to_string())?;
        p.validate().map(|()| p)
    }

    #[test]
    fn the_issue_s_example_is_a_valid_profile() {
        let p = profile(serde_json::json!({
            "name": "small", "display_name": "Python, 2 GB", "description": "…",
            "image": "berth-test-server", "mem_limit": "2G", "cpu_limit": 1.0,
            "pids_limit": 512, "env": {"KEY": "value"}, "roles": ["user"], "groups": [],
            "max_active": 10, "gpus": {"count": 1}
        }))
        .unwrap();
        assert_eq!(p.mem_bytes(), Some(2 << 30));
    }

    /// The README's example file stays a valid profiles file.
    #[test]
    fn the_example_profiles_file_is_valid() {
        let text = include_str!("../../ops/profiles.example.json");
        let profiles: Vec<Profile> = serde_json::from_str(text).expect("a list of profiles");
        assert_eq!(profiles.len(), 3);
        for p in &profiles {
            p.validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
    }

    #[test]
    fn bad_fields_are_named_in_the_refusal() {
        for (json, says) in [
            (serde_json::json!({"name": "Bad Name"}), "profile name"),
            (
                serde_json::json!({"name": "a", "mem_limit": "lots"}),
                "mem_limit",
            ),
            (
                serde_json::json!({"name": "a", "cpu_limit": 0.0}),
                "cpu_limit",
            ),
            (
                serde_json::json!({"name": "a", "env": {"BERTH_API_TOKEN": "x"}}),
                "set by Berth",
            ),
            (
                serde_json::json!({"name": "a", "env": {"1X": "x"}}),
                "not a variable name",
            ),
            (
                serde_json::json!({"name": "a", "mounts": [{"source": "rel", "target": "/d"}]}),
                "absolute",
            ),
            (serde_json::json!({"name": "a", "gpus": {}}), "gpus"),
            (
                serde_json::json!({"name": "a", "gpus": {"count": 1, "device_ids": ["0"]}}),
                "not both",
            ),
            (
                serde_json::json!({"name": "a", "max_active": 0}),
                "max_active",
            ),
            (
                serde_json::json!({"name": "a", "roles": ["root"]}),
                "unknown variant",
            ),
            (serde_json::json!({"name": "a", "groups": ["a b"]}), "group"),
            (
                serde_json::json!({"name": "a", "idle_timeout": -1}),
                "idle_timeout",
            ),
            (
                serde_json::json!({"name": "a", "colour": "red"}),
                "unknown field",
            ),
        ] {
            let err = profile(json.clone()).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
