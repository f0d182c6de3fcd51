// Menny's chat page: server.py's OpenAI-compatible API, in the browser. No build step: an ES module
// with two vendored libraries (vendor/MANIFEST.json). Everything the model or a file says is untrusted:
// it reaches the page as text (textContent), or as Markdown through render(), which keeps no HTML.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const $ = (id) => document.getElementById(id);
const STORE = "menny.conversations"; // the conversation list, in localStorage
const SETTINGS = "menny.settings";
const KEY = "menny.key"; // sessionStorage, or localStorage when "remember" is ticked
const SAMPLING = ["temperature", "top_p", "min_p", "max_tokens", "seed"];

let props = null; // GET /v1/props: model, max_context, persona, layers, experts, defaults
let conversations = load(STORE, []);
let current = null; // the conversation shown
let controller = null; // the request streaming now (Stop aborts it)

// --------------------------------------------------------------------------- Markdown, safely

const SAFE_URL = /^(?:https?:|mailto:)/i;
const escapeHtml = (s) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const link = (href, inner) =>
  SAFE_URL.test(href.trim()) ? `<a href="${escapeHtml(href.trim())}">${inner}</a>` : inner;

// First layer: Marked never emits raw HTML (shown as text), images (links instead) or other schemes.
const markdown = new Marked({
  gfm: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => link(href, escapeHtml(text || href)),
    link({ href, tokens }) {
      return link(href, this.parser.parseInline(tokens));
    },
  },
});

// Second layer: whatever got through, DOMPurify keeps only inert markup and http(s)/mailto links.
const PURIFY = {
  ALLOWED_URI_REGEXP: SAFE_URL,
  FORBID_TAGS: ["img", "style", "iframe", "svg", "math", "form", "input", "button", "video", "audio", "picture"],
  FORBID_ATTR: ["style", "srcset"],
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("rel", "noopener noreferrer");
    node.setAttribute("target", "_blank");
  }
});

function render(text) {
  return DOMPurify.sanitize(markdown.parse(text), PURIFY);
}

// --------------------------------------------------------------------------- storage

function load(name, fallback, storage = localStorage) {
  try {
    return JSON.parse(storage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
  } catch (e) {
    status(`cannot keep the conversations in this browser (${e.message}): export them`);
  }
}

const getKey = () => sessionStorage.getItem(KEY) ?? localStorage.getItem(KEY);

function setKey(key, remember) {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

// --------------------------------------------------------------------------- the API

// fetch() on the server's own origin, with the key when one is kept (in a header, never the URL);
// a 401 asks for the key and tries again.
async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.body ? { "Content-Type": "application/json" } : {}) };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askKey(key ? "The server refused that key. Try another." : "This server needs an API key.");
  }
}

function askKey(why) {
  const dialog = $("key-dialog");
  $("key-why").textContent = why;
  $("key").value = "";
  dialog.showModal();
  return new Promise((resolve, reject) => {
    const done = (ok) => {
      $("key-form").onsubmit = $("key-cancel").onclick = dialog.oncancel = null;
      dialog.close();
      if (!ok) return reject(new Error("no API key given"));
      setKey($("key").value.trim(), $("remember").checked);
      resolve();
    };
    $("key-form").onsubmit = (e) => {
      e.preventDefault(); // the key stays in the page: nothing is submitted anywhere
      done(true);
    };
    $("key-cancel").onclick = dialog.oncancel = () => done(false);
  });
}

async function errorOf(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Server-sent events -> their JSON objects, until [DONE].
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

// --------------------------------------------------------------------------- conversations

function newConversation(system) {
  const c = { id: crypto.randomUUID(), title: "New chat", system, messages: [], updated: Date.now() };
  conversations.unshift(c);
  return c;
}

function open(c) {
  current = c;
  $("persona").value = c.system;
  $("no-persona").checked = !c.system;
  showPersona();
  showAll();
}

function showPersona() {
  $("persona-summary").textContent = current.system || "none (plain Mixtral-Instruct)";
  $("persona").disabled = $("no-persona").checked;
}

function touch(c) {
  const first = c.messages.find((m) => m.role === "user");
  if (first) c.title = first.content.slice(0, 60);
  c.updated = Date.now();
  save();
}

function showList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.textContent = c.title;
    button.className = c === current ? "current" : "";
    button.onclick = () => open(c);
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.className = "small";
    remove.title = "Delete this conversation from the browser";
    remove.onclick = () => {
      conversations = conversations.filter((x) => x !== c);
      save();
      open(c === current ? conversations[0] ?? newConversation(defaultPersona()) : current);
    };
    li.append(button, remove);
    ul.append(li);
  }
}

