//! API settings: every one a flag and an environment variable.

use std::net::SocketAddr;

#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    /// Address the API listens on.
    #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Bootstrap admin API token (`Authorization: Bearer …`), at least 16 characters.
    #[arg(long, env = "BERTH_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub admin_token: String,

    /// Images a spawn request may ask for besides the default (comma-separated).
    #[arg(long, env = "BERTH_ALLOWED_IMAGES", value_delimiter = ',')]
    pub allowed_images: Vec<String>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "BERTH_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
}

fn parse_token(value: &str) -> Result<String, String> {
    if value.len() < 16 {
        return Err("the admin token must be at least 16 characters".into());
    }
    Ok(value.to_owned())
}
