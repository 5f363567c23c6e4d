// The broker link lost under a connected client (this Warren's AMQP connections closed
// by the broker, as in a broker restart, without disturbing the shared broker): the
// socket stays, Warren ends the subscriptions with `broker_unavailable`, the client
// subscribes them again with backoff, and the durable one loses nothing.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Warren } from "../warren.js";
import { spawnSync } from "node:child_process";
import { WarrenProcess, topic, until, recordStates } from "./harness.mjs";

// Needs the local broker's rabbitmqctl (as tests/solo does); skipped elsewhere.
const skip = process.env.WARREN_TEST_AMQP_URL ? "WARREN_TEST_AMQP_URL points at another broker"
  : spawnSync("sh", ["-c", "command -v rabbitmqctl"]).status !== 0 ? "needs rabbitmqctl" : false;

let warren;
let token;
const clients = [];

before(async () => {
  if (skip) return;
  warren = await new WarrenProcess().start();
  token = await warren.token();
});
after(async () => {
  for (const w of clients) w.close();
  await warren?.dispose();
});

/** Publishes over REST, retrying while the broker link is down (503). */
async function publish(message) {
  return until(async () => {
    try { return await warren.publish(token, message); } catch (e) {
      if (/\b503\b/.test(e.message)) return false;
      throw e;
    }
  }, 20000, "a publish once the broker is back");
}

test("broker link lost: subscriptions resubscribed with backoff on the same socket, durable loses nothing", { skip }, async () => {
  const w = new Warren(warren.ws, { token, reconnect: { initialDelayMs: 100, maxDelayMs: 1000 } });
  clients.push(w);
  const states = recordStates(w);
  const t = topic();
  const seen = new Set();
  const errors = [];
  const durable = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.d`, mode: "durable", queue: `q-${t}` },
    (m) => { seen.add(m.payload.n); });
  durable.on("error", (e) => errors.push(e.code));
  const live = [];
  const liveSub = w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.l` }, (m) => { live.push(m.payload.n); });
  await Promise.all([durable.ready, liveSub.ready]);

  for (let n = 0; n < 20; n++) await publish({ exchange: "amq.topic", routing_key: `${t}.d`, payload: { n } });
  await until(() => seen.size === 20, 5000, "the first 20");
  const closed = await warren.cutBroker();
  assert.ok(closed >= 1, "this Warren had AMQP connections to close");
  for (let n = 20; n < 40; n++) await publish({ exchange: "amq.topic", routing_key: `${t}.d`, payload: { n } });
  await until(() => seen.size === 40, 20000, "all 40 after the broker link came back");
  assert.ok(errors.includes("broker_unavailable"), `the subscription was told: ${errors}`);
  assert.equal(durable.state, "subscribed");
  assert.equal(states.filter((s) => s.state === "disconnected").length, 0, "the socket stayed open");
  await until(async () => {
    await publish({ exchange: "amq.topic", routing_key: `${t}.l`, payload: { n: -1 }, mandatory: false });
    return live.includes(-1);
  }, 10000, "the live subscription again");
});
