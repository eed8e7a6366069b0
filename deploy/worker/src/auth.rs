//! Caller authentication: the Worker's own bearer tokens (the `API_TOKENS` secret), compared in
//! constant time. Callers never see or need the nodes' tokens.

use subtle::ConstantTimeEq;

/// The tokens a caller may present.
#[derive(Clone, Default)]
pub struct CallerTokens {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for CallerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallerTokens({} tokens)", self.tokens.len())
    }
}

impl CallerTokens {
    /// Tokens separated by commas, spaces or newlines (so one secret can hold several, for
    /// rotation). Empty entries are ignored.
    pub fn parse(secret: &str) -> Self {
        Self {
            tokens: secret
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_vec())
                .collect(),
        }
    }

    /// No token configured: every caller is refused (the Worker never runs open by accident).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether the `Authorization` header value carries one of the tokens. Every token is
    /// compared, each in constant time, so timing reveals neither which one nor how much matched.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(bearer_token) else {
            return false;
        };
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.tokens {
            ok |= t.as_slice().ct_eq(presented.as_bytes());
        }
        ok.into()
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive), as the node parses it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_bearer_tokens_pass() {
        let t = CallerTokens::parse("alpha, beta\ngamma  ");
        assert!(t.accepts(Some("Bearer alpha")));
        assert!(t.accepts(Some("bearer beta")));
        assert!(t.accepts(Some("  BEARER   gamma ")));
        for bad in [
            None,
            Some(""),
            Some("alpha"),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic alpha"),
            Some("Bearer alph"),
            Some("Bearer alphaa"),
            Some("Bearer alpha,beta"),
        ] {
            assert!(!t.accepts(bad), "{bad:?}");
        }
    }

    #[test]
    fn no_tokens_refuses_everyone() {
        let t = CallerTokens::parse(" ,\n");
        assert!(t.is_empty());
        assert!(!t.accepts(Some("Bearer ")));
        assert!(!t.accepts(Some("Bearer x")));
    }
}
