//! API settings: every one a flag and an environment variable.

use std::net::SocketAddr;

use clap::ArgAction;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Environment {
    /// Ephemeral signing keys are generated when none is configured, with a warning.
    Development,
    /// Refuses to start with a missing signing key or a weak secret.
    Production,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    /// Address the API listens on.
    #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// `production` refuses weak or missing secrets.
    #[arg(
        long = "env",
        env = "BERTH_ENV",
        value_enum,
        default_value = "development"
    )]
    pub environment: Environment,

    /// Break-glass admin API token (`Authorization: Bearer …`); none by default.
    #[arg(long, env = "BERTH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Ed25519 private key (PKCS#8 PEM) that signs access tokens; all API processes
    /// must share it. Development mode generates one per process when unset.
    #[arg(long, env = "BERTH_JWT_PRIVATE_KEY", hide_env_values = true)]
    pub jwt_private_key: Option<String>,

    /// Lifetime of an access token, in seconds.
    #[arg(long, env = "BERTH_TOKEN_TTL", default_value_t = 24 * 3600)]
    pub token_ttl: u64,

    /// Whether anyone may register; when off (the default), only admins and portals
    /// create accounts. Open registration let 17 anonymous accounts fill the platform.
    #[arg(long, env = "BERTH_ALLOW_REGISTRATION", default_value_t = false, action = ArgAction::Set)]
    pub allow_registration: bool,

    /// Registrations one client address may make per throttling window, when open.
    #[arg(long, env = "BERTH_REGISTRATIONS_PER_ADDRESS", default_value_t = 5)]
    pub registrations_per_address: i32,

    /// Name of the admin account created (or promoted) at start-up.
    #[arg(long, env = "BERTH_ADMIN_USER")]
    pub admin_user: Option<String>,

    /// Password of that account when it is created; never reset afterwards.
    #[arg(long, env = "BERTH_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// Most servers one user may have pending or running at once (0: no limit).
    #[arg(long, env = "BERTH_MAX_SERVERS_PER_USER", default_value_t = 3)]
    pub max_servers_per_user: u32,

    /// Failed logins of one account before it is locked for the rest of the window.
    #[arg(long, env = "BERTH_LOGIN_MAX_FAILURES", default_value_t = 5)]
    pub login_max_failures: i32,

    /// Failed logins from one client address before it is locked for the rest of the window.
    #[arg(
        long,
        env = "BERTH_LOGIN_MAX_FAILURES_PER_ADDRESS",
        default_value_t = 50
    )]
    pub login_max_failures_per_address: i32,

    /// Length of the login throttling window, in seconds.
    #[arg(long, env = "BERTH_LOGIN_THROTTLE_WINDOW", default_value_t = 900)]
    pub login_throttle_window: i64,

    /// Browser origins allowed by CORS (comma-separated); none by default.
    #[arg(long, env = "BERTH_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// The proxies and load balancers in front of Berth, as CIDRs (comma-separated):
    /// from them, and only from them, `X-Forwarded-For` says who the client is
    /// (the rightmost hop that is not one of them). None by default.
    #[arg(long, env = "BERTH_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Replaced by BERTH_TRUSTED_PROXIES: believing the client's first hop let anyone
    /// pick their address. Refused when true.
    #[arg(long, env = "BERTH_TRUST_FORWARDED_FOR", default_value_t = false, action = ArgAction::Set, hide = true)]
    pub trust_forwarded_for: bool,

    /// Server profiles as code: a JSON file, a list of profiles (the fields of
    /// `POST /api/v1/admin/profiles`). At every start its profiles replace those of
    /// the same name made through the API, and profiles an earlier file defined
    /// that it no longer does are removed; profiles made through the API stay.
    #[arg(long, env = "BERTH_PROFILES")]
    pub profiles_file: Option<std::path::PathBuf>,

    /// OpenID Connect providers users may sign in with: a JSON list, inline
    /// (`[{"name": …}]`) or in the file this names. Each: `name`, `display_name`,
    /// `issuer`, `client_id`, `client_secret`, `scopes`, `allow_signup`,
    /// `allowed_domains`, `groups_claim`, `admin_groups` (see the README).
    #[arg(long, env = "BERTH_OIDC_PROVIDERS", hide_env_values = true)]
    pub oidc_providers: Option<String>,

    /// Images a spawn request may ask for besides the default (comma-separated).
    #[arg(long, env = "BERTH_ALLOWED_IMAGES", value_delimiter = ',')]
    pub allowed_images: Vec<String>,

    /// The workers' default image (`BERTH_IMAGE`, read here too): a request may
    /// always name it.
    #[arg(long = "default-image", env = "BERTH_IMAGE", default_value = schema::DEFAULT_IMAGE, hide = true)]
    pub default_image: String,

    /// Password checks (argon2, 19 MiB each) run at once; more wait up to a second,
    /// then get 503 with `Retry-After`. Each checking thread keeps its 19 MiB. Default: one per core.
    #[arg(long, env = "BERTH_PASSWORD_CHECKS", default_value_t = crate::passwords::default_concurrency())]
    pub password_checks: usize,

    /// Connections one listener serves at once (API and proxy); more wait to be
    /// accepted. Each open WebSocket through the proxy also holds two descriptors.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Spawn-progress streams one caller may hold open at once, per API process;
    /// more are answered 429. Each stream ends when its caller's session does.
    #[arg(long, env = "BERTH_PROGRESS_STREAMS_PER_USER", default_value_t = 8)]
    pub progress_streams_per_user: usize,

    /// Seconds a client may take to send a request's headers, and a kept-alive
    /// connection may stay idle; then the connection is closed.
    #[arg(long, env = "BERTH_HEADER_TIMEOUT", default_value_t = 30)]
    pub header_timeout: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BERTH_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// A bearer token `GET /metrics` asks for; none: metrics are open (they hold
    /// counts only, no names).
    #[arg(long, env = "BERTH_METRICS_TOKEN")]
    pub metrics_token: Option<String>,

    /// Mark the dashboard's session cookie `Secure` (behind HTTPS).
    #[arg(long, env = "BERTH_SECURE_COOKIES", default_value_t = false, action = ArgAction::Set)]
    pub secure_cookies: bool,

    #[command(flatten)]
    pub proxy: ProxyConfig,

    /// Where the local-process spawner keeps servers' output
    /// (`{BERTH_DATA_DIR}/{BERTH_INSTANCE}/logs`), for `GET …/server/log`; `berth up`
    /// sets it. Unset: server logs are not shown (Docker keeps containers' output).
    #[arg(long, env = "BERTH_SERVER_LOGS")]
    pub server_logs: Option<std::path::PathBuf>,
}

