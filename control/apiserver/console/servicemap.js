// The live service map of a namespace: workloads and external endpoints
// as nodes, flows from the relay (`/skep/v1/flows?follow=true`)
// aggregated into edges per (source, destination, verdict), green when
// forwarded, red when dropped. Clicking an edge lists its recent flows
// and the policy that allowed or dropped them.
import { streamLines } from './api.js';
import { h, s, clear, throttle, workloadOf, labelMap, selectorMatches } from './util.js';
import { policyTypes } from './policies.js';

const WINDOW_MS = 60000;      // rates are over the last minute
const KEEP_MS = 10 * 60000;   // edges without flows for this long go away
const RECENT_FLOWS = 50;      // per edge, for the detail list
const MAX_EDGES = 500;
const W = 1000;
const H = 560;
const R = 22;

// The map node of a flow endpoint.
function endpointNode(ep, podsByKey, nodeIps) {
  if (ep && ep.pod && ep.namespace) {
    const pod = podsByKey.get(`${ep.namespace}/${ep.pod}`);
    let name;
    if (pod) {
      name = workloadOf(pod).name;
    } else {
      const labels = labelMap(ep.labels);
      const hash = labels['pod-template-hash'];
      const m = hash && ep.pod.match(new RegExp(`^(.*)-${hash}-[a-z0-9]+$`));
      name = labels.app || (m ? m[1] : ep.pod);
    }
    return { id: `${ep.namespace}/${name}`, namespace: ep.namespace, name, external: false };
  }
  const ip = (ep && ep.ip) || '?';
  // Node addresses (kubelet probes, host-network pods) are named.
  if (nodeIps.has(ip)) return { id: ip, namespace: '', name: `node ${nodeIps.get(ip)}`, external: true };
  return { id: ip, namespace: '', name: ip, external: true };
}

