// The microseg flow viewer: the agent's live feed (GET /api/v1/flows, a WebSocket) as a table,
// rates, tops and a map. The browser is signed in by a session cookie (see /login); no token
// is ever handled here. Responsive at 1,000 events/s: messages only update counters and a
// bounded buffer; the page is redrawn at most four times a second, the table capped. A flow
// whose staged verdict differs (docs/contract.md §6) shows a "would deny by rule N" badge in
// the staged column, added once such an event is kept (or the staged filter is set).
// An agent given the fleet's flows topic (docs/contract.md §7) also serves the fleet feed
// (?source=fleet): the "fleet" toggle, shown only then, switches to every agent's events, with
// a host column and each reporting host as a node of the map.
"use strict";
(() => {
  const TABLE_CAP = 200;      // rows drawn
  const KEEP = 5000;          // events kept for re-filtering
  const RATE_WINDOW = 5;      // seconds the rates average over
  const MAX_KEYS = 2000;      // per aggregate (rules, talkers, edges): the smallest go first
  const TOP_N = 8;
  const MAP_EDGES = 16;
  const REDRAW_MS = 250;
  const RECENT_ON_CONNECT = 500;

  const $ = (id) => document.getElementById(id);
  const state = {
    events: [],               // flow events and lost records, oldest first
    total: 0,
    lost: 0,
    lostStages: new Map(),
    hasStaged: false,         // an event with a staged verdict was seen
    stagedColumn: false,      // the table has its staged column
    alerts: new Map(),  // "alert subject" -> the firing alert record
    lastSeq: new Map(),       // host -> last seq: each agent numbers its own stream
    arrived: 0,               // events taken since the page opened (pause holds the later ones)
    paused: false,
    pausedAt: 0,
    source: "local",          // or "fleet": every agent's events (the fleet feed)
    hostColumn: false,
    conn: 0,                  // the current connection's number: older ones' ends are ignored
    filter: {},
    rates: new Map(),         // second -> {deny, log}
    rules: new Map(),         // key -> {label, n}
    talkers: new Map(),       // src_ip -> {label, n}
    edges: new Map(),         // "src dst" -> {src, dst, n, deny, log}
    dirty: true,
    ws: null,
    retry: 0,
  };

  // ---- addresses ---------------------------------------------------------------------------

  function parseV4(s) {
    const parts = s.split(".");
    if (parts.length !== 4) return null;
    let n = 0n;
    for (const p of parts) {
      if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
      n = (n << 8n) | BigInt(Number(p));
    }
    return n;
  }

  function v6groups(list) {
    const out = [];
    for (let i = 0; i < list.length; i++) {
      const g = list[i];
      if (g.includes(".")) {
        const v4 = i === list.length - 1 ? parseV4(g) : null;
        if (v4 === null) return null;
        out.push(Number(v4 >> 16n), Number(v4 & 0xffffn));
      } else {
        if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
        out.push(parseInt(g, 16));
      }
    }
    return out;
  }

  function parseV6(s) {
    const at = s.indexOf("::");
    if (at !== -1 && at !== s.lastIndexOf("::")) return null;
    let groups;
    if (at === -1) {
      groups = v6groups(s.split(":"));
      if (!groups || groups.length !== 8) return null;
    } else {
      const head = s.slice(0, at), tail = s.slice(at + 2);
      const h = v6groups(head ? head.split(":") : []);
      const t = v6groups(tail ? tail.split(":") : []);
      if (!h || !t || h.length + t.length > 7) return null;
      groups = [...h, ...new Array(8 - h.length - t.length).fill(0), ...t];
    }
    let n = 0n;
    for (const g of groups) n = (n << 16n) | BigInt(g);
    return n;
  }

  function parseAddr(s) {
    if (typeof s !== "string") return null;
    if (s.includes(":")) {
      const n = parseV6(s);
      return n === null ? null : { v: 6, n };
    }
    const n = parseV4(s);
    return n === null ? null : { v: 4, n };
  }

  function parseNet(text) {
    const [addr, len, extra] = text.split("/");
    if (extra !== undefined) return null;
    const a = parseAddr(addr);
    if (!a) return null;
    const bits = a.v === 4 ? 32 : 128;
    const prefix = len === undefined ? bits : Number(len);
    if (len !== undefined && (!/^\d{1,3}$/.test(len) || prefix > bits)) return null;
    const mask = prefix === 0 ? 0n : ((1n << BigInt(prefix)) - 1n) << BigInt(bits - prefix);
    return { v: a.v, net: a.n & mask, mask };
  }

  function addrOf(ev, key) {
    const cache = "_" + key;
    if (!(cache in ev)) ev[cache] = parseAddr(ev[key]);
    return ev[cache];
  }

  // ---- filters -----------------------------------------------------------------------------

  function readFilters() {
    const f = {};
    const problems = [];
    const verdict = $("f-verdict").value;
    if (verdict) f.verdict = verdict;
    const protocol = $("f-protocol").value;
    if (protocol) f.protocol = protocol;

    const ipText = $("f-ip").value.trim();
    $("f-ip").classList.remove("bad");
    if (ipText) {
      const nets = ipText.split(",").map((x) => x.trim()).filter(Boolean).map(parseNet);
      if (nets.length && nets.every(Boolean)) f.nets = nets;
      else { problems.push("address: use an IPv4/IPv6 address or CIDR"); $("f-ip").classList.add("bad"); }
    }
    const portText = $("f-port").value.trim();
    $("f-port").classList.remove("bad");
    if (portText) {
      const ports = portText.split(",").map((x) => x.trim()).filter(Boolean);
      if (ports.length && ports.every((p) => /^\d{1,5}$/.test(p) && +p >= 1 && +p <= 65535)) {
        f.ports = new Set(ports.map(Number));
      } else { problems.push("port: use 1..65535"); $("f-port").classList.add("bad"); }
    }
    const rule = $("f-rule").value.trim().toLowerCase();
    if (rule) f.rule = rule;
    const staged = $("f-staged").value;
    if (staged) f.staged = staged;
    $("f-error").textContent = problems.join("; ");
    return f;
  }

  function matches(ev, f) {
    if (ev.type === "lost" || ev.type === "alert") return true;  // they concern every view
    if (f.verdict && ev.verdict !== f.verdict) return false;
    if (f.protocol && ev.protocol !== f.protocol) return false;
    if (f.staged) {
      if (!ev.staged) return false;
      if (f.staged !== "any" && ev.staged.verdict !== f.staged) return false;
    }
    if (f.ports && !(f.ports.has(ev.src_port) || f.ports.has(ev.dst_port))) return false;
    if (f.rule) {
      const r = ev.rule;
      if (f.rule === "default") { if (r) return false; }
      else if (/^\d+$/.test(f.rule)) { if (!r || String(r.rule_id) !== f.rule) return false; }
      else if (!r || ![r.name, r.src_group, r.dst_group]
        .some((x) => String(x || "").toLowerCase().includes(f.rule))) return false;
    }
    if (f.nets) {
      const ends = [addrOf(ev, "src_ip"), addrOf(ev, "dst_ip")];
      const hit = f.nets.some((net) => ends.some((a) => a && a.v === net.v && (a.n & net.mask) === net.net));
      if (!hit) return false;
    }
    return true;
  }

  // ---- aggregates --------------------------------------------------------------------------

  function bump(map, key, make) {
    let e = map.get(key);
    if (!e) {
      if (map.size >= MAX_KEYS) prune(map);
      e = make();
      map.set(key, e);
    }
    e.n += 1;
    return e;
  }

  function prune(map) {
    const keep = [...map.entries()].sort((a, b) => b[1].n - a[1].n).slice(0, MAX_KEYS / 2);
    map.clear();
    for (const [k, v] of keep) map.set(k, v);
  }

  // A group rule's ends by group name, e.g. "(from web, to db)"; "" for an address rule.
  function groupEnds(r) {
    const ends = [];
    if (r && r.src_group) ends.push(`from ${r.src_group}`);
    if (r && r.dst_group) ends.push(`to ${r.dst_group}`);
    return ends.length ? `(${ends.join(", ")})` : "";
  }

  function ruleText(r) {
    return `${r.rule_id} ${r.name || ""} ${groupEnds(r)}`.replace(/\s+/g, " ").trim();
  }

  function ruleLabel(r) {
    return r ? ruleText(r) : "default action";
  }

  // A staged verdict as a badge's text and its title (the rule's name and details).
  function stagedText(st) {
    if (!st) return ["", ""];
    const r = st.rule;
    if (!r) return [`would ${st.verdict} by default`, `would ${st.verdict} by the staged default action`];
    const what = r.mode === "staged" ? "staged rule" : "rule";
    return [`would ${st.verdict} by rule ${r.rule_id}`,
      `would ${st.verdict} by ${what} ${ruleText(r)}: priority ${r.priority}, ${r.action}`];
  }

  function account(ev, live) {
    if (ev.type === "alert") {
      // Firing alerts by alert+subject; a resolved one leaves the list.
      const key = `${ev.alert} ${ev.subject}`;
      if (ev.state === "resolved") state.alerts.delete(key);
      else state.alerts.set(key, ev);
      return;
    }
    if (ev.type === "lost") {
      state.lost += ev.lost || 0;
      state.lostStages.set(ev.stage, (state.lostStages.get(ev.stage) || 0) + (ev.lost || 0));
      return;
    }
    state.total += 1;
    if (live) {
      const sec = Math.floor(Date.now() / 1000);
      let b = state.rates.get(sec);
      if (!b) { b = { deny: 0, log: 0 }; state.rates.set(sec, b); }
      if (ev.verdict === "deny" || ev.verdict === "log") b[ev.verdict] += 1;
    }
    const r = ev.rule;
    bump(state.rules, r ? String(r.rule_id) : "default", () => ({ label: ruleLabel(r), n: 0 }));
    if (ev.staged) {
      // What a staged rule would decide counts under its own entry, marked as staged.
      state.hasStaged = true;
      const s = ev.staged.rule;
      bump(state.rules, `staged ${s ? s.rule_id : "default"} ${ev.staged.verdict}`,
        () => ({ label: `${ruleLabel(s)} (staged: would ${ev.staged.verdict})`, n: 0 }));
    }
    bump(state.talkers, ev.src_ip, () => ({ label: ev.src_ip, n: 0 }));
    // In the fleet view the reporting agent's own end is its host: "host:NAME" nodes.
    const here = state.source === "fleet" && ev.host ? `host:${ev.host}` : null;
    const src = here && ev.direction === "egress" ? here : ev.src_ip;
    const dst = here && ev.direction !== "egress" ? here : ev.dst_ip;
    const edge = bump(state.edges, `${src} ${dst}`,
      () => ({ src, dst, n: 0, deny: 0, log: 0 }));
    if (ev.verdict === "deny") edge.deny += 1;
    else if (ev.verdict === "log") edge.log += 1;
  }

  function take(ev, live) {
    if (typeof ev.seq === "number") {
      // Within one agent's stream seq only grows: a step back means the agent restarted.
      const host = ev.host || "";
      let last = state.lastSeq.get(host) || 0;
      if (ev.seq <= last) last = 0;
      const expected = last + 1;
      const first = ev.type === "lost" && typeof ev.first_seq === "number" ? ev.first_seq : ev.seq;
      if (live && last > 0 && first > expected) {
        // Missed while this page was reconnecting: nobody else will report these.
        account({ type: "lost", lost: first - expected, stage: "viewer-reconnect" }, live);
      }
      state.lastSeq.set(host, Math.max(last, ev.seq));
    }
    ev._n = ++state.arrived;
    account(ev, live);
    state.events.push(ev);
    if (state.events.length > KEEP + 1000) state.events.splice(0, state.events.length - KEEP);
    state.dirty = true;
  }

  // ---- the feed ----------------------------------------------------------------------------

  function setConn(s, text) {
    const el = $("conn");
    el.dataset.state = s;
    el.textContent = text;
  }

  async function signedIn() {
    try {
      const r = await fetch("/api/v1/status", { credentials: "same-origin", cache: "no-store" });
      return r.status !== 401;
    } catch (e) {
      return true;  // unreachable, not refused: keep trying
    }
  }

  async function backfill(firstLiveSeq, conn) {
    try {
      const r = await fetch(`/api/v1/flows/recent?limit=${RECENT_ON_CONNECT}${sourceQuery()}`,
        { credentials: "same-origin", cache: "no-store" });
      if (!r.ok || conn !== state.conn) return;
      const body = await r.json();
      if (conn !== state.conn) return;
      // The fleet's hosts number their streams each for itself: what came live already is
      // known by host and seq.
      const seen = new Set(state.events.map((e) => `${e.host} ${e.seq}`));
      const older = (body.events || []).filter((e) => state.source === "fleet"
        ? !seen.has(`${e.host} ${e.seq}`)
        : firstLiveSeq === null || e.seq < firstLiveSeq);
      if (!older.length) return;
      for (const e of older) { e._n = 0; account(e, false); }
      state.events.unshift(...older);
      state.dirty = true;
    } catch (e) { /* the live feed goes on without history */ }
  }

  function sourceQuery() {
    return state.source === "fleet" ? "&source=fleet" : "";
  }

  function connect() {
    setConn(state.retry ? "reconnecting" : "connecting", state.retry ? "reconnecting…" : "connecting…");
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const conn = ++state.conn;
    const query = state.source === "fleet" ? "?source=fleet" : "";
    const ws = new WebSocket(`${proto}//${location.host}/api/v1/flows${query}`);
    state.ws = ws;
    let opened = false;
    let firstLiveSeq = null;
    let backfilled = state.events.length > 0;
    ws.onopen = () => {
      if (conn !== state.conn) return;
      opened = true;
      state.retry = 0;
      setConn("live", "live");
      if (!backfilled) {
        backfilled = true;
        setTimeout(() => backfill(firstLiveSeq, conn), 0);
      }
    };
    ws.onmessage = (msg) => {
      if (conn !== state.conn) return;
      let ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      if (ev.type === "slow_consumer") {
        take({ type: "lost", lost: ev.dropped || 0, stage: "viewer-too-slow" }, true);
        return;
      }
      if (firstLiveSeq === null && typeof ev.seq === "number") firstLiveSeq = ev.seq;
      take(ev, true);
    };
    ws.onclose = async (e) => {
      if (conn !== state.conn) return;  // closed by a switch of source: the new one goes on
      state.ws = null;
      if (!opened && !(await signedIn())) {
        setConn("signed-out", "signed out: open a new sign-in link (microseg viewer-url)");
        return;
      }
      const wait = Math.min(10, 2 ** state.retry);
      state.retry += 1;
      setConn("reconnecting", `disconnected (${e.code}); retrying in ${wait} s`);
      setTimeout(() => { if (conn === state.conn) connect(); }, wait * 1000);
    };
  }

  // ---- drawing -----------------------------------------------------------------------------

  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ESC[c]);
  const cell = (cls, v, title) =>
    `<td class="c-${cls}"${title ? ` title="${esc(title)}"` : ""}>${esc(v)}</td>`;

  // The staged column, from the first staged verdict on (a column nobody needs takes no room).
  function addStagedColumn() {
    state.stagedColumn = true;
    const col = document.createElement("col");
    col.className = "w-staged";
    document.querySelector("#flows col.w-rule").after(col);
    const th = document.createElement("th");
    th.id = "h-staged";
    th.textContent = "staged";
    th.title = "what staged rules would decide, where it differs from the enforced verdict";
    $("h-rule").after(th);
    $("flows").classList.add("has-staged");
  }

  // The host column while the fleet view is on (the column comes and goes with it).
  function setHostColumn(on) {
    if (on === state.hostColumn) return;
    state.hostColumn = on;
    if (on) {
      const col = document.createElement("col");
      col.className = "w-host";
      document.querySelector("#flows col.w-time").after(col);
      const th = document.createElement("th");
      th.id = "h-host";
      th.textContent = "host";
      th.title = "the agent that reported the event";
      document.querySelector("#flows thead th").after(th);
    } else {
      document.querySelector("#flows col.w-host").remove();
      $("h-host").remove();
    }
    $("flows").classList.toggle("has-host", on);
  }

  function row(ev, span, staged) {
    // Cells that may be ellipsised (addresses, rule, messages) carry their whole text as a title.
    if (ev.type === "alert") {
      const msg = `ALERT ${ev.alert} ${ev.state} (${ev.severity}): ${ev.message}`;
      return `<tr class="alert a-${esc(ev.severity)}" data-seq="${esc(ev.seq)}"><td class="c-time">${esc(timeOf(ev.time))}</td>` + hostCell(ev) +
        `<td colspan="${span}" title="${esc(msg)}">${esc(msg)}</td></tr>`;
    }
    if (ev.type === "lost") {
      const range = ev.first_seq ? ` (seq ${ev.first_seq}..${ev.seq})` : "";
      return `<tr class="lost" data-seq="${esc(ev.seq)}"><td class="c-time">${esc(timeOf(ev.time))}</td>` + hostCell(ev) +
        `<td colspan="${span}">${esc(ev.lost)} events lost at ${esc(ev.stage)}${esc(range)}</td></tr>`;
    }
    const r = ev.rule;
    const rule = r ? ruleText(r) : "default";
    const groups = [];
    if (r && r.src_group) groups.push(`source group ${r.src_group}`);
    if (r && r.dst_group) groups.push(`destination group ${r.dst_group}`);
    const ruleTitle = r ? `${rule}: priority ${r.priority}, ${r.action}` +
      (groups.length ? `; ${groups.join(", ")}` : "") : "the policy's default action";
    return `<tr class="v-${esc(ev.verdict)}" data-seq="${esc(ev.seq)}" data-verdict="${esc(ev.verdict)}">` +
      cell("time", timeOf(ev.time), ev.time) + hostCell(ev) + cell("verdict", ev.verdict) +
      cell("dir", ev.direction) + cell("src", ev.src_ip, ev.src_ip) + cell("sport", ev.src_port ?? "") +
      cell("dst", ev.dst_ip, ev.dst_ip) + cell("dport", ev.dst_port ?? "") +
      cell("proto", ev.protocol, ev.tcp_flags || "") +
      cell("rule", rule, ruleTitle) + (staged ? stagedCell(ev.staged) : "") +
      cell("pkts", ev.packets) + cell("bytes", ev.bytes) + "</tr>";
  }

  function hostCell(ev) {
    return state.hostColumn ? cell("host", ev.host ?? "", ev.host) : "";
  }

  function stagedCell(st) {
    const [badge, title] = stagedText(st);
    if (!badge) return '<td class="c-staged"></td>';
    return `<td class="c-staged" title="${esc(title)}">` +
      `<span class="badge s-${esc(st.verdict)}">${esc(badge)}</span></td>`;
  }

  function timeOf(t) {
    const m = /T(\d\d:\d\d:\d\d(?:\.\d{1,3})?)/.exec(t || "");
    return m ? m[1] : (t || "");
  }

  function drawTable() {
    const f = state.filter;
    const out = [];
    let matched = 0;
    const ev = state.events;
    if (!state.stagedColumn && (state.hasStaged || f.staged)) addStagedColumn();
    const staged = state.stagedColumn;
    const span = staged ? 11 : 10;  // the cells after the time (and the host)
    for (let i = ev.length - 1; i >= 0 && out.length < TABLE_CAP; i--) {
      const e = ev[i];
      if (state.paused && e._n > state.pausedAt) continue;
      if (!matches(e, f)) continue;
      matched += 1;
      out.push(row(e, span, staged));
    }
    $("rows").innerHTML = out.join("");
    $("shown").textContent = `${matched} rows shown (newest first, at most ${TABLE_CAP}); ` +
      `${ev.length} events kept in this page`;
  }

  function drawTop(id, map) {
    const top = [...map.values()].sort((a, b) => b.n - a.n).slice(0, TOP_N);
    $(id).innerHTML = top.map((e) => `<li>${esc(e.label)} <span class="n">${e.n}</span></li>`).join("");
  }

  function shortLabel(s) {
    return s.length > 22 ? `${s.slice(0, 10)}…${s.slice(-10)}` : s;
  }

  function drawMap() {
    const edges = [...state.edges.values()].sort((a, b) => b.n - a.n).slice(0, MAP_EDGES);
    const nodes = [...new Set(edges.flatMap((e) => [e.src, e.dst]))];
    const c = 160, rad = 110;
    const pos = new Map(nodes.map((n, i) => {
      const a = (2 * Math.PI * i) / Math.max(1, nodes.length) - Math.PI / 2;
      return [n, [c + rad * Math.cos(a), c + rad * Math.sin(a)]];
    }));
    const parts = ['<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" ' +
      'markerWidth="6" markerHeight="6" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" ' +
      'fill="#78909c"/></marker></defs>'];
    for (const e of edges) {
      const [x1, y1] = pos.get(e.src), [x2, y2] = pos.get(e.dst);
      const len = Math.hypot(x2 - x1, y2 - y1) || 1;
      const ex = x2 - ((x2 - x1) / len) * 7, ey = y2 - ((y2 - y1) / len) * 7;  // stop at the node
      const cls = e.deny ? "deny" : e.log ? "log" : "";
      const w = Math.min(4, 1 + Math.log10(e.n));
      parts.push(`<line class="${cls}" x1="${x1.toFixed(1)}" y1="${y1.toFixed(1)}" x2="${ex.toFixed(1)}" ` +
        `y2="${ey.toFixed(1)}" stroke-width="${w.toFixed(1)}" marker-end="url(#arrow)"><title>` +
        `${esc(e.src)} → ${esc(e.dst)}: ${e.n} events, ${e.deny} denied, ${e.log} logged</title></line>`);
    }
    for (const [n, [x, y]] of pos) {
      const tx = Math.min(265, Math.max(55, x));
      const ty = y < c ? y - 8 : y + 15;
      if (n.startsWith("host:")) {
        // A fleet host: the agent that reported these flows (its own end of them).
        const name = n.slice(5);
        const title = `host ${name} (the agent that reported these flows)`;
        parts.push(`<rect class="host" x="${(x - 5).toFixed(1)}" y="${(y - 5).toFixed(1)}" width="10" ` +
          `height="10"><title>${esc(title)}</title></rect>` +
          `<text class="host" x="${tx.toFixed(1)}" y="${ty.toFixed(1)}" text-anchor="middle">` +
          `<title>${esc(title)}</title>${esc(shortLabel(name))}</text>`);
        continue;
      }
      parts.push(`<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="4"><title>${esc(n)}</title></circle>` +
        `<text x="${tx.toFixed(1)}" y="${ty.toFixed(1)}" text-anchor="middle"><title>${esc(n)}</title>` +
        `${esc(shortLabel(n))}</text>`);
    }
    $("map").innerHTML = parts.join("");
  }

  function drawCounters() {
    const now = Math.floor(Date.now() / 1000);
    let deny = 0, log = 0;
    for (const [sec, b] of state.rates) {
      if (sec < now - RATE_WINDOW - 1) state.rates.delete(sec);
      else if (sec < now) { deny += b.deny; log += b.log; }  // whole seconds only
    }
    $("deny-rate").textContent = (deny / RATE_WINDOW).toFixed(1);
    $("log-rate").textContent = (log / RATE_WINDOW).toFixed(1);
    $("total").textContent = String(state.total);
    const lost = $("lost");
    lost.textContent = String(state.lost);
    lost.classList.toggle("nonzero", state.lost > 0);
    if (state.lost) {
      lost.title = [...state.lostStages].map(([s, n]) => `${s}: ${n}`).join(", ");
    }
    const alerts = $("alerts");
    alerts.textContent = String(state.alerts.size);
    alerts.classList.toggle("nonzero", state.alerts.size > 0);
    alerts.title = [...state.alerts.values()].map((a) => a.message).join("\n") || "no alert firing";
    if (state.paused) {
      const held = state.events.filter((e) => e._n > state.pausedAt).length;
      $("paused-note").textContent = `paused: ${held} newer events held back`;
    }
  }

  function redraw() {
    drawCounters();  // rates move even when nothing arrives
    if (!state.dirty) return;
    state.dirty = false;
    if (!state.paused || state.filterChanged) drawTable();
    state.filterChanged = false;
    drawTop("top-rules", state.rules);
    drawTop("top-talkers", state.talkers);
    drawMap();
  }

  // ---- controls ----------------------------------------------------------------------------

  function onFilter() {
    state.filter = readFilters();
    state.filterChanged = true;
    state.dirty = true;
  }

  function togglePause() {
    state.paused = !state.paused;
    state.pausedAt = state.arrived;
    const b = $("pause");
    b.textContent = state.paused ? "Resume" : "Pause";
    b.setAttribute("aria-pressed", String(state.paused));
    $("paused-note").hidden = !state.paused;
    state.filterChanged = true;
    state.dirty = true;
  }

  // Local or fleet: what was shown goes (a switch starts the view afresh), the feed follows.
  function setSource(source) {
    if (source === state.source) return;
    state.source = source;
    const ws = state.ws;
    state.conn += 1;  // the old connection's messages and end are ignored from now on
    state.ws = null;
    if (ws) ws.close();
    Object.assign(state, { events: [], total: 0, lost: 0, hasStaged: false, lastSeq: new Map(),
      pausedAt: state.arrived, retry: 0 });
    for (const m of [state.lostStages, state.alerts, state.rates, state.rules, state.talkers, state.edges]) m.clear();
    setHostColumn(source === "fleet");
    state.filterChanged = true;
    state.dirty = true;
    redraw();  // at once: the other source's rows must not linger until the next tick
    connect();
  }

  // The fleet toggle, only where the agent serves a fleet feed (/status flow_sources).
  async function offerFleet() {
    try {
      const r = await fetch("/api/v1/status", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) return;
      const body = await r.json();
      if (!(body.flow_sources || []).includes("fleet")) return;
      $("fleet-toggle").hidden = false;
      $("fleet").addEventListener("change", () => setSource($("fleet").checked ? "fleet" : "local"));
    } catch (e) { /* no toggle: the local feed goes on */ }
  }

  function start() {
    for (const id of ["f-verdict", "f-protocol", "f-staged"]) $(id).addEventListener("change", onFilter);
    for (const id of ["f-ip", "f-port", "f-rule"]) $(id).addEventListener("input", onFilter);
    $("filters").addEventListener("reset", () => setTimeout(onFilter, 0));
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    $("pause").addEventListener("click", togglePause);
    onFilter();
    setInterval(redraw, REDRAW_MS);
    connect();
    offerFleet();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
