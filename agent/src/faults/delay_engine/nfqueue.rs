//! A small nfnetlink_queue client: the few messages the delay engine needs
//! (bind a queue, set its copy mode, length and fail-open flag, receive
//! packets, accept them one by one or all up to an id at once), on a socket
//! whose descriptor the engine owns. Owning it lets the engine size the
//! socket's receive buffer (when it is full the kernel, being fail-open,
//! lets packets pass undelayed, ahead of those held: that was the
//! reordering) and sleep in `ppoll` until a packet arrives or one is due.
//!
//! Everything read from the kernel is parsed with bounds checks: a short
//! or odd message is skipped, never a panic.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const CMD_BIND: u8 = 1;
const CMD_UNBIND: u8 = 2;
const COPY_META: u8 = 1;
const COPY_PACKET: u8 = 2;
const NF_ACCEPT: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
/// nlmsghdr + nfgenmsg.
const HEADERS: usize = NLMSG_HDRLEN + 4;

/// A packet the kernel handed over: its id (for the verdict) and, in
/// copy-packet mode, its bytes from the IP header on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub id: u32,
    pub payload: Option<Vec<u8>>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// What one netlink message from the queue socket is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Packet(Packet),
    /// An answer to a request: errno 0 is an acknowledgement.
    Ack(i32),
    Other,
}

/// Split one datagram read from the socket into its messages; anything
/// malformed ends the walk (what was parsed before it is kept).
pub fn parse(datagram: &[u8]) -> Vec<Incoming> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(datagram, at), u16_at(datagram, at + 4)) {
        let len = len as usize;
        let Some(msg) = datagram.get(at..at + len).filter(|_| len >= NLMSG_HDRLEN) else { break };
        if kind == NLMSG_ERROR {
            let errno = msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4).and_then(|b| b.try_into().ok()).map(i32::from_ne_bytes);
            out.push(errno.map_or(Incoming::Other, |e| Incoming::Ack(-e)));
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            out.push(parse_packet(msg).map_or(Incoming::Other, Incoming::Packet));
        } else {
            out.push(Incoming::Other);
        }
        at += align4(len);
    }
    out
}

/// One NFQNL_MSG_PACKET message (headers included): its id and payload.
fn parse_packet(msg: &[u8]) -> Option<Packet> {
    let (mut id, mut payload) = (None, None);
    let mut at = HEADERS;
    while let (Some(len), Some(kind)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let len = usize::from(len);
        let value = msg.get(at + 4..at + len).filter(|_| len >= 4)?;
        match kind & 0x3fff {
            NFQA_PACKET_HDR => id = Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?)),
            NFQA_PAYLOAD => payload = Some(value.to_vec()),
            _ => {}
        }
        at += align4(len);
    }
    Some(Packet { id: id?, payload })
}

/// Append one netlink attribute (padded to 4 bytes).
fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

/// Start a message to queue `queue_num` (its length is set by [`finish`]).
fn start(buf: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, queue_num: u16) {
    buf.clear();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the queue number in network order.
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&queue_num.to_be_bytes());
}

fn finish(buf: &mut [u8]) {
    let len = (buf.len() as u32).to_ne_bytes();
    buf[..4].copy_from_slice(&len);
}

/// A verdict message: accept `id` (with `payload` replacing the packet's bytes when given);
/// `batch`: accept every queued packet up to and including `id`.
pub fn verdict_message(buf: &mut Vec<u8>, queue_num: u16, id: u32, payload: Option<&[u8]>, batch: bool) {
    start(buf, if batch { NFQNL_MSG_VERDICT_BATCH } else { NFQNL_MSG_VERDICT }, 0, 0, queue_num);
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    put_attr(buf, NFQA_VERDICT_HDR, &hdr);
    if let Some(p) = payload {
        put_attr(buf, NFQA_PAYLOAD, p);
    }
    finish(buf);
}

/// A bound queue.
pub struct NfQueue {
    fd: OwnedFd,
    queue_num: u16,
    seq: u32,
    buf: Vec<u8>,
    out: Vec<u8>,
    pending: VecDeque<Packet>,
}

