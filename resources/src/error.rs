//! Errors that name the file, the object and the field, so that a user can find the mistake.

use std::fmt;

/// Which object a problem is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectRef {
    /// An object that has a kind and a name: `NetworkPolicy shop/api`, `ClusterNetworkPolicy pci`.
    Named {
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// An object that cannot be named (unparsable, no kind or name): its place in the file.
    /// `index` counts YAML documents from 1; `item` is the index in a `kind: List`.
    Document { index: usize, item: Option<usize> },
    /// One probe of a `probes.yaml`, as written.
    Probe { index: usize, text: String },
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Named {
                kind,
                namespace: Some(ns),
                name,
            } => write!(f, "{kind} {ns}/{name}"),
            ObjectRef::Named {
                kind,
                namespace: None,
                name,
            } => write!(f, "{kind} {name}"),
            ObjectRef::Document { index, item: None } => write!(f, "document {index}"),
            ObjectRef::Document {
                index,
                item: Some(item),
            } => write!(f, "document {index} items[{item}]"),
            ObjectRef::Probe { index, text } => write!(f, "probes[{index}] ({text})"),
        }
    }
}

/// One problem with one field of an object. `path` is empty for problems with the object
/// as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with one object. Never empty when returned as an error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ObjectError {
    pub object: ObjectRef,
    pub errors: Vec<FieldError>,
}

impl ObjectError {
    pub fn new(object: ObjectRef, path: impl Into<String>, message: impl Into<String>) -> Self {
        ObjectError {
            object,
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// One line per field error: `<object>: <path>: <message>`.
impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {e}", self.object)?;
        }
        Ok(())
    }
}

/// Why a file could not be loaded. A file with any invalid object is rejected whole.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", prefix_lines(file, errors))]
    Invalid {
        file: String,
        errors: Vec<ObjectError>,
    },
}

impl LoadError {
    /// `value` if there are no errors; otherwise every error, so that a file is taken whole
    /// or not at all.
    pub(crate) fn all_or_nothing<T>(
        file: &str,
        value: T,
        errors: Vec<ObjectError>,
    ) -> Result<T, LoadError> {
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(LoadError::Invalid {
                file: file.to_string(),
                errors,
            })
        }
    }

    /// Reads a file and hands its name (as given) and text to `parse`.
    pub(crate) fn read_then<T>(
        path: &std::path::Path,
        parse: impl FnOnce(&str, &str) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        let text = Self::read_text(path)?;
        parse(&path.display().to_string(), &text)
    }

    /// A file's text ([`crate::strict::text_of`]: a BOM dropped, a bad byte located).
    pub(crate) fn read_text(path: &std::path::Path) -> Result<String, LoadError> {
        let read_err = |source| LoadError::Read {
            file: path.display().to_string(),
            source,
        };
        let bytes = std::fs::read(path).map_err(read_err)?;
        crate::strict::text_of(bytes).map_err(|message| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                message,
            ))
        })
    }

    pub fn file(&self) -> &str {
        match self {
            LoadError::Read { file, .. } | LoadError::Invalid { file, .. } => file,
        }
    }
}

fn prefix_lines(file: &str, errors: &[ObjectError]) -> String {
    let mut lines = Vec::new();
    for e in errors {
        for line in e.to_string().lines() {
            lines.push(format!("{file}: {line}"));
        }
    }
    lines.join("\n")
}

/// Collects the field errors of one object so that all of them are reported at once.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The error for an object known to be invalid (an empty list gets a generic message).
    pub fn fail(mut self, object: &ObjectRef) -> ObjectError {
        if self.0.is_empty() {
            self.add("", "invalid");
        }
        ObjectError {
            object: object.clone(),
            errors: self.0,
        }
    }

    pub fn finish<T>(self, object: &ObjectRef, value: T) -> Result<T, ObjectError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ObjectError {
                object: object.clone(),
                errors: self.0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_file_lists_every_error_with_file_and_object() {
        let np = ObjectRef::Named {
            kind: "NetworkPolicy".into(),
            namespace: Some("shop".into()),
            name: "api".into(),
        };
        let err = LoadError::Invalid {
            file: "policies.yaml".into(),
            errors: vec![
                ObjectError {
                    object: np,
                    errors: vec![
                        FieldError {
                            path: "spec.ingress[0].ports[1].endPort".into(),
                            message: "70 is below port 80".into(),
                        },
                        FieldError {
                            path: String::new(),
                            message: "whole".into(),
                        },
                    ],
                },
                ObjectError::new(
                    ObjectRef::Document {
                        index: 3,
                        item: None,
                    },
                    "",
                    "bad yaml",
                ),
            ],
        };
        assert_eq!(
            err.to_string(),
            "policies.yaml: NetworkPolicy shop/api: spec.ingress[0].ports[1].endPort: 70 is below port 80\n\
             policies.yaml: NetworkPolicy shop/api: whole\n\
             policies.yaml: document 3: bad yaml"
        );
    }
}
