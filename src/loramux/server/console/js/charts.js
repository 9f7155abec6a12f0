// Line charts on uPlot (vendor/uPlot.iife.min.js, loaded before the modules as window.uPlot).

export const COLORS = {
  decode: "#2563eb", prefill: "#ea580c", train: "#16a34a", eval: "#9333ea",
  p50: "#0891b2", p90: "#2563eb", p99: "#1e3a8a", target: "#dc2626", value: "#2563eb", second: "#ea580c",
};

// A y scale from 0 to a little above the data's maximum (uPlot's own pads all-zero data to 100).
export const fromZero = { range: (plot, min, max) => [0, max > 0 ? max * 1.15 : 1] };
export const PERCENT = { range: [0, 100] };

// Whole-number ticks for an x axis of steps.
const STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];

const innerWidth = (element) => {
  const style = getComputedStyle(element);
  return Math.max(200, element.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight));
};

// A chart in `container` that follows its width. `series`: uPlot series options ({label, stroke,
// dash, scale, ...}); `time`: the x values are epoch seconds (else plain numbers named `xLabel`);
// `scales`, `axes`: extra uPlot options (a second y scale and its axis). `update(data)` redraws
// with uPlot's columns (x values, then one array per series, nulls for gaps) and records the
// number of x values in the container's data-points attribute.
export function lineChart(container, { series, time = true, xLabel = "x", height = 170, scales = {}, axes = [] }) {
  const options = {
    width: innerWidth(container),
    height,
    scales: { x: { time }, ...scales },
    series: [
      { label: time ? "time" : xLabel },
      ...series.map((s) => ({ width: 2, spanGaps: true, points: { show: !time, size: 4 }, ...s })),
    ],
    axes: [time ? {} : { incrs: STEPS }, { size: 48 }, ...axes],
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
  };
  const plot = new window.uPlot(options, [[], ...series.map(() => [])], container);
  let width = options.width;
  new ResizeObserver(() => {
    const now = innerWidth(container);
    if (now !== width) plot.setSize({ width: (width = now), height });
  }).observe(container);
  return {
    update(data) {
      plot.setData(data);
      container.dataset.points = String(data[0].length);
    },
  };
}

// Sparse series (latencies, attainment: only buckets with finished requests) show their points.
export const sparse = (series) => ({ ...series, points: { show: true, size: 5 } });

// A target as a dashed horizontal series: the same value at every x.
export const targetSeries = (label) => ({ label, stroke: COLORS.target, dash: [6, 4], width: 1.5 });
