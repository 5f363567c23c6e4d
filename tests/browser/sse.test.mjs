// A real browser EventSource on a page Warren serves (/demo/sse): it replays a stream,
// the test drops its connection (a TCP proxy between the browser and Warren cuts every
// socket), and the EventSource reconnects by itself with Last-Event-ID: nothing is
// missed, nothing shows twice. Run by scripts/browser-test.sh, which starts Warren with
// a `{ stream = WARREN_SSE_STREAM }` grant and sets WARREN_URL / WARREN_TOKEN.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { chromium } from "playwright-core";

const base = process.env.WARREN_URL;
const token = process.env.WARREN_TOKEN;
const stream = process.env.WARREN_SSE_STREAM;
const management = process.env.WARREN_TEST_MANAGEMENT_URL || "http://127.0.0.1:15672";
const admin = { authorization: `Basic ${Buffer.from("guest:guest").toString("base64")}`, "content-type": "application/json" };

/** A TCP proxy in front of Warren whose open connections the test can cut. */
async function proxy(target) {
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on("error", () => b.destroy());
      a.on("close", () => { sockets.delete(a); b.destroy(); });
      a.pipe(b);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut: () => { for (const socket of sockets) socket.destroy(); },
    close: () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(resolve); }),
  };
}

async function publish(routingKey, n) {
  const response = await fetch(`${base}/v1/publish`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ exchange: "amq.topic", routing_key: routingKey, payload: { n } }),
  });
  assert.equal(response.status, 202, await response.text());
}

test("an EventSource resumes a stream after a dropped connection, without loss or duplicates", async () => {
  assert.ok(base && token && stream, "WARREN_URL, WARREN_TOKEN and WARREN_SSE_STREAM must be set");
  const queue = `${management}/api/queues/%2F/${encodeURIComponent(stream)}`;
  const declared = await fetch(queue, { method: "PUT", headers: admin, body: JSON.stringify({ durable: true, arguments: { "x-queue-type": "stream" } }) });
  assert.ok(declared.ok, `declare the stream: ${declared.status}`);
  const topic = `demo.sse.${Math.random().toString(36).slice(2)}`;
  const bound = await fetch(`${management}/api/bindings/%2F/e/amq.topic/q/${encodeURIComponent(stream)}`, {
    method: "POST", headers: admin, body: JSON.stringify({ routing_key: `${topic}.#` }),
  });
  assert.ok(bound.ok, `bind the stream: ${bound.status}`);
  const between = await proxy(new URL(base));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    for (let n = 0; n < 20; n++) await publish(`${topic}.before`, n);
    const page = await browser.newPage();
    await page.goto(`${between.url}/demo/sse#${new URLSearchParams({ token, stream })}`);
    const received = () => page.evaluate(() => window.warrenEvents.received.length);
    await page.waitForFunction(() => window.warrenEvents.received.length >= 20, null, { timeout: 15000 });

    // The network drops; meanwhile more is written to the stream.
    between.cut();
    await page.waitForFunction(() => document.getElementById("status").textContent === "reconnecting", null, { timeout: 10000 });
    for (let n = 20; n < 40; n++) await publish(`${topic}.during`, n);

    await page.waitForFunction(() => window.warrenEvents.received.length >= 40, null, { timeout: 20000 });
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(await received(), 40, "nothing shown twice");
    const state = await page.evaluate(() => window.warrenEvents);
    assert.ok(state.opens >= 2, `the EventSource reconnected by itself (opened ${state.opens} times)`);
    assert.deepEqual(state.received.map((e) => e.payload.n), [...Array(40).keys()], "none missed, in order");
    for (const event of state.received) assert.equal(event.id, String(event.offset), "the event id is the offset");
    assert.deepEqual(state.errors, [], "no error event from Warren");
  } finally {
    await browser.close();
    await between.close();
    await fetch(queue, { method: "DELETE", headers: admin });
  }
});
