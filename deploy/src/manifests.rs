//! Rendered manifests: the documents of a `helm template` output, found by kind and name.

use serde_yaml::Value;

/// The objects of a multi-document YAML stream (empty documents left out).
pub fn parse(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

pub fn kind(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap_or_default()
}

pub fn name(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_default()
}

/// The one object of `kind` named `name`; panics naming what is there otherwise.
pub fn find<'a>(objects: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == kind_ && name(o) == name_)
        .unwrap_or_else(|| {
            let have: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", kind(o), name(o)))
                .collect();
            panic!("no {kind_}/{name_} in the rendered chart; it has {have:?}")
        })
}

/// Every object of `kind`.
pub fn all<'a>(objects: &'a [Value], kind_: &'a str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| kind(o) == kind_)
}

/// The strings of a YAML sequence (empty if it is not one).
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}