const defaultPersona = () => props?.persona ?? "Your name is Menny, a cynical teenager AI assistant.";

// --------------------------------------------------------------------------- messages

function showAll() {
  const box = $("messages");
  box.replaceChildren(...current.messages.map(messageView));
  showList();
  showExperts();
  box.scrollTop = box.scrollHeight;
}

function messageView(m) {
  const div = document.createElement("div");
  div.className = `message ${m.role}`;
  const body = document.createElement("div");
  body.className = "body";
  const raw = document.createElement("pre");
  raw.className = "raw";
  raw.hidden = true;
  const toggle = document.createElement("button");
  toggle.className = "small toggle";
  toggle.textContent = "raw";
  toggle.title = "Show the plain text";
  toggle.onclick = () => {
    raw.hidden = !raw.hidden;
    body.hidden = !raw.hidden;
    toggle.textContent = raw.hidden ? "raw" : "formatted";
  };
  const stats = document.createElement("div");
  stats.className = "stats";
  div.append(toggle, body, raw, stats);
  div.update = () => {
    if (m.role === "user") body.textContent = m.content;
    else body.innerHTML = render(m.content);
    raw.textContent = m.content;
    stats.replaceChildren(...(m.role === "assistant" ? statsView(m) : []));
  };
  div.update();
  return div;
}

function statsView(m) {
  const s = m.stats;
  if (!s) return [];
  const parts = [];
  const span = (text, title) => {
    const e = document.createElement("span");
    e.textContent = text;
    if (title) e.title = title;
    parts.push(e);
  };
  if (s.tps != null) span(`${s.final ? "" : "≈"}${s.tps.toFixed(1)} tokens/s`, s.final ? "measured by the server" : "so far");
  if (s.ttft != null) span(`first token ${s.ttft.toFixed(2)} s`, "from Send to the first word on the page");
  if (s.prompt != null) span(`prompt ${s.prompt}: ${s.reused} reused, ${s.prompt - s.reused} prefilled`);
  if (s.tokens != null) span(`${s.tokens} tokens`);
  if (s.context != null && props) {
    const meter = document.createElement("meter");
    meter.max = props.max_context;
    meter.value = s.context;
    meter.high = 0.8 * props.max_context;
    meter.title = `context: ${s.context} of ${props.max_context} tokens`;
    span(`context ${s.context}/${props.max_context}`);
    parts.push(meter);
  }
  if (m.finish && m.finish !== "stop") span(m.finish === "length" ? "(cut off at max_tokens)" : `(${m.finish})`);
  return parts;
}

function status(text) {
  $("status").textContent = text;
}

// --------------------------------------------------------------------------- sending

function sampling() {
  const s = load(SETTINGS, {});
  const out = {};
  for (const name of SAMPLING) {
    const value = s[name] ?? props?.defaults?.[name];
    if (value !== undefined && value !== null && value !== "") out[name] = Number(value);
  }
  return out;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  current.messages.push({ role: "user", content: text });
  touch(current);
  await reply(text);
}

