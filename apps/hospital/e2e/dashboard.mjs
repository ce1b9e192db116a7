// Real-browser end-to-end test of the hospital dashboard.
//
// Starts `hospital simulate` (a short run on the synthetic set), drives
// Debian's Chromium through playwright-core: signs in, watches the round
// counter and the AUROC chart advance while training runs, uploads an X-ray
// and reads the 14 findings, visits the other pages; then starts an MNIST
// job from the runs page's form (on a tiny MNIST this script writes),
// watches its accuracy chart advance, stops it, resumes it, starts a
// second one with DP, compares the two; checks that a viewer can start or
// stop nothing (no form, no buttons, 403); signs out. Screenshots
// go to $E2E_OUT (default target/e2e-screenshots).
//
//   node apps/hospital/e2e/dashboard.mjs [path/to/hospital]
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
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

// A tiny MNIST in IDX files: the digit is where a bright square sits, on
// noise (what `--mnist-dir` points at; the real one is not needed here).
function writeMnist(dir, counts) {
  mkdirSync(dir, { recursive: true });
  let seed = 7;
  const rand = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
  for (const [prefix, n] of counts) {
    const images = Buffer.alloc(16 + n * 784);
    images.writeUInt32BE(0x803, 0); images.writeUInt32BE(n, 4); images.writeUInt32BE(28, 8); images.writeUInt32BE(28, 12);
    const labels = Buffer.alloc(8 + n);
    labels.writeUInt32BE(0x801, 0); labels.writeUInt32BE(n, 4);
    for (let i = 0; i < n; i++) {
      const d = rand(10);
      labels[8 + i] = d;
      const r0 = 4 + Math.floor(d / 5) * 12, c0 = 1 + (d % 5) * 5;
      for (let r = 0; r < 28; r++) {
        for (let c = 0; c < 28; c++) {
          const inside = r >= r0 && r < r0 + 6 && c >= c0 && c < c0 + 5;
          images[16 + i * 784 + r * 28 + c] = inside ? 255 - rand(60) : rand(60);
        }
      }
    }
    writeFileSync(join(dir, `${prefix}-images-idx3-ubyte`), images);
    writeFileSync(join(dir, `${prefix}-labels-idx1-ubyte`), labels);
  }
}
writeMnist(join(runDir, "mnist"), [["train", 600], ["t10k", 200]]);

function fail(msg) {
  console.error(`e2e: FAILED: ${msg}`);
  process.exitCode = 1;
}

