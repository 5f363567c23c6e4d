// End to end in a real browser: the /demo page, built on the JavaScript client that
// Warren serves at /clients/warren.js (clients/js/warren.js), subscribes over WebSocket,
// a REST publish arrives on the page, and a publish from the page is confirmed.
// Run by scripts/browser-test.sh, which starts Warren and sets WARREN_URL / WARREN_TOKEN.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const base = process.env.WARREN_URL;
const token = process.env.WARREN_TOKEN;
const screenshot = process.env.WARREN_SCREENSHOT;

test("Warren serves the client library at /clients/warren.js", async () => {
  assert.ok(base, "WARREN_URL must be set");
  const response = await fetch(`${base}/clients/warren.js`);
  assert.equal(response.status, 200, "the /clients/warren.js route is missing");
  assert.match(response.headers.get("content-type") ?? "", /^text\/javascript/);
  const library = readFileSync(new URL("../../clients/js/warren.js", import.meta.url), "utf8");
  assert.equal(await response.text(), library, "the served library is clients/js/warren.js");
});

test("the demo page receives a REST publish and publishes with a confirm", async () => {
  assert.ok(base && token, "WARREN_URL and WARREN_TOKEN must be set");
  const topic = `demo.${Math.random().toString(36).slice(2)}`;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    const hash = new URLSearchParams({ token, exchange: "amq.topic", binding: `${topic}.#`, routing: `${topic}.from-page` });
    await page.goto(`${base}/demo#${hash}`);
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("status").textContent === "subscribed", null, { timeout: 10000 });
    assert.equal(await page.evaluate(() => window.warrenClient.state), "connected", "the page runs on the library");

    const response = await fetch(`${base}/v1/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ exchange: "amq.topic", routing_key: `${topic}.rest`, payload: { from: "rest", n: 1 } }),
    });
    const text = await response.text();
    assert.equal(response.status, 202, text);
    assert.equal(JSON.parse(text).routed, true, "the page's live subscription is bound");
    await page.waitForSelector(`#messages li:has-text('${topic}.rest {"from":"rest","n":1}')`, { timeout: 10000 });

    await page.fill("#payload", '{"from":"page"}');
    await page.click("#publish");
    await page.waitForSelector("#log li:has-text('confirmed p1')", { timeout: 10000 });
    await page.waitForSelector(`#messages li:has-text('${topic}.from-page {"from":"page"}')`, { timeout: 10000 });
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  } finally {
    await browser.close();
  }
});
