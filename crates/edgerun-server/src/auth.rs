//! Bearer-token authentication, compared in constant time.

use crate::error::{respond, ErrorStyle};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use edgerun_protocol::ApiError;

/// The node's tokens. Empty means authentication is off, which `main` allows only on a loopback
/// listener unless the operator opts out explicitly. Shared with the Worker (edgerun-protocol), so
/// both parse `Authorization` identically.
pub use edgerun_protocol::TokenSet;

/// Rejects requests without a valid `Authorization: Bearer <token>` with Workers AI's 401 (in
/// OpenAI's error shape on `/v1/...`).
pub async fn require_bearer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        return next.run(req).await;
    }
    let authorization = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if state.tokens.accepts_authorization(authorization) {
        next.run(req).await
    } else {
        respond(
            ApiError::authentication(),
            ErrorStyle::of_path(req.uri().path()),
            false,
        )
    }
}
