//! rtnetlink connections bound to a network namespace, and the few queries
//! pod plumbing and route sync share.
//!
//! A netlink socket talks to the namespace it was created in, whatever
//! thread later uses it. So a socket for another namespace is created on a
//! thread that entered it (`NetNs::run`) and then driven from the caller's
//! tokio runtime; the caller's own threads never change namespace.

use crate::NetNs;
use futures::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
    },
    sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE},
};
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{FromRawFd, IntoRawFd},
};

/// A netlink connection; its driver task stops when this is dropped.
pub(crate) struct Nl {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Nl {
    /// A connection to the namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        let sock = Socket::new(NETLINK_ROUTE)?;
        Self::from_socket(sock)
    }

    /// A connection to the namespace `ns`.
    pub fn in_netns(ns: &NetNs) -> Result<Self, crate::DataplaneError> {
        let err = |source| crate::DataplaneError::NetNs {
            name: ns.name().to_owned(),
            action: "opening a netlink socket",
            source,
        };
        let sock = ns.run(|| Socket::new(NETLINK_ROUTE))?.map_err(err)?;
        Self::from_socket(sock).map_err(err)
    }

    fn from_socket(sock: Socket) -> io::Result<Self> {
        sock.set_non_blocking(true)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "pod networking must be called from a tokio runtime",
            ));
        }
        // SAFETY: into_raw_fd hands over sole ownership of an open netlink
        // socket; TokioSocket closes it. A runtime is present (checked
        // above), so its registration with the reactor does not panic.
        let sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        Ok(Self {
            handle,
            task: tokio::spawn(conn),
        })
    }
}

/// The errno of a failed netlink request, if the kernel sent one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}

pub(crate) fn to_io(e: rtnetlink::Error) -> io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => m.to_io(),
        _ => io::Error::other(e.to_string()),
    }
}

/// The link called `name`, or `None` when there is none.
pub(crate) async fn link_by_name(h: &Handle, name: &str) -> io::Result<Option<LinkMessage>> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// Every link of the namespace.
pub(crate) async fn links(h: &Handle) -> io::Result<Vec<LinkMessage>> {
    h.link().get().execute().try_collect().await.map_err(to_io)
}

pub(crate) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
        _ => None,
    })
}

/// The IPv4 addresses (with prefix length) on interface `index`.
pub(crate) async fn ipv4_addresses(h: &Handle, index: u32) -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(to_io)?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

/// The interface that holds `ip`, if any.
pub(crate) async fn interface_with(h: &Handle, ip: Ipv4Addr) -> io::Result<Option<u32>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_address_filter(IpAddr::V4(ip))
        .execute()
        .try_collect()
        .await
        .map_err(to_io)?;
    Ok(msgs.first().map(|m| m.header.index))
}

/// The MTU of interface `index`.
pub(crate) async fn link_mtu(h: &Handle, index: u32) -> Option<u32> {
    let link = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .ok()??;
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// Every IPv4 route of the main table.
pub(crate) async fn main_ipv4_routes(h: &Handle) -> io::Result<Vec<RouteMessage>> {
    let query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all: Vec<RouteMessage> = h
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(to_io)?;
    Ok(all
        .into_iter()
        .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}

/// A route's table: the attribute when present (tables > 255), else the
/// header.
pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

pub(crate) fn route_dst(r: &RouteMessage) -> (Ipv4Addr, u8) {
    let dst = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    (dst, r.header.destination_prefix_length)
}

pub(crate) fn route_gateway(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub(crate) fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}
