// Servent web UI: plain DOM, no framework. Everything shown that comes from
// the network is set with textContent, never parsed as HTML.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const HEX64 = /^[0-9a-f]{64}$/i;
const KEY_ITEM = 'servent-key';
const PAGES = ['search', 'downloads', 'shares', 'network'];
const MAX_LINE = 1 << 20; // a hostile stream cannot grow our buffer beyond this

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  e.append(...kids.filter((k) => k != null)); // strings become text nodes
  return e;
}

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const num = (v) => (isNum(v) ? v : 0);
const str = (v) => (typeof v === 'string' ? v : v == null ? '' : String(v));
const plural = (n, one, many = one + 's') => `${n.toLocaleString()} ${n === 1 ? one : many}`;

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
function bytes(n) {
  if (!isNum(n)) return '?';
  if (n < 1024) return `${Math.round(n)} B`;
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return `${n < 10 ? n.toFixed(1) : Math.round(n)} ${UNITS[i]}`;
}
const rate = (n) => `${bytes(n)}/s`;

function duration(s) {
  if (!isNum(s)) return '?';
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function setText(sel, text) {
  const e = typeof sel === 'string' ? $(sel) : sel;
  if (e.textContent !== text) e.textContent = text;
}

function setError(sel, msg) {
  const e = $(sel);
  e.textContent = msg || '';
  e.hidden = !msg;
}

function linkFor(hash, name, size) {
  let l = `servent:?xt=urn:blake3:${hash}`;
  if (name) l += `&dn=${encodeURIComponent(name)}`;
  if (isNum(size)) l += `&xl=${size}`;
  return l;
}

// Copies text; where the clipboard API is refused, shows the text selected in
// a field inside `host` so that Ctrl+C copies it.
async function copyText(text, button, host) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch { /* fall back below */ }
  let field = host.querySelector('input.copy-field');
  if (!ok) {
    if (!field) {
      field = el('input', { class: 'copy-field', type: 'text', readonly: true,
        'aria-label': 'Selected text: press Ctrl+C to copy it' });
      host.append(field);
    }
    field.value = text;
    field.hidden = false;
    field.focus();
    field.select();
    try { ok = document.execCommand('copy'); } catch { ok = false; }
    if (ok) { button.focus(); field.hidden = true; }
  } else if (field) field.hidden = true;
  flash(button, ok ? 'Copied' : 'Press Ctrl+C');
}

function flash(button, text) {
  if (!button.flashTimer) button.dataset.label = button.textContent;
  button.textContent = text;
  clearTimeout(button.flashTimer);
  button.flashTimer = setTimeout(() => { button.flashTimer = null; button.textContent = button.dataset.label; }, 1600);
}

function setLabel(button, label) {
  button.dataset.label = label;
  if (!button.flashTimer) button.textContent = label;
}

// Calls onLine for each line of a streamed body (\n or \r\n separated).
async function readLines(body, onLine) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      onLine(line.endsWith('\r') ? line.slice(0, -1) : line);
    }
    if (buf.length > MAX_LINE) throw new Error('the daemon sent a line too long');
  }
  buf += decoder.decode();
  if (buf) onLine(buf);
}

// ---------------------------------------------------------------- notices

function notice(parts, sticky = false) {
  const n = $('#notice');
  $('.notice-text', n).replaceChildren(...[].concat(parts));
  $('.notice-close', n).hidden = sticky;
  n.dataset.sticky = sticky ? 'true' : 'false';
  n.hidden = false;
}
$('#notice .notice-close').addEventListener('click', () => { $('#notice').hidden = true; });

function conn(state, title) {
  const c = $('#conn');
  c.dataset.state = state;
  c.textContent = { live: 'live', connecting: 'connecting…', reconnecting: 'reconnecting…', offline: 'offline' }[state];
  c.title = title || 'Live updates from the daemon';
}

// ---------------------------------------------------------------- API and auth

class AuthError extends Error {}
let key = null;
let authFailed = false;

