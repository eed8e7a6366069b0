//! Sending a request to the regions in order until one answers.
//!
//! A region is skipped, and the next one tried, only while nothing has been sent to the caller:
//! when the connection fails, when the node (or Cloudflare in front of it) answers 502, 503, 504
//! or 530 (or Cloudflare's 521/522/523: the origin could not be reached at all), or when it
//! answers 429 with code 3040 (busy). Cloudflare's 520 and 524 are not retried: the node may have
//! run the request. Any other answer, error or not, goes to
//! the caller as it is — its body streams through untouched — and once it has, the Worker never
//! retries. [`forward`] is generic over [`Upstream`] so that the host's tests drive it with a
//! scripted upstream and the Worker with `fetch`.

use crate::config::Region;
use edgerun_protocol::{ApiError, ErrorEnvelope};

/// Largest 429 body read to look for code 3040; a node's error envelope is far smaller.
pub const MAX_PEEK_BYTES: usize = 16 * 1024;

/// One way of sending the request to a region.
#[allow(async_fn_in_trait)] // the Worker's futures are !Send by nature (single-threaded wasm)
pub trait Upstream {
    /// A response whose body has not been read.
    type Response;
    /// Sends the request to `region`; `Err` when no HTTP answer came back (connect error, reset).
    async fn send(&mut self, region: &Region) -> Result<Self::Response, String>;
    /// The response's status code.
    fn status(response: &Self::Response) -> u16;
    /// Reads the (small) body of a 429 and returns a response that still carries all of it,
    /// with the first [`MAX_PEEK_BYTES`] to decide whether it means "busy".
    async fn peek(&mut self, response: Self::Response)
        -> Result<(Self::Response, Vec<u8>), String>;
}

/// Why a region was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub region: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// No HTTP answer (connection refused, reset, DNS, ...).
    Unreachable(String),
    /// 502/503/504/521/522/523/530: the node is down, loading, draining, or its Tunnel is.
    Down(u16),
    /// 429 with code 3040: the node's queue is full.
    Busy,
}

/// The result of [`forward`].
pub enum Forwarded<R> {
    /// A region answered; `skipped` lists those tried before it.
    Answered {
        region: String,
        response: R,
        skipped: Vec<Skipped>,
    },
    /// Every region was skipped.
    NoRegion(Vec<Skipped>),
}

/// What to make of a status before reading the body.
fn skip_for_status(status: u16) -> Option<SkipReason> {
    matches!(status, 502 | 503 | 504 | 521 | 522 | 523 | 530).then_some(SkipReason::Down(status))
}

/// Whether a 429 body is the Workers AI capacity error (code 3040).
pub fn is_capacity_error(body: &[u8]) -> bool {
    serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.errors.iter().any(|item| item.code == 3040))
        .unwrap_or(false)
}

/// Tries `regions` in order; see the module docs for when a region is skipped.
pub async fn forward<U: Upstream>(upstream: &mut U, regions: &[&Region]) -> Forwarded<U::Response> {
    let mut skipped = Vec::new();
    for region in regions {
        let skip = |reason| Skipped {
            region: region.name.clone(),
            reason,
        };
        let response = match upstream.send(region).await {
            Ok(r) => r,
            Err(e) => {
                skipped.push(skip(SkipReason::Unreachable(e)));
                continue;
            }
        };
        let status = U::status(&response);
        if let Some(reason) = skip_for_status(status) {
            skipped.push(skip(reason));
            continue;
        }
        let response = if status == 429 {
            match upstream.peek(response).await {
                Ok((_, body)) if is_capacity_error(&body) => {
                    skipped.push(skip(SkipReason::Busy));
                    continue;
                }
                Ok((response, _)) => response,
                Err(e) => {
                    skipped.push(skip(SkipReason::Unreachable(e)));
                    continue;
                }
            }
        } else {
            response
        };
        return Forwarded::Answered {
            region: region.name.clone(),
            response,
            skipped,
        };
    }
    Forwarded::NoRegion(skipped)
}

