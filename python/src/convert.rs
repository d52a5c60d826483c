//! Python values in and out: pairs (dicts or tuples), plain values as JSON (configs, objective
//! parameters), results as dicts of NumPy arrays, and errors as exceptions carrying the Rust message.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

use safedpo::{Logps, PairMetrics, PreferencePair};

/// A Rust error as `RuntimeError`, with its whole chain of context (`a: b: c`).
pub fn runtime_error(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// A Rust error about the arguments as `ValueError`.
pub fn value_error(e: anyhow::Error) -> PyErr {
    PyValueError::new_err(format!("{e:#}"))
}

/// One pair: a dict with `prompt`, `chosen`, `rejected` and optional `chosen_unsafe` /
/// `rejected_unsafe`, or a tuple `(prompt, chosen, rejected[, chosen_unsafe, rejected_unsafe])`.
fn pair(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<PreferencePair> {
    let text = |value: Option<Bound<'_, PyAny>>, field: &str| -> PyResult<String> {
        let value = value.ok_or_else(|| PyValueError::new_err(format!("pair {i}: no `{field}`")))?;
        value.extract::<String>().map_err(|_| PyTypeError::new_err(format!("pair {i}: `{field}` must be a str")))
    };
    let flag = |value: Option<Bound<'_, PyAny>>, field: &str| -> PyResult<bool> {
        match value {
            None => Ok(false),
            Some(v) => {
                v.extract::<bool>().map_err(|_| PyTypeError::new_err(format!("pair {i}: `{field}` must be a bool")))
            }
        }
    };
    if let Ok(dict) = obj.cast::<PyDict>() {
        for key in dict.keys() {
            let key: String = key.extract()?;
            if !["prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe"].contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "pair {i}: unknown key `{key}` (a pair has prompt, chosen, rejected, chosen_unsafe, rejected_unsafe)"
                )));
            }
        }
        let pair = PreferencePair::new(
            text(dict.get_item("prompt")?, "prompt")?,
            text(dict.get_item("chosen")?, "chosen")?,
            text(dict.get_item("rejected")?, "rejected")?,
        );
        let (chosen_unsafe, rejected_unsafe) = (
            flag(dict.get_item("chosen_unsafe")?, "chosen_unsafe")?,
            flag(dict.get_item("rejected_unsafe")?, "rejected_unsafe")?,
        );
        return Ok(pair.with_safety(chosen_unsafe, rejected_unsafe));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        let n = tuple.len();
        if n != 3 && n != 5 {
            return Err(PyValueError::new_err(format!(
                "pair {i}: a tuple holds (prompt, chosen, rejected[, chosen_unsafe, rejected_unsafe]), got {n} items"
            )));
        }
        let item = |k: usize| tuple.get_item(k).ok();
        let pair = PreferencePair::new(text(item(0), "prompt")?, text(item(1), "chosen")?, text(item(2), "rejected")?);
        return Ok(if n == 5 {
            pair.with_safety(flag(item(3), "chosen_unsafe")?, flag(item(4), "rejected_unsafe")?)
        } else {
            pair
        });
    }
    Err(PyTypeError::new_err(format!("pair {i}: expected a dict or a tuple, got {}", obj.get_type().name()?)))
}

/// A sequence of pairs.
pub fn pairs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PreferencePair>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err("expected a list of pairs"));
    }
    obj.try_iter()?.enumerate().map(|(i, item)| pair(i, &item?)).collect()
}

/// A plain Python value (None, bool, int, float, str, list/tuple, dict with str keys) as JSON.
pub fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if obj.is_instance_of::<PyBool>() {
        Ok(Value::Bool(obj.extract()?))
    } else if obj.is_instance_of::<PyInt>() {
        Ok(Value::from(obj.extract::<i64>()?))
    } else if obj.is_instance_of::<PyFloat>() {
        let x: f64 = obj.extract()?;
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err(format!("{x} is not finite")))
    } else if obj.is_instance_of::<PyString>() {
        Ok(Value::String(obj.extract()?))
    } else if let Ok(dict) = obj.cast::<PyDict>() {
        Ok(Value::Object(to_json_map(dict)?))
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        Ok(Value::Array(obj.try_iter()?.map(|item| to_json(&item?)).collect::<PyResult<_>>()?))
    } else if let Ok(path) = obj.extract::<std::path::PathBuf>() {
        Ok(Value::String(path.to_string_lossy().into_owned()))
    } else {
        Err(PyTypeError::new_err(format!("cannot read a {} as a setting", obj.get_type().name()?)))
    }
}

/// A dict with str keys as a JSON object.
pub fn to_json_map(dict: &Bound<'_, PyDict>) -> PyResult<Map<String, Value>> {
    let mut map = Map::new();
    for (key, value) in dict.iter() {
        let key: String = key.extract().map_err(|_| PyTypeError::new_err("dict keys must be str"))?;
        map.insert(key, to_json(&value)?);
    }
    Ok(map)
}

/// JSON as the Python value `json.loads` gives.
pub fn from_json<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (value.to_string(),))
}

/// A float32 NumPy array.
pub fn array<'py>(py: Python<'py>, values: &[f32]) -> PyResult<Bound<'py, PyAny>> {
    py.import("numpy")?.call_method1("asarray", (values.to_vec(), "float32"))
}

/// Log-probs into `out` as `{prefix}_chosen` and `{prefix}_rejected`.
pub fn put_logps(out: &Bound<'_, PyDict>, prefix: &str, logps: &Logps) -> PyResult<()> {
    out.set_item(format!("{prefix}_chosen"), array(out.py(), &logps.chosen)?)?;
    out.set_item(format!("{prefix}_rejected"), array(out.py(), &logps.rejected)?)
}

/// Per-pair metrics into `out`, one array each.
pub fn put_metrics(out: &Bound<'_, PyDict>, metrics: &PairMetrics) -> PyResult<()> {
    let py = out.py();
    out.set_item("losses", array(py, &metrics.loss)?)?;
    out.set_item("rewards_chosen", array(py, &metrics.reward_chosen)?)?;
    out.set_item("rewards_rejected", array(py, &metrics.reward_rejected)?)?;
    out.set_item("margins", array(py, &metrics.margin)?)?;
    out.set_item("accuracies", array(py, &metrics.accuracy)?)?;
    out.set_item("accuracy", metrics.mean_accuracy())
}