(function readKey() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get('key');
  if (fromUrl) {
    key = fromUrl;
    try { sessionStorage.setItem(KEY_ITEM, fromUrl); } catch { /* kept in memory only */ }
    params.delete('key');
    const q = params.toString();
    history.replaceState(null, '', location.pathname + (q ? `?${q}` : '') + location.hash);
  } else {
    try { key = sessionStorage.getItem(KEY_ITEM); } catch { key = null; }
  }
})();

function showAuth(rejected) {
  authFailed = true;
  conn('offline', 'Not authorised');
  notice([
    el('strong', { text: rejected ? 'The daemon refused this page’s key.' : 'This page has no key for the daemon.' }),
    ' Open the address that ', el('code', { text: 'leaf serve' }), ' printed when it started, the one ending in ',
    el('code', { text: '/?key=…' }), ' (for example ', el('code', { text: `${location.origin}/?key=…` }), ').',
  ], true);
}

async function api(method, path, body, signal) {
  if (!key || authFailed) { if (!authFailed) showAuth(false); throw new AuthError('no key'); }
  const opts = { method, headers: { 'X-Servent-Key': key }, cache: 'no-store', signal };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(`/api/v1/${path}`, opts);
  if (res.status === 401) { showAuth(true); throw new AuthError('unauthorised'); }
  return res;
}

async function httpError(res) {
  let msg = '';
  try { const j = await res.json(); if (j && typeof j.error === 'string') msg = j.error; } catch { /* not JSON */ }
  const e = new Error(msg || `the daemon answered ${res.status} ${res.statusText}`.trim());
  e.status = res.status;
  return e;
}

async function apiJson(method, path, body) {
  const res = await api(method, path, body);
  if (!res.ok) throw await httpError(res);
  if (res.status === 204) return null;
  return res.json();
}

const errText = (e) => (e instanceof TypeError ? 'Cannot reach the daemon: is leaf serve still running?' : str(e && e.message));

// ---------------------------------------------------------------- routing

