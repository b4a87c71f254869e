#!/usr/bin/env python3
"""Generates deploy/grafana/cdp-dashboard.json (run it after editing the
panels below; helm/tests/test_monitoring.py fails while the JSON is stale
and checks every query against the metrics the code exports).

    python3 deploy/grafana/dashboard.py > deploy/grafana/cdp-dashboard.json

Most counters are created by their first event (a dead letter, a failed
delivery), so their panels read "No data" until one happens. A single
unlabelled sum gets `or vector(0)` (it shows 0 instead); a panel with one
line per label value says so in its description (LAZY) rather than add an
unlabelled 0 line. Gauges and quantiles get neither: no lag or no latency
series is not 0.
"""
import json
NS = 'namespace=~"$namespace"'
LAZY = " No data until the first one: each line appears with its first event since its process started."
panels = []
y = 0
pid = 0
def row(title):
    global y, pid
    pid += 1
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1
x = 0
def panel(title, targets, unit="short", w=8, h=8, kind="timeseries", desc="", stack=False):
    global x, y, pid
    pid += 1
    if x + w > 24:
        x = 0; y += h
    p = {"type": kind, "title": title, "id": pid, "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                     "tooltip": {"mode": "multi", "sort": "desc"}},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(targets)]}
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 20}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    panels.append(p)
    x += w
    if x >= 24:
        x = 0; y += h
def endrow():
    global x, y
    if x:
        x = 0; y += 8

row("Overview")
panel("Events accepted / s", [(f'sum(rate(cdp_collector_events_accepted_total{{{NS}}}[$__rate_interval])) or vector(0)', "accepted")], "ops", w=6, kind="stat")
panel("Dead letters / s", [(f'sum(rate(cdp_dead_letters_total{{{NS}}}[$__rate_interval])) or vector(0)', "dead letters")], "ops", w=6, kind="stat")
panel("Total consumer lag", [(f'sum(cdp_consumer_lag{{{NS}}})', "lag")], "short", w=6, kind="stat")
panel("p99 event → delivery", [(f'histogram_quantile(0.99, sum by (le) (rate(cdp_end_to_end_latency_seconds_bucket{{{NS}}}[$__rate_interval])))', "p99")], "s", w=6, kind="stat")
endrow()
row("Throughput")
panel("Records in / s by stage", [(f'sum by (stage) (rate(cdp_records_in_total{{{NS}}}[$__rate_interval]))', "{{stage}}")], "ops",
      desc="Input records consumed, ticks included.")
panel("Records out / s by stage and output", [(f'sum by (stage, output) (rate(cdp_records_out_total{{{NS}}}[$__rate_interval]))', "{{stage}} → {{output}}")], "ops")
panel("Batch duration p99 by stage", [(f'histogram_quantile(0.99, sum by (stage, le) (rate(cdp_batch_duration_seconds_bucket{{{NS}}}[$__rate_interval])))', "{{stage}}")], "s",
      desc="Process + produce + commit of one batch.")
panel("Mean batch time by stage and phase", [(f'sum by (stage, phase) (rate(cdp_batch_phase_seconds_sum{{{NS}}}[$__rate_interval])) / sum by (stage, phase) (rate(cdp_batch_phase_seconds_count{{{NS}}}[$__rate_interval]))', "{{stage}} {{phase}}")], "s",
      w=24, stack=True,
      desc="Where a committed batch's time goes: poll_wait (waiting for its first record: idle time), process, outputs (outputs and changelog records acknowledged), markers (commit markers acknowledged), commit (RocksDB).")
endrow()
row("Lag and state")
panel("Consumer lag by stage", [(f'sum by (stage) (cdp_consumer_lag{{{NS}}})', "{{stage}}")], "short",
      desc="Input high watermark minus the next offset, summed over partitions. Growing lag: the stage falls behind.")
panel("Partitions owned by stage", [(f'sum by (stage) (cdp_tasks{{{NS}}})', "{{stage}} owned"),
      (f'max by (stage) (cdp_input_partitions{{{NS}}})', "{{stage}} in its input")], "short",
      desc="Owned below the input's partitions: a partition nobody processes (alert CdpPartitionsUnowned). Zero owned: no instance processes the stage (CdpStageDown); no line at all: no instance is scraped (CdpStageAbsent).")
panel("State store size by stage", [(f'sum by (stage) (cdp_state_store_bytes{{{NS}}})', "{{stage}}")], "bytes",
      desc="RocksDB's estimate-live-data-size, summed over partitions: SST files only (memtables and WAL not counted; 0 for a small or fresh store). Below the disk used: see docs/OPERATIONS.md, Sizing.")
