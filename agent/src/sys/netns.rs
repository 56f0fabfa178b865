//! Work inside a network namespace without moving the agent: a short-lived
//! thread enters it (`setns` moves only the calling thread) and ends with its
//! work, so no thread of the agent is ever left in a target's namespace.
//! Interface names come from an rtnetlink dump read there: no `ip` exec.

use std::{fs::File, io, path::Path};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
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

/// The longest a netlink reply may take; the kernel answers at once, so this
/// only turns a lost reply into an error instead of a hang.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A netlink socket of `protocol` connected to the kernel, in the calling thread's namespace.
pub(crate) fn open(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
    Ok(socket)
}

/// Send `messages` in one datagram (a batch is one).
pub(crate) fn send<M: NetlinkSerializable>(socket: &Socket, messages: &[NetlinkMessage<M>]) -> io::Result<()> {
    let mut buf = vec![0; messages.iter().map(NetlinkMessage::buffer_len).sum()];
    let mut at = 0;
    for m in messages {
        m.serialize(&mut buf[at..at + m.buffer_len()]);
        at += m.buffer_len();
    }
    socket.send(&buf, 0)?;
    Ok(())
}

/// Read replies (datagrams of several messages each), handing each to `each`
/// until it says it has all it needs (`true`).
pub(crate) fn receive<M: NetlinkDeserializable>(
    socket: &Socket,
    mut each: impl FnMut(NetlinkMessage<M>) -> io::Result<bool>,
) -> io::Result<()> {
    let mut datagram = Vec::with_capacity(64 * 1024);
    loop {
        datagram.clear();
        let size = socket.recv(&mut datagram, 0)?;
        let mut at = 0;
        while at < size {
            let msg = NetlinkMessage::<M>::deserialize(&datagram[at..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}")))?;
            let len = msg.header.length as usize;
            if each(msg)? {
                return Ok(());
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// The names of the interfaces of the calling thread's namespace, `lo` included,
/// in the kernel's order (by index).
pub fn link_names() -> io::Result<Vec<String>> {
    let socket = open(NETLINK_ROUTE)?;
    let mut request =
        NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())));
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    send(&socket, &[request])?;
    let mut names = Vec::new();
    receive(&socket, |msg| match msg.payload {
        NetlinkPayload::Done(_) => Ok(true),
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
            names.extend(link.attributes.into_iter().filter_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            }));
            Ok(false)
        }
        _ => Ok(false),
    })?;
    Ok(names)
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
