//! Objectives as text: `FromStr`/`Display` (`safedpo:beta=0.2,delta=5`) and serde (a table tagged
//! with `name`, as the run configuration's `[objective]` holds it).

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::objectives::{Objective, ObjectiveSpec};

/// Parses `name` or `name:key=value,key=value` (e.g. `safedpo:beta=0.2,delta=5`); parameters not
/// given keep their defaults. The result is validated.
impl FromStr for Objective {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, overrides) = match s.split_once(':') {
            Some((name, rest)) => (name, Some(rest)),
            None => (s, None),
        };
        let mut objective = Objective::default_for(name)?;
        for item in overrides.into_iter().flat_map(|rest| rest.split(',')).filter(|item| !item.trim().is_empty()) {
            let (key, value) =
                item.split_once('=').with_context(|| format!("objective {s:?}: expected key=value, got {item:?}"))?;
            let value: f64 = value
                .trim()
                .parse()
                .with_context(|| format!("objective {s:?}: {} = {value:?} is not a number", key.trim()))?;
            objective.set_param(key.trim(), value)?;
        }
        objective.validate()?;
        Ok(objective)
    }
}

/// Writes the `FromStr` syntax with every parameter, e.g. `safedpo:beta=0.1,delta=10`.
impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        for (i, (key, value)) in self.params().into_iter().enumerate() {
            write!(f, "{}{key}={value}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// A table tagged with `name`: `{name = "safedpo", beta = 0.1, delta = 10.0}`, every parameter
/// written.
impl Serialize for Objective {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let params = self.params();
        let mut map = serializer.serialize_map(Some(1 + params.len()))?;
        map.serialize_entry("name", self.name())?;
        for (key, value) in params {
            map.serialize_entry(key, &value)?;
        }
        map.end()
    }
}

/// Reads the table `Serialize` writes. `name` may be an alias and defaults to `safedpo`; parameters
/// left out take the objective's defaults; a parameter the objective does not take is an error.
/// Bounds are checked by [`Objective::validate`], not here.
impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectiveVisitor)
    }
}

struct ObjectiveVisitor;

impl<'de> Visitor<'de> for ObjectiveVisitor {
    type Value = Objective;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an objective: a table with `name` ({}) and its parameters", Objective::name_list())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Objective, A::Error> {
        // The keys may come in any order (TOML's in sorted order, `name` after most parameters).
        let mut spec = None;
        let mut given: Vec<(String, f64)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "name" {
                spec = Some(map.next_value_seed(NameSeed)?);
            } else {
                given.push((key, map.next_value()?));
            }
        }
        let spec = spec.unwrap_or_else(|| Objective::default().spec());
        let mut values: Vec<f64> = spec.params.iter().map(|p| p.default).collect();
        for (key, value) in given {
            match spec.params.iter().position(|p| p.name == key) {
                Some(index) => values[index] = value,
                None => return Err(de::Error::custom(spec.not_a_parameter(&key))),
            }
        }
        Ok(spec.build(&values))
    }
}

/// Reads an objective's name; an unknown one is an error on the value.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = &'static ObjectiveSpec;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<Self::Value, D::Error> {
        let name = String::deserialize(deserializer)?;
        Objective::spec_of(&name).map_err(de::Error::custom)
    }
}
