// The dashboard in a real headless Chromium, driven like a person would.
//
//   node scripts/check-dashboard.mjs single  BASE KEY [SHOTS_DIR]
//   node scripts/check-dashboard.mjs cluster BASE NODE=CONNS,... SHOTS_DIR|- [REMOTE_ID]
//
// single: BASE is a server started with `--api-keys KEY`. A wrong key is
// refused; the right one logs in; a WebSocket opened by this script shows up
// in the client list within 2 s; the rate chart moves while it sends; the
// send form delivers and shows the report; the Disconnect button closes that
// client with code 4000; labels and landmarks are there.
// cluster: BASE is one node of a cluster (no keys); every node named must
// appear alive in the nodes table with its number of connections, and
// REMOTE_ID, a client of another node, in the client list.
//
// With SHOTS_DIR, screenshots of the views are written there (the README's
// docs/img/). Needs Debian's chromium (CHROMIUM overrides /usr/bin/chromium)
// and the npm package playwright-core in $SB_TEST_DEPS/node (default
// target/test-deps/node; scripts/test installs both). Connects only to
// loopback. Ends with "N passed, M failed"; exit status 1 when anything
// failed. Run by crates/switchboard-cli/tests/dashboard_browser.rs.

import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const [mode, base, arg, shotsArg] = process.argv.slice(2);
const shots = shotsArg === "-" ? undefined : shotsArg;
const deps = process.env.SB_TEST_DEPS ?? path.join(root, "target/test-deps");
const require = createRequire(path.join(deps, "node", "package.json"));
const { chromium } = require("playwright-core");

if (!["single", "cluster"].includes(mode) || !/^http:\/\/127\.0\.0\.1:\d+$/.test(base ?? "")) {
  console.error("usage: check-dashboard.mjs single|cluster http://127.0.0.1:PORT KEY|NODES [SHOTS_DIR]");
  process.exit(2);
}

let passed = 0;
let failed = 0;
const check = (ok, what) => {
  ok ? passed++ : failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
};

// Polls `probe` (a page function) until it returns a truthy value or `ms`
// pass; returns the value, or null.
async function until(page, probe, arg, ms) {
  try {
    const handle = await page.waitForFunction(probe, arg, { timeout: ms, polling: 50 });
    return await handle.jsonValue();
  } catch {
    return null;
  }
}