// Stream the assistant's reply to the conversation as it stands (its last message is the user's).
async function reply(restore) {
  const c = current;
  const m = { role: "assistant", content: "", stats: {} };
  const body = {
    messages: [...(c.system ? [{ role: "system", content: c.system }] : []), ...c.messages.map(({ role, content }) => ({ role, content }))],
    stream: true,
    stream_options: { include_usage: true },
    experts: true,
    ...sampling(),
  };
  c.messages.push(m);
  showAll();
  const view = $("messages").lastElementChild;
  controller = new AbortController();
  busy(true);
  const sent = performance.now();
  let first = null, pieces = 0, painting = false;
  const paint = () => {
    if (painting) return;
    painting = true;
    requestAnimationFrame(() => {
      painting = false;
      if (first !== null && !m.stats.final) m.stats.tps = pieces / Math.max((performance.now() - first) / 1000, 1e-3);
      view.update();
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  };
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorOf(response));
    for await (const event of events(response.body)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        if (first === null) {
          // Timed as it arrives: a frame may never come for a reply that ends first (a hidden page).
          first = performance.now();
          m.stats.ttft = (first - sent) / 1000;
        }
        m.content += choice.delta.content;
        pieces += 1;
        paint();
      }
      if (choice?.finish_reason) m.finish = choice.finish_reason;
      if (event.experts) {
        m.experts = event.experts;
        m.tokens = event.experts.ids.reply; // exported with the text: chat.py --resume continues exactly
      }
      if (event.usage) {
        const u = event.usage;
        Object.assign(m.stats, {
          final: true,
          tps: u.timings?.reply_per_second,
          prompt: u.prompt_tokens,
          reused: u.prompt_tokens_details?.cached_tokens ?? 0,
          tokens: u.completion_tokens,
          context: u.total_tokens,
        });
      }
    }
    status("");
  } catch (e) {
    m.finish = "stopped";
    if (e.name !== "AbortError") status(`error: ${e.message}`);
    else status("stopped");
    if (!m.content) {
      // Nothing said: the message goes back to the input, as if unsent (chat.py does the same).
      c.messages.splice(-2, 2);
      if (restore !== undefined) $("input").value = restore;
    }
  } finally {
    controller = null;
    busy(false);
    touch(c);
    if (c === current) showAll();
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("regen").disabled = $("edit").disabled = on;
}

function regenerate() {
  const last = current.messages.at(-1);
  if (controller || last?.role !== "assistant") return status("nothing to regenerate yet");
  current.messages.pop();
  reply();
}

function editLast() {
  if (controller || current.messages.length < 2) return status("nothing to edit yet");
  const [user] = current.messages.splice(-2, 2);
  $("input").value = user.content;
  $("input").focus();
  touch(current);
  showAll();
}

// --------------------------------------------------------------------------- the expert map

function showExperts() {
  const box = $("expert-map");
  const last = current.messages.findLast((m) => m.role === "assistant" && m.experts);
  if (!last) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No reply yet.";
    return box.replaceChildren(p);
  }
  const r = last.experts;
  box.replaceChildren(
    expertGrid("prompt", `Your message (${r.ids.prompt.length} tokens)`, r),
    expertGrid("reply", `The reply (${r.ids.reply.length} tokens)`, r),
  );
}

// Layers x experts: each cell's shade is the share of the part's tokens routed to that expert; the
// numbers view beside it gives the counts, as chat.py's /experts FILE writes them.
function expertGrid(part, title, report) {
  const tokens = Math.max(report.ids[part].length, 1);
  const figure = document.createElement("figure");
  figure.className = "experts";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const grid = document.createElement("div");
  grid.className = "heat";
  const table = document.createElement("table");
  table.id = `numbers-${part}`;
  const head = table.createTHead().insertRow();
  head.append(th("layer"), ...report.layers[0][part].map((_, e) => th(`${e + 1}`)));
  const rows = table.createTBody();
  report.layers.forEach((layer, i) => {
    const row = rows.insertRow();
    row.append(th(`${i}`));
    layer[part].forEach((count, e) => {
      row.insertCell().textContent = count;
      const cell = document.createElement("div");
      cell.style.setProperty("--share", count / tokens); // CSSOM, which the CSP allows (no style attribute)
      cell.title = `layer ${i}, expert ${e + 1}: ${count} of ${report.ids[part].length} tokens`;
      grid.append(cell);
    });
  });
  grid.style.setProperty("--experts", report.layers[0][part].length);
  const both = document.createElement("div");
  both.className = "row top";
  both.append(grid, table);
  figure.append(caption, both);
  return figure;
}

function th(text) {
  const e = document.createElement("th");
  e.textContent = text;
  return e;
}

// --------------------------------------------------------------------------- transcripts (chat.py's format)

function exportConversation() {
  const s = sampling();
  const transcript = {
    messages: [...(current.system ? [{ role: "system", content: current.system }] : []), ...current.messages.map(({ role, content, tokens }) => ({ role, content, ...(tokens ? { tokens } : {}) }))],
    settings: { temp: s.temperature, top_p: s.top_p, min_p: s.min_p, max_tokens: s.max_tokens },
    seed: s.seed ?? null,
  };
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(transcript, null, 1)], { type: "application/json" }));
  a.download = `${current.title.replace(/[^A-Za-z0-9_-]+/g, "-").slice(0, 40) || "chat"}.json`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// A transcript (chat.py's /save, Export, a saved session) -> a new conversation in the list.
