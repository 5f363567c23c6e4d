// Test harness: starts real Warren processes (built by scripts/js-client-test.sh, or
// here with cargo), each with a random port, against the real RabbitMQ; mints tokens
// with `warren token`; publishes over REST; and a TCP proxy that can cut connections.
// Topology: everything goes through `amq.topic` (present in every vhost) with routing
// keys unique per test; durable queues are declared by Warren and expire by themselves.
import { spawn, execFile, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes, randomUUID } from "node:crypto";
import net from "node:net";

const root = join(dirname(fileURLToPath(import.meta.url)), "../../..");

// WARREN_TEST_WEBSOCKET=/path/to/node_modules/ws/wrapper.mjs runs the tests with the
// `ws` package instead of Node's own WebSocket.
if (process.env.WARREN_TEST_WEBSOCKET) {
  globalThis.WebSocket = (await import(process.env.WARREN_TEST_WEBSOCKET)).WebSocket;
}

export function binary() {
  if (process.env.WARREN_BIN) return process.env.WARREN_BIN;
  execFileSync("cargo", ["build", "--locked", "-q", "--bin", "warren"], { cwd: root, stdio: "inherit" });
  const target = process.env.CARGO_TARGET_DIR || join(root, "target");
  process.env.WARREN_BIN = join(target, "debug", "warren");
  return process.env.WARREN_BIN;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A unique routing-key prefix for one test. */
export const topic = () => `jstest.${randomUUID().slice(0, 8)}`;

/** Waits until `check()` is truthy (polls), or fails after `ms`. */
export async function until(check, ms = 10000, what = "condition") {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/**
 * A Warren process with its config (shared secret `secret`, so two instances are
 * replicas of one deployment). `start()`, `stop(signal)`, `restart()` keep the port.
 */
export class WarrenProcess {
  /**
   * `grants`: extra grant entries (TOML inline tables) of every tenant, as
   * `{ publish: [...], subscribe: [...] }`; `tenantToml`: TOML appended after the
   * tenants (e.g. `[[tenants.js.queues]]` for topology).
   */
  constructor({ secret = randomBytes(32).toString("hex"), extraToml = "", tenants = ["js"], amqpUrl,
    grants = {}, tenantToml = "" } = {}) {
    this.secret = secret;
    this.grants = grants;
    this.tenantToml = tenantToml;
    this.amqpUrl = amqpUrl || process.env.WARREN_TEST_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672";
    this.extraToml = extraToml;
    this.tenants = tenants;
    this.dir = mkdtempSync(join(tmpdir(), "warren-js-"));
    this.config = join(this.dir, "warren.toml");
    this.child = null;
    this.log = "";
  }

  async start() {
    if (!this.port) this.port = await freePort();
    this.writeConfig();
    this.child = spawn(binary(), ["serve", "--config", this.config], { stdio: ["ignore", "ignore", "pipe"] });
    this.child.stderr.on("data", (d) => { this.log = (this.log + d).slice(-20000); });
    const child = this.child;
    this.exited = new Promise((resolve) => child.on("exit", resolve));
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`warren exited: ${this.log}`);
      try { return (await fetch(`${this.http}/readyz`)).ok; } catch { return false; }
    }, 30000, "warren /readyz");
    return this;
  }

  writeConfig() {
    const tenants = this.tenants.map((t) => `
[tenants.${t}]
vhost = "/"
publish = [{ exchange = "amq.topic", routing_key = "jstest.#" }${(this.grants.publish ?? []).map((g) => `, ${g}`).join("")}]
subscribe = [{ exchange = "amq.topic", routing_key = "jstest.#" }${(this.grants.subscribe ?? []).map((g) => `, ${g}`).join("")}]
`).join("");
    writeFileSync(this.config, `
[server]
listen = "127.0.0.1:${this.port ?? 0}"
[amqp]
url = "${this.amqpUrl}"
[auth]
hs256_secret = "${this.secret}"
leeway_s = 0
[ws]
durable_queue_expiry_s = 600
${this.extraToml}
${tenants}
${this.tenantToml}`);
  }

  get http() { return `http://127.0.0.1:${this.port}`; }
  get ws() { return `ws://127.0.0.1:${this.port}/v1/ws`; }

  async stop(signal = "SIGTERM") {
    if (!this.child) return;
    const exited = this.exited;
    this.child.kill(signal);
    await exited;
    this.child = null;
  }

  async restart(pauseMs = 0) {
    await this.stop();
    if (pauseMs) await sleep(pauseMs);
    await this.start();
  }

  async dispose() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }

  /**
   * Closes this process's AMQP connections on the broker side (`rabbitmqctl
   * close_connection`), as a broker restart does for this Warren alone: other users of
   * the shared broker are not touched. Returns how many were closed.
   */
  async cutBroker() {
    const ss = execFileSync("ss", ["-tnpH", "state", "established", "( dport = :5672 )"], { encoding: "utf8" });
    const ports = ss.split("\n").filter((l) => l.includes(`pid=${this.child.pid},`))
      .map((l) => l.trim().split(/\s+/)[2].split(":").pop());
    const ctl = (...args) => new Promise((resolve, reject) => execFile("rabbitmqctl", args,
      (error, out, stderr) => (error ? reject(new Error(stderr || error.message)) : resolve(out))));
    const listed = await ctl("list_connections", "-q", "--no-table-headers", "pid", "peer_port");
    const pids = listed.split("\n").map((l) => l.trim().split(/\s+/))
      .filter(([pid, port]) => pid && ports.includes(port)).map(([pid]) => pid);
    for (const pid of pids) await ctl("close_connection", pid, "warren.js test: broker link cut");
    return pids.length;
  }

  /** Mints a token with `warren token` (config of this process). */
  token({ tenant = this.tenants[0], sub = "js-test", scope = "publish subscribe", ttl = "1h" } = {}) {
    if (!this.child) this.writeConfig();
    return new Promise((resolve, reject) => {
      execFile(binary(), ["token", "--config", this.config, "--tenant", tenant, "--sub", sub, "--scope", scope, "--ttl", ttl],
        (error, stdout, stderr) => (error ? reject(new Error(stderr || error.message)) : resolve(stdout.trim())));
    });
  }

  /** POST /v1/publish; returns the JSON answer, throws on a non-2xx. */
  async publish(token, message, headers = {}) {
    const response = await fetch(`${this.http}/v1/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}`, ...headers },
      body: JSON.stringify(message),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`publish: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }
}

/** A TCP proxy in front of `port`; `cut()` destroys every connection through it. */
export async function proxy(port) {
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(port, "127.0.0.1");
    sockets.add(client); sockets.add(upstream);
    client.pipe(upstream); upstream.pipe(client);
    const done = () => { sockets.delete(client); sockets.delete(upstream); client.destroy(); upstream.destroy(); };
    client.on("error", done); upstream.on("error", done);
    client.on("close", done); upstream.on("close", done);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: server.address().port,
    get url() { return `ws://127.0.0.1:${this.port}/v1/ws`; },
    connections: () => sockets.size / 2,
    cut() { for (const s of sockets) s.destroy(); },
    close() { for (const s of sockets) s.destroy(); return new Promise((r) => server.close(r)); },
  };
}

/** Records a client's state events. */
export function recordStates(client) {
  const events = [];
  client.on("state", (e) => events.push(e));
  return events;
}