const server = spawn(binary, [
  "simulate", "--rounds", String(ROUNDS), "--image-size", "32", "--patients", "90", "--public-patients", "30",
  "--run-dir", runDir, "--listen", "127.0.0.1:0", "--mnist-dir", join(runDir, "mnist"),
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
  // Round 0 (the publicly pretrained model, before any hospital trained) and every round.
  if ((await points()) !== ROUNDS + 1) fail(`the AUROC chart has ${await points()} points after ${ROUNDS} rounds`);
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
    const v = parseFloat(p) / 100;
    if (!label || !p.endsWith("%") || !(v >= 0 && v <= 1)) fail(`bad finding row ${label} ${p}`);
  }
  // The upload is shown with the heatmap of the top finding over it, and
  // the other two of the top three can be picked.
  const overlay = await page.getAttribute("#saliency-overlay", "src");
  if (!overlay || !overlay.startsWith("data:image/png;base64,")) fail(`no heatmap over the image: ${overlay && overlay.slice(0, 40)}`);
  if (!(await page.getAttribute("#xray-image", "src") || "").startsWith("blob:")) fail("the uploaded image is not shown");
  const picks = await page.$$("#saliency-picks button");
  if (picks.length !== 3) fail(`${picks.length} findings to show a heatmap for, not 3`);
  const second = await picks[1].getAttribute("data-label");
  await picks[1].click();
  if (!(await page.textContent("#saliency-caption")).includes(second)) fail(`picking ${second} did not show its heatmap`);
  if (!(await page.textContent("#inference-model")).includes("Model after round")) fail("the model's round is not shown");
  await page.waitForFunction(() => document.querySelectorAll("#inference-history tr").length >= 2);
  if (!(await page.textContent("#inference-history")).includes("admin")) fail("the history does not name who asked");
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

  // Jobs: an MNIST run started from the form; its accuracy chart advances
  // live; it is stopped, resumed from its checkpoint, and finishes.
  await page.goto(`${base}/app#/runs`);
  await page.waitForSelector("#job-form");
  const startJob = async (rounds, dp) => {
    const before = await page.$$eval("#runs-table tr[data-job]", (trs) => trs.map((tr) => Number(tr.dataset.job)));
    await page.selectOption("#job-data", "mnist");
    await page.selectOption("#job-aggregator", "fedavg");
    await page.fill("#job-rounds", String(rounds));
    await page.fill("#job-hospitals", "2");
    if ((await page.isChecked("#job-dp")) !== dp) await page.click("#job-dp");
    if (dp) await page.fill("#job-epsilon", "8");
    await page.click("#job-start");
    await page.waitForFunction((n) => document.querySelectorAll("#runs-table tr[data-job]").length > n, before.length);
    return Math.max(...(await page.$$eval("#runs-table tr[data-job]", (trs) => trs.map((tr) => Number(tr.dataset.job)))));
  };
  const statusOf = (id) => page.getAttribute(`#runs-table tr[data-job="${id}"]`, "data-status");
  const waitStatus = async (id, want, ms = 300_000) => {
    await page.waitForSelector(`#runs-table tr[data-job="${id}"][data-status="${want}"]`, { timeout: ms });
  };
  // Long enough that the run is usually still going when the stop button
  // is pressed (with 20 a CI run saw rounds 1, 4 and 9 on the chart and
  // the job finished before the runs page showed its stop button); if it
  // finishes first anyway, a run twice as long is started and stopped.
  let MNIST_ROUNDS = 40;
  let a = await startJob(MNIST_ROUNDS, false);
  await snap("runs-queued");
  await page.goto(`${base}/app#/training/${a}`);
  await page.waitForSelector("#accuracy-chart");
  const accPoints = async () => Number(await page.getAttribute("#accuracy-chart", "data-points"));
  let accSeen = new Set([await accPoints()]);
  const accStart = Date.now();
  while (accSeen.size < 3) {
    if (Date.now() - accStart > 300_000) throw new Error(`the accuracy chart did not advance: ${[...accSeen]}`);
    await page.waitForTimeout(300);
    accSeen.add(await accPoints());
  }
  console.log(`e2e: accuracy chart points seen live: ${[...accSeen].sort((x, y) => x - y).join(", ")}`);
  await snap("mnist-training");
  // Stops job `a`: true once it is stopped, false if it finished first.
  // The job's stop button ("running") or its final status, whichever
  // the runs page shows first.
  const settled = async (withButton) => {
    const h = await page.waitForFunction(
      ([id, button]) => {
        if (button && document.querySelector(`.job-stop[data-job="${id}"]`)) return "running";
        const tr = document.querySelector(`#runs-table tr[data-job="${id}"]`);
        return tr && ["stopped", "finished", "failed"].includes(tr.dataset.status) ? tr.dataset.status : false;
      },
      [a, withButton],
      { timeout: 300_000, polling: 100 },
    );
    return h.jsonValue();
  };
  const stopJob = async () => {
    await page.goto(`${base}/app#/runs`);
    if ((await settled(true)) === "running") {
      // It may still finish between the wait and the click.
      await page.click(`.job-stop[data-job="${a}"]`, { timeout: 5_000 }).catch(() => {});
    }
    const status = await settled(false);
    if (status === "failed") throw new Error(`MNIST run ${a} failed`);
    return status === "stopped";
  };
  for (let attempt = 1; !(await stopJob()); attempt++) {
    if (attempt === 3) throw new Error(`three MNIST runs (up to ${MNIST_ROUNDS} rounds) finished before they could be stopped`);
    console.log(`e2e: MNIST run ${a} (${MNIST_ROUNDS} rounds) finished before its stop button was pressed; a longer one`);
    MNIST_ROUNDS *= 2;
    a = await startJob(MNIST_ROUNDS, false);
  }
  const stoppedAt = Number(await page.textContent(`#runs-table tr[data-job="${a}"] td:nth-child(6)`));
  if (!(stoppedAt >= 1 && stoppedAt < MNIST_ROUNDS)) fail(`the stopped run recorded ${stoppedAt} rounds`);
  await snap("runs-stopped");
  await page.click(`.job-resume[data-job="${a}"]`);
  await waitStatus(a, "finished");
  const doneRounds = Number(await page.textContent(`#runs-table tr[data-job="${a}"] td:nth-child(6)`));
  if (doneRounds !== MNIST_ROUNDS) fail(`the resumed run recorded ${doneRounds} rounds`);
  console.log(`e2e: MNIST run ${a} stopped after ${stoppedAt} rounds, resumed, finished ${doneRounds}: ${await statusOf(a)}`);

  // A second run with DP-SGD at epsilon 8; the two compared.
  const b = await startJob(3, true);
  await waitStatus(b, "finished");
  await page.check(`.compare-box[data-job="${a}"]`);
  await page.check(`.compare-box[data-job="${b}"]`);
  await snap("runs-finished");
  await page.click("#compare");
  await page.waitForURL(new RegExp(`#/compare/`));
  await page.waitForSelector("#compare-accuracy");
  const cmp = Number(await page.getAttribute("#compare-accuracy", "data-points"));
  if (cmp !== MNIST_ROUNDS + 3 + 2) fail(`the comparison plots ${cmp} accuracy points, not ${MNIST_ROUNDS + 3 + 2} (each run's round 0 and its rounds)`);
  const cmpEps = Number(await page.getAttribute("#compare-epsilon", "data-points"));
  if (cmpEps !== 4) fail(`the comparison plots ${cmpEps} epsilon points, not 4 (round 0 and 3 rounds of the DP run)`);
  await snap("runs-compare");

  // A viewer sees the runs but no form and no buttons, and is refused.
  const viewer = await (await browser.newContext()).newPage();
  await viewer.goto(`${base}/login`);
  await viewer.fill("#username", "viewer");
  await viewer.fill("#password", "e2e-viewer-password");
  await viewer.click("#login-button");
  await viewer.waitForURL(/\/app#\/training/);
  await viewer.goto(`${base}/app#/runs`);
  await viewer.waitForSelector(`#runs-table tr[data-job="${a}"]`);
  const controls = await viewer.$$("#job-form, .job-stop, .job-resume, .job-delete");
  if (controls.length) fail(`a viewer sees ${controls.length} job controls`);
  const refused = await viewer.evaluate(async () => (await fetch("/api/jobs", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ data: "mnist", rounds: 1, hospitals: 2 }),
  })).status);
  if (refused !== 403) fail(`a viewer's POST /api/jobs answered ${refused}`);
  await viewer.context().close();

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
