// The subscription modes and request/reply that need broker topology: a Warren whose
// config declares (topology.apply_on_start) a work queue, a request queue and a stream
// for this run, and grants them. `queue`: two clients on one queue are competing
// consumers; `request()`: a responder written with this library (a `queue`
// subscription that publishes its answer to `reply_to`); `stream`: replay from an
// offset, and a reconnect resumes after the last offset seen, with nothing missed or
// doubled.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { Warren } from "../warren.js";
import { WarrenProcess, until, sleep, proxy, recordStates } from "./harness.mjs";

const run = randomUUID().slice(0, 8);
const work = `jstest-work-${run}`;
const rpc = `jstest-rpc-${run}`;
const log = `jstest-log-${run}`;

let warren;
let token;
const clients = [];
const client = (options = {}, url = warren.ws) => {
  const w = new Warren(url, { token, reconnect: { initialDelayMs: 50, maxDelayMs: 500 }, ...options });
  clients.push(w);
  return w;
};

before(async () => {
  warren = await new WarrenProcess({
    extraToml: "[topology]\napply_on_start = true\n",
    grants: {
      publish: ['{ exchange = "", routing_key = "#" }'],
      subscribe: [`{ queue = "${work}" }`, `{ queue = "${rpc}" }`, `{ stream = "${log}" }`],
    },
    tenantToml: `
[[tenants.js.queues]]
name = "${work}"
expires_ms = 600000
bindings = [{ exchange = "amq.topic", routing_key = "jstest.${run}.work" }]
[[tenants.js.queues]]
name = "${rpc}"
expires_ms = 600000
[[tenants.js.queues]]
name = "${log}"
type = "stream"
max_age = "1h"
bindings = [{ exchange = "amq.topic", routing_key = "jstest.${run}.log" }]
`,
  }).start();
  token = await warren.token();
});
after(async () => {
  for (const w of clients) w.close();
  await warren?.dispose();
  // This run's queues and stream, through the management API (scripts/ensure-services.sh
  // enables it); the queues would expire by themselves, a stream would not.
  const management = process.env.WARREN_TEST_MANAGEMENT_URL || "http://127.0.0.1:15672";
  for (const name of [work, rpc, log]) {
    await fetch(`${management}/api/queues/%2F/${encodeURIComponent(name)}`, {
      method: "DELETE",
      headers: { authorization: `Basic ${Buffer.from("guest:guest").toString("base64")}` },
    }).catch(() => {});
  }
});

test("queue mode: two clients on one queue are competing consumers, nothing lost or doubled", async () => {
  const a = client();
  const b = client();
  const got = { a: [], b: [] };
  const sa = a.subscribe({ mode: "queue", queue: work, prefetch: 5 }, async (m) => { got.a.push(m.payload.n); await sleep(2); });
  const sb = b.subscribe({ mode: "queue", queue: work, prefetch: 5 }, async (m) => { got.b.push(m.payload.n); await sleep(2); });
  await Promise.all([sa.ready, sb.ready]);
  for (let n = 0; n < 200; n++) {
    await warren.publish(token, { exchange: "amq.topic", routing_key: `jstest.${run}.work`, payload: { n } });
  }
  await until(() => got.a.length + got.b.length === 200, 15000, "all 200");
  await sleep(200);
  const all = [...got.a, ...got.b].sort((x, y) => x - y);
  assert.deepEqual(all, Array.from({ length: 200 }, (_, n) => n), "each message exactly once");
  assert.ok(got.a.length > 0 && got.b.length > 0, `both consumers got work: ${got.a.length}/${got.b.length}`);
  const missing = client();
  const refused = missing.subscribe({ mode: "queue", queue: `jstest-nope-${run}` }, () => {});
  await assert.rejects(refused.ready, (e) => e.code === "forbidden");
});

