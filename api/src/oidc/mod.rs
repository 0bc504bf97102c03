//! Sign-in with OpenID Connect providers: the configured providers, what Berth
//! learns from each (discovery, its key set), and the routes that begin and end a
//! sign-in (`routes`). An ID token is believed only after `token::verify`.

mod routes;
pub mod token;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use tokio::sync::Mutex;

pub use routes::{begin_link, router, unlink_identity};
pub use token::{Expected, IdClaims, IdTokenError, verify};

/// One provider as the operator configures it (`BERTH_OIDC_PROVIDERS`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// In URLs and the audit log: `[a-z0-9-]`, at most 32 characters.
    pub name: String,
    /// What the login button says ("Sign in with {display_name}").
    #[serde(default)]
    pub display_name: Option<String>,
    /// The issuer; its discovery document is `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// Asked for; `openid` is always among them.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Whether an identity no account is linked to creates one.
    #[serde(default)]
    pub allow_signup: bool,
    /// The email domains whose users may sign up (empty: any); the provider must
    /// say the address is verified.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// The claim holding the user's groups: at every sign-in they become the
    /// account's groups (for profiles).
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Members of any of these groups are admins, others are users (at every
    /// sign-in). Empty: the provider decides no role.
    #[serde(default)]
    pub admin_groups: Vec<String>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}

impl ProviderConfig {
    pub fn display(&self) -> &str {
        self.display_name.as_deref().unwrap_or(&self.name)
    }

    fn validate(&mut self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(format!(
                "provider name {:?}: use a-z, 0-9 and -, at most 32 characters",
                self.name
            ));
        }
        self.issuer = self.issuer.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&self.issuer)
            .map_err(|e| format!("provider {}: issuer {:?}: {e}", self.name, self.issuer))?;
        let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(format!(
                "provider {}: the issuer must be an https:// URL (http:// only on this machine)",
                self.name
            ));
        }
        if self.client_id.is_empty() || self.client_secret.is_empty() {
            return Err(format!(
                "provider {}: client_id and client_secret are required",
                self.name
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            self.scopes.insert(0, "openid".into());
        }
        if self
            .scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(format!("provider {}: a scope is one word", self.name));
        }
        for domain in &mut self.allowed_domains {
            *domain = domain.trim_start_matches('@').to_lowercase();
        }
        Ok(())
    }
}

/// What a provider's discovery document says Berth needs.
#[derive(Debug, Clone, Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// What was learnt from a provider, and when.
struct Learnt {
    metadata: Metadata,
    keys: JwkSet,
    at: Instant,
}

/// A configured provider and what Berth has learnt from it.
pub struct Provider {
    pub config: ProviderConfig,
    learnt: Mutex<Option<Learnt>>,
}

/// How long discovery and keys are believed before they are fetched again.
const KEEP: Duration = Duration::from_secs(3600);
/// The least time between two fetches of a key set for an unknown key id.
const REFETCH_AFTER: Duration = Duration::from_secs(10);

/// The configured providers, by name, with one HTTP client for them all.
#[derive(Default)]
pub struct Providers {
    by_name: BTreeMap<String, Provider>,
    http: Option<reqwest::Client>,
}

/// Why a provider could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Invalid(String),
}

