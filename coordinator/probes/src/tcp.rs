//! TCP connect check.

use std::time::{Duration, Instant};

use anyhow::Context;

/// Connect to `address` (host:port) within `within`; the connect time.
pub async fn connect(address: &str, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    crate::bounded(&format!("TCP connect to {address}"), within, async {
        tokio::net::TcpStream::connect(address).await.with_context(|| format!("TCP connect to {address}"))
    })
    .await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_port_answers_and_closed_port_is_an_error_naming_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        assert!(connect(&addr, Duration::from_secs(1)).await.is_ok());
        drop(l);
        let e = connect(&addr, Duration::from_secs(1)).await.expect_err("closed");
        assert!(format!("{e:#}").contains(&addr), "{e:#}");
    }
}
