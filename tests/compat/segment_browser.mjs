// Drive @segment/analytics-next (analytics.js, Segment's browser SDK) in
// headless Debian Chromium against cdp's collector. Run by
// tests/compat_sdks.rs; the expectations live there.
//
// usage: node segment_browser.mjs HOST WRITE_KEY RUN
//
// A local page (served here on 127.0.0.1, never a CDN) loads the npm
// package's UMD bundle; analytics.js fetches its settings from the
// collector (`cdnURL`) and posts every call to it. Every id is prefixed with
// `browser-RUN-`. Exits non-zero unless the collector acknowledged every
// event.

import http from 'node:http'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const BATCH_EVENTS = 30
const EXPECTED = 7 + BATCH_EVENTS
const TIMEOUT_MS = 45000

const [host, writeKey, run] = process.argv.slice(2)
if (!host || !writeKey || !run) {
  console.error('usage: node segment_browser.mjs HOST WRITE_KEY RUN')
  process.exit(2)
}
const here = path.dirname(fileURLToPath(import.meta.url))
const umd = path.join(here, 'node_modules/@segment/analytics-next/dist/umd')

// The page: analytics.js from the npm package, calls as a web shop makes.
const page = `<!doctype html>
<html><head><title>cdp compat</title><script src="/umd/index.js"></script></head>
<body><script>
async function main(writeKey, collector, p) {
  const user = p + '-user', anon = p + '-anon'
  const load = (extra) => AnalyticsNext.AnalyticsBrowser.load(
    { writeKey, cdnURL: collector },
    // Plain HTTP on 127.0.0.1 (analytics.js defaults to https).
    { integrations: { 'Segment.io': Object.assign({ protocol: 'http' }, extra) } })
  const [analytics] = await load({})
  analytics.setAnonymousId(anon)
  await analytics.identify(user, { email: p + '@example.com', plan: 'pro' }, { messageId: p + '-identify' })
  await analytics.track('Order Completed', { revenue: 42.5, currency: 'EUR' }, { messageId: p + '-track' })
  await analytics.page('Docs', 'Install', { path: '/install' }, { messageId: p + '-page' })
  await analytics.screen('Home', { tab: 'feed' }, { messageId: p + '-screen' })
  await analytics.group(p + '-org', { name: 'Acme' }, { messageId: p + '-group' })
  await analytics.alias(user, anon, { messageId: p + '-alias' })
  await analytics.track('Past Event', {}, { messageId: p + '-past', timestamp: new Date('2024-01-01T00:00:00Z') })
  // The batching delivery strategy: several events per POST to /v1/b.
  const [batched] = await load({ deliveryStrategy: { strategy: 'batching', config: { size: 10, timeout: 200 } } })
  const calls = []
  for (let i = 0; i < ${BATCH_EVENTS}; i++) {
    calls.push(batched.track('Batch Item', { i }, { anonymousId: p + '-batch' }))
  }
  await Promise.all(calls)
  return 'called'
}
</script></body></html>`

const server = http.createServer(async (req, res) => {
  try {
    if (req.url === '/' || req.url === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html' })
      res.end(page)
      return
    }
    if (req.url === '/favicon.ico') {
      res.writeHead(204)
      res.end()
      return
    }
    const m = /^\/umd\/([\w.-]+\.js)$/.exec(req.url ?? '')
    if (m) {
      res.writeHead(200, { 'content-type': 'application/javascript' })
      res.end(await readFile(path.join(umd, m[1])))
      return
    }
    res.writeHead(404)
    res.end()
  } catch (e) {
    res.writeHead(500)
    res.end(String(e))
  }
})
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
const pageUrl = `http://127.0.0.1:${server.address().port}/`

const browser = await chromium.launch({
  executablePath: process.env.CDP_CHROMIUM ?? '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
})

let failure = null
let acknowledged = 0
let settingsFetched = false
const problems = []
try {
  const ctx = await browser.newContext()
  const tab = await ctx.newPage()
  tab.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console: ${m.text()} ${m.location()?.url ?? ''}`)
  })
  tab.on('pageerror', (e) => problems.push(`page error: ${e}`))
  // Everything the page asks of the collector, and what it answered.
  tab.on('requestfinished', async (request) => {
    const url = new URL(request.url())
    if (url.origin !== host) return
    const response = await request.response()
    const status = response?.status()
    if (/^\/v1\/projects\/[^/]+\/settings$/.test(url.pathname)) {
      settingsFetched = status === 200
      return
    }
    if (!/^\/v1\/[itpsgab]$/.test(url.pathname)) return
    if (status !== 200) {
      failure ??= `${request.method()} ${url.pathname} answered ${status}: ${await response?.text()}`
      return
    }
    const body = JSON.parse(request.postData() ?? '{}')
    acknowledged += url.pathname === '/v1/b' ? body.batch.length : 1
  })
  tab.on('requestfailed', (request) => {
    if (request.url().startsWith(host)) failure ??= `${request.url()} failed: ${request.failure()?.errorText}`
  })
  await tab.goto(pageUrl)
  const called = await tab.evaluate(([k, c, p]) => main(k, c, p), [writeKey, host, `browser-${run}`])
  const deadline = Date.now() + TIMEOUT_MS
  while (acknowledged < EXPECTED && !failure && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50))
  }
  if (!failure && !settingsFetched) failure = 'analytics.js did not fetch its settings from the collector'
  if (!failure && acknowledged !== EXPECTED) {
    failure = `the collector acknowledged ${acknowledged} of ${EXPECTED} events (${called})`
  }
} catch (e) {
  failure = `driver error: ${e?.stack ?? e}`
} finally {
  // Playwright gave the browser a fresh profile, and removes it here.
  await browser.close()
  server.close()
}
if (failure) {
  console.error(`@segment/analytics-next: ${failure}\n  ${problems.slice(0, 10).join('\n  ')}`)
  process.exit(1)
}
console.error(`@segment/analytics-next in Chromium: sent ${acknowledged} events${problems.length ? `; page said:\n  ${problems.slice(0, 10).join("\n  ")}` : ""}`)