/// The caller's error when no region answered: 429/3040 if any node was merely busy (retrying
/// soon helps), otherwise 503 naming what happened to each region.
pub fn no_region_error(skipped: &[Skipped]) -> ApiError {
    if skipped.iter().any(|s| s.reason == SkipReason::Busy) {
        return ApiError::capacity();
    }
    let detail: Vec<String> = skipped
        .iter()
        .map(|s| match &s.reason {
            // The fetch error itself goes to the Worker's log, not to callers.
            SkipReason::Unreachable(_) => format!("{}: unreachable", s.region),
            SkipReason::Down(status) => format!("{}: answered {status}", s.region),
            SkipReason::Busy => format!("{}: busy", s.region),
        })
        .collect();
    ApiError::unavailable(format!(
        "No edgerun node is available: {}",
        if detail.is_empty() {
            "none configured".to_string()
        } else {
            detail.join("; ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// What a region does when asked: answer with a status and body, or fail to connect.
    type Answer = Result<(u16, String), String>;
    type ScriptLine<'a> = (&'a str, Result<(u16, &'a str), &'a str>);

    /// A scripted upstream: each region answers with the next entry of its script.
    struct Script {
        answers: Vec<(String, VecDeque<Answer>)>,
        sent: Vec<String>,
        peeked: usize,
    }

    impl Script {
        fn new(answers: &[ScriptLine<'_>]) -> Self {
            let mut s = Script {
                answers: Vec::new(),
                sent: Vec::new(),
                peeked: 0,
            };
            for (region, answer) in answers {
                let answer = answer
                    .map(|(status, body)| (status, body.to_string()))
                    .map_err(str::to_string);
                match s.answers.iter_mut().find(|(r, _)| r == region) {
                    Some((_, q)) => q.push_back(answer),
                    None => s
                        .answers
                        .push((region.to_string(), VecDeque::from([answer]))),
                }
            }
            s
        }
    }

    impl Upstream for Script {
        type Response = (u16, String);
        async fn send(&mut self, region: &Region) -> Result<(u16, String), String> {
            self.sent.push(region.name.clone());
            self.answers
                .iter_mut()
                .find(|(r, _)| *r == region.name)
                .and_then(|(_, q)| q.pop_front())
                .unwrap_or_else(|| Err("no script".into()))
        }
        fn status(r: &(u16, String)) -> u16 {
            r.0
        }
        async fn peek(&mut self, r: (u16, String)) -> Result<((u16, String), Vec<u8>), String> {
            self.peeked += 1;
            let body = r.1.as_bytes().to_vec();
            Ok((r, body))
        }
    }

    fn regions() -> Vec<Region> {
        ["eu", "us", "ap"]
            .iter()
            .map(|n| Region {
                name: n.to_string(),
                origin: format!("https://{n}.example.com"),
                continents: vec![],
                countries: vec![],
                colos: vec![],
                token_secret: None,
            })
            .collect()
    }

    fn run(script: &mut Script) -> Forwarded<(u16, String)> {
        let regions = regions();
        let order: Vec<&Region> = regions.iter().collect();
        futures_executor::block_on(forward(script, &order))
    }

    const BUSY: &str = r#"{"errors":[{"code":3040,"message":"Capacity temporarily exceeded, please try again."}],"success":false,"result":null,"messages":[]}"#;
    const RATE: &str = r#"{"errors":[{"code":3036,"message":"rate limited"}],"success":false,"result":null,"messages":[]}"#;

    #[test]
    fn first_healthy_region_answers() {
        let mut s = Script::new(&[("eu", Ok((200, "stream")))]);
        let Forwarded::Answered {
            region,
            response,
            skipped,
        } = run(&mut s)
        else {
            panic!("no answer")
        };
        assert_eq!((region.as_str(), response.0), ("eu", 200));
        assert!(skipped.is_empty());
        assert_eq!(s.sent, ["eu"]);
        assert_eq!(s.peeked, 0, "a 200 body is never read by the Worker");
    }

    #[test]
    fn down_regions_are_skipped_in_order() {
        for down in [
            Err("connection refused"),
            Ok((502, "")),
            Ok((503, "")),
            Ok((504, "")),
            Ok((521, "")),
            Ok((522, "")),
            Ok((523, "")),
            Ok((530, "")),
        ] {
            let mut s = Script::new(&[("eu", down), ("us", Ok((200, "ok")))]);
            let Forwarded::Answered {
                region, skipped, ..
            } = run(&mut s)
            else {
                panic!("no answer for {down:?}")
            };
            assert_eq!(region, "us", "{down:?}");
            assert_eq!(skipped.len(), 1);
            assert_eq!(s.sent, ["eu", "us"]);
        }
    }

    #[test]
    fn busy_429_fails_over_but_other_429s_and_errors_do_not() {
        let mut s = Script::new(&[("eu", Ok((429, BUSY))), ("us", Ok((200, "ok")))]);
        let Forwarded::Answered {
            region, skipped, ..
        } = run(&mut s)
        else {
            panic!()
        };
        assert_eq!(region, "us");
        assert_eq!(skipped[0].reason, SkipReason::Busy);

        // A 429 that is not 3040, a 400, a 401, a 500, a 520/524 (the node may have run it): the caller gets the node's own answer,
        // body intact, and no other region is asked.
        for (status, body) in [
            (429, RATE),
            (429, "not json"),
            (400, "bad"),
            (401, "auth"),
            (500, "boom"),
            (404, ""),
            (520, ""),
            (524, ""),
        ] {
            let mut s = Script::new(&[("eu", Ok((status, body))), ("us", Ok((200, "ok")))]);
            let Forwarded::Answered {
                region, response, ..
            } = run(&mut s)
            else {
                panic!()
            };
            assert_eq!(
                (region.as_str(), response.0, response.1.as_str()),
                ("eu", status, body)
            );
            assert_eq!(s.sent, ["eu"]);
        }
    }

    #[test]
    fn every_region_down_is_a_503_naming_each() {
        let mut s = Script::new(&[
            ("eu", Err("connection refused")),
            ("us", Ok((530, ""))),
            ("ap", Ok((503, ""))),
        ]);
        let Forwarded::NoRegion(skipped) = run(&mut s) else {
            panic!()
        };
        assert_eq!(s.sent, ["eu", "us", "ap"]);
        let e = no_region_error(&skipped);
        assert_eq!((e.status, e.code), (503, 3040));
        assert_eq!(
            e.message,
            "No edgerun node is available: eu: unreachable; us: answered 530; ap: answered 503"
        );
    }

    #[test]
    fn all_busy_or_some_busy_is_a_429() {
        let mut s = Script::new(&[
            ("eu", Ok((429, BUSY))),
            ("us", Err("refused")),
            ("ap", Ok((429, BUSY))),
        ]);
        let Forwarded::NoRegion(skipped) = run(&mut s) else {
            panic!()
        };
        assert_eq!(no_region_error(&skipped), ApiError::capacity());
    }

    #[test]
    fn capacity_bodies_are_recognised() {
        assert!(is_capacity_error(BUSY.as_bytes()));
        assert!(is_capacity_error(ApiError::capacity().to_json().as_bytes()));
        assert!(!is_capacity_error(RATE.as_bytes()));
        assert!(!is_capacity_error(b""));
        assert!(!is_capacity_error(b"{\"errors\":3040}"));
    }
}
