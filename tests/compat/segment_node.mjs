// Drive @segment/analytics-node (Segment's own Node.js SDK) against cdp's
// collector. Run by tests/compat_sdks.rs; the expectations live there.
//
// usage: node segment_node.mjs HOST WRITE_KEY RUN
//
// Every id is prefixed with `node-RUN-` so the test can find this run's
// events on the raw topic. Exits non-zero if the SDK reported any failure.

import { Analytics } from '@segment/analytics-node'

const BATCH_EVENTS = 30

const [host, writeKey, run] = process.argv.slice(2)
if (!host || !writeKey || !run) {
  console.error('usage: node segment_node.mjs HOST WRITE_KEY RUN')
  process.exit(2)
}
const p = `node-${run}`
const userId = `${p}-user`
const anonymousId = `${p}-anon`

const analytics = new Analytics({
  writeKey,
  host,
  path: '/v1/batch',
  flushAt: 20,
  flushInterval: 200,
  maxRetries: 2,
  httpRequestTimeout: 10000,
})

const failures = []
analytics.on('error', (err) => failures.push(`error event: ${err?.reason ?? err?.code ?? err}`))
let delivered = 0
// Each call's callback runs once its batch was answered (or given up on).
const done = (what) => (err) => {
  if (err) failures.push(`${what}: ${err?.reason ?? err?.message ?? err}`)
  else delivered += 1
}

analytics.identify(
  { userId, anonymousId, traits: { email: `${p}@example.com`, plan: 'pro' }, messageId: `${p}-identify` },
  done('identify'),
)
analytics.track(
  {
    userId,
    anonymousId,
    event: 'Order Completed',
    properties: { revenue: 42.5, currency: 'EUR' },
    messageId: `${p}-track`,
  },
  done('track'),
)
analytics.page(
  { userId, category: 'Docs', name: 'Install', properties: { path: '/install' }, messageId: `${p}-page` },
  done('page'),
)
analytics.screen(
  { userId, name: 'Home', properties: { tab: 'feed' }, messageId: `${p}-screen` },
  done('screen'),
)
analytics.group({ userId, groupId: `${p}-org`, traits: { name: 'Acme' }, messageId: `${p}-group` }, done('group'))
analytics.alias({ userId, previousId: anonymousId, messageId: `${p}-alias` }, done('alias'))
analytics.track(
  { userId, event: 'Past Event', timestamp: new Date('2024-01-01T00:00:00Z'), messageId: `${p}-past` },
  done('past track'),
)
for (let i = 0; i < BATCH_EVENTS; i++) {
  analytics.track({ anonymousId: `${p}-batch`, event: 'Batch Item', properties: { i } }, done(`batch ${i}`))
}

await analytics.closeAndFlush({ timeout: 30000 })
const expected = 7 + BATCH_EVENTS
if (failures.length > 0 || delivered !== expected) {
  const shown = failures.slice(0, 10).join('\n  ')
  console.error(`@segment/analytics-node: ${delivered} of ${expected} delivered; ${failures.length} failures:\n  ${shown}`)
  process.exit(1)
}
console.error(`@segment/analytics-node: sent ${delivered} events`)
