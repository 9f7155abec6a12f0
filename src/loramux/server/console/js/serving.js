// The serving panel: GET /v1/loramux/stats as charts over the last five minutes, latencies beside
// the server's default targets.

import { serverStats } from "./api.js";
import { COLORS, fromZero, lineChart, PERCENT, sparse, targetSeries } from "./charts.js";
import { poll } from "./poll.js";

const WINDOW = 300;
const INTERVAL = 5;
const KINDS = ["decode", "prefill", "train", "eval"];
const percent = (values) => values.map((v) => (v == null ? null : 100 * v));
const chartIn = (name, options) => lineChart(document.querySelector(`[data-chart="${name}"]`), options);
const percentiles = () => ["p50", "p90", "p99"].map((p) => sparse({ label: p, stroke: COLORS[p] }));

export function servingPanel(active) {
  const charts = {
    rps: chartIn("rps", { series: [{ label: "requests/s", stroke: COLORS.value }], scales: { y: fromZero } }),
    ttft: chartIn("ttft", { series: [...percentiles(), targetSeries("target")], scales: { y: fromZero } }),
    tpot: chartIn("tpot", { series: [...percentiles(), targetSeries("target")], scales: { y: fromZero } }),
    slo: chartIn("slo", { series: [sparse({ label: "met targets %", stroke: COLORS.value })], scales: { y: PERCENT } }),
    kv: chartIn("kv", {
      series: [{ label: "KV in use %", stroke: COLORS.value }, { label: "waiting", stroke: COLORS.second, scale: "n" }],
      scales: { y: PERCENT, n: fromZero },
      axes: [{ scale: "n", side: 1, size: 40, grid: { show: false } }],
    }),
    rows: chartIn("rows", { series: KINDS.map((kind) => ({ label: kind, stroke: COLORS[kind] })), scales: { y: fromZero } }),
  };
  const summary = document.getElementById("serving-summary");

  poll(async () => {
    const s = await serverStats(WINDOW, INTERVAL);
    const flat = (value) => s.time.map(() => value);
    charts.rps.update([s.time, s.requests_per_second]);
    charts.ttft.update([s.time, s.ttft.p50, s.ttft.p90, s.ttft.p99, flat(s.targets.ttft)]);
    charts.tpot.update([s.time, s.tpot.p50, s.tpot.p90, s.tpot.p99, flat(s.targets.tpot)]);
    charts.slo.update([s.time, percent(s.slo_attainment)]);
    charts.kv.update([s.time, percent(s.kv_cache_usage), s.waiting]);
    charts.rows.update([s.time, ...KINDS.map((kind) => s.rows_per_second[kind])]);
    const { requests, slo_attainment: met, steps } = s.totals;
    summary.dataset.requests = String(requests);
    summary.textContent = `Last ${s.window / 60} minutes, in ${s.interval} s buckets: ${requests} request${requests === 1 ? "" : "s"}`
      + `${met == null ? "" : ` (${Math.round(100 * met)}% of those completed met their targets)`}, ${steps} steps. `
      + `Targets: first token within ${s.targets.ttft} s, then ${s.targets.tpot} s per token.`;
  }, INTERVAL * 1000, active);
}
