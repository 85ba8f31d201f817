//! The lab's certificate authority: the apiserver's serving certificate, client certificates
//! (the admin is in `system:masters`), and the ServiceAccount token signing key. All ECDSA
//! P-256, generated fresh for every lab, so nothing secret is ever on disk outside its temp dir.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// A certificate with its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A throwaway CA that signs the lab's certificates; tests may sign their own with it (for
/// example the controller's serving certificate).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn pki(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(pki)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(pki)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, dns_names: &[&str], ips: &[IpAddr]) -> Result<CertPair> {
        let mut params = CertificateParams::default();
        let cn = dns_names.first().copied().unwrap_or("palisade-kubelab");
        params.distinguished_name.push(DnType::CommonName, cn);
        for name in dns_names {
            let name = (*name).try_into().map_err(pki)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes reads the user from the CN and groups from O.
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<CertPair> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertPair> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(pki)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The key pair that signs ServiceAccount tokens (private half) and verifies them (public).
pub struct SigningKey {
    pub private_pem: String,
    pub public_pem: String,
}

impl SigningKey {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(pki)?;
        Ok(Self {
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        })
    }
}

/// Names the apiserver's serving certificate must carry: loopback, and the in-cluster names
/// of the `kubernetes` Service, so clients that use either verify it.
pub(crate) fn apiserver_names() -> (Vec<&'static str>, Vec<IpAddr>) {
    (
        vec![
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
}
