//! A tiny HTTP/1.1 client: keep-alive requests written and read by hand, so the
//! generator costs little CPU beside what it measures.

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection; the cheapest client, so the generator's CPU goes
/// to the measurement, not to a client library.
pub(crate) struct Http {
    pub(crate) addr: String,
    /// The server said `Connection: close` (cowboy does after `max_keepalive` requests).
    pub(crate) closing: bool,
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) body: std::ops::Range<usize>,
}

impl Http {
    pub(crate) async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            addr: addr.to_owned(),
            closing: false,
            stream,
            buf: Vec::with_capacity(8192),
            body: 0..0,
        })
    }

    /// Sends a complete request and reads one response; returns the status.
    pub(crate) async fn call(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.buf.drain(..self.body.end);
        self.body = 0..0;
        if self.closing {
            *self = Http::connect(&self.addr).await?;
        }
        self.stream.write_all(request).await?;
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..head_end])?;
                let status: u16 = head.get(9..12).context("status line")?.parse()?;
                let mut length = None;
                for line in head.split("\r\n").skip(1) {
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = Some(v.trim().parse::<usize>()?);
                        } else if k.eq_ignore_ascii_case("connection") {
                            self.closing |= v.trim().eq_ignore_ascii_case("close");
                        } else if k.eq_ignore_ascii_case("transfer-encoding") {
                            bail!("chunked responses are not supported by the bench client");
                        }
                    }
                }
                let start = head_end + 4;
                let end = start + length.context("no content-length")?;
                while self.buf.len() < end {
                    self.read_more().await?;
                }
                self.body = start..end;
                return Ok(status);
            }
            self.read_more().await?;
        }
    }

    pub(crate) async fn read_more(&mut self) -> anyhow::Result<()> {
        let len = self.buf.len();
        self.buf.resize(len + 8192, 0);
        let n = self.stream.read(&mut self.buf[len..]).await?;
        self.buf.truncate(len + n);
        ensure!(n > 0, "connection closed");
        Ok(())
    }

    pub(crate) fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn post(addr: &str, path: &str, auth: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