test("format cloudevents: each message as a structured CloudEvent in m.event", async () => {
  const w = client();
  const got = [];
  const s = w.subscribe({ exchange: "amq.topic", bindingKey: `jstest.${run}.ce`, format: "cloudevents" }, (m) => { got.push(m); });
  await s.ready;
  await warren.publish(token, { exchange: "amq.topic", routing_key: `jstest.${run}.ce`, payload: { n: 1 },
    properties: { message_id: `ce-${run}` } });
  await until(() => got.length === 1, 5000, "the event");
  const { event } = got[0];
  assert.equal(event.specversion, "1.0");
  assert.equal(event.id, `ce-${run}`);
  assert.equal(event.type, `jstest.${run}.ce`);
  assert.deepEqual(event.data, { n: 1 });
  assert.equal(got[0].payload, undefined);
});

test("request(): answered by a responder built on this library, each caller its own reply", async () => {
  const responder = client();
  const serve = responder.subscribe({ mode: "queue", queue: rpc, prefetch: 50 }, async (m) => {
    await responder.publish({
      exchange: "",
      routingKey: m.properties.replyTo,
      payload: { echo: m.payload.q, by: "js-responder" },
      properties: { correlationId: m.properties.correlationId },
    });
  });
  await serve.ready;
  const caller = client();
  const replies = await Promise.all(Array.from({ length: 20 }, (_, q) =>
    caller.request({ exchange: "", routingKey: rpc, payload: { q }, timeoutMs: 10000 })));
  replies.forEach((r, q) => {
    assert.deepEqual(r.reply.payload, { echo: q, by: "js-responder" });
    assert.ok(r.correlationId, "the reply names its correlation id");
  });
  serve.unsubscribe();
  await assert.rejects(
    caller.request({ exchange: "", routingKey: rpc, payload: { q: -1 }, timeoutMs: 300 }),
    (e) => e.code === "reply_timeout",
  );
});

test("stream mode: replay from an offset; a cut connection resumes after the last offset seen", async () => {
  for (let n = 0; n < 300; n++) {
    await warren.publish(token, { exchange: "amq.topic", routing_key: `jstest.${run}.log`, payload: { n } });
  }
  // Replay from the first offset.
  const r = client();
  const replayed = [];
  const offsets = [];
  const s = r.subscribe({ mode: "stream", stream: log, offset: "first" }, (m) => { replayed.push(m.payload.n); offsets.push(m.offset); });
  await s.ready;
  await until(() => replayed.length >= 300, 15000, "the replay");
  assert.deepEqual(replayed.slice(0, 300), Array.from({ length: 300 }, (_, n) => n));
  // From a numeric offset: exactly the rest.
  const from = offsets[100];
  const tail = [];
  const s2 = client().subscribe({ mode: "stream", stream: log, offset: from }, (m) => { tail.push(m.payload.n); });
  await s2.ready;
  await until(() => tail.length >= 200, 15000, "the tail");
  assert.deepEqual(tail.slice(0, 200), Array.from({ length: 200 }, (_, n) => n + 100));

  // Through a proxy that the test cuts mid-stream: the client reconnects by itself and
  // resumes after the last offset it saw.
  const p = await proxy(warren.port);
  const c = client({}, p.url);
  const states = recordStates(c);
  const seen = [];
  const live = c.subscribe({ mode: "stream", stream: log, offset: "next" }, (m) => { seen.push(m.payload.n); });
  await live.ready;
  const publishing = (async () => {
    for (let n = 300; n < 600; n++) {
      await warren.publish(token, { exchange: "amq.topic", routing_key: `jstest.${run}.log`, payload: { n } });
      if (n === 400) p.cut();
      await sleep(2);
    }
  })();
  await publishing;
  await until(() => seen.length >= 300 && seen.at(-1) === 599, 20000, "the rest after the cut");
  assert.deepEqual(seen, Array.from({ length: 300 }, (_, n) => n + 300), "nothing missed or doubled across the cut");
  assert.ok(states.some((e) => e.state === "disconnected"), "the cut disconnected the client");
  assert.equal(states.filter((e) => e.state === "connected").length, 2, "it reconnected once");
  await p.close();
});
