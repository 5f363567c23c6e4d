// A real browser EventSource through a broker outage and a gateway restart (issue #27):
// Warren answers a reconnect it cannot serve yet with a 200 event stream that sets
// `retry:` and says `event: error`, so the browser keeps trying instead of closing for
// good, and the replay resumes with Last-Event-ID: nothing missed, nothing twice.
// The test runs Warren processes of its own (WARREN_BIN), their broker link through a
// TCP proxy it can cut. Run by scripts/browser-test.sh.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { chromium } from "playwright-core";

const bin = process.env.WARREN_BIN;
const amqp = new URL(process.env.WARREN_TEST_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672");
const management = process.env.WARREN_TEST_MANAGEMENT_URL || "http://127.0.0.1:15672";
const admin = { authorization: `Basic ${Buffer.from("guest:guest").toString("base64")}`, "content-type": "application/json" };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A TCP proxy to the broker that can be cut (open links dropped, new ones refused). */
async function brokerProxy() {
  const sockets = new Set();
  let up = true;
  const server = net.createServer((client) => {
    if (!up) { client.destroy(); return; }
    const upstream = net.connect(Number(amqp.port || 5672), amqp.hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on("error", () => b.destroy());
      a.on("close", () => { sockets.delete(a); b.destroy(); });
      a.pipe(b);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    cut: () => { up = false; for (const socket of sockets) socket.destroy(); },
    restore: () => { up = true; },
    close: () => new Promise((resolve) => { up = false; for (const s of sockets) s.destroy(); server.close(resolve); }),
  };
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A `warren serve` of this test's, on `port`, reaching the broker at `brokerPort`. */
class Warren {
  constructor(dir, port, brokerPort, stream) {
    this.dir = dir;
    this.port = port;
    this.config = join(dir, "warren.toml");
    const auth = amqp.username ? `${amqp.username}:${amqp.password}@` : "";
    writeFileSync(this.config, `[server]
listen = "127.0.0.1:${port}"
shutdown_grace_s = 2
[amqp]
url = "amqp://${auth}127.0.0.1:${brokerPort}"
[auth]
hs256_secret = "${randomBytes(32).toString("hex")}"
[sse]
retry_ms = 200
[tenants.browser]
vhost = "/"
subscribe = [{ stream = "${stream}" }]
`);
    this.base = `http://127.0.0.1:${port}`;
    this.log = join(dir, "warren.log");
  }

  async start() {
    writeFileSync(this.log, "", { flag: "a" });
    const out = await import("node:fs").then((fs) => fs.openSync(this.log, "a"));
    this.child = spawn(bin, ["serve", "--config", this.config], { stdio: ["ignore", "ignore", out] });
    this.exited = new Promise((resolve) => this.child.on("exit", resolve));
    const deadline = Date.now() + 20000;
    for (;;) {
      try {
        if ((await fetch(`${this.base}/readyz`)).status === 200) return;
      } catch { /* not listening yet */ }
      assert.ok(Date.now() < deadline, `Warren not ready: ${readFileSync(this.log, "utf8").slice(-2000)}`);
      await sleep(50);
    }
  }

  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill("SIGTERM");
    await this.exited;
  }

  token() {
    return execFileSync(bin, ["token", "--config", this.config, "--tenant", "browser", "--sub", "e2e",
      "--scope", "subscribe", "--ttl", "10m"]).toString().trim();
  }
}

/** Declares a stream and returns it with a publisher that writes straight to the broker. */
async function stream() {
  const name = `wt-sse-recovery-${randomBytes(6).toString("hex")}`;
  const queue = `${management}/api/queues/%2F/${encodeURIComponent(name)}`;
  const declared = await fetch(queue, { method: "PUT", headers: admin, body: JSON.stringify({ durable: true, arguments: { "x-queue-type": "stream" } }) });
  assert.ok(declared.ok, `declare the stream: ${declared.status}`);
  const publish = async (n) => {
    const r = await fetch(`${management}/api/exchanges/%2F/amq.default/publish`, {
      method: "POST", headers: admin,
      body: JSON.stringify({ routing_key: name, payload: JSON.stringify({ n }), payload_encoding: "string",
        properties: { content_type: "application/json", delivery_mode: 2 } }),
    });
    assert.ok(r.ok && (await r.json()).routed, `publish ${n}`);
  };
  return { name, publish, remove: () => fetch(queue, { method: "DELETE", headers: admin }) };
}

async function withBrowser(work) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    return await work(await browser.newPage());
  } finally {
    await browser.close();
  }
}

/** Waits until the page has received `count` events; fails early if it gave up. */
async function received(page, count, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const state = await page.evaluate(() => window.warrenEvents);
    assert.equal(state.closed, false, `the EventSource closed for good after ${state.received.length} events; errors ${JSON.stringify(state.errors)}`);
    if (state.received.length >= count) return state;
    assert.ok(Date.now() < deadline, `${state.received.length} of ${count} events; errors ${JSON.stringify(state.errors)}`);
    await sleep(100);
  }
}

