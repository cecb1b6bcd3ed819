// Helpers the dashboard's pages share: DOM building (text only, never HTML),
// fetching the JSON API, number formats and the polling loop.
"use strict";

const ct = (() => {
  const POLL_MS = 2000;

  // An element with properties and children; strings become text nodes, so data
  // from the network is never parsed as HTML.
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "style") Object.assign(node.style, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node && node.textContent !== text) node.textContent = text;
    return node;
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function runPath(runId, rest = "") {
    return `/api/runs/${encodeURIComponent(runId)}${rest}`;
  }

  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  // 1234 -> "1.23k", 5.6e9 -> "5.60G"
  function compact(value, unit = "") {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    const abs = Math.abs(value);
    const prefixes = [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [scale, prefix] of prefixes) {
      if (abs >= scale) return `${(value / scale).toPrecision(3)}${prefix}${unit}`;
    }
    return `${abs >= 100 ? integer.format(value) : Number(value.toPrecision(3))}${unit}`;
  }

  function bytes(value) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return `${i === 0 ? value : value.toFixed(1)} ${units[i]}`;
  }

  function loss(value) {
    return value === null || value === undefined ? "–" : value.toFixed(3);
  }

  function percent(fraction) {
    return `${(100 * fraction).toFixed(fraction > 0 && fraction < 0.01 ? 2 : 1)}%`;
  }

  function ago(unixSeconds) {
    if (!unixSeconds) return "never";
    const s = Math.max(0, Date.now() / 1000 - unixSeconds);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} days ago`;
  }

  // Rows of a table body, rebuilt from data; `cells` returns each row's <td>s.
  function fillTable(tbody, rows, cells) {
    tbody.replaceChildren(...rows.map((row) => el("tr", {}, ...cells(row))));
  }

  // A table cell; `title` shows in full what a narrow cell cuts short.
  function td(content, className = "", title = "") {
    return el("td", { className, title }, content);
  }

  // Call `update` now and every POLL_MS after it finishes; the header shows whether
  // the last update reached the coordinator.
  function poll(update) {
    const live = document.getElementById("live");
    async function tick() {
      try {
        await update();
        live.className = "live ok";
        live.textContent = `live · updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
      } catch (error) {
        live.className = "live down";
        live.textContent = "cannot reach the coordinator; retrying";
        console.warn(error);
      }
      setTimeout(tick, POLL_MS);
    }
    tick();
  }

  return { el, setText, getJSON, runPath, compact, bytes, loss, percent, ago, fillTable, td, poll, integer };
})();