async function shot(page, name, locator, fullPage = false) {
  if (!shots) return;
  const file = path.join(shots, `dashboard-${name}.png`);
  if (locator) await page.locator(locator).screenshot({ path: file });
  else await page.screenshot({ path: file, fullPage });
  console.log(`     screenshot ${file}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
// Every request the pages make must go to this server: no fonts, scripts
// or anything else from elsewhere.
const foreign = [];
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  context.on("request", (request) => {
    if (!request.url().startsWith(base) && !request.url().startsWith(base.replace("http:", "ws:"))) {
      foreign.push(request.url());
    }
  });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => msg.type() === "error" && errors.push(msg.text()));
  console.log(`chromium ${browser.version()}, dashboard ${base}/dashboard (${mode})`);
  await page.goto(`${base}/dashboard`);

  if (mode === "single") await single(context, page, arg);
  else await cluster(page, arg.split(","), process.argv[6]);

  // Refused loads (the wrong key's 401) log console errors by design;
  // anything else is a bug in the page.
  const unexpected = errors.filter((e) => !/status of 401/.test(e));
  check(unexpected.length === 0, `no script errors (${JSON.stringify(unexpected)})`);
  check(foreign.length === 0, `no request left the server (${JSON.stringify(foreign)})`);
} finally {
  await browser.close();
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

async function single(context, page, key) {
  // Landmarks and labels.
  const a11y = await page.evaluate(() => ({
    header: !!document.querySelector("header"),
    main: !!document.querySelector("main"),
    nav: !!document.querySelector("nav[aria-label]"),
    unlabelled: [...document.querySelectorAll("input, textarea, select")]
      .filter((el) => el.type !== "radio" && el.labels.length === 0)
      .map((el) => el.id),
    lang: document.documentElement.lang,
  }));
  check(a11y.header && a11y.main && a11y.nav && a11y.lang === "en", `landmarks: ${JSON.stringify(a11y)}`);
  check(a11y.unlabelled.length === 0, `every field has a label (unlabelled: ${a11y.unlabelled})`);

  // The login form, reached by keyboard: the key field has focus.
  await page.waitForSelector("#login:not([hidden])", { timeout: 5000 });
  check(await page.evaluate(() => document.activeElement.id === "api-key"), "the login form has the focus");
  await shot(page, "login", null);

  // A wrong key is refused.
  await page.keyboard.type("wrong-key-0123456789abcdef");
  await page.keyboard.press("Enter");
  const refused = await until(page, () => {
    const text = document.getElementById("login-error").textContent;
    return text.includes("invalid_api_key") && text;
  }, null, 5000);
  check(!!refused && (await page.isHidden("#main")), `a wrong key is refused: ${JSON.stringify(refused)}`);
  check(await page.evaluate(() => sessionStorage.getItem("switchboard.apiKey") === null), "a refused key is not kept");

  // The right key logs in; the stream goes live.
  await page.fill("#api-key", key);
  await page.press("#api-key", "Enter");
  const live = await until(page, () => document.getElementById("live").textContent === "live", null, 5000);
  check(!!live && (await page.isVisible("#main")), "the right key logs in and the stream is live");
  const stored = await page.evaluate(() => ({
    session: sessionStorage.getItem("switchboard.apiKey"),
    local: localStorage.length,
    cookie: document.cookie,
  }));
  check(stored.session === key && stored.local === 0 && stored.cookie === "", "the key is in sessionStorage only");

  // A WebSocket opened by the test (in another tab) appears within 2 s.
  const client = await context.newPage();
  await client.goto(`${base}/dashboard/uPlot.LICENSE.txt`);
  const opened = Date.now();
  await client.evaluate((url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    window.received = [];
    window.closeCode = null;
    ws.onmessage = (e) => window.received.push(e.data);
    ws.onclose = (e) => { window.closeCode = e.code; };
    ws.onopen = () => { window.ws = ws; resolve(); };
    ws.onerror = () => reject(new Error("the test's WebSocket did not open"));
  }), `${base.replace("http:", "ws:")}/ws?id=browser-probe`);
  const appeared = await until(page, () => !!document.querySelector('#ids-body tr[data-id="browser-probe"]'), null, 2000);
  check(!!appeared, `the test's WebSocket appears in the client list within 2 s (${Date.now() - opened} ms)`);

  // The rate chart moves while the test sends: 40 messages/s for 4 s.
  const before = await page.evaluate(() => Number(document.getElementById("chart").dataset.points));
  await client.evaluate(() => new Promise((resolve) => {
    let n = 0;
    const timer = setInterval(() => {
      window.ws.send(JSON.stringify({ targets: ["nobody-here"], payload: n }));
      if (++n >= 160) { clearInterval(timer); resolve(); }
    }, 25);
  }));
  const moved = await until(page, (before) => {
    const chart = document.getElementById("chart");
    return Number(chart.dataset.points) > before + 2 && Number(chart.dataset.lastIn) > 0 &&
      !!chart.querySelector("canvas") && { points: chart.dataset.points, lastIn: chart.dataset.lastIn };
  }, before, 4000);
  check(!!moved, `the rate chart moves while the test sends (${JSON.stringify(moved)}, from ${before} points)`);
  const inRate = await page.textContent("#stat-in");
  check(Number(inRate.replace(/,/g, "")) > 0 || Number(moved?.lastIn) > 0, `messages in /s shows traffic (${inRate})`);
  await shot(page, "overview", "#overview");

  // The send form delivers and shows the report.
  await page.fill("#send-targets", "browser-probe, someone-offline");
  await page.fill("#send-payload", '{"hello":"from the dashboard test"}');
  await page.click("#send-form button[type=submit]");
  const reportText = await until(page, () => {
    const table = document.getElementById("send-report-table");
    return table && table.textContent;
  }, null, 3000);
  const got = await until(client, () => window.received.find((m) => m.includes("from the dashboard test")), null, 3000);
  check(
    !!reportText && /delivered1: browser-probe/.test(reportText) && /offline1: someone-offline/.test(reportText),
    `the send form shows the delivery report (${JSON.stringify(reportText)})`,
  );
  check(got === '{"hello":"from the dashboard test"}', `the message arrived as written (${JSON.stringify(got)})`);
  await shot(page, "send", "#send");

  // Publishing to a topic shows its recipients.
  await page.check("input[name=mode][value=topic]");
  await page.fill("#send-topic", "news");
  await page.click("#send-form button[type=submit]");
  const published = await until(page, () => /Published to news: 0 recipient/.test(document.getElementById("send-report").textContent), null, 3000);
  check(!!published, "publishing to a topic shows its recipients");

  // A v1 client in a topic shows up in that topic's presence.
  await client.evaluate((url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ["switchboard.v1"]);
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "hello" }));
      ws.send(JSON.stringify({ type: "subscribe", id: 1, topic: "room/1" }));
    };
    ws.onmessage = (e) => {
      const frame = JSON.parse(e.data);
      if (frame.type === "ack" && frame.id === 1) { window.v1 = ws; resolve(); }
    };
    ws.onerror = () => reject(new Error("the test's v1 WebSocket did not open"));
  }), `${base.replace("http:", "ws:")}/ws?id=present-1`);
  await page.click("#topics-search button[type=submit]");
  const present = await until(page, () => {
    const cellOf = document.querySelector('#topics-body tr[data-topic="room/1"] td:nth-child(3)');
    return cellOf && cellOf.dataset.members === "1" && cellOf.textContent;
  }, null, 3000);
  check(!!present && /1 member/.test(present) && /present-1 \(1 connection\)/.test(present),
    `a v1 member shows in the topic's presence (${JSON.stringify(present)})`);
  await client.evaluate(() => window.v1.close(1000));

  // Disconnect closes that client with 4000.
  await shot(page, "clients", "#clients");
  await page.click('#ids-body tr[data-id="browser-probe"] button');
  const code = await until(client, () => window.closeCode, null, 3000);
  check(code === 4000, `Disconnect closes the client with code 4000 (got ${code})`);
  const gone = await until(page, () => !document.querySelector('#ids-body tr[data-id="browser-probe"]') &&
    /Closed 1 connection/.test(document.getElementById("ids-status").textContent), null, 3000);
  check(!!gone, "the client leaves the list and the page says what was closed");
  await shot(page, "full", null, true);

  // Logging out forgets the key.
  await page.click("#logout");
  check(await page.evaluate(() => sessionStorage.getItem("switchboard.apiKey") === null) && (await page.isVisible("#login")), "logging out forgets the key");
}

async function cluster(page, want, remoteId) {
  const table = () => [...document.querySelectorAll("#nodes-body tr")]
    .map((r) => `${r.dataset.node}=${r.cells[1].textContent}/${r.cells[3].textContent}`);
  const rows = await until(page, (want) => {
    const rows = [...document.querySelectorAll("#nodes-body tr")]
      .map((r) => `${r.dataset.node}=${r.cells[1].textContent}/${r.cells[3].textContent}`);
    return want.every((w) => {
      const [node, conns] = w.split("=");
      return rows.includes(`${node}=alive/${conns}`);
    }) && rows;
  }, want, 10000);
  const seen = rows ?? (await page.evaluate(table));
  check(!!rows, `every node appears alive with its connections: want ${want}, got ${JSON.stringify(seen)}`);
  await shot(page, "nodes", "#nodes");
  // The client list is the cluster's: a client of another node is listed.
  if (remoteId) {
    const listed = await until(page, (id) => !!document.querySelector(`#ids-body tr[data-id="${id}"]`), remoteId, 5000);
    check(!!listed, `a client of another node (${remoteId}) is in this node's client list`);
  }
}
