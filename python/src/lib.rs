//! The Python module `safedpo`: the Rust [`safedpo::Engine`] front door as `safedpo.Engine`, and
//! TRL-style training as `safedpo.train(config)`. Results come back as dicts of float32 NumPy arrays;
//! a Rust error becomes a Python exception with the Rust message. Long calls (loading, forwards,
//! steps, training) release the GIL. The types are in `safedpo.pyi`.

mod convert;

use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};

use convert::{
    from_json, pairs, put_example_metrics, put_logps, put_metrics, runtime_error, to_json, to_json_map, value_error,
};
use safedpo::{AdamWConfig, DecoderConfig, DeviceKind, Engine, Objective, PairLogps, Precision, StepReport};

/// A policy (trainable) and a reference (frozen) on one device: log-probs, losses of any objective,
/// training steps and checkpoints. See `safedpo.pyi` for every method.
#[pyclass(name = "Engine", module = "safedpo")]
struct PyEngine {
    engine: Mutex<Engine>,
}

impl PyEngine {
    /// Runs `work` on the engine with the GIL released, the engine's lock taken without it too: a
    /// thread that waited for the lock holding the GIL would block one that holds the lock and
    /// needs the GIL back.
    fn with<T: Send>(&self, py: Python<'_>, work: impl FnOnce(&mut Engine) -> T + Send) -> PyResult<T> {
        py.detach(|| match self.engine.lock() {
            Ok(mut engine) => Ok(work(&mut engine)),
            Err(_) => Err("the engine failed in another thread"),
        })
        .map_err(PyRuntimeError::new_err)
    }

    /// [`Self::with`] for work that can fail: its error as `RuntimeError`.
    fn run<T: Send>(&self, py: Python<'_>, work: impl FnOnce(&mut Engine) -> anyhow::Result<T> + Send) -> PyResult<T> {
        self.with(py, work)?.map_err(runtime_error)
    }

    /// The objective a loss call names (with `params`); none: the training objective (with
    /// `params`, its name with them).
    fn objective_or_training(
        &self,
        py: Python<'_>,
        objective: Option<&Bound<'_, PyAny>>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Objective> {
        match objective {
            Some(name) => self::objective(name, params),
            None if params.is_some_and(|p| !p.is_empty()) => {
                self::objective(&self.with(py, |e| e.objective().name())?.into_pyobject(py)?.into_any(), params)
            }
            None => self.with(py, |e| e.objective().clone()),
        }
    }
}

/// An objective from its name (or list of names) and parameters, as the config's `[objective]`.
fn objective(name: &Bound<'_, PyAny>, params: Option<&Bound<'_, PyDict>>) -> PyResult<Objective> {
    let mut table = Map::new();
    table.insert("name".into(), to_json(name)?);
    if let Some(params) = params {
        table.extend(to_json_map(params)?);
    }
    serde_json::from_value(Value::Object(table)).map_err(|e| PyValueError::new_err(format!("objective: {e}")))
}

/// A model configuration: an HF `config.json` dict. A GPT-2 (`model_type` absent or `gpt2`) starts
/// from the tiny default's config, so that it may give only what differs; none: the tiny default, a
/// GPT-2 over the byte tokenizer.
fn decoder_config(config: Option<&Bound<'_, PyDict>>) -> PyResult<DecoderConfig> {
    let tiny = DecoderConfig::gpt2(258, 128, 32, 2, 2);
    let Some(config) = config else {
        return Ok(tiny);
    };
    let given = to_json_map(config)?;
    let is_gpt2 = given.get("model_type").is_none_or(|t| t.as_str() == Some("gpt2"));
    let mut map = match serde_json::from_str::<Value>(&tiny.to_hf_json()) {
        Ok(Value::Object(base)) if is_gpt2 => base,
        _ => Map::new(),
    };
    if given.contains_key("n_positions") {
        map.remove("n_ctx");
    }
    map.extend(given);
    DecoderConfig::from_hf_object(&map).map_err(value_error)
}

fn logps_dict<'py>(py: Python<'py>, logps: &PairLogps) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    put_logps(&out, "policy", &logps.policy)?;
    if let Some(reference) = &logps.reference {
        put_logps(&out, "reference", reference)?;
    }
    Ok(out)
}

