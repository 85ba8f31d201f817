//! The command lines of the lab's components: every flag the control plane needs on
//! loopback, in one place.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::lab::{Options, SERVICE_ACCOUNT_ISSUER};

/// The lab's ports on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
}

/// The first address of a CIDR: the `kubernetes` Service's ClusterIP.
pub(crate) fn first_service_ip(cidr: &str) -> Option<IpAddr> {
    let net: Ipv4Addr = cidr.split('/').next()?.parse().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(u32::from(net) + 1)))
}

pub(crate) fn etcd(root: &Path, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=kubelab".to_string(),
        format!("--data-dir={}", root.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=kubelab={peer}"),
        // A test cluster's data dies with it; fsync only slows every write.
        "--unsafe-no-fsync=true".to_string(),
    ]
}

pub(crate) fn apiserver(root: &Path, ports: &Ports, opts: &Options) -> Vec<String> {
    let p = |f: &str| root.join("pki").join(f).display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        "--bind-address=127.0.0.1".to_string(),
        "--advertise-address=127.0.0.1".to_string(),
        format!("--secure-port={}", ports.apiserver),
        format!("--cert-dir={}", root.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        "--authorization-mode=RBAC".to_string(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!(
            "--api-audiences={SERVICE_ACCOUNT_ISSUER},{}",
            opts.token_audience
        ),
        format!("--service-cluster-ip-range={}", opts.service_cidr),
        // With the default reconciler the 1.37 apiserver fails its readiness on loopback.
        "--endpoint-reconciler-type=none".to_string(),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
    ]
}

/// Only the controllers a kubelet-less lab needs: namespaces finish deleting, and get their
/// `default` ServiceAccount (which pod admission requires); Services get the EndpointSlices
/// that kube-proxy programs from, from the pods they select, as on a real cluster.
pub(crate) fn controller_manager(root: &Path, ports: &Ports, kubeconfig: &Path) -> Vec<String> {
    let kubeconfig = kubeconfig.display();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        // Its own listener needs no front-proxy CA; looking one up only logs errors.
        "--authentication-skip-lookup=true".to_string(),
        "--controllers=namespace,serviceaccount,garbagecollector,endpointslice".to_string(),
        "--leader-elect=false".to_string(),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={}", ports.controller_manager),
        format!("--cert-dir={}", root.join("kcm-certs").display()),
        "--profiling=false".to_string(),
    ]
}
