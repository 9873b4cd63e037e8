// Workloads: Deployments, StatefulSets, DaemonSets and Jobs with their
// rollout progress; a workload's pods (status, restarts); a pod's logs,
// streamed live.
import { streamLines } from './api.js';
import { h, clear, throttle, age, workloadOf, capped, keyedTable } from './util.js';

const KINDS = [
  ['deployments', 'Deployment'],
  ['statefulsets', 'StatefulSet'],
  ['daemonsets', 'DaemonSet'],
  ['jobs', 'Job'],
];
const MAX_ROWS = 200;
const MAX_LOG_LINES = 1000;

function progress(kind, o) {
  const spec = o.spec || {};
  const st = o.status || {};
  switch (kind) {
    case 'Deployment':
    case 'StatefulSet': {
      const want = spec.replicas ?? 1;
      const ready = st.readyReplicas || 0;
      const updated = st.updatedReplicas || 0;
      const done = ready >= want && updated >= want && (st.replicas || 0) === want;
      return { ready, want, text: `${ready}/${want} ready, ${updated} up to date`, done };
    }
    case 'DaemonSet': {
      const want = st.desiredNumberScheduled || 0;
      const ready = st.numberReady || 0;
      return { ready, want, text: `${ready}/${want} ready, ${st.updatedNumberScheduled || 0} up to date`, done: ready >= want };
    }
    case 'Job': {
      const want = spec.completions ?? 1;
      const ok = st.succeeded || 0;
      return { ready: ok, want, text: `${ok}/${want} succeeded, ${st.active || 0} active, ${st.failed || 0} failed`, done: ok >= want };
    }
    default:
      return { ready: 0, want: 0, text: '', done: false };
  }
}

function podStatus(p) {
  const st = p.status || {};
  if (p.metadata.deletionTimestamp) return ['Terminating', 'warn'];
  for (const c of st.containerStatuses || []) {
    const w = (c.state || {}).waiting;
    if (w && w.reason) return [w.reason, 'bad'];
  }
  const ready = (st.conditions || []).find((c) => c.type === 'Ready');
  if (st.phase === 'Running' && ready && ready.status === 'True') return ['Running', 'ok'];
  if (st.phase === 'Succeeded') return ['Completed', 'ok'];
  return [st.phase || 'Pending', st.phase === 'Failed' ? 'bad' : 'warn'];
}

const restarts = (p) => ((p.status || {}).containerStatuses || []).reduce((n, c) => n + (c.restartCount || 0), 0);

