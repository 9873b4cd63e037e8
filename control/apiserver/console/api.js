// The API as the page sees it: the user's bearer token (kept in
// sessionStorage, never in the page), JSON requests, watches and line
// streams read with fetch() and a ReadableStream.

const TOKEN_KEY = 'skep.console.token';

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const listeners = new Set();
// Called with every 401: the token expired or was revoked.
export function onUnauthorized(fn) {
  listeners.add(fn);
}

export async function request(path, opts = {}) {
  const headers = Object.assign({ Accept: 'application/json' }, opts.headers || {});
  const t = opts.token || token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  const resp = await fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
  if (!resp.ok) {
    const text = await resp.text();
    let message = text.trim() || resp.statusText;
    try {
      const st = JSON.parse(text);
      if (st && st.message) message = st.message;
    } catch (_) {
      // Not a Status object: keep the text.
    }
    if (resp.status === 401 && !opts.token) listeners.forEach((fn) => fn(message));
    throw new ApiError(resp.status, `${resp.status} ${message}`);
  }
  return resp;
}

// Health endpoints answer their report with 200 or 500 alike.
export async function getReport(path) {
  const headers = {};
  const t = token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  const resp = await fetch(path, { headers, cache: 'no-store' });
  return { status: resp.status, text: await resp.text() };
}

export async function getJSON(path, opts) {
  return (await request(path, opts)).json();
}

export async function getText(path, opts) {
  return (await request(path, opts)).text();
}

// Reads `path` as a stream of lines until it ends or `signal` aborts.
export async function streamLines(path, signal, onLine) {
  const resp = await request(path, { signal });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      onLine(line);
    }
  }
  if (buf) onLine(buf);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A list + watch cache of one resource (`path` is the collection, e.g.
// /api/v1/pods). Subscribers are called after every change; they
// throttle their own redraws.
export class Informer {
  constructor(path) {
    this.path = path;
    this.items = new Map();
    this.subs = new Set();
    this.error = null;
    this.synced = false;
    this.abort = new AbortController();
    this.run();
  }

  subscribe(fn) {
    this.subs.add(fn);
    return () => this.subs.delete(fn);
  }

  notify() {
    this.subs.forEach((fn) => fn());
  }

  stop() {
    this.abort.abort();
  }

  list() {
    return [...this.items.values()];
  }

  async run() {
    const signal = this.abort.signal;
    let backoff = 500;
    while (!signal.aborted) {
      try {
        const list = await getJSON(this.path, { signal });
        this.items.clear();
        for (const o of list.items || []) this.items.set(itemKey(o), o);
        this.synced = true;
        this.error = null;
        this.notify();
        let rv = list.metadata.resourceVersion;
        // Watch from the list's revision; on a clean end, resume from the
        // last event; on 410 Gone (or an ERROR event) list again.
        for (;;) {
          let gone = false;
          const sep = this.path.includes('?') ? '&' : '?';
          await streamLines(
            `${this.path}${sep}watch=true&allowWatchBookmarks=true&resourceVersion=${rv}`,
            signal,
            (line) => {
              if (!line.trim()) return;
              const ev = JSON.parse(line);
              if (ev.type === 'ERROR') {
                gone = true;
                return;
              }
              const o = ev.object;
              if (o && o.metadata && o.metadata.resourceVersion) rv = o.metadata.resourceVersion;
              if (ev.type === 'BOOKMARK') return;
              if (ev.type === 'DELETED') this.items.delete(itemKey(o));
              else this.items.set(itemKey(o), o);
              this.notify();
            },
          );
          if (gone || signal.aborted) break;
          backoff = 500;
        }
      } catch (e) {
        if (signal.aborted) return;
        this.error = e;
        this.notify();
        // Forbidden resources stay forbidden: retry slowly.
        await sleep(e.status === 403 || e.status === 404 ? 30000 : backoff);
        backoff = Math.min(backoff * 2, 10000);
      }
    }
  }
}

function itemKey(o) {
  const md = o.metadata;
  return md.namespace ? `${md.namespace}/${md.name}` : md.name;
}
