// Drives the demo page (examples/web/, served by examples/demo_backend.rs)
// in Debian's Chromium, with a fake microphone, through the whole flow: a
// conversation runs down to the usage limit, the visitor buys more time and
// talks again. tests/browser.rs runs it; by hand, against a running demo:
//
//   DEMO_URL=http://127.0.0.1:3000 DEMO_SECONDS=20 SCREENSHOT_DIR=/tmp node tests/browser/demo.mjs
//
// Exits 0 when every check passes, 1 with a message naming the first that
// failed (and a screenshot of the page at that moment, failure.png).

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
];

const pageUrl = required('DEMO_URL');
const grantedSeconds = Number(process.env.DEMO_SECONDS ?? '20');
const screenshots = process.env.SCREENSHOT_DIR ?? '.';
const TOP_UP = 30;
// The whole run, whatever happens.
const DEADLINE_MS = 90_000;

const started = Date.now();
const log = (message) => console.log(`[${((Date.now() - started) / 1000).toFixed(2)}s] ${message}`);

class CheckFailed extends Error {}

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`FAILED: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const userDataDir = await mkdtemp(join(tmpdir(), 'tollgate-chromium-'));
let context;
let page;
const pageErrors = [];
const watchdog = setTimeout(() => {
  console.error(`FAILED: the run took longer than ${DEADLINE_MS / 1000} s`);
  cleanUp().finally(() => process.exit(1));
}, DEADLINE_MS);

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 800, height: 960 },
    timeout: 30_000,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (message) => log(`page ${message.type()}: ${message.text()}`));
  page.on('pageerror', (error) => {
    pageErrors.push(error.message);
    log(`uncaught in the page: ${error.message}`);
  });
  await run(page);
  if (pageErrors.length > 0) throw new CheckFailed(`the page threw: ${pageErrors.join('; ')}`);
  log('all checks passed');
  await cleanUp();
  process.exit(0);
} catch (error) {
  const message = error instanceof CheckFailed ? error.message : error.stack || String(error);
  console.error(`FAILED: ${message}`);
  if (page) {
    await page.screenshot({ path: join(screenshots, 'failure.png') }).catch(() => {});
    const status = await statusOf(page).catch(() => null);
    if (status) console.error(`page status then: ${JSON.stringify(status)}`);
  }
  await cleanUp();
  process.exit(1);
}

async function cleanUp() {
  clearTimeout(watchdog);
  await context?.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
}

async function run(page) {
  await page.goto(pageUrl);
  await waitForState(page, 'idle', 10_000, 'the page never became ready');
  const first = await remaining(page);
  check(Math.abs(first - grantedSeconds) < 0.01,
    `a new visitor should start with ${grantedSeconds} s, the page shows ${first}`);
  log(`ready with ${first} s`);

  // A conversation, down to the limit.
  await page.getByTestId('start').click();
  await waitForState(page, 'live', 15_000, 'the session never went live');
  log('session live');
  const reported = await serverRemaining(page, 5_000);
  check(reported <= grantedSeconds, `Tollgate reported ${reported} s of ${grantedSeconds}`);
  const before = await remaining(page);
  await page.waitForTimeout(1_000);
  const after = await remaining(page);
  // Tollgate sends the figures when they change; the page counts down.
  check(after < before - 0.5,
    `the countdown did not move: ${before} s, then ${after} s a second later`);
  check(after < grantedSeconds, `the bar still shows ${after} s`);
  log(`countdown moving: ${before} s, then ${after} s (Tollgate reported ${reported} s)`);
  if (grantedSeconds < 10) {
    // Below the server's default warning threshold, the warning comes at once.
    await waitFor(page, () => !document.getElementById('warning').hidden, 5_000,
      'no usage.warning was shown');
    log(`warning shown: ${await page.getByTestId('warning').textContent()}`);
  }
  await waitFor(page, () => Number(document.getElementById('frames-received').textContent) > 0,
    5_000, 'no audio frames came back');
  log(`audio frames back: ${await count(page, 'frames-received')}`);

  await waitForState(page, 'limit', (grantedSeconds + 10) * 1000,
    'the session was not closed at the usage limit');
  const status = await statusOf(page);
  check(status.closeCode === '4001', `closed with code ${status.closeCode}, not 4001`);
  check(/usage limit reached/i.test(status.title), `the status reads "${status.title}"`);
  await waitFor(page, () => Number(document.getElementById('remaining').dataset.remaining) === 0,
    5_000, 'the bar does not show 0 s after the cut-off');
  check(await page.getByTestId('start').isDisabled(), 'Start is enabled with no time left');
  const frames = await count(page, 'frames-received');
  log(`usage limit reached after ${frames} frames came back`);
  await page.screenshot({ path: join(screenshots, 'limit-reached.png'), animations: 'disabled' });

  // Reloading the page is the same visitor, and refills nothing.
  await page.reload();
  await waitForState(page, 'limit', 10_000, 'after a reload the page does not show the limit');
  const reloaded = await remaining(page);
  check(reloaded === 0, `after a reload the page shows ${reloaded} s, not 0`);
  log('reloaded: still no time left');

  // Buying more time.
  await page.getByTestId('buy').click();
  await waitFor(page, (top) => Math.abs(Number(
    document.getElementById('remaining').dataset.remaining) - top) < 0.01,
  5_000, `the bar does not show the ${TOP_UP} s bought`, TOP_UP);
  const valueNow = Number(await page.getByTestId('bar').getAttribute('aria-valuenow'));
  check(valueNow === TOP_UP, `the progress bar's aria-valuenow is ${valueNow}, not ${TOP_UP}`);
  await waitForState(page, 'idle', 2_000, 'the page is not ready after buying');
  log(`bought ${TOP_UP} s`);

  // Talking again.
  await page.getByTestId('start').click();
  await waitForState(page, 'live', 15_000, 'the second session never went live');
  await waitFor(page, () => Number(document.getElementById('frames-received').textContent) > 0,
    5_000, 'no audio frames came back in the second session');
  await serverRemaining(page, 5_000);
  await page.waitForTimeout(1_000);
  const again = await remaining(page);
  check(again < TOP_UP && again > TOP_UP - 5, `the second session shows ${again} s left`);
  check(await page.getByTestId('warning').isHidden(), 'a warning is shown with 30 s left');
  log(`second session live with ${again} s left`);
  await page.screenshot({ path: join(screenshots, 'demo.png'), animations: 'disabled' });

  await page.getByTestId('stop').click();
  await waitForState(page, 'ended', 5_000, 'Stop did not end the conversation');
  log('stopped');
}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