let current = 'search';
function route() {
  const want = location.hash.slice(1);
  const before = current;
  current = PAGES.includes(want) ? want : 'search';
  if (before !== current) window.scrollTo(0, 0);
  for (const p of PAGES) {
    $(`#page-${p}`).hidden = p !== current;
    const a = $(`#nav-${p}`);
    if (p === current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  if (current === 'shares' && sharesStale) loadFiles();
}
function go(page) {
  if (location.hash === `#${page}`) route(); else location.hash = page;
}
window.addEventListener('hashchange', route);

// ---------------------------------------------------------------- search

const results = new Map(); // hash -> merged result
let searchCtl = null;
let maxSources = 1;

$('#search-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('#search-input').value.trim();
  setError('#search-error', '');
  if (!text) return;
  if (/^servent:/i.test(text)) addDownload(text, null);
  else if (HEX64.test(text)) addDownload(text.toLowerCase(), null);
  else search(text.split(/\s+/));
});

async function search(words) {
  if (searchCtl) searchCtl.abort();
  const ctl = (searchCtl = new AbortController());
  results.clear();
  maxSources = 1;
  $('#results').replaceChildren();
  setText('#search-status', 'Searching…');
  let failure = '';
  try {
    const res = await api('POST', 'search', { words, max: 200 }, ctl.signal);
    if (!res.ok) throw await httpError(res);
    await readLines(res.body, (line) => {
      if (ctl.signal.aborted || !line.trim()) return;
      let m;
      try { m = JSON.parse(line); } catch { return; }
      if (!m || typeof m !== 'object') return;
      if (m.event === 'hit') addHit(m);
      else if (m.event === 'error') failure = str(m.error) || 'the search failed';
    });
  } catch (e) {
    if (ctl.signal.aborted || e instanceof AuthError) return;
    failure = errText(e);
  }
  if (ctl !== searchCtl) return;
  searchCtl = null;
  setError('#search-error', failure);
  setText('#search-status', results.size ? `${plural(results.size, 'file')} found.`
    : failure ? '' : 'No files found. Try other words.');
}

function addHit(m) {
  if (typeof m.hash !== 'string' || !HEX64.test(m.hash)) return;
  const hash = m.hash.toLowerCase();
  let r = results.get(hash);
  if (!r) {
    r = { hash, sources: 0, size: null, link: null, names: new Map(), node: resultNode(hash) };
    results.set(hash, r);
    $('#results').append(r.node.root);
  }
  r.sources += num(m.sources);
  if (r.size == null && isNum(m.size)) r.size = m.size;
  if (!r.link && typeof m.link === 'string' && /^servent:/i.test(m.link)) r.link = m.link;
  const variants = Array.isArray(m.names) && m.names.length ? m.names : [{ name: m.name, size: m.size, sources: m.sources }];
  for (const v of variants) {
    if (!v || typeof v.name !== 'string') continue;
    const known = r.names.get(v.name);
    if (known) known.sources += num(v.sources);
    else r.names.set(v.name, { name: v.name, size: v.size, sources: num(v.sources) });
  }
  if (typeof m.name === 'string' && !r.names.has(m.name)) r.names.set(m.name, { name: m.name, size: m.size, sources: 0 });
  renderResult(r);
  if (r.sources > maxSources) {
    maxSources = r.sources;
    for (const x of results.values()) popularity(x);
  } else popularity(r);
}

function resultNode(hash) {
  const n = {};
  n.name = el('div', { class: 'name' });
  n.more = el('summary');
  n.variants = el('ul', { class: 'variants-list' });
  n.details = el('details', { class: 'variants', hidden: true }, n.more, n.variants);
  n.size = el('span', { class: 'size' });
  n.sources = el('span', { class: 'sources' });
  n.bar = el('span', { class: 'pop-bar' });
  n.pop = el('span', { class: 'pop', 'aria-hidden': 'true' }, n.bar);
  n.download = el('button', { type: 'button', class: 'download primary' }, 'Download');
  n.copy = el('button', { type: 'button', class: 'copy-link' }, 'Copy link');
  n.root = el('li', { class: 'result item', 'data-hash': hash },
    el('div', { class: 'main' }, n.name, n.details,
      el('div', { class: 'meta' }, n.pop, n.sources, n.size, el('code', { class: 'hash', title: hash, text: hash.slice(0, 12) }))),
    el('div', { class: 'actions' }, n.download, n.copy));
  n.download.addEventListener('click', () => {
    if (downloads.has(hash)) go('downloads'); else addDownload(hash, n.download);
  });
  n.copy.addEventListener('click', () => {
    const r = results.get(hash);
    copyText(r.link || linkFor(hash), n.copy, n.root);
  });
  syncResultButton(hash, n);
  return n;
}

function renderResult(r) {
  const n = r.node;
  const names = [...r.names.values()].sort((a, b) => b.sources - a.sources);
  const main = names.length ? names[0].name : r.hash;
  setText(n.name, main);
  n.name.title = main;
  setText(n.size, bytes(r.size));
  setText(n.sources, plural(r.sources, 'source'));
  n.sources.dataset.sources = String(r.sources);
  const others = names.slice(1);
  n.details.hidden = others.length === 0;
  setText(n.more, `+${plural(others.length, 'other name')}`);
  n.variants.replaceChildren(...others.map((v) =>
    el('li', {}, el('span', { class: 'name', text: v.name }),
      el('span', { class: 'muted', text: ` ${bytes(v.size)}, ${plural(v.sources, 'source')}` }))));
}

function popularity(r) {
  const pct = Math.max(4, Math.round((r.sources / maxSources) * 100));
  r.node.bar.style.width = `${pct}%`;
  r.node.pop.title = plural(r.sources, 'source');
}

function syncResultButton(hash, n = results.get(hash) && results.get(hash).node) {
  if (!n) return;
  const have = downloads.has(hash);
  setLabel(n.download, have ? 'In Downloads' : 'Download');
  n.download.title = have ? 'Already in Downloads: show it' : 'Download this file';
  n.download.classList.toggle('primary', !have);
}

// Adds a download of a hash or link. From a result's button (`button` set)
// it stays on the page; from the search box it switches to Downloads.
async function addDownload(target, button) {
  try {
    const d = await apiJson('POST', 'downloads', { target });
    upsertDownload(d);
    if (!button) { $('#search-input').value = ''; go('downloads'); }
  } catch (e) {
    if (e instanceof AuthError) return;
    if (button && e.status === 409) { flash(button, 'Already added'); return; }
    setError('#search-error', errText(e));
  }
}

// ---------------------------------------------------------------- downloads

const downloads = new Map(); // hash -> { d, node, seen }
const STATES = { queued: 'Queued', running: 'Downloading', paused: 'Paused', done: 'Done', failed: 'Failed', cancelled: 'Cancelled' };
const ACTIONS = ['pause', 'resume', 'cancel', 'remove', 'copy-link', 'copy-path'];
const FOLDER_TIP = 'A browser cannot open a folder: copy the path and open it in your file manager';

function downloadNode(hash) {
  const n = {};
  const button = (cls, label, title) => el('button', { type: 'button', class: cls, title }, label);
  n.name = el('span', { class: 'name' });
  n.state = el('span', { class: 'state' });
  n.progress = el('progress', { class: 'progress', max: 1, value: 0 });
  n.percent = el('span', { class: 'percent' });
  n.meta = el('div', { class: 'meta' });
  n.error = el('p', { class: 'error', hidden: true });
  n.pathLabel = el('span', { class: 'muted' });
  n.path = el('code', { class: 'path' });
  n.pathRow = el('div', { class: 'where', hidden: true }, n.pathLabel, n.path,
    button('copy-path', 'Copy path', FOLDER_TIP));
  n.pause = button('pause', 'Pause', 'Stop, keeping the verified parts');
  n.resume = button('resume', 'Resume', 'Queue it again');
  n.cancel = button('cancel', 'Cancel', 'Stop and delete the partial data');
  n.remove = button('remove', 'Remove');
  n.root = el('li', { class: 'download-item item', 'data-hash': hash, 'data-state': 'queued' },
    el('div', { class: 'head' }, n.name, n.state),
    el('div', { class: 'bar' }, n.progress, n.percent),
    n.meta, n.error, n.pathRow,
    el('div', { class: 'actions' }, n.pause, n.resume, n.cancel, n.remove, button('copy-link', 'Copy link')));
  return n;
}

function upsertDownload(d) {
  if (!d || typeof d.hash !== 'string' || !HEX64.test(d.hash)) return;
  const hash = d.hash.toLowerCase();
  let it = downloads.get(hash);
  if (!it) {
    it = { d, node: downloadNode(hash) };
    downloads.set(hash, it);
    const list = $('#downloads');
    const later = [...list.children].find((c) => num(downloads.get(c.dataset.hash).d.added_secs) > num(d.added_secs));
    list.insertBefore(it.node.root, later || null);
    syncResultButton(hash);
  }
  it.d = d;
  it.seen = performance.now();
  renderDownload(it);
  countDownloads();
}

function removeDownload(hash) {
  const it = downloads.get(hash);
  if (!it) return;
  const next = it.node.root.nextElementSibling || it.node.root.previousElementSibling;
  const hadFocus = it.node.root.contains(document.activeElement);
  it.node.root.remove();
  downloads.delete(hash);
  if (hadFocus) (next ? $('.remove', next) : $('#h-downloads')).focus();
  syncResultButton(hash);
  countDownloads();
}

function renderDownload(it) {
  const { d, node: n } = it;
  const state = typeof d.state === 'string' && /^[a-z_]{1,32}$/.test(d.state) ? d.state : 'queued';
  const name = str(d.name) || d.hash;
  n.root.dataset.state = state;
  setText(n.name, name);
  n.name.title = name;
  setText(n.state, STATES[state] || state);
  n.state.dataset.state = state;

  const size = isNum(d.size) && d.size >= 0 ? d.size : null;
  const verified = Math.max(0, num(d.verified));
  let pct = null;
  if (state === 'done') pct = 100;
  else if (size != null) pct = size > 0 ? Math.min(100, (verified / size) * 100) : 0;
  if (state === 'done' || (size != null && size > 0)) {
    n.progress.max = size || 1;
    n.progress.value = state === 'done' ? size || 1 : Math.min(verified, size);
  } else if (state === 'running') n.progress.removeAttribute('value'); // size unknown: indeterminate
  else { n.progress.max = 1; n.progress.value = 0; }
  n.progress.setAttribute('aria-label', `Progress of ${name}`);
  setText(n.percent, pct == null ? '? %' : `${Math.floor(pct)} %`);

  const parts = [size == null ? `${bytes(verified)} verified, size not known yet` : `${bytes(verified)} of ${bytes(size)}`];
  if (state === 'running') {
    parts.push(rate(num(d.rate)));
    if (isNum(d.eta_secs)) parts.push(`${duration(d.eta_secs)} left`);
  }
  if (state === 'running' || num(d.sources) > 0) parts.push(plural(num(d.sources), 'source'));
  const routes = d.routes && typeof d.routes === 'object' ? d.routes : {};
  const used = ['direct', 'reversed', 'punched', 'relayed'].filter((r) => num(routes[r]) > 0).map((r) => `${routes[r]} ${r}`);
  if (used.length) parts.push(used.join(', '));
  if (state === 'done' && isNum(d.finished_secs)) parts.push(`finished ${new Date(d.finished_secs * 1000).toLocaleString()}`);
  setText(n.meta, parts.join(' · '));

  setText(n.error, str(d.error));
  n.error.hidden = !d.error;
  n.pathRow.hidden = typeof d.path !== 'string' || !d.path;
  setText(n.pathLabel, state === 'done' ? 'Saved as ' : 'Saving as ');
  setText(n.path, str(d.path));
  n.path.title = `${str(d.path)}\n${FOLDER_TIP}`;

  n.pause.hidden = !(state === 'queued' || state === 'running');
  n.resume.hidden = !(state === 'paused' || state === 'failed' || state === 'cancelled');
  n.cancel.hidden = !(state === 'queued' || state === 'running' || state === 'paused' || state === 'failed');
  n.remove.title = state === 'done' ? 'Take it off the list; the file stays' : 'Take it off the list and delete its partial data';
}

function countDownloads() {
  let active = 0;
  for (const { d } of downloads.values()) if (d.state === 'running' || d.state === 'queued') active++;
  setText('#downloads-count', active ? String(active) : '');
  $('#downloads-empty').hidden = downloads.size > 0;
}

$('#downloads').addEventListener('click', async (ev) => {
  const button = ev.target.closest('button');
  const li = button && button.closest('.download-item');
  if (!li) return;
  const hash = li.dataset.hash;
  const it = downloads.get(hash);
  const act = ACTIONS.find((c) => button.classList.contains(c));
  if (!it || !act) return;
  if (act === 'copy-link') return copyText(str(it.d.link) || linkFor(hash, it.d.name, it.d.size), button, li);
  if (act === 'copy-path') return copyText(str(it.d.path), button, li);
  if (it.busy) return;
  it.busy = true;
  try {
    if (act === 'remove') {
      await apiJson('DELETE', `downloads/${hash}`);
      removeDownload(hash);
    } else upsertDownload(await apiJson('POST', `downloads/${hash}/${act}`));
  } catch (e) {
    if (e instanceof AuthError) return;
    if (e.status === 404) removeDownload(hash);
    else notice(`Could not ${act} “${str(it.d.name) || hash}”: ${errText(e)}`);
  } finally {
    it.busy = false;
  }
});

// After (re)connecting the event stream: drop what left the list meanwhile.
async function syncDownloads() {
  const start = performance.now();
  try {
    const { downloads: list } = await apiJson('GET', 'downloads');
    const listed = new Set();
    for (const d of Array.isArray(list) ? list : []) {
      if (d && typeof d.hash === 'string') listed.add(d.hash.toLowerCase());
      const it = d && typeof d.hash === 'string' && downloads.get(d.hash.toLowerCase());
      if (!it || it.seen < start) upsertDownload(d);
    }
    for (const [hash, it] of [...downloads]) if (!listed.has(hash) && it.seen < start) removeDownload(hash);
  } catch { /* the event stream brings them too */ }
}

// ---------------------------------------------------------------- shares

let sharesSig = '';
let sharesStale = true;
let filesShown = 0;
let filesTimer = null;

function renderShares(list) {
  const box = $('#shares');
  const old = new Map([...box.children].map((c) => [c.dataset.path, c]));
  const nodes = list.filter((s) => s && typeof s.path === 'string').map((s) => {
    let c = old.get(s.path);
    if (!c) {
      c = el('div', { class: 'share item', 'data-path': s.path },
        el('code', { class: 'path', text: s.path }), el('div', { class: 'meta' }),
        el('div', { class: 'bar' }, el('progress', { class: 'hashing', max: 1, value: 1 }), el('span', { class: 'hash-text' })));
      if (s.removable === true) {
        c.append(el('div', { class: 'actions' }, el('button', {
          type: 'button', class: 'remove-share', text: 'Stop sharing',
          title: 'Stop sharing this folder (its files stay on disk)',
        })));
      }
    }
    setText($('.meta', c), `${plural(num(s.files), 'file')} · ${bytes(num(s.bytes))}`);
    const h = s.hashing && typeof s.hashing === 'object' ? s.hashing : {};
    const busy = num(h.files_to_hash) > num(h.files_hashed);
    const p = $('.hashing', c);
    p.max = busy ? Math.max(1, num(h.bytes_to_hash)) : 1;
    p.value = busy ? Math.min(num(h.bytes_hashed), p.max) : 1;
    p.setAttribute('aria-label', `Hashing progress of ${s.path}`);
    setText($('.hash-text', c), busy
      ? `Hashing: ${num(h.files_hashed).toLocaleString()} of ${plural(num(h.files_to_hash), 'file')}, ${bytes(num(h.bytes_hashed))} of ${bytes(num(h.bytes_to_hash))}`
      : 'All files hashed');
    return c;
  });
  if (!nodes.length) nodes.push(el('p', { class: 'muted', text: 'No folder is shared.' }));
  if (nodes.length !== box.children.length || nodes.some((c, i) => box.children[i] !== c)) box.replaceChildren(...nodes);
  return list.map((s) => s && [s.path, s.files, s.bytes, s.hashing && s.hashing.files_hashed].join(':')).join('|');
}

function onShares(s) {
  const sig = renderShares(Array.isArray(s.shares) ? s.shares : []);
  if (sig === sharesSig) return;
  sharesSig = sig;
  sharesStale = true;
  if (current === 'shares' && !filesTimer) filesTimer = setTimeout(() => { filesTimer = null; loadFiles(); }, 1000);
}

async function loadFiles(more = false) {
  sharesStale = false;
  const offset = more ? filesShown : 0;
  const max = more ? 200 : Math.min(1000, Math.max(200, filesShown));
  let s;
  try {
    s = await apiJson('GET', `shares?offset=${offset}&max=${max}`);
  } catch (e) {
    if (!(e instanceof AuthError)) { sharesStale = true; notice(`Could not list the shared files: ${errText(e)}`); }
    return;
  }
  sharesSig = renderShares(Array.isArray(s.shares) ? s.shares : []);
  const ul = $('#shared-files');
  const old = new Map([...ul.children].map((c) => [c.dataset.hash, c]));
  const files = (Array.isArray(s.files) ? s.files : []).filter((f) => f && typeof f.hash === 'string' && HEX64.test(f.hash));
  const nodes = files.map((f) => {
    const hash = f.hash.toLowerCase();
    let li = old.get(hash);
    if (!li) {
      li = el('li', { class: 'shared-file item', 'data-hash': hash },
        el('div', { class: 'main' }, el('div', { class: 'name' }),
          el('div', { class: 'meta' }, el('span', { class: 'size' }), el('code', { class: 'hash', title: hash, text: hash.slice(0, 12) }))),
        el('div', { class: 'actions' }, el('button', { type: 'button', class: 'copy-link' }, 'Copy link')));
    }
    const name = str(f.name) || hash;
    setText($('.name', li), name);
    $('.name', li).title = name;
    setText($('.size', li), bytes(f.size));
    li.dataset.link = typeof f.link === 'string' ? f.link : linkFor(hash, f.name, f.size);
    return li;
  });
  const all = more ? [...ul.children, ...nodes.filter((n) => !n.isConnected)] : nodes;
  if (all.length !== ul.children.length || all.some((c, i) => ul.children[i] !== c)) ul.replaceChildren(...all);
  filesShown = all.length;
  $('#shared-more').hidden = !s.more;
  setText('#shared-count', filesShown ? `(${filesShown.toLocaleString()}${s.more ? '+' : ''})` : '');
}

$('#shared-files').addEventListener('click', (ev) => {
  const button = ev.target.closest('button.copy-link');
  const li = button && button.closest('.shared-file');
  if (li) copyText(li.dataset.link, button, li);
});
$('#shared-more').addEventListener('click', () => loadFiles(true));

$('#shares').addEventListener('click', async (ev) => {
  const button = ev.target.closest('button.remove-share');
  const share = button && button.closest('.share');
  if (!share) return;
  setError('#share-error', '');
  button.disabled = true;
  try {
    await apiJson('DELETE', `shares?path=${encodeURIComponent(share.dataset.path)}`);
    share.remove();
    loadFiles();
  } catch (e) {
    button.disabled = false;
    if (!(e instanceof AuthError)) setError('#share-error', errText(e));
  }
});

$('#share-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = $('#share-input');
  const path = input.value.trim();
  setError('#share-error', '');
  if (!path) return;
  try {
    await apiJson('POST', 'shares', { path });
    input.value = '';
    loadFiles();
  } catch (e) {
    if (e instanceof AuthError) return;
    setError('#share-error', [404, 405, 501].includes(e.status)
      ? 'Not available: adding folders is not supported by this daemon yet.' : errText(e));
  }
});

