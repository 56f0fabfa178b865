//! `chaos-netprobe`: a bounded TCP throughput probe for tests and benchmarks
//! (run inside a namespace with `ip netns exec`).
//!
//!   chaos-netprobe sink ADDR:PORT          accept one connection, read to EOF, print "BYTES SECONDS"
//!   chaos-netprobe send ADDR:PORT BYTES    connect, send BYTES (at most 64 MiB), close
//!   chaos-netprobe source ADDR:PORT BYTES  accept one connection, send BYTES, close
//!   chaos-netprobe drain ADDR:PORT         connect, read to EOF, print "BYTES SECONDS"
//!   chaos-netprobe udp-sink ADDR:PORT      print "ready", count numbered datagrams until 1 s
//!                                          without one, print "received R distinct D duplicates X bad B
//!                                          reordered O seconds S" (O: intact datagrams that arrived after
//!                                          a higher-numbered one)
//!   chaos-netprobe udp-send ADDR:PORT COUNT PPS   send COUNT numbered datagrams (at most
//!                                          1,000,000) at PPS per second (0: as fast as possible)
//!
//! Every step has a 20 s timeout, so a probe never outlives its test.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const TIMEOUT: Duration = Duration::from_secs(20);
const MAX_BYTES: u64 = 64 * 1024 * 1024;
const MAX_DATAGRAMS: u64 = 1_000_000;
const DATAGRAM: usize = 64;

/// Datagram `seq`: its number, then bytes that follow from it (so a changed byte shows).
fn datagram(seq: u64) -> [u8; DATAGRAM] {
    let mut d = [0u8; DATAGRAM];
    d[..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in d.iter_mut().enumerate().skip(8) {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    d
}

fn udp_send(addr: &str, count: u64, pps: u64) -> anyhow::Result<()> {
    let to = addr.to_socket_addrs()?.next().context("address")?;
    let s = UdpSocket::bind("0.0.0.0:0").context("bind")?;
    let start = Instant::now();
    for seq in 0..count {
        if pps > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / pps as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if start.elapsed() > TIMEOUT {
            bail!("sending took over {TIMEOUT:?}");
        }
        // A full socket buffer is not loss on the wire: try again.
        while let Err(e) = s.send_to(&datagram(seq), to) {
            if e.kind() != std::io::ErrorKind::WouldBlock && e.raw_os_error() != Some(105) {
                return Err(e).context("send");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    Ok(())
}

fn udp_sink(addr: &str) -> anyhow::Result<()> {
    let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut stdout = std::io::stdout();
    stdout.write_all(b"ready\n")?;
    stdout.flush()?;
    let (mut received, mut bad, mut seen) = (0u64, 0u64, HashSet::new());
    let (mut highest, mut reordered) = (None::<u64>, 0u64);
    let (start, mut first, mut last) = (Instant::now(), None, None);
    let mut buf = [0u8; 2048];
    loop {
        match s.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                received += 1;
                let seq = buf.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                match seq {
                    Some(q) if n == DATAGRAM && buf[..n] == datagram(q) => {
                        seen.insert(q);
                        if highest.is_some_and(|h| q < h) {
                            reordered += 1;
                        }
                        highest = highest.max(Some(q));
                    }
                    _ => bad += 1,
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if first.is_some() || start.elapsed() > TIMEOUT {
                    break;
                }
            }
            Err(e) => return Err(e).context("recv"),
        }
    }
    let secs = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let distinct = seen.len() as u64;
    let dups = received - distinct - bad;
    stdout.write_all(
        format!("received {received} distinct {distinct} duplicates {dups} bad {bad} reordered {reordered} seconds {secs}\n").as_bytes(),
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(2).context("ADDR:PORT")?;
    let bytes = || -> anyhow::Result<u64> {
        let b: u64 = args.get(3).context("BYTES")?.parse().context("BYTES must be a number")?;
        if b > MAX_BYTES {
            bail!("at most {MAX_BYTES} bytes");
        }
        Ok(b)
    };
    match args.get(1).map(String::as_str) {
        Some("sink") => report(&mut accept(addr)?)?,
        Some("send") => write_n(&mut connect(addr)?, bytes()?)?,
        Some("source") => {
            let n = bytes()?;
            write_n(&mut accept(addr)?, n)?
        }
        Some("drain") => report(&mut connect(addr)?)?,
        Some("udp-sink") => udp_sink(addr)?,
        Some("udp-send") => {
            let count: u64 = args.get(3).context("COUNT")?.parse().context("COUNT must be a number")?;
            let pps: u64 = args.get(4).context("PPS")?.parse().context("PPS must be a number")?;
            if count > MAX_DATAGRAMS {
                bail!("at most {MAX_DATAGRAMS} datagrams");
            }
            udp_send(addr, count, pps)?
        }
        _ => bail!("usage: chaos-netprobe sink|drain|udp-sink ADDR:PORT | send|source ADDR:PORT BYTES | udp-send ADDR:PORT COUNT PPS"),
    }
    Ok(())
}

fn accept(addr: &str) -> anyhow::Result<TcpStream> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let sa = addr.to_socket_addrs()?.next().context("address")?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).context("connect"),
        }
    }
}

fn write_n(s: &mut TcpStream, bytes: u64) -> anyhow::Result<()> {
    s.set_write_timeout(Some(TIMEOUT))?;
    let buf = vec![b'x'; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).context("write")?;
        left -= k as u64;
    }
    Ok(())
}

/// Read to EOF and print "BYTES SECONDS" (seconds from the first byte).
fn report(s: &mut TcpStream) -> anyhow::Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut first) = (0u64, None);
    loop {
        let k = s.read(&mut buf).context("read")?;
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        n += k as u64;
    }
    let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    std::io::stdout().write_all(format!("{n} {secs}\n").as_bytes())?;
    Ok(())
}
