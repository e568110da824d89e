// A study's observer page: one picture and one label at a time, "Correct" or "Incorrect".
// The link's token is the only credential; every answer is stored by the server as it is given,
// so closing the page and opening the link again continues where it stopped.
"use strict";

const $ = (sel) => document.querySelector(sel);
const token = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
let current = null;
// When the current puzzle's picture was displayed (its `load`), for the answer's `elapsed_ms`.
let shownAt = null;
// The answer button last used, focused again once the next picture is answerable (so the
// focus never drops to the page, where Tab then Enter would answer with the other button).
let lastUsed = null;
// The longest answer time sent (the server's bound): a page left open is no answer time.
const MAX_ELAPSED_MS = 3600000;
// Whether the observer opened the current puzzle's reference pictures (sent with the answer).
// They are hidden, and not even fetched, until "Show reference pictures" is pressed.
let referencesOpened = false;

function setAnswerable(on) {
  for (const b of document.querySelectorAll(".answers button")) b.disabled = !on;
  document.body.dataset.answerable = String(on);
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}

async function call(path, options = {}) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.error) text = `${res.status} ${body.error.code}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    showError(text);
    throw new Error(text);
  }
  return res.json();
}

function show(session) {
  $("#study-name").textContent = session.study;
  $("#observer-name").textContent = session.observer;
  const p = $("#progress");
  p.max = Math.max(session.total, 1);
  p.value = session.answered;
  $("#progress-text").textContent = `${session.answered} / ${session.total}`;
  current = session.puzzle;
  document.body.dataset.answered = String(session.answered);
  if (!current) {
    $("#puzzle").hidden = true;
    $("#finished").hidden = false;
    document.body.dataset.done = "true";
    return;
  }
  $("#puzzle").hidden = false;
  $("#puzzle").dataset.puzzle = String(current.id);
  $("#label").textContent = current.label;
  $("#reference-label").textContent = current.label;
  // The buttons stay disabled until this puzzle's own picture is on screen (or failed to
  // load): a quick click must never judge the previous picture under the new label.
  setAnswerable(false);
  shownAt = null;
  const img = $("#puzzle-image");
  const id = current.id;
  const ready = () => {
    if (!current || current.id !== id) return;
    shownAt = performance.now();
    setAnswerable(true);
    if (lastUsed) lastUsed.focus();
  };
  img.onload = ready;
  img.onerror = ready;
  img.src = current.image;
  referencesOpened = false;
  $("#references").replaceChildren();
  $("#references-shown").hidden = true;
  $("#show-references").setAttribute("aria-expanded", "false");
  $("#references-section").hidden = current.references.length === 0;
}

// The current puzzle's reference pictures, on request: fetched and shown only now.
function openReferences() {
  if (!current || referencesOpened) return;
  referencesOpened = true;
  const refs = $("#references");
  for (const url of current.references) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `a picture of ${current.label}`;
    refs.append(img);
  }
  $("#references-shown").hidden = false;
  $("#show-references").setAttribute("aria-expanded", "true");
}

async function answer(judgement) {
  if (!current || shownAt === null || document.body.dataset.answerable !== "true") return;
  lastUsed = document.querySelector(`.answers button[data-answer="${judgement}"]`);
  const elapsed = Math.min(MAX_ELAPSED_MS, Math.max(0, Math.round(performance.now() - shownAt)));
  setAnswerable(false);
  $("#error").hidden = true;
  try {
    const session = await call(`/observe/${encodeURIComponent(token)}/answers`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ puzzle: current.id, answer: judgement, elapsed_ms: elapsed, references_opened: referencesOpened }),
    });
    show(session);
  } catch (_) {
    setAnswerable(true);
  }
}

async function start() {
  for (const b of document.querySelectorAll(".answers button")) b.addEventListener("click", () => answer(b.dataset.answer));
  $("#show-references").addEventListener("click", openReferences);
  // Keys: c or y answers "Correct", i or n "Incorrect" (only while the buttons are enabled).
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const judgement = { c: "correct", y: "correct", i: "incorrect", n: "incorrect" }[e.key.toLowerCase()];
    if (judgement) {
      e.preventDefault();
      answer(judgement);
    }
  });
  try {
    show(await call(`/observe/${encodeURIComponent(token)}/session`));
  } catch (_) { /* shown */ }
  document.body.dataset.ready = "true";
}

start();
