//! Validated names. Every user and server name is checked once, at the edge, so
//! nothing that is not DNS-safe can reach SQL, Docker or a container name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused; the text is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(pub String);

const USER_MAX: usize = 32;
const SERVER_MAX: usize = 63;

/// Checks a DNS label: lowercase letters, digits and single hyphens, starting and
/// ending with a letter or digit. `--` is refused because it separates user and
/// server in container names, which keeps that mapping one-to-one.
fn check_label(kind: &str, value: &str, max: usize) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Err(InvalidName(format!("{kind} name must not be empty")));
    }
    if value.len() > max {
        return Err(InvalidName(format!(
            "{kind} name must be at most {max} characters, got {}",
            value.len()
        )));
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !value.starts_with('-') && !value.ends_with('-');
    if !ok_chars || !ok_ends || value.contains("--") {
        return Err(InvalidName(format!(
            "{kind} name {value:?} is not DNS-safe: use lowercase letters, digits and single \
             hyphens, starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// A user's name, DNS-safe and at most 32 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserName(String);

impl UserName {
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        check_label("user", value, USER_MAX)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A server's name; the empty name is the user's default server.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ServerName(String);

impl ServerName {
    pub fn default_server() -> Self {
        Self(String::new())
    }

    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        check_label("server", value, SERVER_MAX)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `""` is the default server; anything else must be a valid name.
    pub fn parse_or_default(value: &str) -> Result<Self, InvalidName> {
        if value.is_empty() {
            Ok(Self::default_server())
        } else {
            Self::parse(value)
        }
    }

    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }
}

/// `berth-{user}` for the default server, `berth-{user}--{server}` for a named one:
/// how messages and the process spawner's run directories name a server.
pub fn container_name(user: &UserName, server: &ServerName) -> String {
    if server.is_default() {
        format!("berth-{}", user.0)
    } else {
        format!("berth-{}--{}", user.0, server.0)
    }
}

/// The `BERTH_INSTANCE` whose engine names carry no instance (as before instances
/// were named).
pub const DEFAULT_INSTANCE: &str = "berth";

/// Checks a `BERTH_INSTANCE`: a lowercase DNS label of at most 32 characters, so
/// that it can stand in Docker names, labels and directory names.
pub fn check_instance(value: &str) -> Result<(), InvalidName> {
    check_label("instance", value, USER_MAX)
}

/// What one deployment (`BERTH_INSTANCE`) names its containers and volumes on a
/// Docker engine that others may share. The default instance keeps the plain
/// names (`berth-ann`, `berth-user-ann`); another adds itself after an
/// underscore (`berth_lab_ann--nb`, `berth_lab_user-ann`), which neither a user
/// nor an instance name can contain, so no two deployments' names meet.
#[derive(Debug, Clone, Copy)]
pub struct EngineNames<'a> {
    instance: &'a str,
}

impl<'a> EngineNames<'a> {
    pub fn new(instance: &'a str) -> Self {
        Self { instance }
    }

    pub fn container(&self, user: &UserName, server: &ServerName) -> String {
        let plain = container_name(user, server);
        match self.instance {
            DEFAULT_INSTANCE => plain,
            instance => format!("berth_{instance}_{}", &plain["berth-".len()..]),
        }
    }

    /// The user's named volume, kept across stops and removed with the user.
    pub fn volume(&self, user: &UserName) -> String {
        match self.instance {
            DEFAULT_INSTANCE => format!("berth-user-{}", user.0),
            instance => format!("berth_{instance}_user-{}", user.0),
        }
    }
}

/// Where the proxy serves the server, with the slash that ends it: `/user/{user}/`
/// for the default server, `/user/{user}/{server}/` for a named one. The server
/// sees requests under this prefix unchanged (its base URL).
pub fn server_path(user: &UserName, server: &ServerName) -> String {
    if server.is_default() {
        format!("/user/{}/", user.0)
    } else {
        format!("/user/{}/{}/", user.0, server.0)
    }
}

impl<'de> Deserialize<'de> for UserName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        UserName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ServerName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.is_empty() {
            return Ok(ServerName::default_server());
        }
        ServerName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Debug as the quoted name (`"bob"`): messages use it, and must not show
/// `UserName("bob")`.
impl fmt::Debug for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "alice", "user-42", "0x", &"a".repeat(32)] {
            assert!(UserName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_is_not_dns_safe() {
        let long = "a".repeat(33);
        for bad in [
            "", "Alice", "a_b", "a.b", "-a", "a-", "a--b", "ä", "a b", "../x", &long,
        ] {
            assert!(UserName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn container_names_separate_user_and_server() {
        let user = UserName::parse("ann").unwrap();
        assert_eq!(
            container_name(&user, &ServerName::default_server()),
            "berth-ann"
        );
        let lab = ServerName::parse("lab-1").unwrap();
        assert_eq!(container_name(&user, &lab), "berth-ann--lab-1");
        let plain = EngineNames::new(DEFAULT_INSTANCE);
        assert_eq!(plain.container(&user, &lab), "berth-ann--lab-1");
        assert_eq!(plain.volume(&user), "berth-user-ann");
        let other = EngineNames::new("lab");
        let default = ServerName::default_server();
        assert_eq!(other.container(&user, &default), "berth_lab_ann");
        assert_eq!(other.container(&user, &lab), "berth_lab_ann--lab-1");
        assert_eq!(other.volume(&user), "berth_lab_user-ann");
        // The default instance's user `lab` with server `ann` is another name.
        let lab_user = UserName::parse("lab").unwrap();
        let ann_server = ServerName::parse("ann").unwrap();
        assert_ne!(
            plain.container(&lab_user, &ann_server),
            other.container(&user, &default)
        );
        assert!(check_instance("Lab_1").is_err() && check_instance("lab-1").is_ok());
    }
}
