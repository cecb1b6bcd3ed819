// The runs page: every published run with its live numbers.
"use strict";

(() => {
  const { el, td, compact, loss, integer } = ct;
  const tbody = document.querySelector("#runs tbody");

  async function update() {
    const runs = await ct.getJSON("/api/runs");
    document.getElementById("empty").hidden = runs.length > 0;
    ct.fillTable(tbody, runs, (run) => [
      td(el("a", { href: `/runs/${encodeURIComponent(run.id)}`, className: "run-link" }, run.id), "name"),
      td(run.description || "–", "muted"),
      td(integer.format(run.num_peers), "num"),
      td(compact(run.tokens_per_s), "num"),
      td(integer.format(run.step), "num"),
      td(compact(run.num_tokens), "num"),
      td(loss(run.val_loss), "num"),
    ]);
  }

  ct.poll(update);
})();
