//! JSON request bodies whose every rejection is a clear `ApiError`.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body that may be left out: an empty body means "all defaults".
pub struct OptionalJson<T>(pub T);

/// A JSON body that must be there.
pub struct JsonBody<T>(pub T);

async fn read(request: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("the request body is too large".into())
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}

/// Every body the API takes is a JSON object: an array is refused before it is
/// read as one (serde reads a struct from an array too, and `[]` made a user).
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object {…}".into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("unexpected JSON: {e}")))
}

fn is_blank(body: &Bytes) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let body = read(request).await?;
        if is_blank(&body) {
            return Ok(Self(T::default()));
        }
        parse(&body).map(Self)
    }
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let body = read(request).await?;
        if is_blank(&body) {
            return Err(ApiError::BadRequest("a JSON body is required".into()));
        }
        parse(&body).map(Self)
    }
}
