// Publish with confirm (and rejections carrying Warren's code), live and durable
// subscriptions, ack/nack, idempotency keys and state events. Queue and stream modes
// and request/reply are in modes.test.mjs.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Warren, WarrenError } from "../warren.js";
import { WarrenProcess, topic, until, sleep, recordStates } from "./harness.mjs";

let warren;
let token;
const clients = [];
const client = (options = {}) => {
  const w = new Warren(warren.ws, { token, ...options });
  clients.push(w);
  return w;
};

before(async () => {
  warren = await new WarrenProcess().start();
  token = await warren.token();
});
after(async () => {
  for (const w of clients) w.close();
  await warren.dispose();
});

test("publish resolves on the broker's confirm; a live subscription receives it", async () => {
  const w = client();
  const states = recordStates(w);
  const t = topic();
  const got = [];
  const sub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#` }, (m) => { got.push(m); });
  await sub.ready;
  assert.equal(sub.state, "subscribed");
  const confirm = await w.publish({ exchange: "amq.topic", routingKey: `${t}.a`, payload: { n: 1 } });
  assert.equal(typeof confirm.messageId, "string");
  assert.equal(confirm.routed, true);
  await w.publish({ exchange: "amq.topic", routingKey: `${t}.b`, body: "plain text" });
  await w.publish({ exchange: "amq.topic", routingKey: `${t}.c`, body: new Uint8Array([0, 1, 255]) });
  await until(() => got.length === 3, 5000, "three deliveries");
  assert.deepEqual(got[0].payload, { n: 1 });
  assert.equal(got[0].routingKey, `${t}.a`);
  assert.equal(got[0].properties.messageId, confirm.messageId);
  assert.equal(got[1].text(), "plain text");
  assert.deepEqual([...got[2].body], [0, 1, 255]);
  assert.equal(got[0].ack(), false, "live messages are not acknowledged");
  assert.deepEqual(states.map((s) => s.state).slice(0, 2), ["connecting", "connected"]);
});

test("a publish Warren refuses rejects with its code", async () => {
  const w = client();
  const t = topic();
  await assert.rejects(
    w.publish({ exchange: "amq.topic", routingKey: `${t}.nobody`, payload: {} }),
    (e) => e instanceof WarrenError && e.code === "unroutable",
  );
  await assert.rejects(
    w.publish({ exchange: "amq.topic", routingKey: "not.granted", payload: {} }),
    (e) => e instanceof WarrenError && e.code === "forbidden",
  );
  await assert.rejects(
    w.publish({ exchange: `no-such-exchange-${t}`, routingKey: `${t}.x`, payload: {} }),
    (e) => e.code === "exchange_not_found" || e.code === "forbidden",
  );
  const ok = await w.publish({ exchange: "amq.topic", routingKey: `${t}.nobody`, payload: {}, mandatory: false });
  assert.equal(ok.routed, false, "mandatory: false confirms an unroutable message");
  assert.equal(w.state, "connected", "refusals keep the socket");
});

test("a subscription Warren refuses rejects `ready` with its code", async () => {
  const w = client();
  const sub = w.subscribe({ exchange: "amq.topic", bindingKey: "#" }, () => {});
  await assert.rejects(sub.ready, (e) => e.code === "forbidden");
  assert.equal(sub.state, "failed");
});

test("durable: auto-ack after the handler resolves, nack requeues, nothing acked comes back", async () => {
  const w = client();
  const t = topic();
  const queue = `q-${t}`;
  const seen = [];
  let nacked = false;
  const sub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue, prefetch: 10 }, async (m) => {
    seen.push({ n: m.payload.n, redelivered: m.redelivered });
    if (m.payload.n === 2 && !nacked) { nacked = true; m.nack({ requeue: true }); return; }
    await sleep(5); // auto-ack happens after this resolves
  });
  await sub.ready;
  assert.equal(sub.queue, `warren.js.${queue}`);
  for (let n = 0; n < 5; n++) await w.publish({ exchange: "amq.topic", routingKey: `${t}.m`, payload: { n } });
  await until(() => seen.length === 6, 5000, "5 deliveries + 1 redelivery");
  assert.deepEqual(seen.filter((s) => s.n === 2).map((s) => s.redelivered), [false, true]);
  // Unsubscribe and subscribe again on another socket: everything was acked, nothing comes back.
  await sub.unsubscribe();
  const w2 = client();
  const again = [];
  const sub2 = w2.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue }, (m) => { again.push(m.payload.n); });
  await sub2.ready;
  await w2.publish({ exchange: "amq.topic", routingKey: `${t}.m`, payload: { n: 99 } });
  await until(() => again.includes(99), 5000, "the new message");
  await sleep(200);
  assert.deepEqual(again, [99]);
});

test("durable: manual acks (autoAck: false); what was not acked is redelivered to the next subscriber", async () => {
  const w = client();
  const t = topic();
  const queue = `q-${t}`;
  const held = [];
  const sub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue, autoAck: false }, (m) => { held.push(m); });
  await sub.ready;
  for (let n = 0; n < 4; n++) await w.publish({ exchange: "amq.topic", routingKey: `${t}.m`, payload: { n } });
  await until(() => held.length === 4, 5000, "4 deliveries");
  assert.equal(held[0].ack(), true);
  assert.equal(held[1].ack(), true);
  assert.equal(held[1].ack(), false, "a second ack is a no-op");
  await sleep(100);
  w.close();
  assert.equal(held[2].ack(), false, "an ack after the socket is gone is not sent");
  const w2 = client();
  const again = [];
  const sub2 = w2.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue }, (m) => { again.push(m); });
  await sub2.ready;
  await until(() => again.length === 2, 5000, "the two unacked messages");
  assert.deepEqual(again.map((m) => m.payload.n).sort(), [2, 3]);
  assert.ok(again.every((m) => m.redelivered));
});

test("an idempotencyKey publishes once: a retry is answered with the same message id", async () => {
  const w = client();
  const t = topic();
  const got = [];
  await w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue: `q-${t}` }, (m) => { got.push(m); }).ready;
  const key = `key-${t}`;
  const a = await w.publish({ exchange: "amq.topic", routingKey: `${t}.k`, payload: { once: true }, idempotencyKey: key });
  const b = await w.publish({ exchange: "amq.topic", routingKey: `${t}.k`, payload: { once: true }, idempotencyKey: key });
  assert.equal(a.messageId, b.messageId);
  const c = await w.publish({ exchange: "amq.topic", routingKey: `${t}.k`, payload: { once: false }, idempotencyKey: true });
  assert.equal(typeof c.idempotencyKey, "string");
  await until(() => got.length === 2, 5000, "two messages");
  await sleep(200);
  assert.equal(got.length, 2, "the retried publish did not publish twice");
  await assert.rejects(
    w.publish({ exchange: "amq.topic", routingKey: `${t}.k`, payload: { different: 1 }, idempotencyKey: key }),
    (e) => e.code === "idempotency_key_mismatch",
  );
});

test("close() ends for good: disconnected then closed, pending publishes rejected", async () => {
  const w = client({ autoConnect: false });
  const states = recordStates(w);
  const pending = w.publish({ exchange: "amq.topic", routingKey: `${topic()}.x`, payload: {} });
  w.close();
  await assert.rejects(pending, (e) => e.code === "closed");
  assert.deepEqual(states.map((s) => s.state), ["disconnected", "closed"]);
  await assert.rejects(w.publish({ exchange: "amq.topic", routingKey: "jstest.y", payload: {} }), (e) => e.code === "closed");
});
