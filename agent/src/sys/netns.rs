//! Work inside a network namespace without moving the agent: a short-lived
//! thread enters it (`setns` moves only the calling thread) and ends with its
//! work, so no thread of the agent is ever left in a target's namespace.
//! Interface names come from an rtnetlink dump read there: no `ip` exec.

use std::{fs::File, io, path::Path};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Run `work` inside the namespace at `ns` (`None`: here, on the calling thread).
/// A namespace file that is gone is `Err` of kind `NotFound`.
pub fn in_netns<T: Send>(ns: Option<&Path>, work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(path) = ns else { return work() };
    let file = File::open(path)?;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns-work".into())
            .spawn_scoped(s, move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("setns {}: {e}", path.display())))?;
                work()
            })?
            .join()
            .map_err(|_| io::Error::other("the thread working in the namespace panicked"))?
    })
}

/// The names of the interfaces of the calling thread's namespace, `lo` included,
/// in the kernel's order (by index).
pub fn link_names() -> io::Result<Vec<String>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request =
        NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())));
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let bad = |e: netlink_packet_core::DecodeError| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink link dump: {e}"));
    let mut names = Vec::new();
    // A dump comes in datagrams of several messages each, up to NLMSG_DONE.
    let mut datagram = Vec::with_capacity(64 * 1024);
    loop {
        datagram.clear();
        let size = socket.recv(&mut datagram, 0)?;
        let mut at = 0;
        while at < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&datagram[at..size]).map_err(bad)?;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(names),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    names.extend(link.attributes.into_iter().filter_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n),
                        _ => None,
                    }));
                }
                _ => {}
            }
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_has_loopback_and_a_gone_one_is_not_found() {
        let names = in_netns(None, link_names).expect("link dump");
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
        let e = in_netns(Some(Path::new("/run/netns/chaos-no-such-namespace")), link_names).expect_err("no such namespace");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
