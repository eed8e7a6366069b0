//! What a token says and why one is refused: the [`Claims`] the node reads, the
//! [`Rejection`]s a caller sees (each a 403 or, when the keys are too stale, a 503) and the
//! node's own [`AccessError`]s (configuration and key fetching).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use edgerun_protocol::ApiError;
use jsonwebtoken::errors::ErrorKind;

/// Why a token was turned away. Its `Display` is what the client sees after
/// "invalid Access token: ".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not a compact JWS, bad base64/JSON, or a claim of the wrong type.
    Malformed,
    /// The header's `alg` is not RS256.
    UnsupportedAlgorithm,
    /// The header names no `kid`.
    MissingKeyId,
    /// No key with the token's `kid`, even after a refetch.
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    WrongIssuer,
    MissingClaim(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("malformed token"),
            Self::UnsupportedAlgorithm => f.write_str("unsupported algorithm (RS256 required)"),
            Self::MissingKeyId => f.write_str("no key id"),
            Self::UnknownKey => f.write_str("unknown signing key"),
            Self::BadSignature => f.write_str("bad signature"),
            Self::Expired => f.write_str("token expired"),
            Self::NotYetValid => f.write_str("token not yet valid"),
            Self::IssuedInFuture => f.write_str("token issued in the future"),
            Self::WrongAudience => f.write_str("wrong audience"),
            Self::WrongIssuer => f.write_str("wrong issuer"),
            Self::MissingClaim(c) => write!(f, "missing claim {c}"),
        }
    }
}

impl From<jsonwebtoken::errors::Error> for Rejection {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                Self::UnsupportedAlgorithm
            }
            ErrorKind::MissingRequiredClaim(c) => Self::MissingClaim(c.clone()),
            // A key the library cannot use fails the signature, not the caller's token format.
            ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => Self::BadSignature,
            _ => Self::Malformed,
        }
    }
}

/// Everything this module can fail with.
#[derive(Debug, Error)]
pub enum AccessError {
    /// Bad configuration, reported at start-up.
    #[error("{0}")]
    Config(String),
    /// The request carries no `Cf-Access-Jwt-Assertion`.
    #[error("missing Cf-Access-Jwt-Assertion")]
    Missing,
    /// The token failed a check.
    #[error("invalid Access token: {0}")]
    Invalid(Rejection),
    /// No signing keys could be fetched yet, so no token can be checked.
    #[error("Access signing keys are unavailable")]
    KeysUnavailable,
    /// The keys are older than [`AccessConfig::max_staleness`] (every fetch since failed), so
    /// they are no longer trusted to check tokens.
    #[error("Access signing keys are {} s old, past the maximum staleness", .age.as_secs())]
    KeysTooStale {
        /// How old the keys were when the token was checked.
        age: Duration,
    },
    /// One fetch of the keys failed (kept internal: logged, never sent to clients).
    #[error("fetching Access keys failed: {0}")]
    Fetch(String),
}

impl From<Rejection> for AccessError {
    fn from(r: Rejection) -> Self {
        Self::Invalid(r)
    }
}

impl AccessError {
    /// Whether this is the node's failure to check rather than a verdict on the token: the
    /// `503`s, which say nothing about the caller's credentials.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::KeysUnavailable | Self::KeysTooStale { .. } | Self::Fetch(_)
        )
    }

    /// The wire form: 403 / 10000 for the caller's token, 503 / 3040 when the node cannot check
    /// (see [`AccessError::is_unavailable`]).
    pub fn api_error(&self) -> ApiError {
        match self {
            Self::Missing | Self::Invalid(_) => ApiError::forbidden(self),
            Self::KeysUnavailable | Self::Fetch(_) => {
                ApiError::unavailable("cannot verify Cloudflare Access tokens yet, try again")
            }
            Self::KeysTooStale { age } => ApiError::unavailable(format!(
                "cannot verify Cloudflare Access tokens: signing keys are {} s old",
                age.as_secs()
            )),
            Self::Config(_) => ApiError::internal("Access verification is misconfigured"),
        }
    }
}

/// The claims of an accepted token that the node cares about. Inserted into the request's
/// extensions for handlers further in.
///
/// `aud`, `iss` and `exp` default when absent only so that the validation reports which claim
/// is missing (they are required there); a claim of the wrong type fails deserialization.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub exp: u64,
    pub iat: Option<u64>,
    pub nbf: Option<u64>,
    pub sub: Option<String>,
    /// Set for users who logged in through an identity provider.
    pub email: Option<String>,
    /// Set for service tokens (the token's client id).
    pub common_name: Option<String>,
    /// `app` for application tokens.
    #[serde(rename = "type")]
    pub token_type: Option<String>,
}

impl Claims {
    /// Who the token speaks for: the user's email, the service token's client id, or `sub`.
    pub fn identity(&self) -> &str {
        [&self.email, &self.common_name, &self.sub]
            .into_iter()
            .flatten()
            .find(|s| !s.is_empty())
            .map_or("", String::as_str)
    }
}

pub(super) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}
