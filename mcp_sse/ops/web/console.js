// The admin console: reads and changes everything through the gateway's /api/ routes.
// Served from this origin only (script-src 'self'): no framework, no build step, no inline code.
// Every value from the API is put in the page as text (textContent), never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const oauth = document.querySelector('meta[name="mcp-oauth"]').content === "on";
  const panels = ["backends", "sessions", "keys", "audit", ...(oauth ? ["oauth"] : [])];
  const loaders = {};
  let auditCursor = null;

  // -- talking to /api/ --------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "The gateway could not be reached. Check the connection and try again.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      if (response.status === 401) {
        throw new ApiError(401, "Your sign-in has ended. Reload the page to sign in again.");
      }
      const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  // -- small DOM helpers -------------------------------------------------------------------------

  function el(tag, options = {}, ...children) {
    const node = document.createElement(tag);
    if (options.className) node.className = options.className;
    if (options.text !== undefined && options.text !== null) node.textContent = String(options.text);
    if (options.title) node.title = options.title;
    if (options.type) node.type = options.type;
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function badge(text, tone) {
    return el("span", { className: `badge ${tone || ""}`.trim(), text });
  }

  function button(label, className, onClick) {
    const node = el("button", { className: `button small ${className}`, text: label, type: "button" });
    node.addEventListener("click", async () => {
      node.disabled = true;
      try {
        await onClick();
      } finally {
        node.disabled = false;
      }
    });
    return node;
  }

  // A row of cells; each cell is [label, content, className]. The label shows on narrow screens.
  function row(cells) {
    const tr = el("tr");
    for (const [label, content, className] of cells) {
      const td = el("td", { className: className || "" });
      td.dataset.label = label;
      if (content instanceof Node) td.append(content);
      else td.textContent = content === null || content === undefined || content === "" ? "—" : String(content);
      tr.append(td);
    }
    return tr;
  }

  function fill(table, emptyId, rows) {
    const tbody = $(table).tBodies[0];
    tbody.replaceChildren(...rows);
    $(table).parentElement.classList.toggle("is-empty", rows.length === 0);
    $(emptyId).hidden = rows.length !== 0;
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toISOString().replace("T", " ").slice(0, 19);
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function mono(text, title) {
    return el("code", { text, title: title || text });
  }

  // -- banner and confirmation ---------------------------------------------------------------------

  function banner(message, tone) {
    $("banner-text").textContent = message;
    $("banner").className = `banner ${tone || ""}`.trim();
    $("banner").hidden = false;
  }

  function failed(err) {
    banner(err instanceof ApiError || err instanceof Error ? err.message : String(err));
  }

  function confirmAction(title, text, action) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = action;
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-ok").removeEventListener("click", ok);
        $("confirm-cancel").removeEventListener("click", cancel);
        dialog.removeEventListener("cancel", cancel);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const ok = () => done(true);
      const cancel = () => done(false);
      $("confirm-ok").addEventListener("click", ok);
      $("confirm-cancel").addEventListener("click", cancel);
      dialog.addEventListener("cancel", cancel);
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  // -- backends ------------------------------------------------------------------------------------

  const STATE_TONE = { running: "ok", starting: "warn", restarting: "warn", failed: "bad", stopped: "" };
  const CIRCUIT_TONE = { closed: "ok", half_open: "warn", "half-open": "warn", open: "bad" };

  loaders.backends = async () => {
    const data = await api("GET", "/api/backends");
    fill(
      "backends-table",
      "backends-empty",
      data.backends.map((b) => {
        const circuit = b.circuit ? badge(b.circuit.state.replace("_", "-"), CIRCUIT_TONE[b.circuit.state]) : null;
        const restartable = b.state === "failed" || (b.circuit && b.circuit.state === "open");
        const actions = el("span");
        if (restartable) {
          actions.append(
            button("Restart", "secondary", async () => {
              try {
                await api("POST", `/api/backends/${encodeURIComponent(b.name)}/restart`);
                banner(`Backend ${b.name} restarted.`, "info");
              } catch (err) {
                failed(err);
              }
              await load("backends");
            }),
          );
        }
        return row([
          ["Name", el("span", { className: "strong", text: b.name })],
          ["State", badge(b.state, STATE_TONE[b.state])],
          ["Circuit", circuit],
          ["Restarts", b.restarts ?? "—"],
          ["Tools", b.tools ?? "—"],
          ["Sessions", b.sessions ?? "—"],
          ["Last error", b.last_error ? el("span", { className: "error-text", text: b.last_error }) : "—"],
          ["", actions, "actions-cell"],
        ]);
      }),
    );
  };

  // -- sessions ------------------------------------------------------------------------------------

  loaders.sessions = async () => {
    const data = await api("GET", "/api/sessions");
    fill(
      "sessions-table",
      "sessions-empty",
      data.sessions.map((s) =>
        row([
          ["Session", mono(`${s.id.slice(0, 8)}…`, "Session id (shortened)")],
          ["Identity", mono(s.identity || "—")],
          ["Client", s.client],
          ["Transport", `${s.transport}${s.protocol ? ` · ${s.protocol}` : ""}`],
          ["Backend", s.backend],
          ["Opened", when(s.opened)],
          ["Last seen", ago(s.last_seen)],
          ["Streams", s.streams_open],
          [
            "",
            button("End", "link-danger", async () => {
              const sure = await confirmAction(
                "End this session?",
                `Session ${s.id.slice(0, 8)}… of ${s.identity || "an unknown caller"} is closed with its streams. ` +
                  "The client has to initialize again.",
                "End session",
              );
              if (!sure) return;
              try {
                await api("DELETE", `/api/sessions/${encodeURIComponent(s.id)}`);
                banner("The session was ended.", "info");
              } catch (err) {
                failed(err);
              }
              await load("sessions");
            }),
            "actions-cell",
          ],
        ]),
      ),
    );
  };

  // -- keys ------------------------------------------------------------------------------------------

  function showSecret(title, secret) {
    $("secret-title").textContent = title;
    $("secret-value").textContent = secret;
    $("secret-copied").hidden = true;
    $("secret").hidden = false;
    $("secret").scrollIntoView({ block: "nearest" });
  }

  function hideSecret() {
    $("secret-value").textContent = "";
    $("secret").hidden = true;
  }

  async function copySecret() {
    const text = $("secret-value").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents($("secret-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      document.execCommand("copy");
    }
    $("secret-copied").hidden = false;
  }

  function scopeOf(k) {
    const parts = [];
    parts.push(k.backends === null ? "all backends" : k.backends.join(", ") || "no backends");
    const allow = k.tools.allow.join(", ");
    if (allow !== "*") parts.push(`tools ${allow}`);
    if (k.tools.deny.length) parts.push(`not ${k.tools.deny.join(", ")}`);
    return parts.join(" · ");
  }

  loaders.keys = async () => {
    const data = await api("GET", "/api/keys");
    $("key-form").hidden = !data.keys_file;
    fill(
      "keys-table",
      "keys-empty",
      data.keys.map((k) => {
        const actions = el("span");
        if (k.source === "KEYS_FILE") {
          actions.append(
            button("Rotate", "secondary", async () => {
              const sure = await confirmAction(
                `Rotate ${k.name}?`,
                "A new secret replaces the old one now. Sessions and logins of the old secret end at once.",
                "Rotate key",
              );
              if (!sure) return;
              try {
                const answer = await api("POST", `/api/keys/${encodeURIComponent(k.id)}/rotate`);
                showSecret(`New secret for ${k.name}`, answer.secret);
              } catch (err) {
                failed(err);
              }
              await load("keys");
            }),
            button("Revoke", "link-danger", async () => {
              const sure = await confirmAction(
                `Revoke ${k.name}?`,
                `Key ${k.id} stops working now, and its sessions, logins and OAuth grants end with it. ` +
                  "This cannot be undone.",
                "Revoke key",
              );
              if (!sure) return;
              try {
                await api("DELETE", `/api/keys/${encodeURIComponent(k.id)}`);
                banner(`Key ${k.name} was revoked.`, "info");
              } catch (err) {
                failed(err);
              }
              await load("keys");
            }),
          );
        }
        const expires = k.expired ? badge("expired", "bad") : k.expires ? when(k.expires) : "never";
        return row([
          ["Name", el("span", { className: "strong", text: k.name })],
          ["Id", mono(k.id)],
          ["Role", badge(k.role, k.role === "admin" ? "accent" : "")],
          ["Scope", el("span", { className: "faint", text: scopeOf(k) })],
          ["Expires", expires],
          ["Last used", ago(k.last_used)],
          ["Uses (7 d)", k.uses_7d],
          ["", actions, "actions-cell"],
        ]);
      }),
    );
  };

  async function createKey(event) {
    event.preventDefault();
    const body = { name: $("key-name").value.trim(), role: $("key-role").value };
    const days = $("key-expires").value.trim();
    if (days) body.expires = Number(days);
    $("key-create").disabled = true;
    try {
      const answer = await api("POST", "/api/keys", body);
      showSecret(`Secret of ${answer.key.name}`, answer.secret);
      $("key-form").reset();
      $("banner").hidden = true;
    } catch (err) {
      failed(err);
    } finally {
      $("key-create").disabled = false;
    }
    await load("keys");
  }

  // -- audit -----------------------------------------------------------------------------------------

  const SHOWN = new Set(["ts", "event", "identity", "ip", "outcome", "request_id", "msg"]);

  function auditQuery() {
    const params = new URLSearchParams({ limit: "50" });
    for (const name of ["event", "identity", "outcome", "ip"]) {
      const value = $(`audit-${name}`).value.trim();
      if (value) params.set(name, value);
    }
    for (const name of ["from", "to"]) {
      const value = $(`audit-${name}`).value;
      if (value) params.set(name, value); // a datetime-local value: read as UTC by the API
    }
    return params;
  }

  function auditRow(line) {
    const details = Object.entries(line)
      .filter(([name]) => !SHOWN.has(name))
      .map(([name, value]) => `${name}=${typeof value === "object" ? JSON.stringify(value) : value}`)
      .join("  ");
    const outcome = line.outcome ? badge(line.outcome, line.outcome === "ok" ? "ok" : "warn") : "—";
    return row([
      ["Time", when(line.ts), "nowrap"],
      ["Event", mono(line.event || "—")],
      ["Identity", line.identity ? mono(line.identity) : "—"],
      ["Address", line.ip],
      ["Outcome", outcome],
      ["Details", el("span", { className: "details", text: details || "—" })],
    ]);
  }

  async function searchAudit(more) {
    const params = auditQuery();
    if (more && auditCursor) params.set("cursor", auditCursor);
    const data = await api("GET", `/api/audit?${params}`);
    const rows = data.events.map(auditRow);
    if (more) {
      $("audit-table").tBodies[0].append(...rows);
    } else {
      fill("audit-table", "audit-empty", rows);
    }
    auditCursor = data.next_cursor;
    $("audit-more").hidden = !auditCursor;
  }

  loaders.audit = () => searchAudit(false);

  // -- OAuth -----------------------------------------------------------------------------------------

  loaders.oauth = async () => {
    const [clients, grants] = await Promise.all([api("GET", "/api/oauth/clients"), api("GET", "/api/oauth/grants")]);
    const names = new Map(clients.clients.map((c) => [c.client_id, c.client_name]));
    fill(
      "grants-table",
      "grants-empty",
      grants.grants.map((g) =>
        row([
          ["Client", names.get(g.client_id) || mono(g.client_id)],
          ["Approved by", mono(g.key_id)],
          ["Scope", badge(g.scope, "accent")],
          ["Resource", el("span", { className: "faint", text: g.resource })],
          ["Approved", when(g.created)],
          ["Expires", when(g.expires)],
          [
            "",
            button("Revoke", "link-danger", async () => {
              const sure = await confirmAction(
                "Revoke this grant?",
                `${names.get(g.client_id) || g.client_id} loses its refresh tokens now, and its access tokens ` +
                  "at their next use.",
                "Revoke grant",
              );
              if (!sure) return;
              try {
                await api("DELETE", `/api/oauth/grants/${encodeURIComponent(g.id)}`);
                banner("The grant was revoked.", "info");
              } catch (err) {
                failed(err);
              }
              await load("oauth");
            }),
            "actions-cell",
          ],
        ]),
      ),
    );
    fill(
      "clients-table",
      "clients-empty",
      clients.clients.map((c) =>
        row([
          ["Name", el("span", { className: "strong", text: c.client_name || "(no name)" })],
          ["Client id", mono(c.client_id.length > 24 ? `${c.client_id.slice(0, 24)}…` : c.client_id, c.client_id)],
          ["Type", badge(c.confidential ? "confidential" : "public")],
          ["Redirect URIs", el("span", { className: "faint", text: c.redirect_uris.join(" ") })],
          ["Registered", when(c.created)],
          ["Last used", ago(c.last_used)],
        ]),
      ),
    );
  };

  // -- tabs ------------------------------------------------------------------------------------------

  async function load(name) {
    try {
      await loaders[name]();
    } catch (err) {
      failed(err);
    }
  }

  function show() {
    const wanted = location.hash.slice(1);
    const name = panels.includes(wanted) ? wanted : "backends";
    for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== name;
    for (const tab of document.querySelectorAll("[data-tab]")) {
      if (tab.dataset.tab === name) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    if (name !== "keys") hideSecret(); // shown once: leaving the tab forgets it
    $("banner").hidden = true;
    return load(name);
  }

  function start() {
    if (oauth) document.querySelector('[data-tab="oauth"]').hidden = false;
    for (const refresh of document.querySelectorAll("[data-refresh]")) {
      refresh.addEventListener("click", () => load(refresh.dataset.refresh));
    }
    $("banner-close").addEventListener("click", () => {
      $("banner").hidden = true;
    });
    $("key-form").addEventListener("submit", createKey);
    $("secret-copy").addEventListener("click", copySecret);
    $("secret-done").addEventListener("click", hideSecret);
    $("audit-form").addEventListener("submit", (event) => {
      event.preventDefault();
      searchAudit(false).catch(failed);
    });
    $("audit-form").addEventListener("reset", () => {
      setTimeout(() => searchAudit(false).catch(failed), 0);
    });
    $("audit-more").addEventListener("click", () => searchAudit(true).catch(failed));
    window.addEventListener("hashchange", show);
    show();
  }

  start();
})();
