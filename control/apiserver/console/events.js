// Events, newest first, live through the watch.
import { h, clear, throttle, age, capped } from './util.js';

export function mount(root, ctx) {
  const events = ctx.informer('events');
  const el = h('div');
  const filterEl = h('input#event-filter', { type: 'search', placeholder: 'filter (object, reason, message)' });
  let filter = '';
  filterEl.addEventListener('input', () => { filter = filterEl.value.trim().toLowerCase(); draw(); });
  root.append(h('h2', null, `Events in ${ctx.namespace || 'all namespaces'}`), h('div.toolbar', null, filterEl), el);
  const when = (e) => e.lastTimestamp || e.eventTime || (e.series || {}).lastObservedTime || e.metadata.creationTimestamp || '';
  const draw = throttle(() => {
    let list = events.list();
    if (filter) {
      list = list.filter((e) => `${(e.involvedObject || {}).kind}/${(e.involvedObject || {}).name} ${e.reason} ${e.message}`
        .toLowerCase().includes(filter));
    }
    list.sort((a, b) => when(b).localeCompare(when(a)));
    const { items, note } = capped(list, 300, 'events');
    clear(el).append(events.error ? h('p.error', null, events.error.message) : '', items.length ? h('table#events', null,
      h('thead', null, h('tr', null, ['Age', 'Type', 'Reason', 'Object', 'Message', 'Count'].map((t) => h('th', null, t)))),
      h('tbody', null, items.map((e) => h('tr.event', null,
        h('td', null, age(when(e))),
        h('td', null, h(`span.badge.${e.type === 'Warning' ? 'bad' : 'ok'}`, null, e.type || 'Normal')),
        h('td', null, e.reason || ''),
        h('td', null, `${(e.involvedObject || {}).kind || ''}/${(e.involvedObject || {}).name || ''}`),
        h('td', null, e.message || ''),
        h('td', null, String(e.count || (e.series || {}).count || 1)))))) : h('p.note', null, 'no events'), note || '');
  }, 500);
  const unsub = events.subscribe(draw);
  draw();
  return unsub;
}
