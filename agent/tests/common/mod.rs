//! A tiny lab for root integration tests: one node namespace and pod namespaces joined to it
//! by routed veth pairs exactly as docs/design.md describes, probes run with Rust sockets
//! in threads that entered a namespace. Everything is removed on drop, also on failure.

#![allow(dead_code)]

pub mod agent;

#[allow(unused_imports)]
pub use agent::{eventually, http_get, Agent};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use palisade_agent::Interfaces;
use palisade_policy::model::PodKey;

pub use palisade_testkit::{can_run, IP, NFT, ROOT};

/// A network namespace of the test's own, deleted on drop (also when the test fails); one
/// of the same name that a crashed run left is deleted first.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip").args(["netns", "add", name]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "ip netns add {name}");
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub struct LabPod {
    pub key: PodKey,
    pub netns: String,
    pub veth: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct Lab {
    pub node: String,
    pub pods: Vec<LabPod>,
    namespaces: Vec<String>,
    id: String,
    tag: String,
    subnet: u8,
    /// The host part of the first pod's addresses.
    first_host: u8,
    /// IPv6 addresses as numbers (fd00:77:S::H with S and H in hex) rather than spelled
    /// like the IPv4 ones (fd00:77:17::2 for 10.77.17.2).
    numeric_v6: bool,
}

impl Lab {
    /// `tag` keeps names of concurrently running tests apart (with the pid). `subnet` is the
    /// third octet of the pod addresses (10.77.SUBNET.x).
    pub fn new(tag: &str, subnet: u8, pods: &[&str]) -> Lab {
        Lab::build(tag, subnet, 2, false, pods)
    }

    /// [`Lab::new`] with the `i`-th pod at 10.77.SUBNET.(first_host + i) and at the IPv6
    /// address whose last 16 bits are the number first_host + i (and the third group the
    /// number SUBNET), so that prefixes cover the same pods in both families.
    pub fn with_first_host(tag: &str, subnet: u8, first_host: u8, pods: &[&str]) -> Lab {
        Lab::build(tag, subnet, first_host, true, pods)
    }

    fn build(tag: &str, subnet: u8, first_host: u8, numeric_v6: bool, pods: &[&str]) -> Lab {
        let id = format!("{}{}", tag, std::process::id() % 100000);
        let node = format!("pn-{id}");
        let mut lab = Lab {
            node: node.clone(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            id: id.clone(),
            tag: tag.to_string(),
            subnet,
            first_host,
            numeric_v6,
        };
        sh(&["ip", "netns", "add", &node]);
        lab.namespaces.push(node.clone());
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            sh(&["ip", "netns", "exec", &node, "sysctl", "-qw", s]);
        }
        sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
        // The pods' gateway: ARP for it is answered because it is a local address (proxy
        // ARP alone answers only for targets routed out of another interface).
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "169.254.1.1/32",
            "dev",
            "lo",
        ]);
        for name in pods {
            lab.add_pod(name);
        }
        lab
    }

    /// Adds a pod namespace joined to the node (pods may be added while an agent runs).
    pub fn add_pod(&mut self, name: &str) -> &LabPod {
        self.add_pod_ordered(name, false)
    }

    /// [`Lab::add_pod`], with the node's host routes to the pod added last, once the pod
    /// can already send (as some CNIs order it): its packets are forwarded before the
    /// agent can know its interface.
    pub fn add_pod_host_routes_last(&mut self, name: &str) -> &LabPod {
        self.add_pod_ordered(name, true)
    }

    fn add_pod_ordered(&mut self, name: &str, host_routes_last: bool) -> &LabPod {
        let i = self.pods.len();
        let (node, id, subnet, tag) = (
            self.node.clone(),
            self.id.clone(),
            self.subnet,
            self.tag.clone(),
        );
        let host = i as u8 + self.first_host;
        let netns = format!("pp-{id}-{i}");
        let veth = format!("v{tag}{i}");
        assert!(veth.len() <= 15);
        let ip4: IpAddr = format!("10.77.{subnet}.{host}").parse().unwrap();
        let ip6: IpAddr = if self.numeric_v6 {
            std::net::Ipv6Addr::new(0xfd00, 0x77, subnet.into(), 0, 0, 0, 0, host.into()).into()
        } else {
            format!("fd00:77:{subnet}::{host}").parse().unwrap()
        };
        sh(&["ip", "netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        link_pod(&node, &netns, &veth, ip4, ip6, host_routes_last);
        let (ns, pod) = name.split_once('/').unwrap();
        self.pods.push(LabPod {
            key: PodKey::new(ns, pod),
            netns,
            veth,
            ip4,
            ip6,
        });
        self.pods.last().unwrap()
    }

    /// Adds a namespace that stands for the world outside the cluster: joined to the node
    /// by a veth the agent knows nothing of, holding `addrs` (each routed to it from the
    /// node), and reaching the pods through the node as its default route. Returns the
    /// namespace's name.
    pub fn add_outside(&mut self, addrs: &[IpAddr]) -> String {
        let (node, netns, veth) = (
            self.node.clone(),
            format!("px-{}", self.id),
            format!("x{}", self.tag),
        );
        sh(&["ip", "netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        veth_to_node(&node, &netns, &veth);
        for addr in addrs {
            let (len, family) = if addr.is_ipv4() {
                (32, "-4")
            } else {
                (128, "-6")
            };
            let prefix = format!("{addr}/{len}");
            sh(&[
                "ip", "-n", &node, family, "route", "add", &prefix, "dev", &veth,
            ]);
            sh(&[
                "ip", "-n", &netns, "addr", "add", &prefix, "dev", "eth0", "nodad",
            ]);
        }
        default_routes_via_node(&netns);
        netns
    }

    /// The IPv4 address the `i`-th pod gets (for rules written before it exists).
    pub fn planned_ip4(&self, i: usize) -> IpAddr {
        format!("10.77.{}.{}", self.subnet, i + usize::from(self.first_host))
            .parse()
            .unwrap()
    }

    /// Deletes the pod's veth and creates it again, as a CNI re-creating a pod's network
    /// does: same names, same addresses.
    pub fn recreate_veth(&self, name: &str) {
        let pod = self.pod(name);
        sh(&["ip", "-n", &self.node, "link", "del", &pod.veth]);
        link_pod(&self.node, &pod.netns, &pod.veth, pod.ip4, pod.ip6, false);
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        self.pods
            .iter()
            .find(|p| p.key.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn interfaces(&self) -> Interfaces {
        self.pods
            .iter()
            .map(|p| (p.key.clone(), p.veth.clone()))
            .collect::<BTreeMap<_, _>>()
    }
}

/// Joins pod namespace `netns` to `node` by the veth `veth` (node side) / `eth0`, with
/// the pod's addresses, host routes and default routes.
fn link_pod(node: &str, netns: &str, veth: &str, ip4: IpAddr, ip6: IpAddr, host_routes_last: bool) {
    veth_to_node(node, netns, veth);
    if !host_routes_last {
        host_routes(node, veth, ip4, ip6);
    }
    sh(&[
        "ip",
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip4}/32"),
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    default_routes_via_node(netns);
    if host_routes_last {
        host_routes(node, veth, ip4, ip6);
    }
}

/// A veth from `node` (named `veth` there) to `netns` (`eth0`), up at both ends, with the
/// node side answering ARP for any address (the pods' gateway 169.254.1.1 among them) and
/// holding the IPv6 gateway fe80::1.
fn veth_to_node(node: &str, netns: &str, veth: &str) {
    sh(&[
        "ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
        netns,
    ]);
    for setting in [
        format!("net.ipv4.conf.{veth}.proxy_arp=1"),
        format!("net.ipv4.conf.{veth}.rp_filter=0"),
    ] {
        sh(&["ip", "netns", "exec", node, "sysctl", "-qw", &setting]);
    }
    sh(&["ip", "-n", node, "link", "set", veth, "up"]);
    sh(&[
        "ip",
        "-n",
        node,
        "addr",
        "add",
        "fe80::1/64",
        "dev",
        veth,
        "nodad",
    ]);
    sh(&["ip", "-n", netns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", netns, "link", "set", "eth0", "up"]);
}

/// `netns`'s default routes, both families, through the node at the end of its `eth0`.
fn default_routes_via_node(netns: &str) {
    sh(&[
        "ip",
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    sh(&[
        "ip", "-n", netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
}

/// The node's routes to a pod's addresses, by which the agent finds its interface.
fn host_routes(node: &str, veth: &str, ip4: IpAddr, ip6: IpAddr) {
    sh(&[
        "ip",
        "-n",
        node,
        "route",
        "add",
        &format!("{ip4}/32"),
        "dev",
        veth,
    ]);
    sh(&[
        "ip",
        "-n",
        node,
        "-6",
        "route",
        "add",
        &format!("{ip6}/128"),
        "dev",
        veth,
    ]);
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` in a new thread inside network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        palisade_agent::netns::enter(&netns).unwrap_or_else(|e| panic!("{e}"));
        f()
    })
}

/// A non-blocking TCP listener on `port` (both families) with a deep accept queue.
fn listen_tcp(port: u16) -> TcpListener {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).expect("tcp socket");
    s.set_only_v6(false).expect("dual-stack socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    s.bind(&addr.into()).expect("bind tcp");
    s.listen(4096).expect("listen");
    s.set_nonblocking(true).expect("non-blocking listener");
    s.into()
}

/// Listeners on TCP ports (kernel completes handshakes; accepted sockets are dropped) and
/// UDP ports (counting datagrams), in one pod, until dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    pub udp_received: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(netns: &str, tcp: &[u16], udp: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_received = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for &port in tcp {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(in_netns(netns, move || {
                let l = listen_tcp(port);
                tx.send(()).unwrap();
                // Accepted sockets are held for 50 ms (time for a probe's data, so closing
                // does not reset it) without ever blocking the accept loop: a probe that
                // connects a thousand times a second must never find the queue full, or
                // its dropped SYN would pass for a gap in the table.
                let mut held: std::collections::VecDeque<(std::time::Instant, TcpStream)> =
                    Default::default();
                while !stop.load(Ordering::Relaxed) {
                    let mut idle = true;
                    while let Ok((s, _)) = l.accept() {
                        held.push_back((std::time::Instant::now(), s));
                        idle = false;
                    }
                    while held
                        .front()
                        .is_some_and(|(at, _)| at.elapsed() > Duration::from_millis(50))
                    {
                        held.pop_front();
                    }
                    if idle {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }));
            rx.recv().unwrap();
        }
        for &port in udp {
            let stop = stop.clone();
            let count = udp_received.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(in_netns(netns, move || {
                let s = UdpSocket::bind(("::", port)).expect("bind udp");
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if s.recv_from(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            rx.recv().unwrap();
        }
        Servers {
            stop,
            udp_received,
            threads,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection attempt from `netns` to `dst:port`: true if the handshake completed.
pub fn tcp_ok(netns: &str, dst: IpAddr, port: u16) -> bool {
    tcp_ok_within(netns, dst, port, Duration::from_millis(400))
}

/// [`tcp_ok`] with its own time-out (a lab handshake takes well under a millisecond, so a
/// short one suits probes that must be frequent).
pub fn tcp_ok_within(netns: &str, dst: IpAddr, port: u16, timeout: Duration) -> bool {
    tcp_connect_within(netns, dst, port, timeout).is_ok()
}

/// A TCP connection from `netns`, with the error that ended it (time-out, refused, …).
pub fn tcp_connect_within(
    netns: &str,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> std::io::Result<()> {
    in_netns(netns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(dst, port), timeout).map(drop)
    })
    .join()
    .unwrap()
}

/// [`tcp_connect_within`] from the source address `src` of `netns`.
pub fn tcp_connect_from(
    netns: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    in_netns(netns, move || {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
    })
    .join()
    .unwrap()
}

/// Gives the pod in `netns` one more IPv4 address (a source to spoof from).
pub fn add_address(netns: &str, addr: &str) {
    sh(&[
        "ip",
        "-n",
        netns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ]);
}

/// Sends `n` UDP datagrams from `netns`, bound to `src`, to `dst:port`.
pub fn udp_send_from(netns: &str, src: IpAddr, dst: IpAddr, port: u16, n: usize) {
    in_netns(netns, move || {
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind source");
        for _ in 0..n {
            let _ = s.send_to(b"x", SocketAddr::new(dst, port));
        }
    })
    .join()
    .unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed).
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