// ---------------------------------------------------------------- network

const samples = []; // { up, down } bytes a second, one a network event, last 60
let lastNet = null;
let supernodesSig = null;

function onNetwork(n) {
  const t = performance.now();
  const up = num(n.uploaded_bytes);
  const down = num(n.downloaded_bytes);
  if (lastNet) {
    // Events come every second; measure the gap only when some were missed,
    // so that a burst of late events does not draw spikes.
    const gap = (t - lastNet.t) / 1000;
    const dt = gap > 1.5 ? gap : 1;
    samples.push({ up: Math.max(0, (up - lastNet.up) / dt), down: Math.max(0, (down - lastNet.down) / dt) });
    if (samples.length > 60) samples.shift();
    drawGraph();
  }
  lastNet = { t, up, down };

  setText('#node-id', str(n.id) || '—');
  setText('#role', str(n.role) || '—');
  setText('#uptime', isNum(n.uptime_secs) ? duration(n.uptime_secs) : '—');
  setText('#listen', str(n.listen) || '—');
  const nat = n.nat && typeof n.nat === 'object' ? n.nat : null;
  const natParts = [];
  if (nat) {
    const mappings = {
      'none': 'no NAT', 'endpoint-independent': 'NAT, endpoint-independent mapping',
      'endpoint-dependent': 'NAT, endpoint-dependent mapping', 'unknown': 'NAT not known yet',
    };
    if (nat.mapping != null) natParts.push(mappings[str(nat.mapping)] || `${str(nat.mapping)} mapping`);
    const seen = Array.isArray(nat.reflexive) ? nat.reflexive.map(str).filter(Boolean) : [];
    natParts.push(seen.length ? `seen as ${seen.join(', ')}` : 'not seen from outside yet');
    const pm = nat.port_mapped;
    natParts.push(pm == null || pm === false ? 'no port mapped'
      : `port mapped${pm === true ? '' : `: ${typeof pm === 'object' ? JSON.stringify(pm) : str(pm)}`}`);
  }
  setText('#nat', natParts.length ? natParts.join(' · ') : 'unknown');
  setText('#transfers', `${plural(num(n.uploads_active), 'upload')} and ${plural(num(n.downloads_active), 'download')} running · ` +
    `${bytes(up)} sent, ${bytes(down)} received since start`);

  const sn = Array.isArray(n.supernodes) ? n.supernodes.filter((s) => s && typeof s === 'object') : [];
  const sig = JSON.stringify(sn.map((s) => [s.id, s.addr]));
  if (sig !== supernodesSig) {
    supernodesSig = sig;
    $('#supernodes').replaceChildren(...sn.map((s) => el('li', { class: 'supernode', 'data-id': str(s.id) },
      el('code', { class: 'addr', text: str(s.addr) }), el('code', { class: 'id', text: str(s.id) }))));
    $('#supernodes-empty').hidden = sn.length > 0;
  }
}

