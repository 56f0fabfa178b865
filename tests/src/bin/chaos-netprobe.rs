//! `chaos-netprobe`: a bounded TCP throughput probe for tests and benchmarks
//! (run inside a namespace with `ip netns exec`).
//!
//!   chaos-netprobe sink ADDR:PORT          accept one connection, read to EOF, print "BYTES SECONDS"
//!   chaos-netprobe send ADDR:PORT BYTES    connect, send BYTES (at most 64 MiB), close
//!   chaos-netprobe source ADDR:PORT BYTES  accept one connection, send BYTES, close
//!   chaos-netprobe drain ADDR:PORT         connect, read to EOF, print "BYTES SECONDS"
//!
//! Every step has a 20 s timeout, so a probe never outlives its test.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const TIMEOUT: Duration = Duration::from_secs(20);
const MAX_BYTES: u64 = 64 * 1024 * 1024;

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
        _ => bail!("usage: chaos-netprobe sink|drain ADDR:PORT | send|source ADDR:PORT BYTES"),
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
