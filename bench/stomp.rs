//! RabbitMQ's own WebSocket fan-out, Web-STOMP (the rabbitmq_web_stomp plugin on
//! ws://127.0.0.1:15674/ws), next to Warren's live fan-out at the same socket count and
//! rates: the same publisher, message and latency measurement (`fan_out`).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::{SinkExt, StreamExt};
use lapin::Connection;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{EXCHANGE, FAN_KEY, Fanout, Texts, Warren, Ws, fan_out, warren_fanout};

const STOMP_ADDR: &str = "127.0.0.1:15674";

/// Both fan-outs at each rate, then their CPU per delivery and p99 side by side.
pub async fn run(
    warren: &Warren,
    conn: &Connection,
    sockets: usize,
    rates: &[u64],
    seconds: f64,
) -> anyhow::Result<()> {
    check().await?;
    let mut rows = Vec::new();
    for &rate in rates {
        let w = warren_fanout(warren, conn, sockets, rate, seconds).await?;
        w.print("Warren WebSocket live fan-out", rate);
        let s = stomp_fanout(conn, sockets, rate, seconds).await?;
        s.print("RabbitMQ Web-STOMP fan-out", rate);
        rows.push((rate, w, s));
    }
    println!(
        "\nWarren vs Web-STOMP at {sockets} sockets: CPU per delivery of the whole path \
         (warren + RabbitMQ for Warren, RabbitMQ for Web-STOMP) and p99 publish-to-receive"
    );
    println!(
        "{:>7} {:>14} {:>14} {:>8} {:>14} {:>14}",
        "msg/s", "Warren µs", "STOMP µs", "ratio", "Warren p99 ms", "STOMP p99 ms"
    );
    for (rate, w, s) in rows {
        let warren_us = total_us(&w, true);
        let stomp_us = total_us(&s, false);
        println!(
            "{rate:>7} {warren_us:>14.2} {stomp_us:>14.2} {:>7.2}x {:>14.2} {:>14.2}",
            warren_us / stomp_us,
            w.p99,
            s.p99
        );
    }
    Ok(())
}

/// Fails with what to do when Web-STOMP is not listening (main checks before the run).
pub async fn check() -> anyhow::Result<()> {
    if let Err(e) = TcpStream::connect(STOMP_ADDR).await {
        bail!(
            "Web-STOMP is not listening on {STOMP_ADDR} ({e}): enable it with \
             `rabbitmq-plugins enable rabbitmq_web_stomp` (bench/run.sh does)"
        );
    }
    Ok(())
}

/// CPU per delivery of the processes on the path (Warren's only when it is on it).
fn total_us(f: &Fanout, through_warren: bool) -> f64 {
    f.rabbitmq_us_per_delivery
        + if through_warren {
            f.warren_us_per_delivery
        } else {
            0.0
        }
}

async fn stomp_fanout(
    conn: &Connection,
    sockets: usize,
    rate: u64,
    seconds: f64,
) -> anyhow::Result<Fanout> {
    let results: Vec<anyhow::Result<Ws>> = futures::stream::iter(0..sockets)
        .map(subscribe)
        .buffer_unordered(64)
        .collect()
        .await;
    let texts = results
        .into_iter()
        .map(|ws| ws.map(message_bodies))
        .collect::<anyhow::Result<Vec<Texts>>>()?;
    fan_out(conn, texts, rate, seconds).await
}

/// A STOMP 1.2 session over WebSocket subscribed to EXCHANGE with FAN_KEY; returns once
/// the broker's RECEIPT says the subscription is in place.
async fn subscribe(i: usize) -> anyhow::Result<Ws> {
    let session = async {
        let mut req = format!("ws://{STOMP_ADDR}/ws").into_client_request()?;
        req.headers_mut()
            .insert("sec-websocket-protocol", "v12.stomp".parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        ws.send(Message::text(
            "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\
             heart-beat:0,0\n\n\0",
        ))
        .await?;
        expect(&mut ws, "CONNECTED").await?;
        let receipt = format!("sub-{i}");
        ws.send(Message::text(format!(
            "SUBSCRIBE\nid:0\ndestination:/exchange/{EXCHANGE}/{FAN_KEY}\nack:auto\n\
             receipt:{receipt}\n\n\0"
        )))
        .await?;
        let frame = expect(&mut ws, "RECEIPT").await?;
        ensure!(
            frame
                .lines()
                .any(|l| l.strip_prefix("receipt-id:") == Some(&receipt)),
            "RECEIPT for another frame: {frame:?}"
        );
        anyhow::Ok(ws)
    };
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .with_context(|| format!("STOMP socket {i}: no RECEIPT within 10 s"))?
        .with_context(|| format!("STOMP socket {i}"))
}

/// The next STOMP frame, which must be `command` (an ERROR frame is the broker's reason).
async fn expect(ws: &mut Ws, command: &str) -> anyhow::Result<String> {
    while let Some(message) = ws.next().await {
        let frame = match message? {
            Message::Text(t) => t.as_str().to_owned(),
            Message::Binary(b) => String::from_utf8(b.to_vec())?,
            Message::Close(c) => bail!("closed while waiting for {command}: {c:?}"),
            _ => continue,
        };
        let got = frame.lines().next().unwrap_or("");
        if got == "ERROR" {
            bail!("STOMP ERROR instead of {command}: {frame:?}");
        }
        ensure!(got == command, "expected {command}, got {frame:?}");
        return Ok(frame);
    }
    bail!("socket closed while waiting for {command}")
}

/// The bodies of the MESSAGE frames a socket receives, until it ends.
fn message_bodies(ws: Ws) -> Texts {
    ws.take_while(|m| std::future::ready(m.is_ok()))
        .flat_map(|m| {
            let bodies = match m {
                Ok(Message::Text(t)) => frame_bodies(t.as_str()),
                Ok(Message::Binary(b)) => frame_bodies(&String::from_utf8_lossy(&b)),
                _ => Vec::new(),
            };
            futures::stream::iter(bodies)
        })
        .boxed()
}

/// The bodies of the MESSAGE frames in one WebSocket message. A frame is
/// `COMMAND\nheader:value\n...\n\nbody\0`; heart-beat EOLs may precede a frame.
fn frame_bodies(text: &str) -> Vec<String> {
    text.split_terminator('\0')
        .filter_map(|frame| {
            let frame = frame.trim_start_matches(['\r', '\n']);
            let (head, body) = frame.split_once("\n\n")?;
            (head.lines().next()? == "MESSAGE").then(|| body.to_owned())
        })
        .collect()
}
