// The README's 30-second tour in a real headless Chromium: two tabs, the
// README's two JavaScript snippets pasted as written (read from README.md)
// the way the DevTools console runs them, and tab 1 must log what the README
// says it logs. From a page the server itself serves (/heartbeat) it must
// work; from about:blank and from a page Chromium treats as a public web
// page it must be blocked (Local Network Access checks), as the README says.
//
//   node scripts/check-tour.mjs [http://127.0.0.1:8080]
//
// Needs a switchboard server at that address (`cargo run --release`),
// Debian's chromium (CHROMIUM overrides /usr/bin/chromium) and the npm
// package playwright-core, looked up in $SB_TEST_DEPS/node
// (default target/test-deps/node; `scripts/test --browser` installs both).
// Connects only to loopback addresses. Ends with "N passed, M failed";
// exit status 1 when anything failed.

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const base = process.argv[2] ?? "http://127.0.0.1:8080";
const deps = process.env.SB_TEST_DEPS ?? path.join(root, "target/test-deps");
const require = createRequire(path.join(deps, "node", "package.json"));
const { chromium } = require("playwright-core");

if (!/^http:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+$/.test(base)) {
  console.error(`check-tour: ${base} is not a loopback http://HOST:PORT`);
  process.exit(2);
}

// The tour's snippets and the line tab 1 must log, from README.md.
const readme = readFileSync(path.join(root, "README.md"), "utf8");
const tour = readme.split(/^## 30-second tour$/m)[1]?.split(/^## /m)[0];
if (!tour) throw new Error("README.md has no '## 30-second tour' section");
const snippets = [...tour.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
if (snippets.length !== 2) throw new Error(`the tour should have 2 js snippets, found ${snippets.length}`);
const expected = tour.match(/Tab 1 logs `([^`]+)`/)?.[1];
if (!expected) throw new Error("the tour does not say what tab 1 logs (Tab 1 logs `…`)");
// The snippets connect to 127.0.0.1:8080; point them at `base` if it differs.
const wsBase = base.replace(/^http:/, "ws:");
const paste = (js) => js.replaceAll("ws://127.0.0.1:8080", wsBase);

let passed = 0;
let failed = 0;
const report = (ok, what) => {
  ok ? passed++ : failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
};

// Runs `js` the way the DevTools console runs a paste (REPL mode: a
// top-level `const` stays defined for the next paste); returns its value.
async function consoleEval(cdp, js) {
  const { result, exceptionDetails } = await cdp.send("Runtime.evaluate", {
    expression: js,
    replMode: true,
    returnByValue: true,
    awaitPromise: true,
  });
  if (exceptionDetails) throw new Error(`console: ${exceptionDetails.exception?.description ?? exceptionDetails.text}`);
  return result.value;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Opens two tabs at `url`, pastes snippet 1 into tab 1 and snippet 2 into
// tab 2; returns tab 1's console lines and the readyState of its socket `a`
// after up to `ms`.
async function runTour(context, url, ms = 5000) {
  const tabs = [await context.newPage(), await context.newPage()];
  const logs = [];
  tabs[0].on("console", (m) => logs.push(m.text()));
  const cdp = [];
  for (const tab of tabs) {
    await tab.goto(url);
    cdp.push(await context.newCDPSession(tab));
  }
  const deadline = Date.now() + ms;
  const stateOfA = () => consoleEval(cdp[0], "a.readyState");
  await consoleEval(cdp[0], paste(snippets[0]));
  // Let tab 1 open before tab 2 sends (a person pastes slower than this).
  while ((await stateOfA()) === 0 && Date.now() < deadline) await sleep(50);
  await consoleEval(cdp[1], paste(snippets[1]));
  // Until tab 1 logs the line, or its socket is closed (blocked), or time is up.
  while (!logs.includes(expected) && (await stateOfA()) !== 3 && Date.now() < deadline) await sleep(50);
  const state = await stateOfA();
  for (const tab of tabs) await tab.close();
  return { logs, state };
}

const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
// A page served here counts as a public web page for Chromium's Local
// Network Access checks (--ip-address-space-overrides), like any https site.
const publicPage = http.createServer((_req, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end("<!doctype html><title>a public page</title>");
});
await new Promise((r) => publicPage.listen(0, "127.0.0.1", r));
const publicUrl = `http://127.0.0.1:${publicPage.address().port}/`;

const browser = await chromium.launch({
  executablePath,
  args: [
    "--no-sandbox",
    `--ip-address-space-overrides=127.0.0.1:${publicPage.address().port}=public`,
  ],
});
try {
  console.log(`chromium ${browser.version()}, server ${base}, tab 1 must log: ${expected}`);
  const cases = [
    { url: `${base}/heartbeat`, works: true, what: "a page the server itself serves" },
    { url: "about:blank", works: false, what: "about:blank" },
    { url: publicUrl, works: false, what: "a public web page (address space overridden to public)" },
  ];
  for (const { url, works, what } of cases) {
    const context = await browser.newContext();
    const { logs, state } = await runTour(context, url);
    await context.close();
    const got = logs.includes(expected);
    report(
      works ? got : !got && state !== 1,
      `from ${what}, ${url}: ${works ? "works" : "blocked"} (socket readyState ${state}; tab 1 logged ${JSON.stringify(logs)})`,
    );
  }
} finally {
  await browser.close();
  publicPage.close();
}
console.log(`check-tour: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
