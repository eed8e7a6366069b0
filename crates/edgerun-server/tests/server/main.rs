//! The server's integration tests, one binary: the router through its public API without a
//! model (`http.rs`: routing, auth, limits, envelopes), over the real engine and model with
//! injected faults (`faults.rs`), and behind Cloudflare Access (`access.rs`). The route tests
//! over the fake backend are unit tests beside the handlers (`src/routes/tests.rs`).

mod access;
mod faults;
mod http;
