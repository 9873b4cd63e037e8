// The console's shell: sign-in, navigation, the namespace picker and the
// shared watch caches the views draw from.
import { token, request, getJSON, onUnauthorized, Informer } from './api.js';
import { h, clear } from './util.js';
import * as overview from './overview.js';
import * as workloads from './workloads.js';
import * as servicemap from './servicemap.js';
import * as policies from './policies.js';
import * as events from './events.js';

const VIEWS = { overview, workloads, map: servicemap, policies, events };

const COLLECTIONS = {
  nodes: ['/api/v1', 'nodes', false],
  namespaces: ['/api/v1', 'namespaces', false],
  pods: ['/api/v1', 'pods', true],
  events: ['/api/v1', 'events', true],
  services: ['/api/v1', 'services', true],
  deployments: ['/apis/apps/v1', 'deployments', true],
  statefulsets: ['/apis/apps/v1', 'statefulsets', true],
  daemonsets: ['/apis/apps/v1', 'daemonsets', true],
  jobs: ['/apis/batch/v1', 'jobs', true],
  networkpolicies: ['/apis/networking.k8s.io/v1', 'networkpolicies', true],
};

const ALL = '';

const $ = (id) => document.getElementById(id);

// Watch caches by path, shared by the views and kept across view changes
// (switching views does not re-list).
const informers = new Map();

const ctx = {
  namespace: sessionStorage.getItem('skep.console.namespace') || 'default',
  informer(resource, namespace = ctx.namespace) {
    const [prefix, plural, namespaced] = COLLECTIONS[resource];
    const path = namespaced && namespace !== ALL
      ? `${prefix}/namespaces/${encodeURIComponent(namespace)}/${plural}`
      : `${prefix}/${plural}`;
    if (!informers.has(path)) informers.set(path, new Informer(path));
    return informers.get(path);
  },
  ALL,
};

let unmount = null;

function route() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1] || 'overview';
  const view = VIEWS[name] || overview;
  document.querySelectorAll('header nav a').forEach((a) => {
    a.classList.toggle('active', a.dataset.view === name);
  });
  if (unmount) unmount();
  const root = clear($('view'));
  root.dataset.view = name;
  unmount = view.mount(root, ctx) || null;
}

function stopAll() {
  if (unmount) unmount();
  unmount = null;
  informers.forEach((i) => i.stop());
  informers.clear();
}

function showLogin(message) {
  stopAll();
  $('console').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

// Who the token belongs to; a wrong token answers 401 with the API's
// message, which the form shows as is.
async function whoami(t) {
  const resp = await request('/apis/authentication.k8s.io/v1/selfsubjectreviews', {
    method: 'POST',
    token: t,
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' }),
  });
  const review = await resp.json();
  return ((review.status || {}).userInfo || {}).username || '(unknown user)';
}

async function fillNamespaces() {
  const sel = $('namespace');
  const draw = (names) => {
    const current = ctx.namespace;
    clear(sel);
    sel.append(h('option', { value: ALL }, 'all namespaces'));
    if (current && !names.includes(current)) names.push(current);
    for (const n of names.sort()) sel.append(h('option', { value: n }, n));
    sel.value = current;
  };
  draw([]);
  const inf = ctx.informer('namespaces');
  inf.subscribe(() => {
    const names = inf.list().map((n) => n.metadata.name);
    if (names.length !== sel.options.length - 1) draw(names);
  });
}

async function start() {
  $('login').hidden = true;
  $('console').hidden = false;
  $('whoami').textContent = '';
  whoami().then((u) => { $('whoami').textContent = u; }).catch(() => {});
  fillNamespaces();
  route();
}

function init() {
  onUnauthorized((message) => {
    token.clear();
    showLogin(`Signed out: ${message}`);
  });
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    $('login-error').textContent = '';
    try {
      await whoami(t);
    } catch (e) {
      $('login-error').textContent = e.message;
      return;
    }
    token.set(t);
    $('token').value = '';
    start();
  });
  $('logout').addEventListener('click', () => {
    token.clear();
    showLogin('');
  });
  $('namespace').addEventListener('change', (ev) => {
    ctx.namespace = ev.target.value;
    sessionStorage.setItem('skep.console.namespace', ctx.namespace);
    route();
  });
  window.addEventListener('hashchange', () => {
    if (token.get()) route();
  });
  if (token.get()) start();
  else showLogin('');
}

// Exposed for debugging in the browser's console only; holds no token.
window.skepConsole = { ctx, getJSON };

init();