impl NfQueue {
    /// Open a netlink socket in the calling thread's network namespace and
    /// bind `queue_num`: fail-open, at most `max_len` packets queued, metadata
    /// only unless `copy_payload`, and a receive buffer of `rcvbuf` bytes.
    pub fn open(queue_num: u16, copy_payload: bool, max_len: u32, rcvbuf: usize) -> Result<NfQueue, String> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if raw < 0 {
            return Err(format!("opening an NFQUEUE socket: {}", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut q =
            NfQueue { fd, queue_num, seq: 0, buf: vec![0; 0x1_0000 + 4096], out: Vec::with_capacity(256), pending: VecDeque::new() };
        q.set_rcvbuf(rcvbuf);
        q.config(|b| put_attr(b, NFQA_CFG_CMD, &[CMD_BIND, 0, 0, 0]))
            .map_err(|e| format!("binding NFQUEUE {queue_num}: {e} (in use by another program?)"))?;
        let range: u32 = if copy_payload { 0xffff } else { 0 };
        let mut params = range.to_be_bytes().to_vec();
        params.push(if copy_payload { COPY_PACKET } else { COPY_META });
        q.config(|b| put_attr(b, NFQA_CFG_PARAMS, &params)).map_err(|e| format!("NFQUEUE {queue_num} copy range: {e}"))?;
        q.config(|b| put_attr(b, NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes())).map_err(|e| format!("NFQUEUE {queue_num} length: {e}"))?;
        q.config(|b| {
            put_attr(b, NFQA_CFG_FLAGS, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes());
            put_attr(b, NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes());
        })
        .map_err(|e| format!("NFQUEUE {queue_num} fail-open: {e}"))?;
        Ok(q)
    }

    /// As large a receive buffer as root may set (SO_RCVBUFFORCE), else as the sysctl allows.
    fn set_rcvbuf(&self, bytes: usize) {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on our own descriptor with a c_int value of the right size.
            let r = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                return;
            }
        }
    }

