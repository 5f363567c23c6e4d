// Tokens: refreshed with an `auth` frame before `exp`; after a 4401 (no refresh) the
// client reconnects with a fresh token and the durable subscription loses nothing;
// no reconnect after 1008 (a refreshed token of another tenant) or a 403 upgrade.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Warren } from "../warren.js";
import { WarrenProcess, topic, until, sleep, recordStates } from "./harness.mjs";

let warren;
let longToken;
const clients = [];
const reconnect = { initialDelayMs: 100, maxDelayMs: 800 };

before(async () => {
  warren = await new WarrenProcess({ tenants: ["js", "other"] }).start();
  longToken = await warren.token();
});
after(async () => {
  for (const w of clients) w.close();
  await warren.dispose();
});

test("the token is refreshed with an auth frame before it expires; the socket stays", async () => {
  let minted = 0;
  const w = new Warren(warren.ws, { token: () => { minted++; return warren.token({ ttl: "3s" }); }, reconnect });
  clients.push(w);
  const states = recordStates(w);
  const refreshed = [];
  w.on("token", (e) => refreshed.push(e.exp));
  const t = topic();
  const got = [];
  await w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#` }, (m) => { got.push(m.payload.n); }).ready;
  await sleep(7000); // more than two lifetimes of a token
  assert.ok(refreshed.length >= 2, `refreshed ${refreshed.length} times`);
  assert.ok(minted >= 3);
  assert.equal(states.filter((s) => s.state === "disconnected").length, 0, "never disconnected");
  await w.publish({ exchange: "amq.topic", routingKey: `${t}.x`, payload: { n: 1 } });
  await until(() => got.includes(1), 5000, "a delivery on the same socket");
});

test("after 4401 the client reconnects with a fresh token; durable resumes with nothing lost", async () => {
  let minted = 0;
  const w = new Warren(warren.ws, { token: () => { minted++; return warren.token({ ttl: "2s" }); }, refresh: false, reconnect });
  clients.push(w);
  const states = recordStates(w);
  const t = topic();
  const seen = new Set();
  await w.subscribe({ exchange: "amq.topic", bindingKey: `${t}.#`, mode: "durable", queue: `q-${t}` }, (m) => { seen.add(m.payload.n); }).ready;
  const total = 120;
  for (let n = 0; n < total; n++) {
    await warren.publish(longToken, { exchange: "amq.topic", routing_key: `${t}.m`, payload: { n } });
    await sleep(25); // spread over ~3 s, across the expiry
  }
  await until(() => seen.size === total, 10000, `all ${total} messages`);
  const expired = states.filter((s) => s.state === "disconnected" && s.code === 4401);
  assert.ok(expired.length >= 1, "closed with 4401 at exp");
  assert.equal(expired[0].delayMs, 0, "reconnects at once with a fresh token");
  assert.ok(minted >= 2, "a fresh token was fetched");
  // The 2 s tokens may expire again while the last messages arrive (a slow machine
  // stretches the publishing past a second expiry): the client must end up connected.
  await until(() => states.at(-1).state === "connected", 5000, "connected again");
});

test("a refreshed token of another tenant: 1008, and no reconnect", async () => {
  let tenant = "js";
  const w = new Warren(warren.ws, { token: () => warren.token({ tenant }), reconnect });
  clients.push(w);
  const states = recordStates(w);
  await w.ready();
  const pending = w.subscribe({ exchange: "amq.topic", bindingKey: `${topic()}.#` }, () => {});
  await pending.ready;
  tenant = "other";
  await w.refreshToken();
  await until(() => w.state === "closed", 5000, "closed");
  await sleep(1000);
  const after = states.slice(states.findIndex((s) => s.state === "disconnected"));
  assert.deepEqual(after.map((s) => s.state), ["disconnected", "closed"]);
  assert.equal(after[0].code, 1008);
  assert.equal(after[0].willReconnect, false);
  assert.equal(pending.state, "closed");
});

test("an upgrade refused with 403 (unknown tenant): no reconnect", async () => {
  const ghost = new WarrenProcess({ secret: warren.secret, tenants: ["ghost"] });
  const token = await ghost.token();
  const w = new Warren(warren.ws, { token: async () => token, reconnect });
  clients.push(w);
  const states = recordStates(w);
  await assert.rejects(w.ready(), (e) => e.code === "forbidden" && e.status === 403);
  await sleep(1000);
  assert.deepEqual(states.map((s) => s.state), ["connecting", "disconnected", "closed"]);
  assert.equal(states[2].status, 403);
  assert.equal(states[2].error.code, "forbidden");
  await ghost.dispose();
});