function importTranscript(data, title) {
  const all = data?.messages;
  if (!Array.isArray(all)) throw new Error("not a chat transcript: it has no 'messages' list");
  const system = all[0]?.role === "system" ? String(all[0].content ?? "") : "";
  const messages = all.slice(all[0]?.role === "system" ? 1 : 0).map((m, i) => {
    const role = ["user", "assistant"][i % 2];
    if (m?.role !== role || typeof m.content !== "string") throw new Error(`message ${i}: expected role '${role}' with text content`);
    const tokens = Array.isArray(m.tokens) && m.tokens.every(Number.isInteger) ? m.tokens : undefined;
    return { role, content: m.content, ...(tokens ? { tokens } : {}) };
  });
  const c = newConversation(system);
  if (messages.at(-1)?.role === "user") $("input").value = messages.pop().content; // a question without its answer
  c.messages = messages;
  touch(c);
  if (title) c.title = title;
  save();
  open(c);
}

async function importFile(file) {
  try {
    importTranscript(JSON.parse(await file.text()));
    status(`opened ${file.name}`);
  } catch (e) {
    status(`error: ${file.name}: ${e.message}`);
  }
}

async function showSessions() {
  const ul = $("sessions");
  try {
    const response = await api("/v1/sessions");
    if (!response.ok) throw new Error(await errorOf(response));
    const { data } = await response.json();
    ul.replaceChildren(
      ...data.map((s) => {
        const li = document.createElement("li");
        const button = document.createElement("button");
        button.textContent = `${s.name} (${s.turns ?? "?"} turns)`;
        button.title = `last used ${new Date(s.last_used * 1000).toLocaleString()}; opens a copy in the browser`;
        button.onclick = () => openSession(s.name);
        li.append(button);
        return li;
      }),
    );
    if (!data.length) ul.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "none yet" }));
  } catch (e) {
    ul.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: `cannot list: ${e.message}` }));
  }
}

async function openSession(name) {
  try {
    const response = await api(`/v1/sessions/${encodeURIComponent(name)}`);
    if (!response.ok) throw new Error(await errorOf(response));
    importTranscript(await response.json(), `session ${name}`);
  } catch (e) {
    status(`error: session ${name}: ${e.message}`);
  }
}

// --------------------------------------------------------------------------- settings and start

function showSettings() {
  const s = load(SETTINGS, {});
  for (const name of SAMPLING) $(name).value = s[name] ?? props?.defaults?.[name] ?? "";
}

function keepSetting(e) {
  const s = load(SETTINGS, {});
  s[e.target.id] = e.target.value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

async function start() {
  current = conversations[0] ?? newConversation(defaultPersona());
  open(current); // history is readable before, and without, the server
  try {
    const response = await api("/v1/props");
    if (!response.ok) throw new Error(await errorOf(response));
    props = await response.json();
    $("model").textContent = `${props.model} · ${props.layers} layers × ${props.experts} experts · context ${props.max_context}`;
    if (!current.messages.length && !conversations.some((c) => c.messages.length)) current.system = props.persona;
    open(current);
    showSettings();
    showSessions();
  } catch (e) {
    status(`error: cannot reach the server (${e.message}); the conversations kept here stay readable`);
  }
}

$("send").onclick = send;
$("stop").onclick = () => controller?.abort();
$("regen").onclick = regenerate;
$("edit").onclick = editLast;
$("input").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
};
$("new-chat").onclick = () => open(newConversation(current.system));
$("no-persona").onchange = () => ($("persona").disabled = $("no-persona").checked);
$("apply-persona").onclick = () => {
  const system = $("no-persona").checked ? "" : $("persona").value;
  if (current.messages.length) open(newConversation(system));
  else {
    current.system = system;
    save();
    open(current);
  }
};
$("export").onclick = exportConversation;
$("import").onchange = (e) => e.target.files[0] && importFile(e.target.files[0]).then(() => (e.target.value = ""));
$("refresh-sessions").onclick = showSessions;
for (const name of SAMPLING) $(name).onchange = keepSetting;
$("reset-settings").onclick = () => {
  localStorage.removeItem(SETTINGS);
  showSettings();
};
start();
