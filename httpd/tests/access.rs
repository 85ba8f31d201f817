//! The access modes against the real thing: secure mode with a real kube-apiserver
//! (kubelab) doing the TokenReviews and SubjectAccessReviews, real TLS, and real sockets.

use std::path::Path;
use std::sync::Arc;

use palisade_httpd::{
    bind, serve, Access, Handler, KubeAuthorizer, Limits, Mode, ModeError, Reply, ReplyFuture,
    ThreadAuthorizer,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NS: &str = "httpd-access";

struct Fixed;

impl Handler for Fixed {
    fn get(&self, path: &str) -> ReplyFuture {
        let reply = match path {
            "/metrics" => Reply::ok("palisade_test_metric 1\n"),
            "/healthz" => Reply::ok("ok\n"),
            "/readyz" => Reply::ok("ready\n"),
            _ => Reply::not_found(),
        };
        Box::pin(std::future::ready(reply))
    }
}

/// A request over `stream`, HTTP/1.0 so the answer ends with the connection: status line
/// and body.
async fn exchange<S>(mut stream: S, method: &str, path: &str, token: Option<&str>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    port: u16,
}

impl TlsClient {
    fn new(cert_pem: &str, port: u16) -> Self {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            port,
        }
    }

    async fn get(&self, method: &str, path: &str, token: Option<&str>) -> String {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        exchange(tls, method, path, token).await
    }
}

fn write_cert(dir: &Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (cert.pem(), c, k)
}

const RBAC: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: httpd-access}
---
apiVersion: v1
kind: ServiceAccount
metadata: {namespace: httpd-access, name: scraper}
---
apiVersion: v1
kind: ServiceAccount
metadata: {namespace: httpd-access, name: stranger}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: httpd-access-metrics-reader}
rules:
  - nonResourceURLs: [/metrics]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: httpd-access-metrics-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: httpd-access-metrics-reader}
subjects:
  - {kind: ServiceAccount, namespace: httpd-access, name: scraper}
";

#[test]
fn secure_mode_answers_only_authorized_service_accounts_over_tls() {
    let Some(lab) = palisade_kubelab::shared() else {
        return;
    };
    let dir = lab.dir().join("httpd-access");
    std::fs::create_dir_all(&dir).unwrap();
    let rbac = dir.join("rbac.yaml");
    std::fs::write(&rbac, RBAC).unwrap();
    lab.kubectl(
        ["apply", "-f"]
            .iter()
            .map(|s| s.to_string())
            .chain([rbac.display().to_string()]),
    )
    .expect("apply the RBAC");
    let token = |sa: &str| {
        lab.kubectl(["create", "token", sa, "-n", NS])
            .unwrap_or_else(|e| panic!("a token for {sa}: {e}"))
            .trim()
            .to_string()
    };
    let (scraper, stranger) = (token("scraper"), token("stranger"));
    let (cert_pem, cert, key) = write_cert(&dir);

    // As the agent does it: the reviews run on a thread of their own.
    let kubeconfig = lab.kubeconfig().to_path_buf();
    let authorizer =
        ThreadAuthorizer::spawn(
            move || async move { KubeAuthorizer::connect(Some(&kubeconfig)).await },
        )
        .expect("an authorizer");
    let access = Access::for_mode(
        Mode::Secure,
        Some((&cert, &key)),
        Some(Arc::new(authorizer)),
    )
    .expect("secure access");
    let listener = bind(Mode::Secure, "127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();

    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::spawn(serve(listener, access, Limits::default(), Arc::new(Fixed)));
            let client = TlsClient::new(&cert_pem, port);

            let answer = client.get("GET", "/metrics", None).await;
            assert_eq!(status(&answer), 401, "{answer}");
            assert!(answer.contains("WWW-Authenticate") || answer.contains("www-authenticate"));
            let answer = client.get("GET", "/metrics", Some("not-a-token")).await;
            assert_eq!(status(&answer), 401, "{answer}");
            let answer = client.get("GET", "/metrics", Some(&stranger)).await;
            assert_eq!(status(&answer), 403, "{answer}");
            assert!(
                answer.contains("system:serviceaccount:httpd-access:stranger"),
                "{answer}"
            );
            assert!(!answer.contains("palisade_test_metric"), "{answer}");
            let answer = client.get("GET", "/metrics", Some(&scraper)).await;
            assert_eq!(status(&answer), 200, "{answer}");
            assert!(answer.ends_with("palisade_test_metric 1\n"), "{answer}");
            // The binding is for /metrics only: another path is refused even for the scraper.
            let answer = client.get("GET", "/debug", Some(&scraper)).await;
            assert_eq!(status(&answer), 403, "{answer}");
            // Probes carry no token.
            for path in ["/healthz", "/readyz"] {
                let answer = client.get("GET", path, None).await;
                assert_eq!(status(&answer), 200, "{path}: {answer}");
            }
            let answer = client.get("POST", "/metrics", Some(&scraper)).await;
            assert_eq!(status(&answer), 405, "{answer}");

            // Plain HTTP on the TLS port gets no HTTP answer at all.
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let answer = exchange(tcp, "GET", "/healthz", None).await;
            assert!(
                !answer.starts_with("HTTP/"),
                "plain HTTP was answered: {answer:?}"
            );
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let answer = exchange(tcp, "GET", "/metrics", Some(&scraper)).await;
            assert!(!answer.contains("palisade_test_metric"), "{answer:?}");
        });
}

#[test]
fn loopback_mode_binds_loopback_only_and_serves_plain_http() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let err = bind(Mode::Loopback, addr.parse().unwrap()).unwrap_err();
        assert!(matches!(err, ModeError::NotLoopback(_)), "{addr}: {err}");
        assert!(err.to_string().contains("loopback"), "{err}");
    }
    let listener = bind(Mode::Loopback, "127.0.0.1:0".parse().unwrap()).unwrap();
    let local = listener.local_addr().unwrap();
    assert!(local.ip().is_loopback(), "{local}");
    let access = Access::for_mode(Mode::Loopback, None, None).unwrap();
    assert_eq!(access.scheme(), "http");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::spawn(serve(listener, access, Limits::default(), Arc::new(Fixed)));
            let tcp = TcpStream::connect(local).await.unwrap();
            let answer = exchange(tcp, "GET", "/metrics", None).await;
            assert_eq!(status(&answer), 200, "{answer}");
            let tcp = TcpStream::connect(local).await.unwrap();
            let answer = exchange(tcp, "DELETE", "/metrics", None).await;
            assert_eq!(status(&answer), 405, "{answer}");
            assert!(
                answer.contains("allow: GET") || answer.contains("Allow: GET"),
                "{answer}"
            );
        });
}

#[test]
fn secure_mode_needs_an_authorizer() {
    let err = Access::for_mode(Mode::Secure, None, None)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("authorizer"), "{err}");
}
