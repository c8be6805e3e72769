// The rlbus dashboard page: feeds what /api/stream pushes into uPlot charts and plain tables.
// The server sends everything once, then only what is new (see dashboard_state.py); charts are
// drawn by uPlot, this file only arranges the data. Text from the run is set as textContent.
(function () {
  "use strict";

  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];
  const DASHES = [[], [6, 3], [2, 3], [10, 3, 2, 3]];
  const MAX_MARKED_POINTS = 60; // like rlbus.plots: a short run's lines also mark their points
  const MAX_EVENTS_SHOWN = 25;
  const MAX_SAMPLES_KEPT = 2000; // as many as the server keeps (dashboard_run.py)
  const MAX_EVENTS_KEPT = 300;
  const CHART_HEIGHT = 240;
  const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000];

  const state = { charts: [], runs: [], health: null, live: false, clockOffset: 0, version: -1 };
  const plots = {}; // chart id -> {card, plotEl, readout, uplot, signature}
  window.rlbusDashboard = { state, plots };

  function newRun(name) {
    return { name, overview: {}, series: new Map(), samples: [], events: [] };
  }

  function apply(payload) {
    state.version = payload.version;
    state.live = payload.live;
    state.health = payload.health;
    state.clockOffset = payload.server_time - Date.now() / 1000;
    if (payload.charts) {
      state.charts = payload.charts;
    }
    payload.runs.forEach((delta, index) => {
      if (delta.reset || !state.runs[index]) {
        state.runs[index] = newRun(delta.name);
      }
      const run = state.runs[index];
      run.overview = delta.overview;
      for (const [key, points] of Object.entries(delta.series)) {
        if (!run.series.has(key)) {
          run.series.set(key, new Map());
        }
        const byStep = run.series.get(key);
        for (const [step, value] of points) {
          byStep.set(step, value); // a step read again (a resumed run) replaces the earlier value
        }
      }
      run.samples = run.samples.concat(delta.samples).slice(-MAX_SAMPLES_KEPT);
      run.events = run.events.concat(delta.events).slice(-MAX_EVENTS_KEPT);
    });
  }

  // ------------------------------------------------------------------ formatting
  function formatValue(value) {
    if (value === null || value === undefined) return "–";
    if (value === 0 || !isFinite(value)) return String(value);
    const magnitude = Math.abs(value);
    return magnitude < 1e-3 || magnitude >= 1e6 ? value.toExponential(3) : String(Number(value.toPrecision(4)));
  }

  // Axis ticks: enough digits to tell ticks of a nearly flat line apart, exponents for tiny values (a KL).
  function tickLabels(_, splits) {
    return splits.map((v) => {
      if (v === null || v === undefined) return "";
      if (v === 0) return "0";
      const magnitude = Math.abs(v);
      return magnitude < 1e-3 || magnitude >= 1e6 ? v.toExponential(1) : String(Number(v.toPrecision(6)));
    });
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), rest = s % 60;
    return h ? `${h}h ${m}m ${rest}s` : m ? `${m}m ${rest}s` : `${rest}s`;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function serverNow() {
    return Date.now() / 1000 + state.clockOffset;
  }

  // ------------------------------------------------------------------ overview
  function renderOverview() {
    const box = document.getElementById("overview");
    box.replaceChildren(...state.runs.map((run) => {
      const o = run.overview;
      const card = element("div", null, "run-card");
      card.dataset.run = run.name;
      card.dataset.step = o.step ?? "";
      card.append(element("div", run.name, "name"));
      const running = state.live && !o.finished && o.started_at;
      const elapsed = running ? serverNow() - o.started_at : o.elapsed_s;
      const status = o.finished ? "finished" : state.live ? "running" : "from files";
      const fields = [["model", o.model ?? "–"], ["envs", o.envs.length ? o.envs.join(", ") : "–"],
        ["step", `${o.step ?? "–"} / ${o.max_steps ?? "?"}`], ["elapsed", formatDuration(elapsed)],
        ["ETA", o.eta_s === null ? "–" : formatDuration(o.eta_s)], ["status", status]];
      const list = element("dl");
      for (const [name, value] of fields) {
        const dd = element("dd", value);
        dd.dataset.field = name;
        list.append(element("dt", name), dd);
      }
      card.append(list);
      return card;
    }));
  }

  // ------------------------------------------------------------------ charts
  function chartColumns(chart) {
    const pattern = chart.pattern ? new RegExp(chart.pattern) : null;
    const columns = [];
    const seen = new Set();
    const add = (key, label) => { if (!seen.has(key)) { seen.add(key); columns.push({ key, label }); } };
    for (const [key, label] of Object.entries(chart.columns)) {
      if (state.runs.some((run) => run.series.has(key))) add(key, label);
    }
    if (pattern) {
      const found = new Set();
      state.runs.forEach((run) => run.series.forEach((_, key) => { if (pattern.test(key)) found.add(key); }));
      [...found].sort().forEach((key) => add(key, key.match(pattern)[1] ?? key));
    }
    return columns;
  }

  function chartSeries(chart) {
    const columns = chartColumns(chart);
    const several = state.runs.length > 1;
    const lines = [];
    state.runs.forEach((run, runIndex) => columns.forEach((column, columnIndex) => {
      const byStep = run.series.get(column.key);
      if (!byStep || byStep.size === 0) return;
      lines.push({
        run: run.name, key: column.key, byStep,
        label: several ? `${run.name} · ${column.label}` : column.label,
        color: PALETTE[(several ? runIndex : columnIndex) % PALETTE.length],
        dash: several ? DASHES[columnIndex % DASHES.length] : [],
      });
    }));
    return lines;
  }

  function alignedData(lines) {
    const steps = new Set();
    lines.forEach((line) => line.byStep.forEach((_, step) => steps.add(step)));
    const xs = [...steps].sort((a, b) => a - b);
    return [xs, ...lines.map((line) => xs.map((step) => (line.byStep.has(step) ? line.byStep.get(step) : null)))];
  }

  function ensureCard(chart) {
    if (plots[chart.id]) return plots[chart.id];
    const card = element("div", null, "chart-card");
    card.dataset.chart = chart.id;
    card.append(element("h2", chart.title));
    const plotEl = element("div", null, "plot");
    const readout = element("table", null, "readout");
    card.append(plotEl, readout);
    document.getElementById("charts").append(card);
    plots[chart.id] = { card, plotEl, readout, uplot: null, signature: "" };
    return plots[chart.id];
  }

  function renderChart(chart) {
    const lines = chartSeries(chart);
    const slot = ensureCard(chart);
    slot.card.hidden = lines.length === 0;
    if (lines.length === 0) return;
    const data = alignedData(lines);
    const values = data.slice(1).flat().filter((v) => v !== null);
    const log = chart.log_scale && values.length > 0 && Math.min(...values) > 0;
    const marked = data[0].length <= MAX_MARKED_POINTS;
    const signature = JSON.stringify([lines.map((l) => l.label), log, marked]);
    if (slot.uplot && slot.signature === signature) {
      slot.uplot.setData(data);
    } else {
      if (slot.uplot) slot.uplot.destroy();
      slot.signature = signature;
      slot.uplot = new uPlot({
        width: Math.max(300, slot.plotEl.clientWidth), height: CHART_HEIGHT,
        scales: { x: { time: false }, y: { distr: log ? 3 : 1 } },
        axes: [{ label: "step", incrs: STEP_INCREMENTS }, { label: chart.ylabel, size: 64, values: tickLabels }],
        legend: { show: false }, // the readout under the chart names each line, with its latest value
        series: [{ label: "step" }, ...lines.map((line) => ({
          label: line.label, stroke: line.color, dash: line.dash, width: 1.5, spanGaps: true,
          points: { show: marked, size: 5 },
        }))],
      }, data, slot.plotEl);
    }
    renderReadout(slot.readout, lines);
  }

  // The latest value of each line, as text and as data-* attributes (what tests compare with the files).
  function renderReadout(table, lines) {
    table.replaceChildren(...lines.map((line) => {
      const last = Math.max(...line.byStep.keys());
      const value = line.byStep.get(last);
      const row = element("tr");
      Object.assign(row.dataset, { run: line.run, key: line.key, step: String(last), value: String(value) });
      const swatch = element("span", null, "swatch");
      swatch.style.background = line.color;
      const name = element("td");
      name.append(swatch, line.label);
      row.append(name, element("td", `step ${last}`, "number"), element("td", formatValue(value), "number"));
      return row;
    }));
  }

  function resizeCharts() {
    Object.values(plots).forEach((slot) => {
      if (slot.uplot) slot.uplot.setSize({ width: Math.max(300, slot.plotEl.clientWidth), height: CHART_HEIGHT });
    });
  }

  // ------------------------------------------------------------------ tables
  function renderHealth() {
    const section = document.getElementById("health-section");
    section.hidden = !state.live;
    if (!state.live) return;
    const now = serverNow();
    document.querySelector("#health tbody").replaceChildren(...(state.health || []).map((row) => {
      const bad = row.status === "dead" || row.status === "stalled";
      const tr = element("tr", null, bad ? "bad" : "");
      tr.dataset.replica = row.replica_id;
      tr.dataset.status = row.status;
      let waiting = row.waiting_for || "";
      if (row.waiting_for && row.waiting_since) waiting += ` (${formatDuration(now - row.waiting_since)})`;
      tr.append(element("td", row.service), element("td", row.replica_id),
        element("td", bad ? row.status.toUpperCase() : row.status), element("td", row.step ?? "–", "number"),
        element("td", `${formatDuration(now - row.last_seen)} ago`, "number"), element("td", waiting),
        element("td", row.host), element("td", row.pid, "number"));
      return tr;
    }));
  }

  function renderEvents() {
    const events = state.runs.flatMap((run) => run.events.map((event) => ({ ...event, run: run.name })));
    events.sort((a, b) => (b.time || 0) - (a.time || 0));
    document.querySelector("#events tbody").replaceChildren(...events.slice(0, MAX_EVENTS_SHOWN).map((event) => {
      const bad = event.level === "error" || ["service_dead", "service_stalled"].includes(event.kind);
      const tr = element("tr", null, bad ? "bad" : event.level === "warning" ? "warning" : "");
      const when = event.time ? new Date(event.time * 1000).toLocaleTimeString() : "–";
      tr.append(element("td", when), element("td", event.run, "run-column"),
        element("td", `${event.service}/${event.replica_id}`), element("td", event.level),
        element("td", event.kind), element("td", event.message, "text"));
      return tr;
    }));
  }

  function syncSelect(select, options, fallback) {
    const keep = select.value;
    const values = options.map(([value]) => value);
    if (JSON.stringify(values) !== select.dataset.values) {
      select.replaceChildren(...options.map(([value, text]) => {
        const option = element("option", text);
        option.value = value;
        return option;
      }));
      select.dataset.values = JSON.stringify(values);
    }
    select.value = values.includes(keep) ? keep : fallback;
  }

  function renderSamples() {
    const runSelect = document.getElementById("sample-run");
    const stepSelect = document.getElementById("sample-step");
    syncSelect(runSelect, state.runs.map((run, index) => [String(index), run.name]), "0");
    const run = state.runs[Number(runSelect.value)] || state.runs[0];
    if (!run) return;
    const steps = [...new Set(run.samples.map((sample) => sample.step))].sort((a, b) => b - a);
    syncSelect(stepSelect, [["latest", "latest"], ...steps.map((step) => [String(step), String(step)])], "latest");
    const step = stepSelect.value === "latest" ? steps[0] : Number(stepSelect.value);
    const table = document.getElementById("samples");
    table.dataset.step = step ?? "";
    table.querySelector("tbody").replaceChildren(...run.samples.filter((s) => s.step === step).map((sample) => {
      const tr = element("tr");
      tr.append(element("td", sample.env_id), element("td", sample.prompt, "text"),
        element("td", sample.completion, "text"), element("td", sample.answer, "text"),
        element("td", formatValue(sample.reward), "number"), element("td", formatValue(sample.advantage), "number"),
        element("td", sample.policy_step ?? "–", "number"));
      return tr;
    }));
  }

  function render() {
    document.body.classList.toggle("one-run", state.runs.length <= 1);
    document.body.dataset.version = String(state.version);
    renderOverview();
    state.charts.forEach(renderChart);
    renderHealth();
    renderEvents();
    renderSamples();
  }

  // ------------------------------------------------------------------ connection
  function connect() {
    const badge = document.getElementById("connection");
    const stream = new EventSource("api/stream");
    stream.onopen = () => { badge.dataset.state = "live"; badge.textContent = "connected"; };
    stream.onmessage = (message) => {
      apply(JSON.parse(message.data));
      render();
    };
    stream.onerror = () => {
      // EventSource reconnects by itself; the server then sends everything again (reset runs).
      const finished = state.runs.length > 0 && state.runs.every((run) => run.overview.finished);
      badge.dataset.state = finished ? "done" : "lost";
      badge.textContent = finished ? "run finished; server gone (page kept)" : "connection lost: retrying…";
    };
  }

  document.getElementById("sample-run").addEventListener("change", renderSamples);
  document.getElementById("sample-step").addEventListener("change", renderSamples);
  window.addEventListener("resize", resizeCharts);
  setInterval(() => { renderOverview(); renderHealth(); }, 1000); // elapsed and "last seen" keep counting
  connect();
})();
