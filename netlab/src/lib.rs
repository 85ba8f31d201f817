//! A cluster of network namespaces on one machine: nodes, pods, an underlay, echo servers
//! and probes. Used by `palisadectl verify --dataplane`, `palisadectl demo`, the agent's
//! integration tests and the benchmarks.
//!
//! [`Lab::build`] turns a [`Cluster`](palisade_policy::model::Cluster) into the topology of
//! docs/design.md ("The lab topology"):
//!
//! - one namespace per node (`PREFIX-n<i>-<node>`), one per pod that is not host-network
//!   (`PREFIX-p<i>-<namespace>.<name>`), one underlay (`PREFIX-ul`) holding bridge `br0`;
//! - each node's `ul0` (its end of a veth to the bridge) holds the node addresses, with the
//!   longest prefix covering all nodes' addresses of the family, at most /24 or /64;
//! - each pod's `eth0` holds its `/32` and `/128` with default routes via `169.254.1.1`
//!   (onlink) and `fe80::1`; the node side `pv<i>` has `fe80::1/64`, `proxy_arp=1`,
//!   `rp_filter=0` and the host routes `POD/32 dev pv<i>`, `POD6/128 dev pv<i>`;
//! - each node routes every remote pod address via that pod's node address on `ul0`, and
//!   `169.254.1.1/32 dev lo` so proxy ARP answers for the pods' gateway (proxy ARP replies
//!   only for targets routed out of another interface, and a node has no default route);
//! - forwarding on and `rp_filter` off in node namespaces; IPv6 DAD off everywhere (and
//!   `nodad` on addresses) so addresses are usable at once.
//!
//! Host-network pods are their node's namespace and addresses. Nothing is routed to the
//! machine's real interfaces and the host namespace is not changed (apart from the
//! `/var/run/netns` entries). Building needs root and `ip` (iproute2); the underlay and
//! nodes are configured with one `ip -batch` per namespace, pods over rtnetlink in-process,
//! sysctls by writing `/proc/sys` from a thread inside the namespace.
//!
//! Then [`Lab::serve_all`] starts echo servers in pods and [`Lab::probe_all`] runs
//! [`Probe`]s in parallel, each giving a [`ProbeResult`]. Dropping the lab (or
//! [`Lab::teardown`]) removes every namespace it created. [`cleanup_stale`] and
//! [`cleanup_dead_labs`] remove leftovers of labs whose process died before that.
//! [`exec_in`] and [`command_in`] run programs (`nft`, `palisade-agent`) in a namespace.
//!
//! ```no_run
//! use std::time::Duration;
//! use palisade_netlab::{Lab, LabOptions, Probe};
//! use palisade_policy::model::{Cluster, Family, PodKey, Protocol};
//!
//! # fn demo(cluster: &Cluster) -> Result<(), palisade_netlab::LabError> {
//! let lab = Lab::build(cluster, LabOptions::default())?;
//! let (a, b) = (PodKey::new("x", "a"), PodKey::new("y", "b"));
//! lab.serve(&b, Protocol::Tcp, 80)?;
//! let to_addr = lab.pod_address(&b, Family::IPv4)?.expect("b has an IPv4 address");
//! let probe = Probe { from: a, to_addr, protocol: Protocol::Tcp, port: 80 };
//! println!("{}", lab.probe(&probe, Duration::from_secs(1))?);
//! # Ok(()) }
//! ```

mod error;
mod lab;
mod names;
mod netns;
mod plan;
mod podconf;
mod probe;
mod serve;
mod sockets;

pub use error::{LabError, Result};
pub use lab::{Lab, LabOptions};
pub use names::{cleanup_dead_labs, cleanup_stale, LAB_PREFIX};
pub use netns::{command_in, exec_in, exec_in_with_input, list as list_namespaces, NETNS_DIR};
pub use plan::{
    POD_GATEWAY_V4, POD_GATEWAY_V6, POD_INTERFACE, UNDERLAY_BRIDGE, UNDERLAY_INTERFACE,
};
pub use probe::{Probe, ProbeResult};

/// Whether the kernel can create SCTP sockets (probed in the calling thread's namespace;
/// the protocol's availability is machine-wide).
pub fn kernel_supports_sctp() -> bool {
    match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
    ) {
        Ok(_) => true,
        Err(e) => !sockets::is_unsupported(&e),
    }
}
