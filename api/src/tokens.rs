//! Access tokens: EdDSA-signed JWTs with a published key set (JWKS), so other
//! components verify them without the signing key.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const ISSUER: &str = "berth";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
    pub iss: String,
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    public: [u8; 32],
    kid: String,
    /// A key of its own for sealing what the dashboard says (derived from the
    /// signing key, so every API process that shares one shares it).
    seal: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
}

impl JwtKeys {
    /// From a PKCS#8 PEM Ed25519 private key.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let key = SigningKey::from_pkcs8_pem(pem.trim())
            .map_err(|e| format!("not an Ed25519 PKCS#8 PEM key: {e}"))?;
        Self::from_signing_key(&key)
    }

    /// A fresh Ed25519 key as PKCS#8 PEM, for a deployment to keep (`berth up`
    /// keeps one in its data directory so sessions outlive a restart).
    pub fn generate_pem() -> Result<String, String> {
        let seed: [u8; 32] = rand::random();
        SigningKey::from_bytes(&seed)
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| e.to_string())
    }

    /// A fresh key, for development: tokens die with the process.
    pub fn generate() -> Result<Self, String> {
        let seed: [u8; 32] = rand::random();
        Self::from_signing_key(&SigningKey::from_bytes(&seed))
    }

    fn from_signing_key(key: &SigningKey) -> Result<Self, String> {
        let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
        let public = key.verifying_key().to_bytes();
        let kid = hex::encode(&Sha256::digest(public)[..8]);
        let mut seal = Sha256::new();
        seal.update(b"berth dashboard notices\0");
        seal.update(key.to_bytes());
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_der(&public),
            public,
            kid,
            seal: seal.finalize().into(),
        })
    }

    /// An HMAC-SHA256 of `text` (hex, 128 bits): proof that this server chose it.
    pub fn seal(&self, text: &str) -> String {
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.seal);
        let pad = |byte: u8| block.map(|b| b ^ byte);
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(text.as_bytes())
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        hex::encode(&outer[..16])
    }

    /// Whether `seal` is this server's seal of `text` (compared in constant time).
    pub fn sealed(&self, text: &str, seal: &str) -> bool {
        crate::auth::same_secret(&self.seal(text), seal)
    }

    pub fn issue(&self, user: &str, role: &str, ttl_secs: u64) -> Result<(String, Claims), String> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user.to_owned(),
            role: role.to_owned(),
            iat: now,
            exp: now + ttl_secs as i64,
            jti: Uuid::new_v4(),
            iss: ISSUER.into(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    /// Checks signature, algorithm (EdDSA only: `none` and HMAC are refused), issuer and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 5;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(self.public),
        }]})
    }
}

pub fn expiry(claims: &Claims) -> DateTime<Utc> {
    DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now)
}

/// Opaque tokens (service, server, SSO) are stored as SHA-256 hex only.
pub fn hash_opaque(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new opaque token with a readable prefix (`bt_` service, `bsso_` SSO).
pub fn new_opaque(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}
