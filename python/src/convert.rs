//! Python values in and out: pairs and unpaired examples (dicts or tuples), plain values as JSON (configs, objective
//! parameters), results as dicts of NumPy arrays, and errors as exceptions carrying the Rust message.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

use safedpo::{ExampleMetrics, Logps, PairMetrics, PreferencePair, UnpairedExample};

/// A Rust error as `RuntimeError`, with its whole chain of context (`a: b: c`).
pub fn runtime_error(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// A Rust error about the arguments as `ValueError`.
pub fn value_error(e: anyhow::Error) -> PyErr {
    PyValueError::new_err(format!("{e:#}"))
}

/// A required text field of item `what` ("pair 3").
fn text(what: &str, value: Option<Bound<'_, PyAny>>, field: &str) -> PyResult<String> {
    let value = value.ok_or_else(|| PyValueError::new_err(format!("{what}: no `{field}`")))?;
    value.extract::<String>().map_err(|_| PyTypeError::new_err(format!("{what}: `{field}` must be a str")))
}

/// A bool field of item `what`, `false` when absent.
fn flag(what: &str, value: Option<Bound<'_, PyAny>>, field: &str) -> PyResult<bool> {
    match value {
        None => Ok(false),
        Some(v) => v.extract::<bool>().map_err(|_| PyTypeError::new_err(format!("{what}: `{field}` must be a bool"))),
    }
}

/// Fails on a key of `dict` outside `keys`, naming them.
fn known_keys(what: &str, dict: &Bound<'_, PyDict>, keys: &[&str], kind: &str) -> PyResult<()> {
    for key in dict.keys() {
        let key: String = key.extract()?;
        if !keys.contains(&key.as_str()) {
            return Err(PyValueError::new_err(format!(
                "{what}: unknown key `{key}` (a {kind} has {})",
                keys.join(", ")
            )));
        }
    }
    Ok(())
}

/// One pair: a dict with `prompt`, `chosen`, `rejected` and optional `chosen_unsafe` /
/// `rejected_unsafe`, or a tuple `(prompt, chosen, rejected[, chosen_unsafe, rejected_unsafe])`.
fn pair(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<PreferencePair> {
    let what = &format!("pair {i}");
    if let Ok(dict) = obj.cast::<PyDict>() {
        known_keys(what, dict, &["prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe"], "pair")?;
        let pair = PreferencePair::new(
            text(what, dict.get_item("prompt")?, "prompt")?,
            text(what, dict.get_item("chosen")?, "chosen")?,
            text(what, dict.get_item("rejected")?, "rejected")?,
        );
        let (chosen_unsafe, rejected_unsafe) = (
            flag(what, dict.get_item("chosen_unsafe")?, "chosen_unsafe")?,
            flag(what, dict.get_item("rejected_unsafe")?, "rejected_unsafe")?,
        );
        return Ok(pair.with_safety(chosen_unsafe, rejected_unsafe));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        let n = tuple.len();
        if n != 3 && n != 5 {
            return Err(PyValueError::new_err(format!(
                "{what}: a tuple holds (prompt, chosen, rejected[, chosen_unsafe, rejected_unsafe]), got {n} items"
            )));
        }
        let item = |k: usize| tuple.get_item(k).ok();
        let pair = PreferencePair::new(
            text(what, item(0), "prompt")?,
            text(what, item(1), "chosen")?,
            text(what, item(2), "rejected")?,
        );
        return Ok(if n == 5 {
            pair.with_safety(flag(what, item(3), "chosen_unsafe")?, flag(what, item(4), "rejected_unsafe")?)
        } else {
            pair
        });
    }
    Err(PyTypeError::new_err(format!("{what}: expected a dict or a tuple, got {}", obj.get_type().name()?)))
}

/// A sequence of pairs.
pub fn pairs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PreferencePair>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err("expected a list of pairs"));
    }
    obj.try_iter()?.enumerate().map(|(i, item)| pair(i, &item?)).collect()
}

/// One unpaired example (TRL's KTO rows): a dict with `prompt`, `completion`, `label` (True:
/// desirable) and optional `completion_unsafe`, or a tuple `(prompt, completion, label[,
/// completion_unsafe])`.
fn example(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<UnpairedExample> {
    let what = &format!("example {i}");
    let required = |value: Option<Bound<'_, PyAny>>, field: &str| -> PyResult<bool> {
        match value {
            None => Err(PyValueError::new_err(format!("{what}: no `{field}`"))),
            some => flag(what, some, field),
        }
    };
    if let Ok(dict) = obj.cast::<PyDict>() {
        known_keys(what, dict, &["prompt", "completion", "label", "completion_unsafe"], "example")?;
        let example = UnpairedExample::new(
            text(what, dict.get_item("prompt")?, "prompt")?,
            text(what, dict.get_item("completion")?, "completion")?,
            required(dict.get_item("label")?, "label")?,
        );
        return Ok(example.with_unsafe(flag(what, dict.get_item("completion_unsafe")?, "completion_unsafe")?));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        let n = tuple.len();
        if n != 3 && n != 4 {
            return Err(PyValueError::new_err(format!(
                "{what}: a tuple holds (prompt, completion, label[, completion_unsafe]), got {n} items"
            )));
        }
        let item = |k: usize| tuple.get_item(k).ok();
        let example = UnpairedExample::new(
            text(what, item(0), "prompt")?,
            text(what, item(1), "completion")?,
            required(item(2), "label")?,
        );
        return Ok(example.with_unsafe(flag(what, item(3), "completion_unsafe")?));
    }
    Err(PyTypeError::new_err(format!("{what}: expected a dict or a tuple, got {}", obj.get_type().name()?)))
}

/// A sequence of unpaired examples.
pub fn examples(obj: &Bound<'_, PyAny>) -> PyResult<Vec<UnpairedExample>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err("expected a list of examples"));
    }
    obj.try_iter()?.enumerate().map(|(i, item)| example(i, &item?)).collect()
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

/// Per-example metrics of an objective on unpaired examples into `out`, one array each.
pub fn put_example_metrics(out: &Bound<'_, PyDict>, metrics: &ExampleMetrics) -> PyResult<()> {
    let py = out.py();
    out.set_item("losses", array(py, &metrics.loss)?)?;
    out.set_item("rewards", array(py, &metrics.reward)?)?;
    out.set_item("policy_logps", array(py, &metrics.policy_logps)?)
}
