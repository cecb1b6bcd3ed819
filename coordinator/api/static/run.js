// One run's page: headline numbers, loss and throughput charts (uPlot), peers,
// leaderboard, shard coverage and the latest checkpoint, polled from the JSON API.
"use strict";

(() => {
  const { el, td, setText, compact, loss, percent, ago, integer } = ct;
  const runId = document.body.dataset.runId;
  const MAX_SAMPLES = 20000;

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // Time labels as precise as the visible span needs, on one line.
  function timeTicks(u, ticks) {
    const span = ticks.length > 1 ? ticks[ticks.length - 1] - ticks[0] : 0;
    const clock = { hour: "2-digit", minute: "2-digit", hour12: false };
    const format =
      span > 2 * 86400 ? { month: "short", day: "numeric" }
        : span > 600 ? clock
          : { ...clock, second: "2-digit" };
    return ticks.map((t) => new Date(t * 1000).toLocaleString([], format));
  }

  // A line chart in `container` that is created on its first data and follows the
  // container's width. `data-points` on the container says how many points it drew.
  function lineChart(container, { label, colorVar, timeAxis, xLabel, yFormat, xFormat }) {
    let plot = null;
    const height = 260;
    const axis = (values) => ({
      stroke: cssVar("--muted"),
      grid: { stroke: cssVar("--grid"), width: 1 },
      ticks: { stroke: cssVar("--grid"), width: 1 },
      font: "12px system-ui, sans-serif",
      ...(values ? { values } : {}),
    });
    function options() {
      const color = cssVar(colorVar);
      return {
        width: Math.max(container.clientWidth, 200),
        height,
        scales: { x: { time: timeAxis } },
        legend: { show: true },
        cursor: { drag: { x: true, y: false } },
        series: [
          { label: xLabel, value: (u, v) => (v === null ? "–" : xFormat(v)) },
          {
            label,
            stroke: color,
            width: 2,
            fill: `${color}22`,
            points: { show: (u) => u.data[0].length < 60, size: 5, fill: color },
            value: (u, v) => (v === null ? "–" : yFormat(v)),
          },
        ],
        axes: [
          timeAxis ? { ...axis(timeTicks), space: 90 } : axis((u, ticks) => ticks.map(xFormat)),
          { ...axis((u, ticks) => ticks.map(yFormat)), size: 60 },
        ],
      };
    }
    new ResizeObserver(() => {
      if (plot) plot.setSize({ width: Math.max(container.clientWidth, 200), height });
    }).observe(container);
    // Colours come from the theme: draw again when it changes.
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
      if (plot === null) return;
      const data = plot.data;
      plot.destroy();
      plot = new uPlot(options(), data, container);
    });
    return {
      setData(xs, ys) {
        if (xs.length < 2) return; // one point has no range to draw an axis over
        if (plot === null) {
          container.replaceChildren();
          plot = new uPlot(options(), [xs, ys], container);
        } else {
          plot.setData([xs, ys]);
        }
        container.dataset.points = String(xs.length);
      },
    };
  }

  const lossChart = lineChart(document.getElementById("loss-chart"), {
    label: "validation loss",
    colorVar: "--accent",
    timeAxis: false,
    xLabel: "tokens",
    xFormat: (v) => compact(v),
    yFormat: (v) => v.toFixed(2),
  });
  const throughputChart = lineChart(document.getElementById("throughput-chart"), {
    label: "tokens/s",
    colorVar: "--good",
    timeAxis: true,
    xLabel: "time",
    xFormat: (v) => new Date(v * 1000).toLocaleTimeString([], { hour12: false }),
    yFormat: (v) => compact(v),
  });

  const samples = [];

  function showRun(run) {
    setText("description", run.description || "");
    setText("stat-loss", loss(run.val_loss));
    setText(
      "stat-bpb",
      run.val_bits_per_byte === null ? "no evaluation yet" : `${run.val_bits_per_byte.toFixed(3)} bits/byte`,
    );
    setText("stat-tokens", compact(run.num_tokens)).dataset.value = String(run.num_tokens);
    setText("stat-sequences", `${integer.format(run.num_sequences)} sequence${run.num_sequences === 1 ? "" : "s"}`);
    setText("stat-throughput", compact(run.tokens_per_s));
    setText("stat-step", integer.format(run.step));
    setText("stat-epoch", `epoch ${run.epoch}`);
    setText("stat-peers", integer.format(run.num_peers));
    const { done, total, leased } = run.shards;
    setText("stat-shards", total ? percent(done / total) : "–");
    setText("stat-shards-sub", `${integer.format(done)} of ${integer.format(total)}, ${leased} leased`);
  }

  function showEvals(evals) {
    const points = evals
      .filter((e) => e.val_loss !== null && Number.isFinite(e.val_loss))
      .sort((a, b) => a.swarm_tokens - b.swarm_tokens || a.step - b.step);
    lossChart.setData(points.map((e) => e.swarm_tokens), points.map((e) => e.val_loss));
  }

  function showSamples(fresh) {
    samples.push(...fresh);
    if (samples.length > MAX_SAMPLES) samples.splice(0, samples.length - MAX_SAMPLES);
    throughputChart.setData(samples.map((s) => s.time), samples.map((s) => s.tokens_per_s));
  }

  function share(fraction) {
    const meter = el("span", { className: "meter" }, el("i", { style: { width: percent(Math.min(fraction, 1)) } }));
    return el("span", { className: "share" }, percent(fraction), meter);
  }

  function showPeers(peers) {
    const order = { active: 0, gone: 1, left: 2, banned: 3 };
    peers.sort((a, b) => order[a.state] - order[b.state] || b.tokens_per_s - a.tokens_per_s);
    setText("stat-peers-all", `${peers.length} ever joined`);
    document.getElementById("peers-empty").hidden = peers.length > 0;
    document.querySelector("#peers").hidden = peers.length === 0;
    ct.fillTable(document.querySelector("#peers tbody"), peers, (p) => [
      td(p.name, "name", p.name),
      td(p.device || "–"),
      td(el("span", { className: `badge ${p.state}` }, p.state)),
      td(p.state === "active" ? compact(p.tokens_per_s) : "–", "num"),
      td(compact(p.num_tokens), "num"),
      td(loss(p.loss), "num"),
      td(ago(p.last_seen), "num"),
      uplink(p.traffic),
      utilisation(p.loop_time),
      td(share(p.verified_share), "num"),
    ]);
  }

  // What the peer's uplink carried (as it reported), with each purpose on hover.
  function uplink(traffic) {
    const purposes = Object.entries(traffic || {});
    const sent = purposes.reduce((sum, [, counts]) => sum + counts.sent, 0);
    const detail = purposes.map(([purpose, counts]) => `${purpose} ${ct.bytes(counts.sent)}`);
    return td(ct.bytes(sent), "num uplink", detail.join(", "));
  }

  // The share of its training loop's time the peer spent computing (as it reported),
  // with where the rest went on hover.
  function utilisation(time) {
    if (!time || time.utilisation === null) return td("–", "num utilisation");
    const hours = (s) => `${(s / 3600).toFixed(2)} h`;
    const detail = `training ${hours(time.training_s)}: computing ${hours(time.computing_s)}, `
      + `swarm wait ${hours(time.swarm_wait_s)}, data wait ${hours(time.data_wait_s)}`;
    return td(`${(100 * time.utilisation).toFixed(1)}%`, "num utilisation", detail);
  }

  function showLeaderboard(rows) {
    const credited = rows.filter((r) => r.verified_flops > 0 || r.num_shards > 0);
    document.getElementById("leaderboard-empty").hidden = credited.length > 0;
    document.querySelector("#leaderboard").hidden = credited.length === 0;
    ct.fillTable(document.querySelector("#leaderboard tbody"), credited, (r) => [
      td(integer.format(r.rank), "num"),
      td(r.name, "name", r.name),
      td(compact(r.verified_flops, "FLOP"), "num"),
      td(compact(r.verified_tokens), "num"),
      td(percent(r.verified_share), "num"),
      td(
        r.banned
          ? el("span", { className: "badge banned" }, "banned")
          : r.flagged
            ? el("span", { className: "badge flagged", title: r.flagged }, "flagged")
            : "",
      ),
    ]);
  }

  function showCoverage(coverage, names) {
    const grid = document.getElementById("coverage");
    const shards = coverage.shards;
    if (grid.children.length !== shards.length) {
      grid.replaceChildren(...shards.map(() => el("i", { className: "cell" })));
      // Thousands of shards still fit on a screen in smaller cells.
      grid.classList.toggle("dense", shards.length > 600);
    }
    const counts = { pending: 0, leased: 0, done: 0 };
    shards.forEach((shard, i) => {
      counts[shard.state] = (counts[shard.state] || 0) + 1;
      const cell = grid.children[i];
      const className = `cell ${shard.state}`;
      if (cell.className !== className) cell.className = className;
      const holder = shard.holder ? ` · held by ${names.get(shard.holder) || shard.holder}` : "";
      cell.title = `${shard.shard}: ${shard.state}${holder}`;
    });
    setText("coverage-epoch", `epoch ${coverage.epoch}`);
    setText(
      "coverage-counts",
      `${counts.done} done · ${counts.leased} leased · ${counts.pending} pending of ${shards.length}`,
    );
  }

  function showCheckpoint(checkpoints) {
    const kept = checkpoints.filter((c) => c.available);
    const latest = kept.length ? kept[kept.length - 1] : null;
    document.getElementById("checkpoint-empty").hidden = latest !== null;
    document.getElementById("checkpoint-facts").hidden = latest === null;
    const link = document.getElementById("checkpoint-download");
    link.hidden = latest === null;
    if (latest === null) return;
    setText("checkpoint-step", integer.format(latest.step));
    setText("checkpoint-tokens", latest.num_tokens ? compact(latest.num_tokens) : "–");
    setText("checkpoint-time", `${new Date(latest.created_at * 1000).toLocaleString([], { hour12: false })} (${ago(latest.created_at)})`);
    setText("checkpoint-size", ct.bytes(latest.num_bytes));
    setText("checkpoint-sha", latest.file_sha256 || "–");
    link.href = ct.runPath(runId, `/checkpoints/${latest.step}/file`);
    link.download = `${runId}-step${latest.step}.safetensors`;
  }

  // The evaluations are fetched again only when the run's latest one changed:
  // a long run holds many, and they only ever grow.
  let evalsSeen = null;

  async function update() {
    const since = samples.length ? samples[samples.length - 1].time : 0;
    const [run, peers, fresh, leaderboard, coverage, checkpoints] = await Promise.all([
      ct.getJSON(ct.runPath(runId)),
      ct.getJSON(ct.runPath(runId, "/peers")),
      ct.getJSON(ct.runPath(runId, `/metrics?since=${since}`)),
      ct.getJSON(ct.runPath(runId, "/leaderboard")),
      ct.getJSON(ct.runPath(runId, "/coverage")),
      ct.getJSON(ct.runPath(runId, "/checkpoints")),
    ]);
    showRun(run);
    const latestEval = `${run.val_step}:${run.val_loss}`;
    if (latestEval !== evalsSeen) {
      showEvals(await ct.getJSON(ct.runPath(runId, "/evals")));
      evalsSeen = latestEval;
    }
    showSamples(fresh);
    showPeers(peers);
    showLeaderboard(leaderboard);
    showCoverage(coverage, new Map(peers.map((p) => [p.peer_id, p.name])));
    showCheckpoint(checkpoints);
  }

  ct.poll(update);
})();
