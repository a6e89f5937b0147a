// Charts of the version page: one scatter per device class from the JSON beside its canvas.
// Size (x) against latency (y), colour by quality, shape by verdict (star = chosen,
// cross = failed), budgets as dashed lines. The table under each chart holds the same figures.
(function () {
  "use strict";
  function shade(value, low, high) {
    if (value === null || value === undefined) return "#8c959f";
    var t = high > low ? Math.max(0, Math.min(1, (value - low) / (high - low))) : 1;
    var hue = Math.round(10 + 120 * t); // red (worse) to green (better)
    return "hsl(" + hue + ", 70%, 40%)";
  }
  function draw(canvas) {
    var data = JSON.parse(document.getElementById("chart-" + canvas.dataset.chart).textContent);
    var points = data.points.filter(function (p) { return p.size_mb !== null; });
    var qualities = points.map(function (p) { return p.quality; }).filter(function (q) { return q !== null; });
    var low = Math.min.apply(null, qualities.concat([data.quality_budget || 1])), high = Math.max.apply(null, qualities.concat([low]));
    var latencies = points.map(function (p) { return p.latency_ms || 0; });
    var maxY = Math.max.apply(null, latencies.concat([data.latency_budget_ms || 0])) * 1.15 || 1;
    // The size budget is drawn only when it is near the variants (a 512 MB budget would
    // squeeze 20-60 MB variants into a corner); the caption always states it.
    var largest = Math.max.apply(null, points.map(function (p) { return p.size_mb; }).concat([0]));
    var showSize = data.size_budget_mb && data.size_budget_mb <= largest * 2;
    var maxX = Math.max(largest, showSize ? data.size_budget_mb : 0) * 1.15 || 1;
    var datasets = [{
      type: "scatter", label: "variants",
      data: points.map(function (p) { return { x: p.size_mb, y: p.latency_ms === null ? 0 : p.latency_ms, p: p }; }),
      pointStyle: points.map(function (p) { return p.chosen ? "star" : (p.verdict === "failed" ? "crossRot" : "circle"); }),
      pointRadius: points.map(function (p) { return p.chosen ? 12 : 7; }),
      borderWidth: points.map(function (p) { return p.chosen ? 3 : 1.5; }),
      backgroundColor: points.map(function (p) { return shade(p.quality, low, high); }),
      borderColor: points.map(function (p) { return p.chosen ? "#8250df" : shade(p.quality, low, high); })
    }];
    if (data.latency_budget_ms) datasets.push({ type: "line", label: "latency budget", data: [{ x: 0, y: data.latency_budget_ms }, { x: maxX, y: data.latency_budget_ms }], borderColor: "#cf222e", borderDash: [6, 4], pointRadius: 0, borderWidth: 1.5 });
    if (showSize) datasets.push({ type: "line", label: "size budget", data: [{ x: data.size_budget_mb, y: 0 }, { x: data.size_budget_mb, y: maxY }], borderColor: "#9a6700", borderDash: [6, 4], pointRadius: 0, borderWidth: 1.5 });
    new Chart(canvas, {
      data: { datasets: datasets },
      options: {
        animation: false, maintainAspectRatio: false,
        scales: { x: { type: "linear", min: 0, max: maxX, title: { display: true, text: "size (MB)" } },
                  y: { min: 0, max: maxY, title: { display: true, text: "latency (ms)" } } },
        plugins: { tooltip: { callbacks: { label: function (ctx) {
          var p = ctx.raw.p; if (!p) return ctx.dataset.label;
          return p.recipe + ": " + p.size_mb.toFixed(1) + " MB, " + (p.latency_ms === null ? "latency not measured" : p.latency_ms.toFixed(1) + " ms") +
            ", " + data.quality_name + " " + (p.quality === null ? "?" : p.quality.toFixed(4)) + ", " + p.verdict + (p.chosen ? ", chosen" : "");
        } } } }
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas[data-chart]").forEach(draw);
  });
})();