impl Providers {
    /// Reads `BERTH_OIDC_PROVIDERS`: a JSON list, inline or in the file it names.
    pub fn from_setting(setting: Option<&str>) -> Result<Self, String> {
        let Some(setting) = setting.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(Self::default());
        };
        let text = if setting.starts_with('[') {
            setting.to_owned()
        } else {
            std::fs::read_to_string(setting)
                .map_err(|e| format!("BERTH_OIDC_PROVIDERS: reading {setting}: {e}"))?
        };
        let list: Vec<ProviderConfig> = serde_json::from_str(&text)
            .map_err(|e| format!("BERTH_OIDC_PROVIDERS: not a list of providers: {e}"))?;
        let mut by_name = BTreeMap::new();
        for mut config in list {
            config
                .validate()
                .map_err(|e| format!("BERTH_OIDC_PROVIDERS: {e}"))?;
            let name = config.name.clone();
            let provider = Provider {
                config,
                learnt: Mutex::new(None),
            };
            if by_name.insert(name.clone(), provider).is_some() {
                return Err(format!(
                    "BERTH_OIDC_PROVIDERS: provider {name} is listed twice"
                ));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("berth")
            .build()
            .map_err(|e| format!("BERTH_OIDC_PROVIDERS: {e}"))?;
        Ok(Self {
            by_name,
            http: Some(http),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Provider> {
        self.by_name.values()
    }

    fn http(&self) -> &reqwest::Client {
        self.http
            .as_ref()
            .expect("a client exists when providers do")
    }

    async fn fetch_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        url: &str,
    ) -> Result<T, ProviderError> {
        let response = self
            .http()
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| ProviderError::Unreachable(format!("fetching {what} from {url}: {e}")))?;
        if !response.status().is_success() {
            return Err(ProviderError::Unreachable(format!(
                "fetching {what} from {url}: {}",
                response.status()
            )));
        }
        response
            .json()
            .await
            .map_err(|e| ProviderError::Invalid(format!("{what} at {url}: {e}")))
    }

    /// The provider's discovery and keys, fetched when not known or too old;
    /// `fresh_keys` fetches the key set again (a token named a key not in it).
    async fn learn(
        &self,
        provider: &Provider,
        fresh_keys: bool,
    ) -> Result<(Metadata, JwkSet), ProviderError> {
        let mut learnt = provider.learnt.lock().await;
        if let Some(known) = learnt.as_mut() {
            let young = known.at.elapsed() < KEEP;
            if young && !fresh_keys {
                return Ok((known.metadata.clone(), known.keys.clone()));
            }
            if young && known.at.elapsed() < REFETCH_AFTER {
                return Ok((known.metadata.clone(), known.keys.clone()));
            }
        }
        let issuer = &provider.config.issuer;
        let url = format!("{issuer}/.well-known/openid-configuration");
        let metadata: Metadata = self.fetch_json("the discovery document", &url).await?;
        // OpenID Connect Discovery 1.0, 4.3: the document's issuer is the one asked.
        if metadata.issuer.trim_end_matches('/') != issuer {
            return Err(ProviderError::Invalid(format!(
                "the discovery document at {url} names issuer {:?}, not the configured {issuer:?}",
                metadata.issuer
            )));
        }
        let keys: JwkSet = self.fetch_json("the key set", &metadata.jwks_uri).await?;
        *learnt = Some(Learnt {
            metadata: metadata.clone(),
            keys: keys.clone(),
            at: Instant::now(),
        });
        Ok((metadata, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(providers: serde_json::Value) -> Result<Providers, String> {
        Providers::from_setting(Some(&providers.to_string()))
    }

    fn provider(name: &str, issuer: &str) -> serde_json::Value {
        serde_json::json!({ "name": name, "issuer": issuer, "client_id": "berth",
                            "client_secret": "s3cret-s3cret" })
    }

    #[test]
    fn providers_are_checked_when_berth_starts() {
        let ok = setting(serde_json::json!([
            provider("corp", "https://id.example.org/realms/lab/"),
            provider("local", "http://127.0.0.1:8123/o"),
        ]))
        .unwrap();
        let corp = ok.get("corp").unwrap();
        assert_eq!(corp.config.issuer, "https://id.example.org/realms/lab");
        assert_eq!(corp.config.scopes, ["openid", "email", "profile"]);
        assert_eq!(corp.config.display(), "corp");
        assert!(
            Providers::from_setting(None)
                .unwrap()
                .all()
                .next()
                .is_none()
        );

        for (providers, why) in [
            (
                serde_json::json!([provider("corp", "http://id.example.org")]),
                "https://",
            ),
            (
                serde_json::json!([provider("Corp", "https://id.example.org")]),
                "a-z, 0-9",
            ),
            (
                serde_json::json!([
                    provider("corp", "https://a.example.org"),
                    provider("corp", "https://b.example.org")
                ]),
                "listed twice",
            ),
            (
                serde_json::json!([{ "name": "corp", "issuer": "https://id.example.org",
                                     "client_id": "berth", "client_secret": "" }]),
                "client_secret",
            ),
            (
                serde_json::json!([{ "name": "corp", "issuer": "https://id.example.org",
                                     "client_id": "berth", "client_secret": "x",
                                     "clientsecret": "typo" }]),
                "unknown field",
            ),
        ] {
            let e = setting(providers).err().expect("refused");
            assert!(e.contains(why), "{e}");
        }
        let e = Providers::from_setting(Some("/nonexistent/providers.json"))
            .err()
            .expect("refused");
        assert!(e.contains("/nonexistent/providers.json"), "{e}");
    }
}