panel("Rebalances / 5m", [(f'sum by (stage, kind) (increase(cdp_rebalances_total{{{NS}}}[5m]))', "{{stage}} {{kind}}")], "short")
panel("Restores", [(f'sum by (stage) (increase(cdp_restores_total{{{NS}}}[$__rate_interval]))', "{{stage}} restores"),
                   (f'sum by (stage) (rate(cdp_restored_records_total{{{NS}}}[$__rate_interval]))', "{{stage}} records/s")], "short",
      desc=LAZY.strip())
panel("Commits / s and duplicates dropped / s", [(f'sum by (stage) (rate(cdp_commits_total{{{NS}}}[$__rate_interval]))', "{{stage}} commits"),
      (f'sum by (stage) (rate(cdp_duplicates_dropped_total{{{NS}}}[$__rate_interval]))', "{{stage}} duplicates"),
      (f'sum by (stage) (rate(cdp_ticks_total{{{NS}}}[$__rate_interval]))', "{{stage}} ticks")], "ops")
endrow()
row("Broker and ownership")
panel("Broker reachable (collector)", [(f'min by (stage) (cdp_broker_reachable{{{NS}}})', "{{stage}}")], "short",
      desc="1 while the component can reach the broker and produce. 0: the collector answers 503.")
panel("Broker retries / s", [(f'sum by (stage, what) (rate(cdp_broker_retries_total{{{NS}}}[$__rate_interval]))', "{{stage}} {{what}}")], "ops",
      desc="Produce rounds or restore reads retried while the broker was away." + LAZY)
panel("Client rebuilds / 10m", [(f'sum by (stage, client) (increase(cdp_client_rebuilds_total{{{NS}}}[10m]))', "{{stage}} {{client}}")], "short")
panel("Fenced batches and changelog repairs / s", [(f'sum by (stage) (rate(cdp_fenced_total{{{NS}}}[$__rate_interval]))', "{{stage}} fenced"),
      (f'sum by (stage) (rate(cdp_changelog_repairs_total{{{NS}}}[$__rate_interval]))', "{{stage}} repairs")], "ops",
      desc="Fenced: another owner claimed the partition (a zombie lost). Repairs: uncommitted changelog keys written again.")
panel("State resets / 1h", [(f'sum by (stage, reason) (increase(cdp_state_resets_total{{{NS}}}[1h]))', "{{stage}} {{reason}}")], "short",
      desc="Local state discarded or input re-read because it did not match the broker (see docs/OPERATIONS.md, Recovery)." + LAZY)
panel("Ticks rejected / s", [(f'sum by (stage, reason) (rate(cdp_ticks_rejected_total{{{NS}}}[$__rate_interval]))', "{{stage}} {{reason}}")], "ops",
      desc="Tick records not written by the partition's owner, or too far ahead.")
endrow()
row("Dead letters")
panel("Dead letters / s by stage and reason", [(f'sum by (stage, reason) (rate(cdp_dead_letters_total{{{NS}}}[$__rate_interval]))', "{{stage}} {{reason}}")], "ops", w=12, stack=True,
      desc=LAZY.strip())
panel("Validation failures / s by source and event", [(f'topk(10, sum by (source, event, reason) (rate(cdp_validation_failures_total{{{NS}}}[$__rate_interval])))', "{{source}} {{event}} {{reason}}")], "ops", w=12,
      desc="Which producing team and event to talk to." + LAZY)
endrow()
row("Identity and profile state")
panel("Identifiers refused / s by type and rule", [(f'sum by (type, reason) (rate(cdp_identity_dropped_identifiers_total{{{NS}}}[$__rate_interval]))', "{{type}} {{reason}}")], "ops", w=6, stack=True,
      desc="Identifiers identity kept off a profile: blocked values/patterns, wrong types, limits, max_merges. Each is also on the profile's audit trail in <p>.profiles." + LAZY)
panel("Profile merges / s", [(f'sum(rate(cdp_identity_merges_total{{{NS}}}[$__rate_interval])) or vector(0)', "merges")], "ops", w=6,
      desc="Profiles identity merged into another (logins joining devices).")
panel("Event times corrected / s", [(f'sum by (stage) (rate(cdp_event_times_corrected_total{{{NS}}}[$__rate_interval]))', "{{stage}}")], "ops", w=6,
      desc="Events dated further ahead of stream time than event_time.max_future (wrong device clocks)." + LAZY)
