//! The checks an ID token must pass (OpenID Connect Core 1.0, 3.1.3.7) before
//! Berth believes who it names.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;
use serde_json::{Map, Value};

/// What an ID token must say: who issued it, for which client, for which sign-in.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The issuer as the provider's discovery document gives it.
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The nonce the sign-in sent with its authorization request.
    pub nonce: &'a str,
}

/// The claims Berth reads from an ID token that passed.
#[derive(Debug, Deserialize)]
pub struct IdClaims {
    /// Who the user is at the provider: identities are linked by this.
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_verified: Option<bool>,
    #[serde(default)]
    pub preferred_username: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    /// Every other claim (a provider's groups claim among them).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Why an ID token was refused, as a sentence about "it".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("it is not a signed JWT")]
    Malformed,
    #[error("it is signed with {0}, which Berth does not accept from a provider")]
    Algorithm(String),
    #[error("its signing key is not in the provider's key set")]
    UnknownKey,
    #[error("its signature does not verify")]
    Signature,
    #[error("it was issued by another issuer")]
    Issuer,
    #[error("it is meant for another client")]
    Audience,
    #[error("it has expired")]
    Expired,
    #[error("it belongs to another sign-in: its nonce differs")]
    Nonce,
    #[error("its claims are not those of an ID token: {0}")]
    Claims(String),
}

/// Asymmetric signatures only: a token signed with the client's secret (HS*),
/// which the client itself could forge, or not signed at all is refused.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Seconds of clock difference allowed between Berth and the provider.
const LEEWAY_SECS: u64 = 60;