fn step_dict<'py>(py: Python<'py>, report: &StepReport) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("step", report.step)?;
    out.set_item("loss", report.loss)?;
    out.set_item("grad_norm", report.grad_norm)?;
    out.set_item("lr", report.lr)?;
    put_logps(&out, "policy", &report.policy_logps)?;
    put_metrics(&out, &report.metrics)?;
    Ok(out)
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (device = "auto", precision = None))]
    fn new(py: Python<'_>, device: &str, precision: Option<&str>) -> PyResult<Self> {
        let device: DeviceKind = device.parse().map_err(value_error)?;
        let precision = precision.map(str::parse::<Precision>).transpose().map_err(value_error)?;
        let engine = py
            .detach(|| match precision {
                Some(precision) => Engine::with_precision(device, precision),
                None => Engine::new(device),
            })
            .map_err(runtime_error)?;
        Ok(Self { engine: Mutex::new(engine) })
    }

    #[getter]
    fn device(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |e| e.device().to_string())
    }

    #[getter]
    fn precision(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(match self.with(py, |e| e.precision())? {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }

    #[getter]
    fn fallback_reason(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with(py, |e| e.fallback_reason().map(str::to_string))
    }

    #[getter]
    fn backend_name(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |e| e.backend_name())
    }

    #[getter]
    fn steps_taken(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |e| e.steps_taken())
    }

    #[getter]
    fn policy_config<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let text = self.with(py, |e| e.policy_config().map(DecoderConfig::to_hf_json))?;
        text.map(|text| py.import("json")?.call_method1("loads", (text,))).transpose()
    }

    fn load_policy(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        self.run(py, |e| e.load_policy(&path))
    }

    fn load_reference(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        self.run(py, |e| e.load_reference(&path))
    }

    #[pyo3(signature = (config = None, seed = 0))]
    fn random_policy(&self, py: Python<'_>, config: Option<&Bound<'_, PyDict>>, seed: u64) -> PyResult<()> {
        let config = decoder_config(config)?;
        self.run(py, |e| e.random_policy(config, seed))
    }

    #[pyo3(signature = (config = None, seed = 0))]
    fn random_reference(&self, py: Python<'_>, config: Option<&Bound<'_, PyDict>>, seed: u64) -> PyResult<()> {
        let config = decoder_config(config)?;
        self.run(py, |e| e.random_reference(config, seed))
    }

    fn reference_from_policy(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, Engine::reference_from_policy)
    }

    fn set_template(&self, py: Python<'_>, template: &str) -> PyResult<()> {
        self.with(py, |e| e.set_template(template))?.map_err(value_error)
    }

    #[pyo3(signature = (max_len = None))]
    fn set_max_len(&self, py: Python<'_>, max_len: Option<usize>) -> PyResult<()> {
        self.with(py, |e| e.set_max_len(max_len))
    }

    fn tokenize<'py>(&self, py: Python<'py>, pairs: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let pairs = convert::pairs(pairs)?;
        let tokens = self.run(py, |e| e.tokenize(&pairs))?;
        tokens
            .iter()
            .map(|t| {
                let out = PyDict::new(py);
                out.set_item("prompt", &t.prompt)?;
                out.set_item("chosen", &t.chosen)?;
                out.set_item("rejected", &t.rejected)?;
                Ok(out)
            })
            .collect()
    }

    fn logps<'py>(&self, py: Python<'py>, pairs: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let pairs = convert::pairs(pairs)?;
        let logps = self.run(py, |e| e.logps(&pairs))?;
        logps_dict(py, &logps)
    }

    #[pyo3(signature = (pairs, objective = None, **params))]
    fn loss<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
        objective: Option<&Bound<'py, PyAny>>,
        params: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let pairs = convert::pairs(pairs)?;
        let objective = self.objective_or_training(py, objective, params)?;
        let report = self.run(py, |e| e.loss(&pairs, &objective))?;
        let out = logps_dict(py, &report.logps)?;
        out.set_item("objective", report.objective.to_string())?;
        out.set_item("loss", report.loss)?;
        put_metrics(&out, &report.metrics)?;
        Ok(out)
    }

    #[pyo3(signature = (examples, objective = None, **params))]
    fn unpaired_loss<'py>(
        &self,
        py: Python<'py>,
        examples: &Bound<'py, PyAny>,
        objective: Option<&Bound<'py, PyAny>>,
        params: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let examples = convert::examples(examples)?;
        let objective = self.objective_or_training(py, objective, params)?;
        let report = self.run(py, |e| e.unpaired_loss(&examples, &objective))?;
        let out = PyDict::new(py);
        out.set_item("objective", report.objective.to_string())?;
        out.set_item("loss", report.loss)?;
        out.set_item("kl", report.kl)?;
        put_example_metrics(&out, &report.metrics)?;
        Ok(out)
    }

    #[pyo3(signature = (examples, lr = None))]
    fn unpaired_train_step<'py>(
        &self,
        py: Python<'py>,
        examples: &Bound<'py, PyAny>,
        lr: Option<f32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let examples = convert::examples(examples)?;
        let report = self.run(py, |e| match lr {
            Some(lr) => {
                let tokens = e.tokenize_examples(&examples)?;
                e.unpaired_train_step_tokens(&[&tokens], lr)
            }
            None => e.unpaired_train_step(&examples),
        })?;
        let out = PyDict::new(py);
        out.set_item("step", report.step)?;
        out.set_item("loss", report.loss)?;
        out.set_item("kl", report.kl)?;
        out.set_item("grad_norm", report.grad_norm)?;
        out.set_item("lr", report.lr)?;
        put_example_metrics(&out, &report.metrics)?;
        Ok(out)
    }

    #[pyo3(signature = (objective, **params))]
    fn set_objective(
        &self,
        py: Python<'_>,
        objective: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let objective = self::objective(objective, params)?;
        self.with(py, |e| e.set_objective(objective))?.map_err(value_error)
    }

    #[getter]
    fn objective(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |e| e.objective().to_string())
    }

    #[pyo3(signature = (lr = 1e-5, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.0, grad_clip = 1.0))]
    fn set_optimizer(
        &self,
        py: Python<'_>,
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
        grad_clip: f32,
    ) -> PyResult<()> {
        let config = AdamWConfig { lr, beta1: betas.0, beta2: betas.1, eps, weight_decay };
        self.with(py, |e| e.set_optimizer(config, grad_clip))?.map_err(value_error)
    }

    #[pyo3(signature = (pairs, lr = None))]
    fn train_step<'py>(
        &self,
        py: Python<'py>,
        pairs: &Bound<'py, PyAny>,
        lr: Option<f32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let pairs = convert::pairs(pairs)?;
        let report = self.run(py, |e| match lr {
            Some(lr) => e.train_step_at(&pairs, lr),
            None => e.train_step(&pairs),
        })?;
        step_dict(py, &report)
    }

    #[pyo3(signature = (micro_batches, lr = None))]
    fn accumulated_step<'py>(
        &self,
        py: Python<'py>,
        micro_batches: &Bound<'py, PyAny>,
        lr: Option<f32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let micro: Vec<_> = micro_batches.try_iter()?.map(|m| pairs(&m?)).collect::<PyResult<_>>()?;
        let report = self.run(py, |e| match lr {
            Some(lr) => {
                let tokens = micro.iter().map(|m| e.tokenize(m)).collect::<anyhow::Result<Vec<_>>>()?;
                let views: Vec<&[safedpo::TokenizedPair]> = tokens.iter().map(Vec::as_slice).collect();
                e.accumulated_step_tokens(&views, lr)
            }
            None => e.accumulated_step(&micro),
        })?;
        step_dict(py, &report)
    }

    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        self.run(py, |e| e.save(&path))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |e| {
            format!("safedpo.Engine(device={:?}, backend={:?})", e.device().to_string(), e.backend_name())
        })
    }
}

/// Preference training from a TRL-style `DPOConfig` dict; returns the run's summary.
#[pyfunction]
fn train<'py>(py: Python<'py>, config: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyAny>> {
    let config = to_json_map(config)?;
    let run = safedpo::engine::read_dpo_config(&config).map_err(value_error)?;
    let summary = py
        .detach(|| safedpo::engine::train_with(&run.overrides, safedpo::train::Task::Preference, &run.options))
        .map_err(runtime_error)?;
    let out = summary.to_json();
    from_json(py, &out)
}

#[pymodule]
#[pyo3(name = "safedpo")]
fn safedpo_python(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
