// The annotation page. It asks GET api/next for an item, builds the answer from clicks or keys,
// POSTs it to api/label, and shows the next item only once the server has acknowledged (committed)
// the answer. Everything that comes from the server is inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const NAME_KEY = "ppo-rlhf-annotate-name";

let annotator = null;  // the annotator's name
let item = null;       // the item shown: the answer of api/next
let sel = null;        // the answer being built, in shown indices (0-based)
let tieNext = false;   // rank mode: the next response joins the last group ("=")
let busy = false;      // a request is in flight: input is ignored
let last = null;       // {item_id, skipped} of this annotator's latest answer: it can be undone

function show(section) {
  for (const id of ["login", "item", "done"]) $(id).hidden = id !== section;
}

function setError(message) {
  $("error").textContent = message || "";
}

async function api(path, body) {
  const init = {method: body === undefined ? "GET" : "POST", cache: "no-store",
                credentials: "same-origin", headers: {Accept: "application/json"}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + "); try again");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((data && data.error) || ("HTTP " + response.status));
  return data;
}

function setProgress(p) {
  $("progress").textContent = p.done + " / " + p.total + " done";
  $("bar").max = Math.max(p.total, 1);
  $("bar").value = p.done;
  $("bar").hidden = false;
}

// ---- the flow ------------------------------------------------------------------------------
async function start(name) {
  annotator = name;
  $("who").textContent = name;
  $("change-name").hidden = false;
  if (await loadNext()) localStorage.setItem(NAME_KEY, name);
}

async function loadNext() {
  busy = true;
  try {
    const data = await api("api/next?annotator=" + encodeURIComponent(annotator));
    setError("");
    setProgress(data.progress);
    if (data.done) {
      item = null;
      const skipped = data.progress.skipped ? " and skipped " + data.progress.skipped : "";
      $("done-text").textContent = "All done, " + annotator + ": you have answered " +
        data.progress.done + " item(s)" + skipped + ". Thank you! (Reload later to check for more.)";
      show("done");
    } else {
      item = data;
      resetAnswer();
      renderItem();
      show("item");
    }
    return true;
  } catch (e) {
    setError(e.message);
    if (!item) logout(false);
    return false;
  } finally {
    busy = false;
  }
}

function logout(forget) {
  if (forget) localStorage.removeItem(NAME_KEY);
  annotator = null;
  item = null;
  setLast(null);
  $("who").textContent = "";
  $("progress").textContent = "";
  $("bar").hidden = true;
  $("change-name").hidden = true;
  show("login");
  $("name").focus();
}

async function post(answer) {
  if (busy || !item) return;
  busy = true;
  const answered = {item_id: item.item_id, skipped: answer.skip === true};
  try {
    await api("api/label", Object.assign({item_id: item.item_id, annotator: annotator}, answer));
  } catch (e) {
    await afterFailure(e.message, answered);
    busy = false;
    return;
  }
  setLast(answered);
  await loadNext();  // only now, with the answer committed, comes the next item
}

// The latest answer or skip can be taken back while it is still this annotator's latest: the
// server deletes it and hands the item out to them again, next.
function setLast(value) {
  last = value;
  $("undo-bar").hidden = last === null;
  if (last !== null) {
    $("undo-text").textContent = last.skipped ? "Item skipped." : "Answer saved.";
  }
}

async function undoLast() {
  if (busy || last === null || !annotator) return;
  busy = true;
  const target = last;
  setLast(null);
  try {
    await api("api/undo", {item_id: target.item_id, annotator: annotator});
  } catch (e) {
    setError("Cannot undo: " + e.message);
    busy = false;
    return;
  }
  await loadNext();  // the undone item, reserved for this annotator again
}

// A failed answer may still have been stored: the server committed it and then died before its
// reply (or the reply was lost). If the server now hands out another item, this one is done;
// otherwise the answer stays on screen, to be sent again.
async function afterFailure(message, answered) {
  let data = null;
  try {
    data = await api("api/next?annotator=" + encodeURIComponent(annotator));
  } catch (e) { /* still unreachable */ }
  if (data && (data.done || data.item_id !== item.item_id)) {
    setLast(answered);
    await loadNext();
    setError("Your answer to the previous item had already been saved.");
  } else {
    setError(message);
  }
}