/// The proxy's settings (`berth proxy`, and the proxy routes of `berth up`); the API
/// reads the public address from here to show servers' URLs.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyConfig {
    /// The origin users type to reach Berth (`https://lab.example.org`): servers'
    /// URLs are this + `/user/{user}/{server}/`. Default: `http://` + `BERTH_LISTEN`
    /// (right for `berth up`; set it when the proxy runs apart from the API).
    #[arg(long, env = "BERTH_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// The portal's login page: a browser without a session is sent there (with
    /// `?next=` the URL it wanted) instead of being answered 401.
    #[arg(long, env = "BERTH_LOGIN_URL")]
    pub login_url: Option<String>,

    /// Paths (under a server's prefix) that an open tab polls by itself: a GET or
    /// HEAD of these does not count as activity. Comma-separated prefixes.
    #[arg(
        long = "proxy-ignore-paths",
        env = "BERTH_PROXY_IGNORE_PATHS",
        value_delimiter = ',',
        default_value = "api/kernels,api/sessions,api/terminals,api/metrics,api/status,\
                         api/contents,api/kernelspecs,api/me,api/nbconvert,lab/api/workspaces,\
                         lab/api/settings,lab/api/translations,api/events"
    )]
    pub ignore_paths: Vec<String>,

    /// Seconds between the proxy's writes of the activity it saw (one statement each).
    #[arg(
        long = "proxy-activity-interval",
        env = "BERTH_PROXY_ACTIVITY_INTERVAL",
        default_value_t = 5
    )]
    pub activity_interval: u64,

    /// Seconds the proxy waits to connect to a server before answering 502.
    #[arg(
        long = "proxy-connect-timeout",
        env = "BERTH_PROXY_CONNECT_TIMEOUT",
        default_value_t = 5
    )]
    pub connect_timeout: u64,

    /// Seconds the proxy waits for a server's answer to begin before answering
    /// 504 (a body may stream for longer: downloads, event streams).
    #[arg(
        long = "proxy-timeout",
        env = "BERTH_PROXY_TIMEOUT",
        default_value_t = 300
    )]
    pub timeout: u64,
}