export function mount(root, ctx) {
  const infs = KINDS.map(([res, kind]) => [kind, ctx.informer(res)]);
  const pods = ctx.informer('pods');
  let selected = null; // {kind, name, namespace}
  let filter = '';

  const workloadTable = keyedTable('workloads', ['Kind', 'Namespace', 'Name', 'Rollout', 'Age']);
  const workloadErrors = h('div');
  const workloadsEl = h('div', null, workloadErrors, workloadTable.el);
  const podTable = keyedTable('pod-table', ['Name', 'Status', 'Restarts', 'Node', 'IP', 'Age', 'Logs']);
  const podNote = h('div');
  const podsTitle = h('h3', null, 'Pods');
  const filterEl = h('input#pod-filter', { type: 'search', placeholder: 'filter pods by name' });
  const podsEl = h('div#pods', null, podTable.el, podNote);
  const logsEl = h('div#logs.card', { hidden: true });
  root.append(
    h('h2', null, `Workloads in ${ctx.namespace || 'all namespaces'}`),
    workloadsEl,
    h('div.split', null,
      h('div#workload-detail', null, h('div.toolbar', null, podsTitle, filterEl), podsEl),
      logsEl),
  );
  filterEl.addEventListener('input', () => {
    filter = filterEl.value.trim();
    draw();
  });

  const draw = throttle(() => {
    const rows = [];
    for (const [kind, inf] of infs) {
      for (const o of inf.list()) {
        const p = progress(kind, o);
        const isSel = selected && selected.kind === kind && selected.name === o.metadata.name
          && selected.namespace === o.metadata.namespace;
        const bar = h('div.bar.progress', null, h('span'));
        bar.firstChild.style.width = `${p.want ? Math.min(100, (100 * p.ready) / p.want) : 100}%`;
        rows.push(h(`tr.workload.clickable${isSel ? '.selected' : ''}`, {
          dataset: { key: `${kind}/${o.metadata.namespace}/${o.metadata.name}`, kind, name: o.metadata.name, namespace: o.metadata.namespace },
          onclick: () => {
            selected = { kind, name: o.metadata.name, namespace: o.metadata.namespace };
            draw();
          },
        },
        h('td', null, kind),
        h('td', null, o.metadata.namespace),
        h('td.name', null, o.metadata.name),
        h('td.rollout', null, bar, h(`span.badge.${p.done ? 'ok' : 'warn'}`, null, p.done ? 'complete' : 'progressing'), ' ', p.text),
        h('td', null, age(o.metadata.creationTimestamp))));
      }
    }
    rows.sort((a, b) => a.dataset.name.localeCompare(b.dataset.name));
    const errors = infs.filter(([, i]) => i.error).map(([k, i]) => h('p.error', null, `${k}: ${i.error.message}`));
    clear(workloadErrors).append(...errors);
    workloadTable.update(rows, h('p.note', null, 'no workloads'));

    let list = pods.list();
    if (selected) {
      list = list.filter((p) => {
        const w = workloadOf(p);
        return p.metadata.namespace === selected.namespace && w.name === selected.name
          && (w.kind === selected.kind || (selected.kind === 'Job' && w.kind === 'Job'));
      });
      podsTitle.textContent = `Pods of ${selected.kind} ${selected.namespace}/${selected.name}`;
    } else {
      podsTitle.textContent = 'Pods';
    }
    if (filter) list = list.filter((p) => p.metadata.name.includes(filter));
    list.sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    const { items, note } = capped(list, MAX_ROWS, 'pods');
    podTable.update(items.map((p) => {
        const [status, cls] = podStatus(p);
        return h('tr.pod', { dataset: { key: `${p.metadata.namespace}/${p.metadata.name}`, name: p.metadata.name, namespace: p.metadata.namespace } },
          h('td', null, p.metadata.name),
          h('td.status', null, h(`span.badge.${cls}`, null, status)),
          h('td.restarts', null, String(restarts(p))),
          h('td', null, (p.spec || {}).nodeName || ''),
          h('td.mono', null, (p.status || {}).podIP || ''),
          h('td', null, age(p.metadata.creationTimestamp)),
          h('td', null, ((p.spec || {}).containers || []).map((c) => h('button.logs', {
            type: 'button',
            dataset: { container: c.name },
            onclick: () => openLogs(p.metadata.namespace, p.metadata.name, c.name),
          }, c.name))));
      }), h('p.note', null, pods.synced ? 'no pods' : 'loading…'));
    clear(podNote).append(note || '');
  }, 300);

  // One log stream at a time; the previous one is aborted.
  let logAbort = null;
  function openLogs(ns, pod, container) {
    if (logAbort) logAbort.abort();
    logAbort = new AbortController();
    const signal = logAbort.signal;
    const out = h('pre#log-output');
    const state = h('span#log-state.note', null, 'connecting…');
    clear(logsEl).append(
      h('div.toolbar', null, h('h3', null, `Logs of ${ns}/${pod} (${container})`), state,
        h('button#log-close', { type: 'button', onclick: () => { logAbort.abort(); logsEl.hidden = true; } }, 'close')),
      out);
    logsEl.hidden = false;
    let lines = 0;
    const url = `/api/v1/namespaces/${encodeURIComponent(ns)}/pods/${encodeURIComponent(pod)}/log`
      + `?follow=true&tailLines=200&container=${encodeURIComponent(container)}`;
    streamLines(url, signal, (line) => {
      state.textContent = 'streaming';
      const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      out.append(h('div.log-line', null, line));
      if (++lines > MAX_LOG_LINES) out.firstChild.remove();
      if (atEnd) out.scrollTop = out.scrollHeight;
    }).then(() => {
      if (!signal.aborted) state.textContent = 'stream ended';
    }).catch((e) => {
      if (!signal.aborted) state.textContent = `error: ${e.message}`;
    });
  }

  const unsubs = [...infs.map(([, i]) => i.subscribe(draw)), pods.subscribe(draw)];
  draw();
  return () => {
    unsubs.forEach((u) => u());
    if (logAbort) logAbort.abort();
  };
}
