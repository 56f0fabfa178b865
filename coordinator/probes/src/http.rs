//! An HTTP/1.1 status check over plain TCP: `GET PATH`, read the status
//! line, close. No TLS (an `https://` URL is refused when the probe is
//! configured); enough for health endpoints on a trusted network.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// host:port and path of an `http://` URL.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("expected an http:// URL (no TLS support), got {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("expected http://HOST[:PORT][/PATH], got {url:?}"));
    }
    let hostport = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((hostport, path.to_string()))
}

/// The status code of `GET url` and how long the answer took.
pub async fn status(url: &str, within: Duration) -> anyhow::Result<(u16, Duration)> {
    let (hostport, path) = parse_url(url).map_err(anyhow::Error::msg)?;
    let host = hostport.rsplit_once(':').map(|(h, _)| h).unwrap_or(&hostport);
    let t0 = Instant::now();
    crate::bounded(&format!("GET {url}"), within, async {
        let mut s = TcpStream::connect(&hostport).await.with_context(|| format!("connecting to {hostport}"))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: chaos-probe\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .context("sending the request")?;
        let mut buf = vec![0u8; 256];
        let mut got = 0;
        while got < buf.len() && !buf[..got].contains(&b'\n') {
            let n = s.read(&mut buf[got..]).await.context("reading the status line")?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&buf[..got]);
        let line = line.lines().next().unwrap_or_default();
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
            (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok((code, t0.elapsed())),
            _ => bail!("not an HTTP answer from {hostport}: {:?}", line.chars().take(60).collect::<String>()),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://127.0.0.1:8080/health").expect("ok"), ("127.0.0.1:8080".into(), "/health".into()));
        assert_eq!(parse_url("http://example.invalid").expect("ok"), ("example.invalid:80".into(), "/".into()));
        assert!(parse_url("https://x/").expect_err("tls").contains("no TLS"));
        assert!(parse_url("http:///x").is_err());
    }

    #[tokio::test]
    async fn reads_a_status_and_times_out_on_silence() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            // First connection: a real answer. Second: accept and say nothing.
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
            let (_silent, _) = l.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (code, _) = status(&format!("http://{addr}/health"), Duration::from_secs(2)).await.expect("status");
        assert_eq!(code, 503);
        let t0 = Instant::now();
        let e = status(&format!("http://{addr}/health"), Duration::from_millis(300)).await.expect_err("silent");
        assert!(e.to_string().contains("no answer within 300 ms"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
