// Real-browser end-to-end test of the hospital dashboard.
//
// Starts `hospital simulate` (a short run on the synthetic set), drives
// Debian's Chromium through playwright-core: signs in, watches the round
// counter and the AUROC chart advance while training runs, uploads an X-ray
// and reads the 14 findings, visits the other pages, signs out. Screenshots
// go to $E2E_OUT (default target/e2e-screenshots).
//
//   node apps/hospital/e2e/dashboard.mjs [path/to/hospital]
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

const root = resolve(new URL("../../..", import.meta.url).pathname);
const binary = process.argv[2] || join(root, "target/debug/hospital");
const out = process.env.E2E_OUT || join(root, "target/e2e-screenshots");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const ROUNDS = 4;
const PASSWORD = "e2e-admin-password";
mkdirSync(out, { recursive: true });
const runDir = mkdtempSync(join(tmpdir(), "fedcore-e2e-"));

function fail(msg) {
  console.error(`e2e: FAILED: ${msg}`);
  process.exitCode = 1;
}

const server = spawn(binary, [
  "simulate", "--rounds", String(ROUNDS), "--image-size", "32", "--patients", "90", "--public-patients", "30",
  "--run-dir", runDir, "--listen", "127.0.0.1:0",
], {
  env: {
    ...process.env,
    HOSPITAL_ADMIN_PASSWORD: PASSWORD,
    HOSPITAL_DOCTOR_PASSWORD: "e2e-doctor-password",
    HOSPITAL_VIEWER_PASSWORD: "e2e-viewer-password",
    DATABASE_URL: `sqlite://${join(runDir, "e2e.sqlite")}?mode=rwc`,
  },
  stdio: ["ignore", "pipe", "inherit"],
});
let serverLog = "";
const base = await new Promise((ok, ko) => {
  const timer = setTimeout(() => ko(new Error(`the dashboard did not start:\n${serverLog}`)), 120_000);
  server.stdout.on("data", (d) => {
    serverLog += d;
    process.stdout.write(`  [hospital] ${d}`);
    const m = serverLog.match(/dashboard: (http:\/\/[0-9.:]+)\//);
    if (m) { clearTimeout(timer); ok(m[1]); }
  });
  server.on("exit", (code) => ko(new Error(`hospital exited with ${code}:\n${serverLog}`)));
});

const browser = await chromium.launch({
  executablePath: browserPath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let shot = 0;
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const snap = async (name) => {
  shot += 1;
  const file = join(out, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`e2e: screenshot ${file}`);
};
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
// Script errors count; the browser's own "Failed to load resource" lines for
// answers the app gives on purpose (401 after sign-out, no favicon) do not.
page.on("console", (m) => {
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text());
});

try {
  // Signing in: a wrong password is refused, the right one lands on training.
  await page.goto(`${base}/login`);
  await page.fill("#username", "admin");
  await page.fill("#password", "not-the-password");
  await page.click("#login-button");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.length > 0);
  await snap("login-refused");
  await page.fill("#password", PASSWORD);
  await page.click("#login-button");
  await page.waitForURL(/\/app#\/training/);
  await page.waitForSelector("#round-counter");
  await snap("training-start");

  // The counter and the chart advance while training runs, without reloads.
  const counter = async () => Number((await page.textContent("#round-counter")).split("/")[0]);
  const points = async () => Number(await page.getAttribute("#auroc-chart", "data-points"));
  const seen = new Set([await counter()]);
  const start = Date.now();
  let lastPoints = await points();
  let chartGrew = 0;
  while ((await counter()) < ROUNDS) {
    if (Date.now() - start > 600_000) throw new Error("training did not finish in 10 minutes");
    await page.waitForTimeout(500);
    const c = await counter();
    if (!seen.has(c)) {
      seen.add(c);
      const p = await points();
      if (p > lastPoints) chartGrew += 1;
      lastPoints = p;
      await snap(`training-round-${c}`);
    }
  }
  await page.waitForTimeout(800);
  if (seen.size < 3) fail(`the round counter took only the values ${[...seen]} (expected it to advance live)`);
  if (chartGrew < 2) fail(`the AUROC chart grew ${chartGrew} times while the counter advanced`);
  if ((await points()) !== ROUNDS) fail(`the AUROC chart has ${await points()} points after ${ROUNDS} rounds`);
  console.log(`e2e: round counter values seen live: ${[...seen].sort().join(", ")}; chart grew ${chartGrew} times`);
  await snap("training-done");

  // Inference: upload an image of the synthetic set, read the 14 findings.
  await page.goto(`${base}/app#/inference`);
  await page.waitForSelector("#xray");
  const images = join(runDir, "synthetic", "images");
  const xray = join(images, readdirSync(images).find((f) => f.endsWith(".png")));
  await page.setInputFiles("#xray", xray);
  await page.click("#inference-form button[type=submit]");
  await page.waitForSelector("#findings tr:nth-child(15)");
  const rows = await page.$$eval("#findings tr", (trs) => trs.slice(1).map((tr) => [...tr.children].map((td) => td.textContent)));
  if (rows.length !== 14) fail(`${rows.length} findings`);
  for (const [label, p] of rows) {
    const v = Number(p);
    if (!label || !(v >= 0 && v <= 1)) fail(`bad finding row ${label} ${p}`);
  }
  await page.waitForFunction(() => document.querySelectorAll("#inference-history tr").length >= 2);
  await snap("inference");

  for (const [route, sel] of [["overview", "#round-counter"], ["clients", "#clients-table"], ["privacy", "#privacy-table"], ["audit", "#audit-table"], ["rounds/1", "#round-updates"]]) {
    await page.goto(`${base}/app#/${route}`);
    await page.waitForSelector(sel);
    await snap(route.replace("/", "-"));
    if (route === "audit") {
      const audit = await page.textContent("#audit-table");
      for (const action of ["login", "inference"]) {
        if (!audit.includes(action)) fail(`the audit log lacks ${action}`);
      }
    }
  }

  // Signing out: back to the login page, and the app needs a new sign-in.
  await page.click("#logout");
  await page.waitForURL(/\/login$/);
  await snap("logged-out");
  await page.goto(`${base}/app#/training`);
  await page.waitForURL(/\/login$/);
  if (errors.length) fail(`browser errors: ${errors.join(" | ")}`);
} catch (e) {
  fail(e.stack || String(e));
  await snap("failure").catch(() => {});
} finally {
  await browser.close();
  server.kill("SIGINT");
  await new Promise((ok) => { server.on("exit", ok); setTimeout(ok, 5000); });
  rmSync(runDir, { recursive: true, force: true });
}
if (!process.exitCode) console.log(`e2e: passed; ${shot} screenshots in ${out}`);
