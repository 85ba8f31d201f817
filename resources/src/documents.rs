//! Multi-document YAML into individual objects, each remembering where it was in the file.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ObjectError, ObjectRef};
use crate::strict;

/// One Kubernetes object of a file.
#[derive(Clone, Debug)]
pub struct Document {
    /// Where the object is: its document (from 1) and, inside a `kind: List`, its item.
    pub position: ObjectRef,
    pub value: Value,
}

impl Document {
    pub fn api_version(&self) -> &str {
        self.value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }

    /// The object's name for messages: `Kind ns/name` when it has a kind and a name, its
    /// position otherwise. `default_namespace` is used for namespaced kinds without one.
    pub fn object_ref(&self, default_namespace: Option<&str>) -> ObjectRef {
        object_ref(&self.value, default_namespace).unwrap_or_else(|| self.position.clone())
    }
}

/// `Kind ns/name` of an object value, if it has a kind and a name.
pub fn object_ref(value: &Value, default_namespace: Option<&str>) -> Option<ObjectRef> {
    let kind = value.get("kind").and_then(Value::as_str)?;
    let meta = value.get("metadata")?;
    let name = meta.get("name").and_then(Value::as_str)?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .or(default_namespace)
        .map(str::to_string);
    Some(ObjectRef::Named {
        kind: kind.to_string(),
        namespace,
        name: name.to_string(),
    })
}

/// Splits a multi-document YAML text into objects. Empty documents are skipped and the
/// items of a `kind: List` (as `kubectl get -o yaml` prints) are taken one by one.
/// Returns the objects read and the errors met; YAML that cannot be parsed stops the reading
/// (the parser cannot resynchronise), which the error says.
pub fn split(text: &str) -> (Vec<Document>, Vec<ObjectError>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let position = ObjectRef::Document { index, item: None };
        let value = match strict::yaml_value(de) {
            Ok((v, duplicates)) if !duplicates.is_empty() => {
                // A second key replaces the first: refuse the object, as the apiserver does.
                let object = object_ref(&v, None).unwrap_or_else(|| position.clone());
                for path in duplicates {
                    errors.push(ObjectError::new(object.clone(), path, "duplicate key"));
                }
                continue;
            }
            Ok((v, _)) => v,
            Err(e) => {
                errors.push(ObjectError::new(
                    position,
                    "",
                    format!("unparsable YAML: {e}"),
                ));
                break;
            }
        };
        match value {
            Value::Null => {}
            Value::Object(ref map) => {
                let is_list = map
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k == "List" || k.ends_with("List"))
                    && map.contains_key("items");
                if is_list {
                    match map.get("items") {
                        Some(Value::Array(items)) => {
                            for (j, item) in items.iter().enumerate() {
                                docs.push(Document {
                                    position: ObjectRef::Document {
                                        index,
                                        item: Some(j),
                                    },
                                    value: item.clone(),
                                })
                            }
                        }
                        Some(Value::Null) => {}
                        _ => errors.push(ObjectError::new(
                            position,
                            "items",
                            "expected a list of objects",
                        )),
                    }
                } else {
                    docs.push(Document { position, value })
                }
            }
            _ => errors.push(ObjectError::new(
                position,
                "",
                "expected a Kubernetes object (a mapping with apiVersion, kind and metadata)",
            )),
        }
    }
    (docs, errors)
}

/// Deserializes an object value into a typed struct, strictly ([`strict::decode`]): a type
/// error or an unknown field names the field's path.
pub fn typed<T: DeserializeOwned>(value: &Value, object: &ObjectRef) -> Result<T, ObjectError> {
    strict::decode(value).map_err(|e| ObjectError::new(object.clone(), e.path, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let (docs, errs) = split("a: 1\n---\n# only a comment\n---\nkind: X\nb: 2\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[1].position,
            ObjectRef::Document {
                index: 3,
                item: None
            }
        );
        assert_eq!(docs[1].kind(), "X");
    }

    #[test]
    fn list_items_are_objects_of_their_own() {
        let (docs, errs) = split("apiVersion: v1\nkind: List\nitems:\n- {kind: A}\n- {kind: B}\n");
        assert!(errs.is_empty());
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].kind(), "B");
        assert_eq!(docs[1].position.to_string(), "document 1 items[1]");
    }

    #[test]
    fn unparsable_yaml_names_the_document() {
        let (docs, errs) = split("kind: A\n---\nkind: [unclosed\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(msg.starts_with("document 2: unparsable YAML"), "{msg}");
    }

    #[test]
    fn a_scalar_document_is_not_an_object() {
        let (_, errs) = split("just text\n");
        assert!(errs[0].to_string().contains("expected a Kubernetes object"));
    }

    #[test]
    fn type_errors_carry_the_field_path() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct S {
            spec: Inner,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            ports: Vec<u16>,
        }
        let v = serde_json::json!({"spec": {"ports": [1, "x"]}});
        let obj = ObjectRef::Document {
            index: 1,
            item: None,
        };
        let e = typed::<S>(&v, &obj).unwrap_err();
        assert_eq!(e.errors[0].path, "spec.ports[1]");
    }
}
