//! Bearer-token authentication, compared in constant time.

use crate::error::IntoHttp;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use edgerun_protocol::ApiError;
use subtle::ConstantTimeEq;

/// The tokens a caller may present. Empty means authentication is off, which `main` allows
/// only on a loopback listener unless the operator opts out explicitly.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

impl TokenSet {
    pub fn new<I: IntoIterator<Item = String>>(tokens: I) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .map(String::into_bytes)
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `presented` matches a configured token. Every configured token is compared,
    /// each in constant time, so timing does not reveal which one (or how much) matched.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.tokens {
            ok |= t.as_slice().ct_eq(presented);
        }
        ok.into()
    }
}

/// Rejects requests without a valid `Authorization: Bearer <token>` with Workers AI's 401.
pub async fn require_bearer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(token) if state.tokens.accepts(token.as_bytes()) => next.run(req).await,
        _ => ApiError::authentication().into_http(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let set = TokenSet::new(["alpha".to_string(), " beta \n".to_string(), String::new()]);
        assert!(set.accepts(b"alpha"));
        assert!(set.accepts(b"beta"));
        assert!(!set.accepts(b"alph"));
        assert!(!set.accepts(b"alphaa"));
        assert!(!set.accepts(b""));
        assert!(TokenSet::new(Vec::<String>::new()).is_empty());
    }
}
