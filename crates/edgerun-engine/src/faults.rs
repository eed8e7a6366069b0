//! Fault injection for tests (the `fault-injection` feature, which only test targets enable:
//! a plain `cargo build -p edgerun-server` never has it, and nothing but a test calls
//! [`crate::Engine::inject_faults`]).
//!
//! [`crate::Engine::inject_faults`] sets what the engine's forward pass does from its next step
//! on: fail (as a device error would) or panic whenever a step includes a chosen token, or
//! fail every step. The check runs where the real forward pass runs, inside the scheduler's
//! failure handling, so tests exercise exactly the path a real fault takes.

use crate::models::Segment;
use std::sync::Mutex;

/// What to break.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// A step whose tokens include this one fails with an error.
    pub error_on_token: Option<u32>,
    /// A step whose tokens include this one panics.
    pub panic_on_token: Option<u32>,
    /// Every step fails (a broken device), probes included.
    pub fail_every_step: bool,
    /// A step whose tokens include this one fails after the model has run and committed its
    /// cache positions (as an asynchronous device error would surface).
    pub error_after_forward_on_token: Option<u32>,
    /// The device sampler fails (its own operations, not the forward pass).
    pub fail_device_sampling: bool,
}

/// Called before the device sampler runs.
pub(crate) fn check_sampling(faults: &Mutex<Faults>) -> candle_core::Result<()> {
    if faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fail_device_sampling
    {
        candle_core::bail!("injected device sampling failure");
    }
    Ok(())
}

/// Called after each forward pass that succeeded, with its segments.
pub(crate) fn check_after(faults: &Mutex<Faults>, segments: &[Segment<'_>]) -> crate::Result<()> {
    let token = faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .error_after_forward_on_token;
    if token.is_some_and(|t| segments.iter().any(|s| s.tokens.contains(&t))) {
        return Err(crate::EngineError::Model(candle_core::Error::Msg(
            "injected fault after the forward pass".into(),
        )));
    }
    Ok(())
}

/// Called before each forward pass with its segments.
pub(crate) fn check(faults: &Mutex<Faults>, segments: &[Segment<'_>]) -> crate::Result<()> {
    let f = faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let includes =
        |token: Option<u32>| token.is_some_and(|t| segments.iter().any(|s| s.tokens.contains(&t)));
    if f.fail_every_step {
        return Err(crate::EngineError::Model(candle_core::Error::Msg(
            "injected device failure".into(),
        )));
    }
    if includes(f.error_on_token) {
        return Err(crate::EngineError::Model(candle_core::Error::Msg(
            "injected fault".into(),
        )));
    }
    if includes(f.panic_on_token) {
        panic!("injected panic");
    }
    Ok(())
}