async function waitFor(page, predicate, timeout, message, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 50 });
  } catch (error) {
    if (error.name === 'TimeoutError') {
      throw new CheckFailed(`${message} (within ${timeout / 1000} s)`);
    }
    throw error;
  }
}

function waitForState(page, state, timeout, message) {
  return waitFor(page, (wanted) => document.getElementById('status').dataset.state === wanted,
    timeout, `${message}: no "${state}" state`, state);
}

async function remaining(page) {
  return Number(await page.getByTestId('remaining').getAttribute('data-remaining'));
}

// The last remaining value Tollgate reported on the session.
async function serverRemaining(page, timeout) {
  if (timeout > 0) {
    await waitFor(page, () => document.getElementById('bar').dataset.serverRemaining !== undefined,
      timeout, 'Tollgate never reported the remaining seconds');
  }
  return Number(await page.getByTestId('bar').getAttribute('data-server-remaining'));
}

async function count(page, testId) {
  return Number(await page.getByTestId(testId).textContent());
}

function statusOf(page) {
  return page.evaluate(() => {
    const status = document.getElementById('status');
    return {
      state: status.dataset.state,
      closeCode: status.dataset.closeCode,
      title: document.getElementById('status-title').textContent,
      detail: document.getElementById('status-detail').textContent,
    };
  });
}
