//! The lab's files: its temp dir and kubeconfigs.

use std::fs;
use std::path::Path;

use base64::Engine;

use crate::error::{io, Result};
use crate::pki::CertPair;

pub(crate) fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(io(format!("write {}", path.display())))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A kubeconfig with the CA and a client certificate inline.
pub(crate) fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str, client: &CertPair) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubelab\n  cluster:\n    server: {url}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    \
         client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: kubelab\n  \
         context:\n    cluster: kubelab\n    user: {user}\ncurrent-context: kubelab\n",
        ca = b64(ca_pem),
        cert = b64(&client.cert_pem),
        key = b64(&client.key_pem),
    )
}

pub(crate) const DIR_PREFIX: &str = "palisade-kubelab-";

/// Removes the temp dirs of labs whose process is gone: a killed test process takes its
/// children with it (`PR_SET_PDEATHSIG`) but cannot remove its files.
pub(crate) fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
