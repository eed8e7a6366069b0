//! The one JSON field reader both request dialects use: how a field is looked up (`null` counts
//! as absent), what JSON type a value is called in an error, which numbers are integers, and
//! the typed readers (boolean, number in a range, integer in a range) with errors naming the
//! field.
//!
//! The two dialects word their errors differently and both wordings are wire contract, so each
//! reader comes in the dialect's words: [`workers_ai`] (`/ai/run`, the binding; Workers AI's
//! 5006 `Type mismatch of '/key', 'string' not in 'number'` and `'/key' must be <= 2, got 3`)
//! and [`openai`] (`/v1`; `'key' must be a number, got a string` and `'key' must be between 0
//! and 2, got 3`). What they share — lookup, type names, integral numbers — is written once here.
//!
//! A leaf: it depends on [`crate::error`] only.

use serde_json::{Map, Number, Value};

/// The value under `key`; `null` counts as absent.
pub(crate) fn non_null<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// Removes and returns the value under `key`; `null` counts as absent.
pub(crate) fn take_non_null(map: &mut Map<String, Value>, key: &str) -> Option<Value> {
    map.remove(key).filter(|v| !v.is_null())
}

/// The JSON type name of a value as schema validators print it (`string`, `object`, ...).
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON type of a value in a sentence (`a string`, `an object`, ...).
pub(crate) fn a_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The exact value of an integral number (integral floats such as `5.0` too); huge integral
/// floats saturate (`as` never panics).
pub(crate) fn integral(number: &Number) -> Option<i128> {
    if let Some(u) = number.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = number.as_i64() {
        return Some(i128::from(i));
    }
    let f = number.as_f64()?;
    (f.is_finite() && f.fract() == 0.0).then_some(f as i128)
}

/// The value of a number as `f64`. serde_json numbers are always finite, so this only fails
/// for arbitrary-precision builds; that counts as out of range.
fn float(number: &Number) -> f64 {
    number.as_f64().unwrap_or(f64::INFINITY)
}

/// Workers AI's wording (`/ai/run`, the binding): fields are JSON pointers (`/options/x`),
/// errors are [`ApiError::bad_input`](crate::error::ApiError::bad_input) (400 / 5006).
pub(crate) mod workers_ai {
    use std::fmt;

    use serde_json::{Map, Number, Value};

    use super::{float, integral, non_null, type_name};
    use crate::error::ApiError;

    /// `Type mismatch of '{pointer}', '{got}' not in '{expected}'`.
    pub(crate) fn type_mismatch(pointer: &str, value: &Value, expected: &str) -> ApiError {
        ApiError::bad_input(format_args!(
            "Type mismatch of '{pointer}', '{}' not in '{expected}'",
            type_name(value)
        ))
    }

    /// `'{pointer}' must be {op} {limit}, got {got}`.
    pub(crate) fn out_of_range(
        pointer: &str,
        op: &str,
        limit: impl fmt::Display,
        got: &Number,
    ) -> ApiError {
        ApiError::bad_input(format_args!("'{pointer}' must be {op} {limit}, got {got}"))
    }

    /// A boolean, also accepting the strings `"true"` / `"false"`.
    pub(crate) fn boolean(
        map: &Map<String, Value>,
        key: &str,
        pointer: &str,
    ) -> Result<Option<bool>, ApiError> {
        match non_null(map, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(other) => Err(type_mismatch(pointer, other, "boolean")),
        }
    }

    /// A number in `0..=max`, as `f32`.
    pub(crate) fn number(
        map: &Map<String, Value>,
        key: &str,
        max: f64,
    ) -> Result<Option<f32>, ApiError> {
        let pointer = format!("/{key}");
        let number = match non_null(map, key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n,
            Some(other) => return Err(type_mismatch(&pointer, other, "number")),
        };
        let value = float(number);
        if value < 0.0 {
            return Err(out_of_range(&pointer, ">=", 0.0, number));
        }
        if value > max {
            return Err(out_of_range(&pointer, "<=", max, number));
        }
        Ok(Some(value as f32))
    }

    /// An integer (integral floats like `5.0` allowed) in `min..=max`.
    pub(crate) fn integer(
        map: &Map<String, Value>,
        key: &str,
        min: i128,
        max: Option<i128>,
    ) -> Result<Option<i128>, ApiError> {
        let pointer = format!("/{key}");
        let number = match non_null(map, key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n,
            Some(other) => return Err(type_mismatch(&pointer, other, "integer")),
        };
        let Some(value) = integral(number) else {
            return Err(ApiError::bad_input(format_args!(
                "Type mismatch of '{pointer}', 'number' not in 'integer'"
            )));
        };
        if value < min {
            return Err(out_of_range(&pointer, ">=", min, number));
        }
        if let Some(max) = max {
            if value > max {
                return Err(out_of_range(&pointer, "<=", max, number));
            }
        }
        Ok(Some(value))
    }
}

/// OpenAI's wording (`/v1`): fields are dotted names (`messages[0].role`), errors are
/// [`ApiError::invalid_request`](crate::error::ApiError::invalid_request) (400 / 5006).
pub(crate) mod openai {
    use serde_json::{Map, Value};

    use super::{a_type_name, float, integral, non_null};
    use crate::error::ApiError;

    /// `'{name}' must be {expected}, got {got}`.
    pub(crate) fn type_error(name: &str, got: &Value, expected: &str) -> ApiError {
        ApiError::invalid_request(format_args!(
            "'{name}' must be {expected}, got {}",
            a_type_name(got)
        ))
    }

    /// A boolean.
    pub(crate) fn boolean(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
        match non_null(map, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(type_error(key, other, "a boolean")),
        }
    }

    /// A number in `min..=max`, as `f32`.
    pub(crate) fn number(
        map: &Map<String, Value>,
        key: &str,
        min: f64,
        max: f64,
    ) -> Result<Option<f32>, ApiError> {
        let value = match non_null(map, key) {
            None => return Ok(None),
            Some(Value::Number(n)) => float(n),
            Some(other) => return Err(type_error(key, other, "a number")),
        };
        if !(min..=max).contains(&value) {
            return Err(ApiError::invalid_request(format_args!(
                "'{key}' must be between {min} and {max}, got {value}"
            )));
        }
        Ok(Some(value as f32))
    }

    /// An integer (integral floats such as `5.0` too) in `min..=max`.
    pub(crate) fn integer(
        map: &Map<String, Value>,
        key: &str,
        min: i128,
        max: i128,
    ) -> Result<Option<i128>, ApiError> {
        let value = match non_null(map, key) {
            None => return Ok(None),
            Some(Value::Number(n)) => integral(n),
            Some(other) => return Err(type_error(key, other, "an integer")),
        };
        match value {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            Some(v) => Err(ApiError::invalid_request(format_args!(
                "'{key}' must be between {min} and {max}, got {v}"
            ))),
            None => Err(ApiError::invalid_request(format_args!(
                "'{key}' must be an integer"
            ))),
        }
    }
}