function drawGraph() {
  const W = 600, H = 120, step = W / 59;
  const max = Math.max(1024, ...samples.map((s) => Math.max(s.up, s.down)));
  const points = (k) => {
    const pts = samples.map((s, i) => `${(W - (samples.length - 1 - i) * step).toFixed(1)},${(H - 3 - (s[k] / max) * (H - 10)).toFixed(1)}`);
    if (pts.length === 1) pts.unshift(`${(W - step).toFixed(1)},${pts[0].split(',')[1]}`);
    return pts.join(' ');
  };
  const svg = $('#rate-graph');
  $('polyline.up', svg).setAttribute('points', points('up'));
  $('polyline.down', svg).setAttribute('points', points('down'));
  const last = samples[samples.length - 1];
  setText('#rate-up', rate(last.up));
  setText('#rate-down', rate(last.down));
  setText('#rate-max', rate(max));
}

// ---------------------------------------------------------------- events

let backoff = 1000;

function dispatch(type, text) {
  let d;
  try { d = JSON.parse(text); } catch { return; }
  if (!d || typeof d !== 'object') return;
  if (type === 'download') upsertDownload(d);
  else if (type === 'removed' && typeof d.hash === 'string') removeDownload(d.hash.toLowerCase());
  else if (type === 'network') onNetwork(d);
  else if (type === 'shares') onShares(d);
}

async function events() {
  if (authFailed) return;
  let opened = false;
  let why = '';
  try {
    const res = await api('GET', 'events');
    if (!res.ok) throw await httpError(res);
    opened = true;
    conn('live');
    lastNet = null;
    if (!$('#notice').hidden && $('#notice').dataset.sticky === 'true') $('#notice').hidden = true;
    syncDownloads();
    let type = '';
    let data = [];
    await readLines(res.body, (line) => {
      if (line === '') {
        if (data.length) dispatch(type || 'message', data.join('\n'));
        type = '';
        data = [];
        return;
      }
      if (line[0] === ':') return; // comment / keep-alive
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    });
  } catch (e) {
    if (e instanceof AuthError) return;
    why = errText(e);
  }
  if (opened) backoff = 1000;
  conn(opened ? 'reconnecting' : 'offline', why || 'The event stream ended; reconnecting');
  if (!opened && why) notice(`No live updates: ${why} Retrying in ${backoff / 1000} s.`, true);
  setTimeout(events, backoff);
  backoff = Math.min(backoff * 2, 10000);
}

// ---------------------------------------------------------------- start

route();
countDownloads();
if (!key) showAuth(false);
else events();
if (current === 'search') $('#search-input').focus();