function submit() {
  if (!item) return;
  const k = item.k;
  if (item.mode === "choose") {
    if (sel === null) return setError("Choose the better response first (1 or 2, or t for a tie).");
    return post({choice: sel});
  }
  if (item.mode === "rank") {
    if (placed().length !== k) return setError("Rank all " + k + " responses first.");
    return post({ranking: sel.map((tier) => (tier.length === 1 ? tier[0] : tier))});
  }
  if (sel.includes(null)) return setError("Rate every response first.");
  return post({ratings: sel});
}

// ---- the answer being built ----------------------------------------------------------------
function resetAnswer() {
  sel = item.mode === "choose" ? null : item.mode === "rank" ? [] : new Array(item.k).fill(null);
  tieNext = false;
  setError("");
}

function placed() {
  return item.mode === "rank" ? sel.flat() : [];
}

function pick(j) {  // a response was clicked, or its number typed
  if (j < 0 || j >= item.k) return;
  if (item.mode === "choose") {
    sel = j;
  } else if (item.mode === "rank" && !placed().includes(j)) {
    if (tieNext && sel.length) sel[sel.length - 1].push(j);
    else sel.push([j]);
    tieNext = false;
  }
  renderAnswer();
}

function rate(j, value) {
  sel[j] = value;
  renderAnswer();
}

function tieAll() {
  if (item.mode === "choose") sel = "tie";
  else if (item.mode === "rank") sel = [Array.from({length: item.k}, (_, i) => i)];
  renderAnswer();
}

function undo() {
  if (item.mode === "choose") sel = null;
  else if (item.mode === "rank") {
    if (sel.length) {
      sel[sel.length - 1].pop();
      if (!sel[sel.length - 1].length) sel.pop();
    }
    tieNext = false;
  } else {
    const last = sel.map((v) => v !== null).lastIndexOf(true);
    if (last >= 0) sel[last] = null;
  }
  renderAnswer();
}

function digit(d) {
  if (item.mode === "rate") {
    const next = sel.indexOf(null);
    if (item.scale <= 9 && d >= 1 && d <= item.scale && next >= 0) rate(next, d);
  } else if (item.k <= 9) {
    pick(d - 1);
  }
}

// ---- rendering (text only) -----------------------------------------------------------------
const INSTRUCTIONS = {
  choose: "Pick the better response: press 1 or 2 (or click it), t if they are equally good; " +
          "then Enter.",
  rank: "Rank the responses from best to worst: press their numbers in that order (or click " +
        "them); = before a number ties it with the one before; t ties all; then Enter.",
  rate: "Rate each response from 1 (worst) to SCALE (best): click a number, or type one digit " +
        "per response in the order shown; then Enter.",
};

const TITLES = {choose: "Which response is better?", rank: "Rank the responses",
                rate: "Rate the responses"};

function renderItem() {
  $("title").textContent = TITLES[item.mode];
  $("prompt").textContent = item.prompt;
  $("instructions").textContent = INSTRUCTIONS[item.mode].replace("SCALE", String(item.scale));
  $("tie").hidden = item.mode === "rate";
  const list = $("responses");
  list.replaceChildren();
  item.responses.forEach((text, j) => {
    const li = document.createElement("li");
    li.dataset.index = String(j);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = String(j + 1);
    const place = document.createElement("span");
    place.className = "place";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text === "" ? "(empty response)" : text;
    li.append(num, place, body);
    if (item.mode === "rate") {
      const row = document.createElement("div");
      row.className = "ratings";
      for (let v = 1; v <= item.scale; v++) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = String(v);
        b.dataset.value = String(v);
        b.addEventListener("click", (e) => { e.currentTarget.blur(); rate(j, v); });
        row.append(b);
      }
      li.append(row);
    } else {
      li.addEventListener("click", () => pick(j));
    }
    list.append(li);
  });
  renderHelp();
  renderAnswer();
}