impl ApiConfig {
    /// The origin of servers' public URLs, without a trailing slash:
    /// `BERTH_PUBLIC_URL`, else this process's own address (`bound`).
    /// Whether `BERTH_PUBLIC_URL` names where users reach Berth.
    pub fn has_public_url(&self) -> bool {
        self.proxy
            .public_url
            .as_deref()
            .is_some_and(|u| !u.is_empty())
    }

    pub fn public_origin(&self, bound: SocketAddr) -> String {
        match self.proxy.public_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if bound.ip().is_unspecified() => format!("http://127.0.0.1:{}", bound.port()),
            None => format!("http://{bound}"),
        }
    }

    /// Checks secrets; in production a missing or weak one stops the start.
    pub fn validate(&self) -> Result<(), String> {
        let production = self.environment == Environment::Production;
        if self.password_checks == 0 {
            return Err("BERTH_PASSWORD_CHECKS must be at least 1".into());
        }
        if let Some(token) = &self.admin_token {
            let min = if production { 32 } else { 16 };
            if token.len() < min {
                return Err(format!(
                    "BERTH_ADMIN_TOKEN must be at least {min} characters"
                ));
            }
        }
        if production && self.jwt_private_key.is_none() {
            return Err("BERTH_JWT_PRIVATE_KEY is required in production".into());
        }
        match (&self.admin_user, &self.admin_password) {
            (Some(_), None) => return Err("BERTH_ADMIN_USER needs BERTH_ADMIN_PASSWORD".into()),
            (None, Some(_)) => return Err("BERTH_ADMIN_PASSWORD needs BERTH_ADMIN_USER".into()),
            (Some(_), Some(password)) => crate::passwords::check_strength(password)
                .map_err(|e| format!("BERTH_ADMIN_PASSWORD: {e}"))?,
            (None, None) => {}
        }
        if let Some(url) = self.proxy.public_url.as_deref().filter(|u| !u.is_empty())
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "BERTH_PUBLIC_URL must be an http:// or https:// origin, got {url:?}"
            ));
        }
        if self.proxy.activity_interval == 0
            || self.proxy.connect_timeout == 0
            || self.proxy.timeout == 0
        {
            return Err(
                "BERTH_PROXY_ACTIVITY_INTERVAL, BERTH_PROXY_CONNECT_TIMEOUT and \
                 BERTH_PROXY_TIMEOUT must be positive"
                    .into(),
            );
        }
        if self.trust_forwarded_for {
            return Err(
                "BERTH_TRUST_FORWARDED_FOR is replaced by BERTH_TRUSTED_PROXIES: \
                 list the addresses of the proxies in front of Berth as CIDRs"
                    .into(),
            );
        }
        crate::auth::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|e| format!("BERTH_TRUSTED_PROXIES: {e}"))?;
        if self.max_connections == 0
            || self.header_timeout == 0
            || self.progress_streams_per_user == 0
        {
            return Err("BERTH_MAX_CONNECTIONS, BERTH_HEADER_TIMEOUT and \
                        BERTH_PROGRESS_STREAMS_PER_USER must be positive"
                .into());
        }
        if self.token_ttl == 0 || self.login_throttle_window <= 0 {
            return Err("BERTH_TOKEN_TTL and BERTH_LOGIN_THROTTLE_WINDOW must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        config: super::ApiConfig,
    }

    #[test]
    fn registration_is_off_unless_switched_on() {
        let defaults = Flags::try_parse_from(["api"]).unwrap().config;
        assert!(!defaults.allow_registration, "off by default");
        let on = Flags::try_parse_from(["api", "--allow-registration", "true"])
            .unwrap()
            .config;
        assert!(on.allow_registration);
    }
}