function assertExactly(state, count) {
  assert.deepEqual(state.received.map((e) => e.payload.n), [...Array(count).keys()], "none missed, none twice, in order");
}

test("an EventSource rides out a 5 s broker outage by itself", async () => {
  assert.ok(bin, "WARREN_BIN must be set");
  const dir = mkdtempSync(join(tmpdir(), "warren-sse-"));
  const proxy = await brokerProxy();
  const log = await stream();
  const warren = new Warren(dir, await freePort(), proxy.port, log.name);
  try {
    await warren.start();
    for (let n = 0; n < 50; n++) await log.publish(n);
    await withBrowser(async (page) => {
      await page.goto(`${warren.base}/demo/sse#${new URLSearchParams({ token: warren.token(), stream: log.name })}`);
      await received(page, 50, 15000);
      proxy.cut();
      // The outage: the stream ends with an error event, and every reconnect meets a
      // gateway without a broker link.
      for (let n = 50; n < 100; n++) await log.publish(n);
      for (let waited = 0; waited < 5000; waited += 250) {
        await sleep(250);
        assert.equal(await page.evaluate(() => window.warrenEvents.closed), false, "closed during the outage");
      }
      proxy.restore();
      const state = await received(page, 100, 30000);
      await sleep(300);
      assertExactly(await page.evaluate(() => window.warrenEvents), 100);
      assert.ok(state.opens >= 2, `reconnected (opened ${state.opens} times)`);
      assert.ok(state.errors.some((e) => e.code === "broker_unavailable"), `Warren said why: ${JSON.stringify(state.errors)}`);
    });
  } finally {
    await warren.stop();
    await proxy.close();
    await log.remove();
  }
});

test("an EventSource comes back by itself after a gateway restart", async () => {
  assert.ok(bin, "WARREN_BIN must be set");
  const dir = mkdtempSync(join(tmpdir(), "warren-sse-"));
  const proxy = await brokerProxy();
  const log = await stream();
  const warren = new Warren(dir, await freePort(), proxy.port, log.name);
  try {
    await warren.start();
    for (let n = 0; n < 30; n++) await log.publish(n);
    await withBrowser(async (page) => {
      await page.goto(`${warren.base}/demo/sse#${new URLSearchParams({ token: warren.token(), stream: log.name })}`);
      await received(page, 30, 15000);
      // Three restarts: each time the browser retries every 200 ms, and meets the new
      // gateway while it is still connecting to the broker.
      for (let round = 1; round <= 3; round++) {
        await warren.stop();
        for (let n = round * 30; n < round * 30 + 30; n++) await log.publish(n);
        await sleep(500);
        await warren.start();
        await received(page, round * 30 + 30, 30000);
      }
      await sleep(300);
      assertExactly(await page.evaluate(() => window.warrenEvents), 120);
    });
  } finally {
    await warren.stop();
    await proxy.close();
    await log.remove();
  }
});
