use std::path::PathBuf;

/// Why the lab could not start or an operation on it failed. Startup failures carry the tail
/// of the failing component's log, because that is where the reason is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kube tools missing: {0} (run scripts/tools.sh)")]
    ToolsMissing(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Pki(String),
    #[error("{component} exited during startup ({status}); last lines of {log}:\n{tail}")]
    Exited {
        component: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("timed out after {seconds}s waiting for {what}; last lines of {log}:\n{tail}")]
    Timeout {
        what: String,
        seconds: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("YAML document {index} of {source_name}: {message}")]
    Yaml {
        source_name: String,
        index: usize,
        message: String,
    },
    #[error("kubectl {args}: {message}")]
    Kubectl { args: String, message: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