panel("State limits hit / s", [(f'sum by (stage, kind) (rate(cdp_state_limit_hits_total{{{NS}}}[$__rate_interval]))', "{{stage}} {{kind}}")], "ops", w=6,
      desc="Per-profile state bounds reached (most_frequent, unique_count limits): values dropped by the documented rule." + LAZY)
endrow()
row("Audiences and delivery")
panel("Audience sizes", [(f'sum by (audience) (cdp_audience_members{{{NS}}})', "{{audience}}")], "short",
      desc="Profiles in each audience: every audiences task counts its members in its state and reports them while it owns its partition, so the sum over instances survives restarts and rebalances.")
panel("Audience changes / s", [(f'sum by (audience, action) (rate(cdp_audience_changes_total{{{NS}}}[$__rate_interval]))', "{{audience}} {{action}}")], "ops",
      desc=LAZY.strip())
panel("Event → delivery latency", [(f'histogram_quantile({q}, sum by (le) (rate(cdp_end_to_end_latency_seconds_bucket{{{NS}}}[$__rate_interval])))', f"p{int(q*100)}") for q in (0.5, 0.95, 0.99)], "s",
      desc="Event time to delivery, all destinations.")
panel("Delivery attempts / s by destination", [(f'sum by (destination) (rate(cdp_delivery_attempts_total{{{NS}}}[$__rate_interval]))', "{{destination}}")], "ops")
panel("Delivery failures / s by destination", [(f'sum by (destination) (rate(cdp_delivery_failures_total{{{NS}}}[$__rate_interval]))', "{{destination}}")], "ops",
      desc="Failed after every retry; dead-lettered with reason delivery_failed." + LAZY)
panel("Changes sent / s by destination", [(f'sum by (destination) (rate(cdp_delivery_sent_total{{{NS}}}[$__rate_interval]))', "{{destination}}")], "ops",
      desc="Audience changes a destination accepted.")
panel("Retries / s by destination", [(f'sum by (destination) (rate(cdp_delivery_retries_total{{{NS}}}[$__rate_interval]))', "{{destination}}")], "ops",
      desc="Attempts retried after a 5xx, 429 (Retry-After honoured) or network error." + LAZY)
panel("In flight by destination", [(f'sum by (destination) (cdp_delivery_in_flight{{{NS}}})', "{{destination}}")], "short",
      desc="Changes handed to a destination and not yet settled.")
panel("p99 lag from emitted_at by destination", [(f'histogram_quantile(0.99, sum by (le, destination) (rate(cdp_delivery_lag_seconds_bucket{{{NS}}}[$__rate_interval])))', "{{destination}}")], "s",
      desc="Change computed (emitted_at) to accepted by the destination.")
panel("p99 latency by destination", [(f'histogram_quantile(0.99, sum by (destination, le) (rate(cdp_end_to_end_latency_seconds_bucket{{{NS}}}[$__rate_interval])))', "{{destination}}")], "s")
endrow()
row("Collector")
panel("Requests / s by status", [(f'sum by (status) (rate(cdp_http_requests_total{{{NS}}}[$__rate_interval]))', "{{status}}")], "reqps", stack=True)
panel("Request latency p99 by route", [(f'histogram_quantile(0.99, sum by (route, le) (rate(cdp_http_request_duration_seconds_bucket{{{NS}}}[$__rate_interval])))', "{{route}}"),
      (f'histogram_quantile(0.99, sum by (le) (rate(cdp_broker_ack_seconds_bucket{{{NS}}}[$__rate_interval])))', "broker ack")], "s")
panel("Events accepted and rejected / s", [(f'sum by (source) (rate(cdp_collector_events_accepted_total{{{NS}}}[$__rate_interval]))', "accepted {{source}}"),
      (f'sum by (reason) (rate(cdp_collector_events_rejected_total{{{NS}}}[$__rate_interval]))', "rejected {{reason}}")], "ops",
      desc=LAZY.strip())
endrow()

dash = {
    "title": "cdp",
    "uid": "cdp-pipeline",
    "description": "cdp: collector, stages, lag, dead letters, audiences, delivery. Metrics from pipeline/src/metrics.rs.",
    "tags": ["cdp", "kafka"],
    "timezone": "",
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-3h", "to": "now"},
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "namespace", "label": "Namespace", "type": "query",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(cdp_records_in_total, namespace)", "refId": "namespace"},
         "definition": "label_values(cdp_records_in_total, namespace)",
         "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "current": {}, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
