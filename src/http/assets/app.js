"use strict";
// The dashboard: reads /api/status and /api/history and redraws in place.
(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  let selected = null;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const child of children || []) node.append(child);
    return node;
  }
  const short = (commit) => (commit || "").slice(0, 7);
  const badge = (word) => el("span", { class: "badge " + word, text: word });
  const seconds = (ms) => (ms == null ? "" : (ms / 1000).toFixed(1) + " s");

  async function get(path) {
    const response = await fetch(path, { headers, cache: "no-store" });
    if (!response.ok) throw new Error(path + ": " + response.status + " " + (await response.text()));
    return response.json();
  }

  function drawStatus(status) {
    document.getElementById("host").textContent = status.host ? "· " + status.host : "";
    const agent = document.getElementById("agent");
    agent.textContent = status.agent.running ? "agent " + status.agent.activity : "agent not running";
    const s = status.source;
    const facts = [
      ["source", s.url + " (" + s.branch + ")"],
      ["desired", short(s.desired_commit) || "-"],
      ["deployed", short(s.deployed_commit) || "-"],
    ];
    if (s.failed_commit) facts.push(["failed", short(s.failed_commit)]);
    if (s.last_fetch_error) facts.push(["fetch", s.last_fetch_error]);
    if (status.awaiting_approval) facts.push(["awaiting approval", short(status.awaiting_approval.commit) + " — moorline approve " + short(status.awaiting_approval.commit)]);
    document.getElementById("source").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));

    const rows = status.scopes.map((scope) => {
      const route = status.edge && status.edge.routes ? status.edge.routes[scope.name] : null;
      const members = scope.members.map((m) => el("span", { class: "member mono" + (m.idle ? " idle" : m.state.startsWith("active") || m.state.startsWith("running") ? "" : " down"), text: m.name + " " + m.state }));
      const health = [badge(scope.health)];
      if (scope.held) health.push(" ", el("span", { class: "badge held", text: "held", title: scope.held }));
      const healthCell = el("td", {}, health);
      if (scope.detail) healthCell.append(el("div", { class: "muted", text: scope.detail }));
      return el("tr", { "data-scope": scope.name }, [
        el("td", { text: scope.name }),
        el("td", { text: scope.owner }),
        el("td", { class: "mono", text: short(scope.release) }),
        healthCell,
        el("td", {}, members),
        el("td", { text: route && route.active != null ? String(route.active) : "" }),
      ]);
    });
    document.querySelector("#scopes tbody").replaceChildren(...rows);
  }

  function phaseBar(rollout) {
    const total = rollout.phases.reduce((sum, p) => sum + p.duration_ms, 0) || 1;
    return el("div", { class: "bar", title: rollout.phases.map((p) => p.phase + " " + seconds(p.duration_ms)).join(", ") },
      rollout.phases.map((p) => el("span", { class: "phase-" + p.phase, style: "width:" + (100 * p.duration_ms / total) + "%" })));
  }

  function drawHistory(history) {
    const rows = history.map((r) => {
      const row = el("tr", { "data-rollout": String(r.id) }, [
        el("td", { text: String(r.id) }),
        el("td", { class: "mono", text: short(r.commit) }, r.subject ? [el("div", { class: "muted", text: r.subject })] : []),
        el("td", { text: r.trigger + (r.user ? " · " + r.user : "") }),
        el("td", { text: r.started }),
        el("td", {}, [phaseBar(r)]),
        el("td", {}, [badge(r.outcome)]),
      ]);
      if (r.id === selected) row.classList.add("selected");
      row.addEventListener("click", () => { selected = r.id; showRollout(r.id); });
      return row;
    });
    document.querySelector("#rollouts tbody").replaceChildren(...rows);
  }

  async function showRollout(id) {
    const r = await get("/api/rollouts/" + id);
    document.querySelectorAll("#rollouts tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.rollout === String(id)));
    const body = [];
    body.push(el("p", {}, [badge(r.outcome), " ", el("span", { class: "mono", text: r.commit }), " ", el("span", { class: "muted", text: r.trigger + " · " + r.started + (r.duration_ms != null ? " · " + seconds(r.duration_ms) : "") })]));
    if (r.error) body.push(el("p", { class: "error", text: r.error }));
    body.push(el("table", {}, [
      el("thead", {}, [el("tr", {}, ["scope", "action", "reason", "release", "result"].map((h) => el("th", { text: h })))]),
      el("tbody", {}, r.scopes.map((s) => el("tr", {}, [
        el("td", { text: s.scope }), el("td", { text: s.action }), el("td", { text: s.reason }),
        el("td", { class: "mono", text: short(s.release) }), el("td", { text: s.result || "" }),
      ]))),
    ]));
    body.push(el("h2", { text: "Phases" }), el("p", {}, [phaseBar(r), el("span", { class: "muted", text: r.phases.map((p) => p.phase + " " + seconds(p.duration_ms)).join(" · ") })]));
    if (r.journal.length) body.push(el("h2", { text: "Journal" }), el("pre", { text: r.journal.map((j) => j.at + "  " + j.step + "  " + j.state).join("\n") }));
    if (r.analysis && r.analysis.length) body.push(el("h2", { text: "Canary intervals" }), el("pre", { text: r.analysis.map((a) => JSON.stringify(a)).join("\n") }));
    if (r.build_tail.length) body.push(el("h2", { text: "Build output (tail)" }), el("pre", { text: r.build_tail.join("\n") }));
    document.getElementById("detail-title").textContent = "Rollout " + r.id;
    document.getElementById("detail-body").replaceChildren(...body);
    document.getElementById("detail").hidden = false;
  }

  async function refresh() {
    try {
      const [status, history] = await Promise.all([get("/api/status"), get("/api/history?limit=30")]);
      drawStatus(status);
      drawHistory(history);
      if (selected == null && history.length) { selected = history[0].id; await showRollout(selected); }
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("agent").textContent = "cannot reach the agent";
      document.getElementById("updated").textContent = String(e.message || e);
    }
  }
  refresh();
  setInterval(refresh, 5000);
})();
