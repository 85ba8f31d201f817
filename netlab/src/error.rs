//! The lab's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The cluster cannot be turned into a lab; names the object and field at fault.
    #[error("{object}: field {field}: {message}")]
    InvalidCluster {
        object: String,
        field: &'static str,
        message: String,
    },
    /// A pod, node or probe refers to something the lab does not have.
    #[error("{0}")]
    NotFound(String),
    /// Building a lab needs root (network namespaces, veths, sysctls).
    #[error("building a network-namespace lab needs root (effective uid is {0})")]
    NotRoot(u32),
    /// An `ip` command failed; `stderr` carries iproute2's own message.
    #[error("`{command}` failed in {netns}: {stderr}")]
    Command {
        netns: String,
        command: String,
        stderr: String,
    },
    /// Entering a namespace, writing a sysctl or creating a socket failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A sysctl file could not be written.
    #[error("sysctl {path} in {netns}: {source}")]
    Sysctl {
        netns: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        object: impl Into<String>,
        field: &'static str,
        message: impl Into<String>,
    ) -> Self {
        LabError::InvalidCluster {
            object: object.into(),
            field,
            message: message.into(),
        }
    }
}
