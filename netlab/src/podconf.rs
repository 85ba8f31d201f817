//! Configures pod namespaces in-process over rtnetlink. A pod needs only a handful of
//! netlink requests, far cheaper than starting an `ip` process per pod (milliseconds each
//! on a busy machine, which dominated building labs of a hundred pods).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::error::{LabError, Result};
use crate::netns;
use crate::plan::{POD_GATEWAY_V4, POD_GATEWAY_V6, POD_INTERFACE};

/// One pod namespace to configure: `eth0` up with the addresses, default routes.
pub(crate) struct PodJob {
    pub netns: String,
    pub fd: Arc<OwnedFd>,
    pub addresses: Vec<IpAddr>,
}

/// Configures the pods on a few threads; each thread enters one pod namespace after the
/// other and opens a netlink socket there.
pub(crate) fn configure_all(jobs: Vec<PodJob>) -> Result<()> {
    const WORKERS: usize = 2;
    let chunk = jobs.len().div_ceil(WORKERS).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| scope.spawn(move || configure_group(part)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(LabError::io(
                    "configuring pods",
                    std::io::Error::other("worker thread panicked"),
                ))
            })
        })
    })
}

fn configure_group(jobs: &[PodJob]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::io("starting a netlink runtime", e))?;
    for job in jobs {
        // This thread is ours alone and ends with the group, so it may change namespace.
        netns::enter(job.fd.as_fd())
            .map_err(|e| LabError::io(format!("entering network namespace {}", job.netns), e))?;
        runtime
            .block_on(configure(&job.addresses))
            .map_err(|(step, e)| LabError::Command {
                netns: job.netns.clone(),
                command: step,
                stderr: e,
            })?;
    }
    Ok(())
}

fn interface_index(name: &str) -> std::result::Result<u32, (String, String)> {
    let c_name =
        std::ffi::CString::new(name).map_err(|e| (format!("find {name}"), e.to_string()))?;
    // SAFETY: c_name is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        Err((
            format!("find {name}"),
            std::io::Error::last_os_error().to_string(),
        ))
    } else {
        Ok(index)
    }
}

async fn configure(addresses: &[IpAddr]) -> std::result::Result<(), (String, String)> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| ("open netlink".to_string(), e.to_string()))?;
    let connection = tokio::spawn(connection);
    let result = async {
        let lo = interface_index("lo")?;
        let eth0 = interface_index(POD_INTERFACE)?;
        for (name, index) in [("lo", lo), (POD_INTERFACE, eth0)] {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| (format!("link set {name} up"), e.to_string()))?;
        }
        for addr in addresses {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            let mut request = handle.address().add(eth0, *addr, len);
            if addr.is_ipv6() {
                // Usable at once: no duplicate address detection in a lab.
                request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            request.execute().await.map_err(|e| {
                (
                    format!("addr add {addr}/{len} dev {POD_INTERFACE}"),
                    e.to_string(),
                )
            })?;
        }
        if addresses.iter().any(IpAddr::is_ipv4) {
            let gateway: Ipv4Addr = POD_GATEWAY_V4.parse().map_err(|_| bad_gateway())?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(eth0)
                .onlink()
                .build();
            handle.route().add(route).execute().await.map_err(|e| {
                (
                    format!("route add default via {gateway} dev {POD_INTERFACE} onlink"),
                    e.to_string(),
                )
            })?;
        }
        if addresses.iter().any(IpAddr::is_ipv6) {
            let gateway: Ipv6Addr = POD_GATEWAY_V6.parse().map_err(|_| bad_gateway())?;
            let route = RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gateway)
                .output_interface(eth0)
                .build();
            handle.route().add(route).execute().await.map_err(|e| {
                (
                    format!("route add default via {gateway} dev {POD_INTERFACE}"),
                    e.to_string(),
                )
            })?;
        }
        Ok(())
    }
    .await;
    connection.abort();
    result
}

fn bad_gateway() -> (String, String) {
    (
        "parse gateway".to_string(),
        "invalid built-in gateway address".to_string(),
    )
}
