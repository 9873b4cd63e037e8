// Network policies: the pods each one selects (its podSelector evaluated
// here against the pods) and, per pod, its effective isolation.
import { h, clear, throttle, selectorMatches, selectorText, capped } from './util.js';

// policyTypes as the API defaults it: Ingress always, Egress when the
// policy has egress rules.
export function policyTypes(np) {
  const spec = np.spec || {};
  if (spec.policyTypes && spec.policyTypes.length) return spec.policyTypes;
  return spec.egress ? ['Ingress', 'Egress'] : ['Ingress'];
}

export function selects(np, pod) {
  return np.metadata.namespace === pod.metadata.namespace
    && selectorMatches((np.spec || {}).podSelector || {}, pod.metadata.labels);
}

function peerText(p) {
  const parts = [];
  if (p.ipBlock) parts.push(`ipBlock ${p.ipBlock.cidr}${(p.ipBlock.except || []).length ? ` except ${p.ipBlock.except.join(', ')}` : ''}`);
  if (p.namespaceSelector) parts.push(`namespaces [${selectorText(p.namespaceSelector)}]`);
  if (p.podSelector) parts.push(`pods [${selectorText(p.podSelector)}]`);
  return parts.join(' and ');
}

function rulesText(rules, dir) {
  if (!rules) return [];
  if (!rules.length) return [h('li', null, `${dir}: nothing allowed`)];
  return rules.map((r) => {
    const peers = r[dir === 'ingress' ? 'from' : 'to'];
    const who = peers && peers.length ? peers.map(peerText).join(' or ') : 'anyone';
    const ports = r.ports && r.ports.length
      ? r.ports.map((p) => `${p.protocol || 'TCP'}/${p.port ?? 'any'}${p.endPort ? `-${p.endPort}` : ''}`).join(', ')
      : 'all ports';
    return h('li', null, `${dir} ${dir === 'ingress' ? 'from' : 'to'} ${who} on ${ports}`);
  });
}

export function mount(root, ctx) {
  const nps = ctx.informer('networkpolicies');
  const pods = ctx.informer('pods');
  const policiesEl = h('div');
  const podsEl = h('div');
  root.append(h('h2', null, `Network policies in ${ctx.namespace || 'all namespaces'}`), policiesEl,
    h('h3', null, 'Effective isolation per pod'), podsEl);

  const draw = throttle(() => {
    const policies = nps.list().sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    const podList = pods.list().sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    clear(policiesEl).append(nps.error ? h('p.error', null, nps.error.message) : '', policies.length
      ? h('table#policies', null,
        h('thead', null, h('tr', null, ['Policy', 'Pod selector', 'Types', 'Rules', 'Selected pods'].map((t) => h('th', null, t)))),
        h('tbody', null, policies.map((np) => {
          const sel = podList.filter((p) => selects(np, p)).map((p) => p.metadata.name);
          const shown = capped(sel, 20, 'pods');
          return h('tr.policy', { dataset: { name: np.metadata.name, namespace: np.metadata.namespace } },
            h('td', null, `${np.metadata.namespace}/${np.metadata.name}`),
            h('td', null, selectorText((np.spec || {}).podSelector || {})),
            h('td', null, policyTypes(np).join(', ')),
            h('td', null, h('ul', null, rulesText(np.spec.ingress || (policyTypes(np).includes('Ingress') ? [] : null), 'ingress'),
              rulesText(np.spec.egress || (policyTypes(np).includes('Egress') ? [] : null), 'egress'))),
            h('td.selected-pods', null, shown.items.join(', ') || h('span.note', null, 'none'), shown.note || ''));
        })))
      : h('p.note', null, 'no network policies: every pod accepts and sends all traffic'));

    const { items, note } = capped(podList, 200, 'pods');
    clear(podsEl).append(h('table#isolation', null,
      h('thead', null, h('tr', null, ['Pod', 'Ingress', 'Egress', 'Policies'].map((t) => h('th', null, t)))),
      h('tbody', null, items.map((p) => {
        const applying = policies.filter((np) => selects(np, p));
        const ing = applying.filter((np) => policyTypes(np).includes('Ingress'));
        const eg = applying.filter((np) => policyTypes(np).includes('Egress'));
        const cell = (list) => (list.length
          ? h('span.badge.warn', null, `isolated (${list.length})`)
          : h('span.badge.ok', null, 'open'));
        return h('tr.pod-isolation', { dataset: { name: p.metadata.name } },
          h('td', null, `${p.metadata.namespace}/${p.metadata.name}`),
          h('td.ingress', null, cell(ing)),
          h('td.egress', null, cell(eg)),
          h('td', null, applying.map((np) => np.metadata.name).join(', ')));
      }))), note || '');
  }, 400);
  const unsubs = [nps.subscribe(draw), pods.subscribe(draw)];
  draw();
  return () => unsubs.forEach((u) => u());
}
