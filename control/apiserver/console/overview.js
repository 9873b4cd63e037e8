// Cluster overview: nodes (conditions, capacity, usage), the control
// plane's readiness checks and each node's eBPF dataplane as its agent
// publishes it in the `skep.io/dataplane` annotation.
import { getJSON, getReport } from './api.js';
import { h, clear, throttle, age, quantity, bytes } from './util.js';

// /readyz and node metrics have no watch: a slow refresh.
const REFRESH_MS = 15000;

export function mount(root, ctx) {
  const nodesEl = h('div');
  const healthEl = h('div.card#control-plane', null, h('h3', null, 'Control plane'), 'loading…');
  const dataplaneEl = h('div.cards#dataplane');
  root.append(
    h('h2', null, 'Cluster overview'),
    h('div.cards', null, healthEl),
    h('h3', null, 'Nodes'),
    nodesEl,
    h('h3', null, 'Dataplane'),
    dataplaneEl,
  );
  let usage = null; // node name → {cpu, memory}, or 'n/a'
  const nodes = ctx.informer('nodes');

  const draw = throttle(() => {
    const list = nodes.list().sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    clear(nodesEl).append(nodesTable(list, usage, nodes.error));
    clear(dataplaneEl).append(...list.map(dataplaneCard));
  }, 300);
  const unsub = nodes.subscribe(draw);
  draw();

  let stopped = false;
  async function refresh() {
    try {
      const text = await getReport('/readyz?verbose').then((r) => r.text).catch((e) => e.message);
      if (!stopped) drawHealth(healthEl, text);
      try {
        const m = await getJSON('/apis/metrics.k8s.io/v1beta1/nodes');
        usage = new Map((m.items || []).map((i) => [i.metadata.name, i.usage || {}]));
      } catch (_) {
        usage = 'n/a';
      }
      if (!stopped) draw();
    } finally {
      if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
    }
  }
  let timer = null;
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    unsub();
  };
}

// `/readyz?verbose` answers one `[+]name ok` / `[-]name failed: …` per
// check, then a summary line.
function drawHealth(el, text) {
  const rows = [];
  let summary = '';
  for (const line of String(text).split('\n')) {
    const m = line.match(/^\[([+-])\](\S+)\s*(.*)$/);
    if (m) {
      rows.push(h('tr.check', { dataset: { name: m[2] } },
        h('td', null, h(`span.badge.${m[1] === '+' ? 'ok' : 'bad'}`, null, m[1] === '+' ? 'ok' : 'failed')),
        h('td', null, m[2]),
        h('td.note', null, m[3] === 'ok' ? '' : m[3])));
    } else if (line.trim()) {
      summary = line.trim();
    }
  }
  clear(el).append(
    h('h3', null, 'Control plane'),
    h('p', null, summary || 'no answer'),
    h('table', null, h('tbody', null, rows)),
  );
}

function condition(node, type) {
  return ((node.status || {}).conditions || []).find((c) => c.type === type);
}

function nodesTable(list, usage, error) {
  if (!list.length) return h('p.note', null, error ? error.message : 'no nodes yet');
  const rows = list.map((n) => {
    const ready = condition(n, 'Ready');
    const isReady = ready && ready.status === 'True';
    const pressure = ((n.status || {}).conditions || [])
      .filter((c) => c.type !== 'Ready' && c.status === 'True')
      .map((c) => c.type);
    const cap = (n.status || {}).capacity || {};
    const addrs = ((n.status || {}).addresses || []).map((a) => `${a.type}: ${a.address}`);
    let cpu = 'n/a';
    let mem = 'n/a';
    if (usage instanceof Map && usage.has(n.metadata.name)) {
      const u = usage.get(n.metadata.name);
      cpu = `${quantity(u.cpu).toFixed(2)} / ${cap.cpu || '?'} cores`;
      mem = `${bytes(quantity(u.memory))} / ${bytes(quantity(cap.memory))}`;
    }
    return h('tr.node', { dataset: { name: n.metadata.name } },
      h('td', null, n.metadata.name),
      h('td.ready', null, h(`span.badge.${isReady ? 'ok' : 'bad'}`, null, isReady ? 'Ready' : 'NotReady'),
        pressure.map((p) => h('span.badge.warn', null, p))),
      h('td', null, addrs.join(', ')),
      h('td', null, `${cap.cpu || '?'} cpu, ${bytes(quantity(cap.memory))}, ${cap.pods || '?'} pods`),
      h('td.cpu', null, cpu),
      h('td.memory', null, mem),
      h('td', null, ((n.status || {}).nodeInfo || {}).kubeletVersion || ''),
      h('td', null, age(n.metadata.creationTimestamp)));
  });
  return h('table#nodes', null,
    h('thead', null, h('tr', null, ['Name', 'Status', 'Addresses', 'Capacity', 'CPU used', 'Memory used', 'Version', 'Age'].map((t) => h('th', null, t)))),
    h('tbody', null, rows));
}

function fillBar(used, max) {
  const frac = max > 0 ? Math.min(1, used / max) : 0;
  const bar = h(`div.bar${frac >= 0.95 ? '.full' : frac >= 0.75 ? '.high' : ''}`, null, h('span'));
  // Through the CSSOM: the CSP forbids style attributes.
  bar.firstChild.style.width = `${(frac * 100).toFixed(1)}%`;
  return bar;
}

function dataplaneCard(node) {
  const raw = ((node.metadata || {}).annotations || {})['skep.io/dataplane'];
  const card = h('div.card.dataplane', { dataset: { node: node.metadata.name } }, h('h3', null, node.metadata.name));
  if (!raw) return card.append(h('p.note', null, 'not reported yet')), card;
  let d;
  try {
    d = JSON.parse(raw);
  } catch (e) {
    card.append(h('p.error', null, `unreadable report: ${e.message}`));
    return card;
  }
  if (!d.ok) {
    card.append(h('p.error', null, `dataplane error: ${d.error || 'unknown'}`), h('p.note', null, `reported ${age(d.at)} ago`));
    return card;
  }
  const st = d.status || {};
  const links = st.links || {};
  const flag = (on, name) => h(`span.badge.${on ? 'ok' : 'bad'}`, null, `${name} ${on ? 'on' : 'off'}`);
  card.append(
    h('p', null, flag(st.ready, 'ready'), ' ', flag(st.policy, 'policy'), ' ', flag(st.flows, 'flows'),
      h('span.note', null, ` reported ${age(d.at)} ago`)),
    h('p', null, `links: tc ${links.tc ?? 0}, xdp ${links.xdp ?? 0}, cgroup ${links.cgroup ?? 0}`),
    h('p.programs', null, `${(st.programs || []).length} programs attached: `,
      h('span.mono', null, (st.programs || []).join(', '))),
  );
  const maps = (st.maps || []).slice().sort((a, b) => (b.used ?? -1) / b.max - (a.used ?? -1) / a.max);
  card.append(h('table.maps', null, h('tbody', null, maps.map((m) =>
    h('tr', { dataset: { map: m.name } },
      h('td.mono', null, m.name),
      h('td.note', null, m.kind),
      h('td', null, m.used === undefined || m.used === null ? h('span.note', null, 'n/a') : fillBar(m.used, m.max)),
      h('td', null, `${m.used ?? '?'} / ${m.max}`))))));
  return card;
}
