// Small DOM and Kubernetes helpers shared by the views.

// h('div.cls#id', {attrs}, ...children): builds an element. Text children
// become text nodes, so nothing from the API is ever parsed as HTML.
export function h(tag, attrs, ...children) {
  const m = tag.match(/^([a-z0-9]+)((?:[.#][\w-]+)*)$/i);
  const el = document.createElement(m ? m[1] : tag);
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  if (!attrs) return;
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// A table whose body is redrawn row by row: `update(rows, empty)` puts
// `rows` (elements with a data-key) in order, keeping every existing row
// whose markup did not change. Under a stream of watch events (1,000 pods
// being created) a redraw then leaves alone the rows the user looks at or
// is clicking, instead of replacing the whole table every few hundred ms.
// With no rows, `empty` (a note) shows instead of the table.
export function keyedTable(id, headers) {
  const tbody = h('tbody');
  const table = h(`table#${id}`, null, h('thead', null, h('tr', null, headers.map((t) => h('th', null, t)))), tbody);
  const el = h('div');
  return {
    el,
    update(rows, empty) {
      if (!rows.length) {
        clear(tbody);
        clear(el).append(empty);
        return;
      }
      if (table.parentNode !== el) clear(el).append(table);
      const old = new Map();
      for (const r of tbody.children) old.set(r.dataset.key, r);
      rows.forEach((r, i) => {
        const o = old.get(r.dataset.key);
        const keep = o && o.outerHTML === r.outerHTML ? o : r;
        const at = tbody.children[i];
        if (at !== keep) tbody.insertBefore(keep, at || null);
      });
      while (tbody.children.length > rows.length) tbody.lastChild.remove();
    },
  };
}

// Calls fn at most once per `ms`, always with the latest state (views
// redraw on watch events; 100 events a second become a few redraws).
export function throttle(fn, ms) {
  let timer = null;
  let pending = false;
  return () => {
    if (timer) {
      pending = true;
      return;
    }
    fn();
    timer = setTimeout(function tick() {
      if (pending) {
        pending = false;
        fn();
        timer = setTimeout(tick, ms);
      } else {
        timer = null;
      }
    }, ms);
  };
}

export function age(ts) {
  if (!ts) return '';
  let secs = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (secs < 120) return `${secs}s`;
  const mins = Math.round(secs / 60);
  if (mins < 120) return `${mins}m`;
  const hours = Math.round(mins / 60);
  return hours < 48 ? `${hours}h` : `${Math.round(hours / 24)}d`;
}

export const key = (o) =>
  o.metadata.namespace ? `${o.metadata.namespace}/${o.metadata.name}` : o.metadata.name;

// The workload a pod belongs to: the Deployment behind its ReplicaSet
// (the ReplicaSet's name minus the pod-template-hash), any other owner,
// the `app` label, or the pod itself.
export function workloadOf(pod) {
  const md = pod.metadata || {};
  const labels = md.labels || {};
  const owner = (md.ownerReferences || []).find((r) => r.controller) || (md.ownerReferences || [])[0];
  if (owner) {
    const hash = labels['pod-template-hash'];
    if (owner.kind === 'ReplicaSet' && hash && owner.name.endsWith(`-${hash}`)) {
      return { kind: 'Deployment', name: owner.name.slice(0, -hash.length - 1) };
    }
    return { kind: owner.kind, name: owner.name };
  }
  if (labels.app) return { kind: 'app', name: labels.app };
  return { kind: 'Pod', name: md.name };
}

// Label selectors as NetworkPolicies and workloads use them. An empty
// selector selects everything; a missing one (null) nothing.
export function selectorMatches(sel, labels) {
  if (!sel) return false;
  labels = labels || {};
  for (const [k, v] of Object.entries(sel.matchLabels || {})) {
    if (labels[k] !== v) return false;
  }
  for (const e of sel.matchExpressions || []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    const vals = e.values || [];
    switch (e.operator) {
      case 'In':
        if (!has || !vals.includes(labels[e.key])) return false;
        break;
      case 'NotIn':
        if (has && vals.includes(labels[e.key])) return false;
        break;
      case 'Exists':
        if (!has) return false;
        break;
      case 'DoesNotExist':
        if (has) return false;
        break;
      default:
        return false;
    }
  }
  return true;
}

export function selectorText(sel) {
  if (!sel) return '(none)';
  const parts = Object.entries(sel.matchLabels || {}).map(([k, v]) => `${k}=${v}`);
  for (const e of sel.matchExpressions || []) {
    parts.push(`${e.key} ${e.operator}${e.values ? ` (${e.values.join(', ')})` : ''}`);
  }
  return parts.length ? parts.join(', ') : '(all pods)';
}

// Flow endpoints carry labels as `k=v` strings.
export function labelMap(labels) {
  if (!labels) return {};
  if (!Array.isArray(labels)) return labels;
  const out = {};
  for (const l of labels) {
    const i = l.indexOf('=');
    if (i > 0) out[l.slice(0, i)] = l.slice(i + 1);
  }
  return out;
}

export function bytes(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return 'n/a';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Kubernetes quantities ("250m", "2Gi", "1500000Ki") as numbers.
export function quantity(q) {
  if (q === undefined || q === null) return NaN;
  const m = String(q).match(/^([0-9.]+)([a-zA-Z]*)$/);
  if (!m) return NaN;
  const n = parseFloat(m[1]);
  const mult = {
    '': 1, n: 1e-9, u: 1e-6, m: 1e-3, k: 1e3, M: 1e6, G: 1e9, T: 1e12,
    Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4,
  }[m[2]];
  return mult === undefined ? NaN : n * mult;
}

// The first `limit` items, and a note when there were more (long lists
// stay cheap to draw with 1,000 pods).
export function capped(items, limit, what) {
  if (items.length <= limit) return { items, note: null };
  return {
    items: items.slice(0, limit),
    note: h('p.note', null, `showing ${limit} of ${items.length} ${what}; narrow with the filter`),
  };
}