/// Checks an ID token against the provider's key set: signature, algorithm,
/// issuer, audience (and `azp` when present), expiry, and the sign-in's nonce.
pub fn verify(
    token: &str,
    keys: &JwkSet,
    expected: Expected<'_>,
) -> Result<IdClaims, IdTokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| IdTokenError::Malformed)?;
    if !ACCEPTED.contains(&header.alg) {
        return Err(IdTokenError::Algorithm(format!("{:?}", header.alg)));
    }
    let jwk = match &header.kid {
        Some(kid) => keys.find(kid),
        // Without a key id, only a set of one key says which key it is.
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
    .ok_or(IdTokenError::UnknownKey)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| IdTokenError::UnknownKey)?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.set_issuer(&[expected.issuer]);
    validation.set_audience(&[expected.client_id]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => IdTokenError::Expired,
            ErrorKind::InvalidIssuer => IdTokenError::Issuer,
            ErrorKind::InvalidAudience => IdTokenError::Audience,
            ErrorKind::InvalidSignature => IdTokenError::Signature,
            // The key's type is not the header's algorithm's.
            ErrorKind::InvalidAlgorithm => IdTokenError::Signature,
            ErrorKind::MissingRequiredClaim(claim) => IdTokenError::Claims(format!("no {claim}")),
            ErrorKind::InvalidClaimFormat(claim) => {
                IdTokenError::Claims(format!("{claim} is not valid"))
            }
            ErrorKind::Json(e) => IdTokenError::Claims(e.to_string()),
            _ => IdTokenError::Malformed,
        })?
        .claims;
    // A token for several audiences names the one it was issued to.
    if claims
        .azp
        .as_deref()
        .is_some_and(|azp| azp != expected.client_id)
    {
        return Err(IdTokenError::Audience);
    }
    match claims.nonce.as_deref() {
        Some(nonce) if crate::auth::same_secret(nonce, expected.nonce) => Ok(claims),
        _ => Err(IdTokenError::Nonce),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://id.example.org/o";
    const CLIENT: &str = "berth";
    const NONCE: &str = "n-0S6_WzA2Mj";

    /// A provider's signing key: its PEM and its published key set.
    struct Provider {
        pem: String,
        keys: JwkSet,
        kid: String,
    }

    fn provider() -> Provider {
        let pem = crate::tokens::JwtKeys::generate_pem().unwrap();
        let set = crate::tokens::JwtKeys::from_pem(&pem).unwrap().jwks();
        let kid = set["keys"][0]["kid"].as_str().unwrap().to_owned();
        Provider {
            pem,
            keys: serde_json::from_value(set).unwrap(),
            kid,
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn claims() -> Value {
        json!({
            "iss": ISSUER, "aud": CLIENT, "sub": "248289761001", "nonce": NONCE,
            "iat": now(), "exp": now() + 300,
            "email": "ann@example.org", "email_verified": true,
            "preferred_username": "ann", "groups": ["physics", "gpu"],
        })
    }

    fn signed(p: &Provider, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        let key = EncodingKey::from_ed_pem(p.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn expected() -> Expected<'static> {
        Expected {
            issuer: ISSUER,
            client_id: CLIENT,
            nonce: NONCE,
        }
    }

    fn with(change: impl FnOnce(&mut Value)) -> Value {
        let mut c = claims();
        change(&mut c);
        c
    }

    #[test]
    fn a_token_of_the_provider_for_this_client_and_sign_in_passes() {
        let p = provider();
        let claims = verify(&signed(&p, Some(&p.kid), &claims()), &p.keys, expected()).unwrap();
        assert_eq!(claims.sub, "248289761001");
        assert_eq!(claims.email.as_deref(), Some("ann@example.org"));
        assert_eq!(claims.email_verified, Some(true));
        assert_eq!(claims.preferred_username.as_deref(), Some("ann"));
        assert_eq!(claims.other["groups"], json!(["physics", "gpu"]));
        // A set of one key needs no key id; several do.
        assert!(verify(&signed(&p, None, &self::claims()), &p.keys, expected()).is_ok());
        let other = provider();
        let mut two = p.keys.clone();
        two.keys.extend(other.keys.keys);
        assert_eq!(
            verify(&signed(&p, None, &self::claims()), &two, expected()).unwrap_err(),
            IdTokenError::UnknownKey
        );
        // An audience list that holds this client, issued to it.
        let listed = with(|c| {
            c["aud"] = json!([CLIENT, "portal"]);
            c["azp"] = json!(CLIENT);
        });
        assert!(verify(&signed(&p, Some(&p.kid), &listed), &p.keys, expected()).is_ok());
    }

    #[test]
    fn a_token_from_another_issuer_audience_or_sign_in_is_refused() {
        let p = provider();
        let refused = |claims: Value| {
            verify(&signed(&p, Some(&p.kid), &claims), &p.keys, expected()).unwrap_err()
        };
        assert_eq!(
            refused(with(|c| c["iss"] = json!("https://evil.example.org/o"))),
            IdTokenError::Issuer
        );
        assert_eq!(
            refused(with(|c| c["aud"] = json!("another-client"))),
            IdTokenError::Audience
        );
        assert_eq!(
            refused(with(|c| {
                c["aud"] = json!([CLIENT, "portal"]);
                c["azp"] = json!("portal");
            })),
            IdTokenError::Audience,
            "issued to another client of the same list"
        );
        assert_eq!(
            refused(with(|c| c["nonce"] = json!("another-sign-in"))),
            IdTokenError::Nonce
        );
        assert_eq!(
            refused(with(|c| {
                c.as_object_mut().unwrap().remove("nonce");
            })),
            IdTokenError::Nonce
        );
        assert_eq!(
            refused(with(|c| {
                c["iat"] = json!(now() - 7200);
                c["exp"] = json!(now() - 3600);
            })),
            IdTokenError::Expired
        );
        let no_subject = refused(with(|c| {
            c.as_object_mut().unwrap().remove("sub");
        }));
        assert!(
            matches!(&no_subject, IdTokenError::Claims(m) if m.contains("sub")),
            "{no_subject:?}"
        );
    }

    #[test]
    fn a_forged_unsigned_or_secret_signed_token_is_refused() {
        let p = provider();
        // Signed by another key under the provider's key id.
        let forger = provider();
        assert_eq!(
            verify(
                &signed(&forger, Some(&p.kid), &claims()),
                &p.keys,
                expected()
            )
            .unwrap_err(),
            IdTokenError::Signature
        );
        assert_eq!(
            verify(
                &signed(&p, Some("rotated-away"), &claims()),
                &p.keys,
                expected()
            )
            .unwrap_err(),
            IdTokenError::UnknownKey
        );
        // HS256 with the client secret: anyone holding the secret could make it.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(p.kid.clone());
        let hs =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        assert_eq!(
            verify(&hs, &p.keys, expected()).unwrap_err(),
            IdTokenError::Algorithm("HS256".into())
        );
        // `alg: none` with no signature.
        let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", part(json!({"alg": "none"})), part(claims()));
        assert_eq!(
            verify(&none, &p.keys, expected()).unwrap_err(),
            IdTokenError::Malformed
        );
        // A valid signature over other claims does not carry over.
        let good = signed(&p, Some(&p.kid), &claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let tampered = part(with(|c| c["sub"] = json!("admin")));
        parts[1] = &tampered;
        assert_eq!(
            verify(&parts.join("."), &p.keys, expected()).unwrap_err(),
            IdTokenError::Signature
        );
    }
}
