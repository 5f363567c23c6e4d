// Forced server-side disconnects: Warren restarted mid-stream (1001) and the network
// cut under the client. Durable subscriptions resume with nothing lost and no acked
// message delivered again; live ones are resubscribed; backoff has jitter; an
// idempotent publish whose answer was lost is sent again with the same key, once.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Warren } from "../warren.js";
import { WarrenProcess, topic, until, sleep, recordStates, proxy } from "./harness.mjs";

let a; // the instance the client talks to, restarted by the tests
let b; // a replica (same secret, same broker) that publishes while `a` is down
let token;
const clients = [];
const reconnect = { initialDelayMs: 100, maxDelayMs: 800, factor: 2, jitter: 0.5 };

before(async () => {
  a = await new WarrenProcess().start();
  b = await new WarrenProcess({ secret: a.secret }).start();
  token = await a.token();
});
after(async () => {
  for (const w of clients) w.close();
  await a.dispose();
  await b.dispose();
});

test("Warren restarted mid-stream (1001): durable resumes, nothing lost, no acked message again; live resubscribed", async () => {
  const w = new Warren(a.ws, { token, reconnect });
  clients.push(w);
  const states = recordStates(w);
  const t = topic();
  const deliveries = []; // { n, redelivered, acked }
  const sub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.d`, mode: "durable", queue: `q-${t}`, prefetch: 20 },
    async (m) => { deliveries.push({ n: m.payload.n, redelivered: m.redelivered }); });
  const live = [];
  const liveSub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.l` }, (m) => { live.push(m.payload.n); });
  await Promise.all([sub.ready, liveSub.ready]);

  const total = 300;
  let restarted;
  for (let n = 0; n < total; n++) {
    await b.publish(token, { exchange: "amq.topic", routing_key: `${t}.d`, payload: { n } });
    if (n === 100) restarted = a.restart(300); // stop (1001) while messages keep coming, start again
    if (n % 10 === 0) await sleep(5);
  }
  await restarted;
  await until(() => new Set(deliveries.map((d) => d.n)).size === total, 20000, `all ${total} durable messages`);
  await sleep(300);

  const closes = states.filter((s) => s.state === "disconnected");
  assert.equal(closes[0].code, 1001, "the first disconnect is Warren's shutdown");
  assert.ok(closes.every((c) => c.willReconnect));
  assert.equal(states.at(-1).state, "connected");
  // Nothing lost: every n arrived. A message arrives twice only when its ack had not
  // reached the broker when the socket closed: then it is marked redelivered.
  const count = new Map();
  for (const d of deliveries) count.set(d.n, (count.get(d.n) ?? 0) + 1);
  const twice = deliveries.filter((d) => count.get(d.n) > 1 && d.redelivered);
  for (const [n, c] of count) {
    if (c > 1) assert.ok(deliveries.some((d) => d.n === n && d.redelivered), `message ${n} delivered ${c} times, none marked redelivered`);
    assert.ok(c <= 2, `message ${n} delivered ${c} times`);
  }
  assert.ok(twice.length <= 20, `at most a prefetch of messages comes again (${twice.length})`);

  // The live subscription was resubscribed on the new connection.
  await until(async () => {
    await b.publish(token, { exchange: "amq.topic", routing_key: `${t}.l`, payload: { n: -1 }, mandatory: false });
    return live.includes(-1);
  }, 5000, "the live subscription after the restart");
});

test("reconnects with exponential backoff and jitter while Warren is down", async () => {
  const w = new Warren(a.ws, { token, reconnect });
  clients.push(w);
  const states = recordStates(w);
  await w.ready();
  await a.stop();
  try {
    await sleep(2500);
    const seen = () => states.map((s) => `${s.state}${s.code ? " " + s.code : ""}${s.delayMs !== undefined ? " +" + s.delayMs : ""}`).join(", ");
    const down = states.filter((s) => s.state === "disconnected");
    assert.equal(down[0].code, 1001);
    const delays = down.map((s) => s.delayMs);
    assert.ok(delays.length >= 4, `several attempts: ${delays}`);
    for (let i = 0; i < delays.length; i++) {
      const base = Math.min(reconnect.maxDelayMs, reconnect.initialDelayMs * 2 ** i);
      assert.ok(delays[i] <= base && delays[i] >= base * 0.5, `attempt ${i}: ${delays[i]} ms within [${base / 2}, ${base}]; states: ${seen()}`);
    }
    assert.ok(new Set(delays.map((d, i) => d / Math.min(reconnect.maxDelayMs, reconnect.initialDelayMs * 2 ** i))).size > 1, "jitter");
  } finally {
    // The next test needs Warren back, whatever happened here.
    await a.start();
  }
  await until(() => w.state === "connected", 5000, "reconnected after Warren is back");
});

test("network cut: reconnect; an idempotent publish is sent again with its key and lands once", async () => {
  const p = await proxy(a.port);
  const w = new Warren(p.url, { token, reconnect });
  clients.push(w);
  const states = recordStates(w);
  const t = topic();
  const got = [];
  await w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue: `q-${t}` }, (m) => { got.push(m); }).ready;
  const keyed = [];
  for (let i = 0; i < 10; i++) {
    keyed.push(w.publish({ exchange: "amq.topic", routingKey: `${t}.k`, payload: { i }, idempotencyKey: `${t}-${i}` }));
  }
  const unkeyed = w.publish({ exchange: "amq.topic", routingKey: `${t}.u`, payload: { unkeyed: true } });
  p.cut(); // before any answer can come back
  await assert.rejects(unkeyed, (e) => e.code === "connection_lost");
  const confirms = await Promise.all(keyed);
  assert.ok(states.some((s) => s.state === "disconnected" && s.code === 1006), "the cut was seen");
  await until(() => new Set(got.filter((m) => m.payload.i !== undefined).map((m) => m.payload.i)).size === 10, 10000, "ten keyed messages");
  await sleep(500);
  const keyedGot = got.filter((m) => m.payload.i !== undefined);
  const ids = keyedGot.map((m) => m.properties.messageId);
  assert.deepEqual(new Set(ids), new Set(confirms.map((c) => c.messageId)), "the confirmed message ids are the delivered ones");
  assert.equal(keyedGot.length, 10, "each keyed publish landed once");
  w.close();
  await p.close();
});
