// Keeps N dashboards open in headless Chromium for S seconds, for measuring
// what open dashboards cost the server (docs/benchmarks.md, "The
// dashboard's own cost"). Each is a real page: the event stream, the chart,
// the client list.
//
//   node scripts/open-dashboards.mjs N SECONDS http://127.0.0.1:PORT [KEY]
//
// Needs what scripts/check-dashboard.mjs needs. Loopback only; ends by
// itself after S seconds and prints how many pages were live.

import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const [count, seconds, base, key] = process.argv.slice(2);
const deps = process.env.SB_TEST_DEPS ?? path.join(root, "target/test-deps");
const require = createRequire(path.join(deps, "node", "package.json"));
const { chromium } = require("playwright-core");

if (!/^http:\/\/127\.0\.0\.1:\d+$/.test(base ?? "") || !(Number(count) >= 0) || !(Number(seconds) > 0)) {
  console.error("usage: open-dashboards.mjs N SECONDS http://127.0.0.1:PORT [KEY]");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const pages = [];
  for (let i = 0; i < Number(count); i++) {
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    const page = await context.newPage();
    if (key) await page.addInitScript((k) => sessionStorage.setItem("switchboard.apiKey", k), key);
    await page.goto(`${base}/dashboard`);
    pages.push(page);
  }
  await new Promise((r) => setTimeout(r, Number(seconds) * 1000));
  let live = 0;
  for (const page of pages) {
    if ((await page.textContent("#live")) === "live") live++;
  }
  console.log(`${live} of ${count} dashboards live after ${seconds} s`);
  if (live !== Number(count)) process.exitCode = 1;
} finally {
  await browser.close();
}