    /// The receive buffer the kernel granted, in bytes (it doubles what was asked).
    pub fn rcvbuf(&self) -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the size we pass.
        let r = unsafe {
            libc::getsockopt(self.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&mut v as *mut libc::c_int).cast(), &mut len)
        };
        if r == 0 { usize::try_from(v).unwrap_or(0) } else { 0 }
    }

    /// Send a config request and wait (1 s at most) for its acknowledgement;
    /// a packet that arrives meanwhile is accepted at once.
    fn config(&mut self, attrs: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut out = std::mem::take(&mut self.out);
        start(&mut out, NFQNL_MSG_CONFIG, NLM_F_ACK, self.seq, self.queue_num);
        attrs(&mut out);
        finish(&mut out);
        let sent = self.send(&out);
        self.out = out;
        sent?;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !self.wait(left, None)? {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer from the kernel within 1 s"));
            }
            for m in self.read_datagram()? {
                match m {
                    Incoming::Ack(0) => return Ok(()),
                    Incoming::Ack(e) => return Err(io::Error::from_raw_os_error(e)),
                    Incoming::Packet(p) => self.accept(p.id, None)?,
                    Incoming::Other => {}
                }
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) of an initialised buffer on our own socket (unconnected netlink: to the kernel).
        let r = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// One datagram from the socket, without blocking (empty when there is none).
    fn read_datagram(&mut self) -> io::Result<Vec<Incoming>> {
        // SAFETY: recv(2) into our buffer, at most its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(Vec::new()) } else { Err(e) };
        }
        Ok(parse(self.buf.get(..n as usize).unwrap_or_default()))
    }

    /// The next packet, without blocking: `Ok(None)` when the socket is empty.
    pub fn recv(&mut self) -> io::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Ok(Some(p));
            }
            let msgs = self.read_datagram()?;
            if msgs.is_empty() {
                return Ok(None);
            }
            self.pending.extend(msgs.into_iter().filter_map(|m| match m {
                Incoming::Packet(p) => Some(p),
                _ => None,
            }));
        }
    }

    /// Sleep until the socket (or `also`) has something to read or `timeout`
    /// passes; whether the socket has.
    pub fn wait(&self, timeout: Duration, also: Option<BorrowedFd<'_>>) -> io::Result<bool> {
        if !self.pending.is_empty() {
            return Ok(true);
        }
        let mut pfd = [
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: also.map_or(-1, |f| f.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: ppoll on two pollfds in a live array (a negative fd is ignored), a valid timespec, no signal mask.
        let r = unsafe { libc::ppoll(pfd.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        match r {
            r if r > 0 => Ok(pfd[0].revents != 0),
            0 => Ok(false),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) }
            }
        }
    }

    /// Accept packet `id`, its bytes replaced by `payload` when given.
    pub fn accept(&mut self, id: u32, payload: Option<&[u8]>) -> io::Result<()> {
        self.verdict(id, payload, false)
    }

    /// Accept every packet still queued with an id up to and including `id` (one message).
    pub fn accept_up_to(&mut self, id: u32) -> io::Result<()> {
        self.verdict(id, None, true)
    }

    fn verdict(&mut self, id: u32, payload: Option<&[u8]>, batch: bool) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        verdict_message(&mut out, self.queue_num, id, payload, batch);
        let r = self.send(&out);
        self.out = out;
        r
    }

    /// Unbind the queue (the kernel accepts whatever is still queued).
    pub fn unbind(&mut self) -> io::Result<()> {
        self.config(|b| put_attr(b, NFQA_CFG_CMD, &[CMD_UNBIND, 0, 0, 0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel writes it: headers, a packet header, an odd attribute, the payload.
    fn packet_msg(id: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        start(&mut b, NFQNL_MSG_PACKET, 0, 0, 7);
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 0]);
        put_attr(&mut b, NFQA_PACKET_HDR, &hdr);
        put_attr(&mut b, 9, &[1, 2, 3, 4]);
        put_attr(&mut b, NFQA_PAYLOAD, payload);
        finish(&mut b);
        b
    }

    #[test]
    fn packets_parse_with_their_id_and_payload_and_junk_is_skipped() {
        let mut d = packet_msg(41, &[0x45, 0, 0, 20, 9]);
        d.extend(packet_msg(42, &[]));
        let got = parse(&d);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Incoming::Packet(Packet { id: 41, payload: Some(vec![0x45, 0, 0, 20, 9]) }));
        assert_eq!(got[1], Incoming::Packet(Packet { id: 42, payload: Some(vec![]) }));
        // Every truncation of a message parses without a panic, to nothing or to what was whole.
        let one = packet_msg(5, &[1; 33]);
        for cut in 0..one.len() {
            assert!(parse(&one[..cut]).is_empty(), "cut at {cut}");
        }
        // A lying attribute length inside a whole message: no packet, no panic.
        let mut bad = packet_msg(6, &[1; 8]);
        bad[HEADERS..HEADERS + 2].copy_from_slice(&500u16.to_ne_bytes());
        assert_eq!(parse(&bad), vec![Incoming::Other]);
        let mut ack = vec![0u8; 36];
        ack[..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        assert_eq!(parse(&ack), vec![Incoming::Ack(16)]);
    }

    #[test]
    fn verdicts_name_the_packet_and_the_batch_kind() {
        let mut b = Vec::new();
        verdict_message(&mut b, 0x1234, 99, None, true);
        assert_eq!(u32_at(&b, 0), Some(b.len() as u32));
        assert_eq!(u16_at(&b, 4), Some((3 << 8) | 3), "a batch verdict");
        assert_eq!(&b[18..20], &[0x12, 0x34], "queue number in network order");
        assert_eq!(&b[24..28], &1u32.to_be_bytes(), "NF_ACCEPT");
        assert_eq!(&b[28..32], &99u32.to_be_bytes());
        verdict_message(&mut b, 1, 7, Some(&[1, 2, 3]), false);
        assert_eq!(u16_at(&b, 4), Some(3 << 8 | 1), "a single verdict");
        assert_eq!(b.len(), 20 + 12 + 8, "the payload attribute padded to 4 bytes");
    }
}