function renderAnswer() {
  const items = Array.from($("responses").children);
  let summary;
  if (item.mode === "choose") {
    items.forEach((li, j) => {
      li.classList.toggle("selected", sel === j);
      li.classList.toggle("tied", sel === "tie");
      li.querySelector(".place").textContent = sel === j ? "better" : "";
    });
    summary = sel === null ? "" : sel === "tie" ? "Your answer: a tie" :
      "Your answer: response " + (sel + 1) + " is better";
  } else if (item.mode === "rank") {
    const where = {};
    sel.forEach((tier, t) => tier.forEach((j) => { where[j] = t; }));
    items.forEach((li, j) => {
      const t = where[j];
      li.classList.toggle("selected", t !== undefined);
      li.classList.toggle("tied", t !== undefined && sel[t].length > 1);
      li.querySelector(".place").textContent = t === undefined ? "" :
        (sel[t].length > 1 ? "= " : "") + "place " + (t + 1);
    });
    summary = sel.length === 0 ? "" : "Your ranking: " +
      sel.map((tier) => tier.map((j) => j + 1).join(" = ")).join(" > ") + (tieNext ? " = ..." : "");
  } else {
    items.forEach((li, j) => {
      li.classList.toggle("selected", sel[j] !== null);
      li.querySelectorAll(".ratings button").forEach((b) => {
        b.classList.toggle("on", Number(b.dataset.value) === sel[j]);
      });
      li.querySelector(".place").textContent = sel[j] === null ? "" : "rated " + sel[j];
    });
    summary = sel.every((v) => v === null) ? "" :
      "Your ratings: " + sel.map((v) => (v === null ? "-" : String(v))).join(", ");
  }
  $("answer").textContent = summary;
}

function renderHelp() {
  const lines = {
    choose: ["1 / 2: choose that response", "t: a tie"],
    rank: ["1..K: the next-best response", "=: tie the next response with the one before",
           "t: all tied"],
    rate: ["1..SCALE: rate the next unrated response"],
  }[item.mode].concat(["Enter: submit", "Backspace: undo the last step", "Escape: start over",
                       "s: skip this item (u right after brings it back)",
                       "u: undo your last answer or skip", "?: show or hide this help"]);
  $("help-list").replaceChildren(...lines.map((line) => {
    const li = document.createElement("li");
    li.textContent = line.replace("SCALE", String(item.scale)).replace("K", String(item.k));
    return li;
  }));
}

// ---- input ---------------------------------------------------------------------------------
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || busy) return;
  if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement) return;
  if (e.key === "u" && last !== null && annotator) {  // on the item page and the done page
    e.preventDefault();
    undoLast();
    return;
  }
  if (!item || $("item").hidden) return;
  const key = e.key;
  if (key === "Enter") submit();
  else if (key === "s") post({skip: true});
  else if (key === "Backspace") undo();
  else if (key === "Escape") { resetAnswer(); renderAnswer(); }
  else if (key === "t" && item.mode !== "rate") tieAll();
  else if (key === "=" && item.mode === "rank") { tieNext = sel.length > 0; renderAnswer(); }
  else if (key === "?") $("help").open = !$("help").open;
  else if (/^[1-9]$/.test(key)) digit(Number(key));
  else return;
  e.preventDefault();  // also stops Enter from clicking a focused button
});

function onClick(id, action) {
  $(id).addEventListener("click", (e) => { e.currentTarget.blur(); if (item && !busy) action(); });
}
onClick("submit", submit);
onClick("tie", tieAll);
onClick("clear", () => { resetAnswer(); renderAnswer(); });
onClick("skip", () => post({skip: true}));
$("change-name").addEventListener("click", () => logout(true));
$("undo").addEventListener("click", (e) => { e.currentTarget.blur(); undoLast(); });

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  if (name) start(name);
});

// The token (if any) came in the address; the server set it as a cookie, so drop it from view.
if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", location.pathname);
}
const saved = localStorage.getItem(NAME_KEY);
if (saved) {
  $("name").value = saved;
  start(saved);
} else {
  logout(false);
}