export function mount(root, ctx) {
  const ns = ctx.namespace;
  const pods = ctx.informer('pods');
  const nodes = new Map(); // id → {id, name, namespace, external, x, y}
  const edges = new Map(); // `${from}|${to}|${verdict}` → edge
  let selectedKey = null;
  let received = 0;
  let lastTime = '';

  const statusEl = h('span#map-status.note', null, 'connecting to the flow stream…');
  const svg = s('svg', { id: 'map', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'service map' });
  const detailEl = h('div#edge-detail.card', null, h('p.note', null, 'Click an edge to see its flows and the policy behind them.'));
  const edgeListEl = h('div#edge-list');
  root.append(
    h('h2', null, `Service map of ${ns || 'all namespaces'}`),
    h('div.toolbar', null, statusEl, h('span.legend', null,
      h('span.verdict-FORWARDED', null, '━ forwarded'), h('span.verdict-DROPPED', null, '╍ dropped'))),
    h('div.split', null, svg, detailEl),
    h('h3', null, 'Edges'), edgeListEl,
  );

  function podIndex() {
    const m = new Map();
    for (const p of pods.list()) m.set(`${p.metadata.namespace}/${p.metadata.name}`, p);
    return m;
  }
  let podsByKey = podIndex();
  const unsubPods = pods.subscribe(() => { podsByKey = podIndex(); });
  const clusterNodes = ctx.informer('nodes');
  let nodeIps = new Map();
  const indexNodes = () => {
    nodeIps = new Map();
    for (const n of clusterNodes.list()) {
      for (const a of (n.status || {}).addresses || []) nodeIps.set(a.address, n.metadata.name);
    }
  };
  indexNodes();
  const unsubNodes = clusterNodes.subscribe(indexNodes);

  // A connection is seen at every hook it passes: leaving its source
  // (forwarded: the source is not isolated) and then dropped at the
  // destination. It counts as dropped only, whichever report arrives
  // first.
  const dropped = new Map(); // connection → time of the drop
  const forwardedAt = new Map(); // connection → forwarded edge key
  const connOf = (f) => `${f.protocol} ${(f.source || {}).ip}:${f.source_port} ${(f.destination || {}).ip}:${f.destination_port}`;
  function unforward(conn) {
    const k = forwardedAt.get(conn);
    forwardedAt.delete(conn);
    const e = k && edges.get(k);
    if (!e) return;
    const before = e.flows.length;
    e.flows = e.flows.filter((f) => connOf(f) !== conn);
    const removed = Math.max(1, before - e.flows.length);
    e.conns.delete(conn);
    e.times.splice(0, Math.min(removed, e.times.length));
    e.total -= removed;
    if (e.total <= 0) edges.delete(k);
  }

  function addNode(n) {
    if (nodes.has(n.id)) return nodes.get(n.id);
    // Start new nodes on a circle; the layout moves them from there.
    const i = nodes.size;
    const a = i * 2.399963; // golden angle: spread without collisions
    const node = Object.assign(n, {
      x: W / 2 + Math.cos(a) * (120 + 18 * i), y: H / 2 + Math.sin(a) * (100 + 10 * i), vx: 0, vy: 0,
    });
    nodes.set(n.id, node);
    return node;
  }

  function addFlow(f) {
    received++;
    const verdict = f.verdict === 'DROPPED' ? 'DROPPED' : 'FORWARDED';
    const conn = connOf(f);
    if (verdict === 'DROPPED') {
      dropped.set(conn, Date.now());
      unforward(conn);
    } else if (dropped.has(conn)) {
      return;
    }
    const src = addNode(endpointNode(f.source, podsByKey, nodeIps));
    const dst = addNode(endpointNode(f.destination, podsByKey, nodeIps));
    const k = `${src.id}|${dst.id}|${verdict}`;
    let e = edges.get(k);
    if (!e) {
      if (edges.size >= MAX_EDGES) return;
      e = { key: k, from: src.id, to: dst.id, verdict, flows: [], times: [], conns: new Map(), last: 0, total: 0 };
      edges.set(k, e);
    }
    const t = Date.parse(f.time) || Date.now();
    e.total++;
    e.last = Math.max(e.last, t);
    e.times.push(t);
    e.conns.set(conn, t);
    if (verdict === 'FORWARDED') forwardedAt.set(conn, k);
    e.flows.push(f);
    if (e.flows.length > RECENT_FLOWS) e.flows.shift();
  }

  // Drops what fell out of the rate window and edges long silent.
  function prune(now) {
    for (const [c, t] of dropped) if (t < now - KEEP_MS) dropped.delete(c);
    for (const [c, k] of forwardedAt) if (!edges.has(k) || !edges.get(k).conns.has(c)) forwardedAt.delete(c);
    for (const [k, e] of edges) {
      while (e.times.length && e.times[0] < now - WINDOW_MS) e.times.shift();
      for (const [c, t] of e.conns) if (t < now - WINDOW_MS) e.conns.delete(c);
      if (e.last < now - KEEP_MS && k !== selectedKey) edges.delete(k);
    }
    const used = new Set();
    for (const e of edges.values()) { used.add(e.from); used.add(e.to); }
    for (const id of [...nodes.keys()]) if (!used.has(id)) nodes.delete(id);
  }

  // A small force layout: nodes repel, edges pull, everything is drawn
  // to the middle. It runs from the current positions, so the picture
  // stays put as flows arrive.
  function layout(iterations) {
    const list = [...nodes.values()];
    const links = [...edges.values()];
    const k = Math.sqrt((W * H) / Math.max(1, list.length)) * 0.55;
    for (let it = 0; it < iterations; it++) {
      const temp = 20 * (1 - it / iterations) + 1;
      for (const n of list) { n.vx = 0; n.vy = 0; }
      for (let i = 0; i < list.length; i++) {
        for (let j = i + 1; j < list.length; j++) {
          const a = list[i]; const b = list[j];
          let dx = a.x - b.x; let dy = a.y - b.y;
          let d2 = dx * dx + dy * dy;
          if (d2 < 0.01) { dx = Math.random() - 0.5; dy = Math.random() - 0.5; d2 = 0.5; }
          const d = Math.sqrt(d2);
          const f = (k * k) / d;
          a.vx += (dx / d) * f; a.vy += (dy / d) * f;
          b.vx -= (dx / d) * f; b.vy -= (dy / d) * f;
        }
      }
      for (const e of links) {
        const a = nodes.get(e.from); const b = nodes.get(e.to);
        if (!a || !b || a === b) continue;
        const dx = a.x - b.x; const dy = a.y - b.y;
        const d = Math.max(1, Math.sqrt(dx * dx + dy * dy));
        const f = (d * d) / k;
        a.vx -= (dx / d) * f; a.vy -= (dy / d) * f;
        b.vx += (dx / d) * f; b.vy += (dy / d) * f;
      }
      for (const n of list) {
        n.vx += (W / 2 - n.x) * 0.05 * k / 50;
        n.vy += (H / 2 - n.y) * 0.05 * k / 50;
        const v = Math.sqrt(n.vx * n.vx + n.vy * n.vy) || 1;
        n.x += (n.vx / v) * Math.min(v, temp);
        n.y += (n.vy / v) * Math.min(v, temp);
        n.x = Math.min(W - 60, Math.max(60, n.x));
        n.y = Math.min(H - 40, Math.max(40, n.y));
      }
    }
  }

  function label(n) {
    if (n.external) return nodeIps.has(n.id) ? `node ${nodeIps.get(n.id)}` : n.name;
    return n.namespace === ns ? n.name : `${n.namespace}/${n.name}`;
  }

  function rateText(e) {
    return `${e.conns.size} conn/min, ${e.times.length} flows/min`;
  }

  function drawEdge(e) {
    const a = nodes.get(e.from); const b = nodes.get(e.to);
    const cls = e.verdict === 'DROPPED' ? 'dropped' : 'forwarded';
    const g = s('g', {
      class: `edge ${cls}${e.key === selectedKey ? ' selected' : ''}`,
      'data-from': e.from, 'data-to': e.to, 'data-verdict': e.verdict, 'data-key': e.key,
    });
    g.addEventListener('click', () => select(e.key));
    let d;
    let mx;
    let my;
    if (a === b) {
      // A workload talking to itself: a loop above the node.
      d = `M ${a.x - 8} ${a.y - R} C ${a.x - 40} ${a.y - 80}, ${a.x + 40} ${a.y - 80}, ${a.x + 8} ${a.y - R}`;
      mx = a.x; my = a.y - 70;
    } else {
      const dx = b.x - a.x; const dy = b.y - a.y;
      const len = Math.max(1, Math.sqrt(dx * dx + dy * dy));
      const ux = dx / len; const uy = dy / len;
      // Forwarded and dropped edges of a pair sit side by side.
      const off = e.verdict === 'DROPPED' ? -5 : 5;
      const ox = -uy * off; const oy = ux * off;
      const x1 = a.x + ux * R + ox; const y1 = a.y + uy * R + oy;
      const x2 = b.x - ux * (R + 6) + ox; const y2 = b.y - uy * (R + 6) + oy;
      d = `M ${x1.toFixed(1)} ${y1.toFixed(1)} L ${x2.toFixed(1)} ${y2.toFixed(1)}`;
      mx = (x1 + x2) / 2 + ox * 2; my = (y1 + y2) / 2 + oy * 2;
    }
    g.append(
      s('path', { class: 'hit', d }),
      s('path', { class: 'line', d, 'marker-end': `url(#${cls === 'dropped' ? 'arrow-bad' : 'arrow-ok'})` }),
      s('text', { x: mx.toFixed(1), y: my.toFixed(1) }, `${e.conns.size}/min`),
      s('title', null, `${label(a)} → ${label(b)} ${e.verdict}: ${rateText(e)}`),
    );
    return g;
  }

  const draw = throttle(() => {
    const now = Date.now();
    prune(now);
    layout(nodes.size > 60 ? 15 : 40);
    clear(svg);
    const arrow = (id) => s('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      s('path', { d: 'M 0 0 L 10 5 L 0 10 z' }));
    svg.append(s('defs', null, arrow('arrow-ok'), arrow('arrow-bad')));
    const edgeLayer = s('g', { class: 'edges' });
    const nodeLayer = s('g', { class: 'nodes' });
    for (const e of edges.values()) edgeLayer.append(drawEdge(e));
    for (const n of nodes.values()) {
      nodeLayer.append(s('g', { class: `node${n.external ? ' external' : ''}`, 'data-id': n.id, transform: `translate(${n.x.toFixed(1)} ${n.y.toFixed(1)})` },
        s('circle', { r: R }),
        s('text', { y: R + 14 }, label(n)),
        s('title', null, n.external ? `external endpoint ${n.id}` : `workload ${n.id}`)));
    }
    svg.append(edgeLayer, nodeLayer);
    if (!edges.size) {
      svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'note' }, 'no flows yet in this namespace'));
    }
    drawEdgeList();
    if (selectedKey) drawDetail();
    statusEl.textContent = `live: ${received} flows received, ${edges.size} edges`;
  }, 300);

  function drawEdgeList() {
    const list = [...edges.values()].sort((a, b) => b.times.length - a.times.length).slice(0, 100);
    clear(edgeListEl).append(list.length ? h('table#edges', null,
      h('thead', null, h('tr', null, ['From', 'To', 'Verdict', 'Rate', 'Total'].map((t) => h('th', null, t)))),
      h('tbody', null, list.map((e) => h(`tr.edge-row.clickable${e.key === selectedKey ? '.selected' : ''}`, {
        dataset: { key: e.key, verdict: e.verdict }, onclick: () => select(e.key),
      },
      h('td', null, label(nodes.get(e.from))),
      h('td', null, label(nodes.get(e.to))),
      h(`td.verdict-${e.verdict}`, null, e.verdict),
      h('td', null, rateText(e)),
      h('td', null, String(e.total)))))) : '');
  }

  function select(k) {
    selectedKey = k;
    svg.querySelectorAll('g.edge').forEach((g) => g.classList.toggle('selected', g.dataset.key === k));
    drawDetail();
  }

  // The NetworkPolicies of `namespace` that select a pod with `labels`
  // for `direction` (Ingress or Egress).
  const watchedPolicies = new Map(); // namespace → unsubscribe
  function policiesOf(namespace) {
    const inf = ctx.informer('networkpolicies', namespace);
    // The detail is redrawn when the policies arrive or change.
    if (!watchedPolicies.has(namespace)) {
      watchedPolicies.set(namespace, inf.subscribe(() => { if (selectedKey) drawDetail(); }));
    }
    return inf;
  }
  if (ns) policiesOf(ns);

  function selecting(namespace, labels, direction) {
    const inf = policiesOf(namespace);
    if (!inf.synced) return null;
    return inf.list().filter((np) => np.metadata.namespace === namespace
      && policyTypes(np).includes(direction)
      && selectorMatches((np.spec || {}).podSelector || {}, labels));
  }

  function policyExplanation(e) {
    const withPolicy = [...new Set(e.flows.map((f) => f.policy).filter(Boolean))];
    if (e.verdict === 'FORWARDED') {
      return withPolicy.length
        ? h('p.policy', null, 'allowed by ', h('strong', null, withPolicy.join(', ')))
        : h('p.policy', null, 'allowed: no policy isolates these pods for this direction');
    }
    if (withPolicy.length) return h('p.policy', null, 'dropped by ', h('strong', null, withPolicy.join(', ')));
    const f = e.flows[e.flows.length - 1] || {};
    const egress = String(f.drop_reason || '').includes('egress');
    const ep = egress ? f.source : f.destination;
    const parts = [h('p.policy', null, h('strong', null, 'default deny (no policy admits it)'),
      f.drop_reason ? ` — ${f.drop_reason}` : '')];
    if (ep && ep.namespace) {
      const pod = podsByKey.get(`${ep.namespace}/${ep.pod}`);
      const labels = pod ? pod.metadata.labels || {} : labelMap(ep.labels);
      const sel = selecting(ep.namespace, labels, egress ? 'Egress' : 'Ingress');
      parts.push(h('p', null, `NetworkPolicies selecting the ${egress ? 'source' : 'destination'} ${ep.namespace}/${ep.pod || ep.ip} for ${egress ? 'egress' : 'ingress'}: `,
        sel === null ? 'loading…' : sel.length ? h('strong.selecting', null, sel.map((np) => np.metadata.name).join(', ')) : 'none found'));
    }
    return h('div', null, parts);
  }

  function drawDetail() {
    const e = edges.get(selectedKey);
    if (!e) return;
    const flows = e.flows.slice(-20).reverse();
    clear(detailEl).append(
      h('h3', null, `${label(nodes.get(e.from))} → ${label(nodes.get(e.to))} `, h(`span.verdict-${e.verdict}`, null, e.verdict)),
      h('p.note', null, rateText(e), `, ${e.total} flows seen`),
      policyExplanation(e),
      h('table#edge-flows', null,
        h('thead', null, h('tr', null, ['Time', 'Source', 'Destination', 'Proto', 'Seen at', 'Verdict', 'Reason / policy'].map((t) => h('th', null, t)))),
        h('tbody', null, flows.map((f) => h('tr.flow', { dataset: { verdict: f.verdict } },
          h('td', null, (f.time || '').slice(11, 23)),
          h('td.mono', null, `${(f.source || {}).pod ? `${f.source.namespace}/${f.source.pod} ` : ''}${(f.source || {}).ip}:${f.source_port}`),
          h('td.mono', null, `${(f.destination || {}).pod ? `${f.destination.namespace}/${f.destination.pod} ` : ''}${(f.destination || {}).ip}:${f.destination_port}`
            + (f.service ? ` (service ${f.service.ip}:${f.service.port})` : '')),
          h('td', null, f.protocol || ''),
          h('td', null, `${f.observation || ''} on ${f.node || '?'}`),
          h(`td.verdict-${f.verdict}`, null, f.verdict),
          h('td', null, [f.drop_reason, f.policy].filter(Boolean).join(' · ') || (f.verdict === 'DROPPED' ? 'default deny' : '—')))))),
    );
  }

  // The flow stream; reconnects resume after the last flow seen.
  const abort = new AbortController();
  (async () => {
    let backoff = 500;
    while (!abort.signal.aborted) {
      // Nodes report out of order: within a stream every flow counts; a
      // new stream starts after the newest flow seen (and skips repeats).
      const resumeAfter = lastTime;
      const since = resumeAfter ? encodeURIComponent(resumeAfter) : '5m';
      const q = `follow=true&since=${since}${ns ? `&namespace=${encodeURIComponent(ns)}` : ''}`;
      try {
        statusEl.textContent = `live: ${received} flows received`;
        await streamLines(`/skep/v1/flows?${q}`, abort.signal, (line) => {
          if (!line.trim()) return;
          const ev = JSON.parse(line);
          if (ev.type !== 'FLOW' || !ev.object) return;
          const f = ev.object;
          if (resumeAfter && f.time && f.time <= resumeAfter) return;
          if (f.time && f.time > lastTime) lastTime = f.time;
          addFlow(f);
          draw();
        });
        backoff = 500;
      } catch (err) {
        if (abort.signal.aborted) return;
        statusEl.textContent = `flow stream: ${err.message}; retrying`;
        backoff = Math.min(backoff * 2, 10000);
      }
      await new Promise((r) => setTimeout(r, backoff));
    }
  })();
  // Rates decay without new flows: a slow redraw.
  const tick = setInterval(draw, 5000);
  draw();
  return () => {
    abort.abort();
    clearInterval(tick);
    unsubPods();
    unsubNodes();
    watchedPolicies.forEach((unsub) => unsub());
  };
}
