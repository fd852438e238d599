// The labeling page: lease a task, show the chat and the K replies, rank them (ties allowed),
// thumbs per assistant turn, strength, rationale; submit or skip. Everything has a key.
// A session task (a conversation a policy played) has no replies to rank: thumbs on its
// assistant turns and the session's outcome (succeeded / failed) are the answer.
"use strict";

const S = {task: null, places: [], focus: 0, turn: -1, thumbs: {}, outcome: null, renew: null, leaseSeconds: 120, busy: false};
const LETTERS = "ABCDEFGHIJKLMNOP";
const $ = Page.$;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function next() {
  stopRenew();
  S.task = null;
  const data = await Page.api("POST", "/api/next");
  Page.showProgress(data.progress);
  $("empty").hidden = !!data.task;
  $("task").hidden = !data.task;
  if (data.task) show(data.task);
  else $("reload").focus();
}

function isSession() {
  return S.task.kind === "session";
}

// The chat shown: a ranking task's prompt, or a session task's whole conversation.
function chat() {
  return isSession() ? S.task.conversation : S.task.prompt;
}

// Assistant turns that take a thumb (a session's: only those answering a user turn).
function thumbTurns() {
  const all = chat().map((m, i) => (m.role === "assistant" ? i : -1)).filter((i) => i >= 0);
  return isSession() ? all.filter((i) => S.task.scored_turns.includes(i)) : all;
}

function show(task) {
  S.task = task;
  $("task").dataset.taskId = task.task_id;
  $("task").dataset.kind = task.kind;
  S.places = task.completions.map(() => null);
  S.focus = 0;
  S.thumbs = {};
  S.outcome = null;
  const turns = thumbTurns();
  S.turn = turns.length ? (isSession() ? turns[0] : turns[turns.length - 1]) : -1;
  $("strength").value = "";
  $("rationale").value = "";
  for (const id of ["replies-box", "strength-box", "ranking-keys"]) $(id).hidden = isSession();
  for (const id of ["outcome-box", "session-keys"]) $(id).hidden = !isSession();
  renderChat();
  renderReplies();
  renderOutcome();
  renderSuggestions();
  startRenew();
  if (isSession()) $("submit").focus(); else focusReply(0);
}

function renderOutcome() {
  $("outcome-success").setAttribute("aria-pressed", String(S.outcome === 1));
  $("outcome-failure").setAttribute("aria-pressed", String(S.outcome === 0));
}

function setOutcome(value) {
  S.outcome = S.outcome === value ? null : value;
  renderOutcome();
}

function renderChat() {
  const list = $("chat");
  list.replaceChildren();
  const turns = thumbTurns();
  chat().forEach((m, i) => {
    const item = el("li", {class: "turn " + m.role + (i === S.turn ? " picked" : ""), "data-index": i},
                    el("div", {class: "role"}, m.role), el("div", {class: "content"}, m.content));
    if (turns.includes(i)) {
      const up = el("button", {type: "button", class: "thumb", "aria-label": `thumbs up, turn ${i}`, "aria-pressed": String(S.thumbs[i] === "up"),
                               onclick: () => thumb(i, "up")}, "▲ up");
      const down = el("button", {type: "button", class: "thumb", "aria-label": `thumbs down, turn ${i}`,
                                 "aria-pressed": String(S.thumbs[i] === "down"), onclick: () => thumb(i, "down")}, "▼ down");
      item.append(el("div", {class: "thumbs"}, up, down));
    }
    list.append(item);
  });
}

function renderReplies() {
  const box = $("replies");
  const k = S.task.completions.length;
  box.style.gridTemplateColumns = `repeat(${k}, minmax(0, 1fr))`;
  box.replaceChildren(...S.task.completions.map((text, i) => {
    const buttons = el("div", {class: "rank-buttons"});
    for (let p = 1; p <= k; p++) {
      buttons.append(el("button", {type: "button", tabindex: "-1", "aria-pressed": String(S.places[i] === p),
                                   onclick: () => { setPlace(i, p, false); }}, String(p)));
    }
    const badge = S.places[i] === null ? "unranked" : `rank ${S.places[i]}` + (tied(i) ? " (tie)" : "");
    return el("div", {class: "reply" + (S.places[i] !== null ? " ranked" : ""), tabindex: "0", id: "reply-" + i,
                      "aria-label": `reply ${LETTERS[i]}, ${badge}`, onfocus: () => { S.focus = i; }},
              el("div", {class: "reply-head"}, el("span", {class: "letter"}, LETTERS[i]), el("span", {class: "badge"}, badge), buttons),
              el("div", {class: "content"}, text));
  }));
}

function tied(i) {
  return S.places[i] !== null && S.places.filter((p) => p === S.places[i]).length > 1;
}

function renderSuggestions() {
  const list = $("suggestion-list");
  const shown = S.task.suggestions || [];
  $("suggestions").hidden = shown.length === 0;
  list.replaceChildren(...shown.map((s) => {
    const order = s.ranks.map((r, i) => [r, i]).sort((a, b) => a[0] - b[0]);
    let text = "";
    order.forEach(([r, i], n) => { text += (n === 0 ? "" : (r === order[n - 1][0] ? " = " : " > ")) + LETTERS[i]; });
    const who = s.kind === "model" ? `Reward model ${s.suggester}` : `Judge ${s.suggester}`;
    const scores = s.scores ? " (" + s.scores.map((v, i) => `${LETTERS[i]} ${v.toFixed(3)}`).join(", ") + ")" : "";
    return el("li", {class: s.kind}, el("strong", {}, who + ": "), text + scores);
  }));
}

function focusReply(i) {
  if (isSession()) return;
  const k = S.task.completions.length;
  S.focus = (i + k) % k;
  $("reply-" + S.focus).focus();
}

function setPlace(i, place, advance) {
  S.places[i] = place;
  renderReplies();
  if (advance) {
    const unranked = S.places.findIndex((p, j) => p === null && j > i);
    const first = S.places.findIndex((p) => p === null);
    focusReply(unranked >= 0 ? unranked : first >= 0 ? first : i);
  } else {
    focusReply(i);
  }
}

function thumb(index, value) {
  S.thumbs[index] = S.thumbs[index] === value ? undefined : value;
  if (S.thumbs[index] === undefined) delete S.thumbs[index];
  S.turn = index;
  renderChat();
}

function moveTurn(step) {
  const turns = thumbTurns();
  if (!turns.length) return;
  const at = turns.indexOf(S.turn);
  S.turn = turns[Math.min(turns.length - 1, Math.max(0, (at < 0 ? turns.length : at) + step))];
  renderChat();
  document.querySelector(`#chat li[data-index="${S.turn}"]`).scrollIntoView({block: "nearest"});
}

function stepStrength(step) {
  const select = $("strength");
  select.selectedIndex = Math.min(select.options.length - 1, Math.max(0, select.selectedIndex + step));
}

// Places as typed (1 = best, equal = tie, gaps allowed) to the store's dense ranks (0 = best).
function denseRanks(places) {
  const distinct = [...new Set(places)].sort((a, b) => a - b);
  return places.map((p) => distinct.indexOf(p));
}

async function submit() {
  if (S.busy || !S.task) return;
  if (isSession()) return submitSession();
  if (S.places.some((p) => p === null)) {
    Page.say(`Rank every reply first (1..${S.places.length}; the same number for a tie).`, "error");
    return;
  }
  const strength = $("strength").value;
  const body = {ranks: denseRanks(S.places), strength: strength === "" ? null : Number(strength), rationale: $("rationale").value,
                turn_feedback: S.thumbs};
  await act(async () => {
    const data = await Page.api("POST", `/api/tasks/${encodeURIComponent(S.task.task_id)}/label`, body);
    Page.say(data.status === "DUPLICATE" ? "Already saved." : "Saved.", "ok");
    Page.showProgress(data.progress);
  });
}

async function submitSession() {
  if (!Object.keys(S.thumbs).length && S.outcome === null) {
    Page.say("Give a thumb on a turn (u/d) or the session's outcome (y/n), or both.", "error");
    return;
  }
  const body = {turn_feedback: S.thumbs, outcome: S.outcome, rationale: $("rationale").value};
  await act(async () => {
    const data = await Page.api("POST", `/api/tasks/${encodeURIComponent(S.task.task_id)}/label`, body);
    Page.say(data.status === "DUPLICATE" ? "Already saved." : "Saved.", "ok");
    Page.showProgress(data.progress);
  });
}

async function skip() {
  if (S.busy || !S.task) return;
  await act(async () => {
    await Page.api("POST", `/api/tasks/${encodeURIComponent(S.task.task_id)}/skip`);
    Page.say("Skipped.", "ok");
  });
}

// Run a submit or skip, then lease the next task; a lost lease (409) also moves on.
async function act(fn) {
  S.busy = true;
  try {
    await fn();
    await next();
  } catch (error) {
    Page.say(error.message, "error");
    if (error.status === 409) await next();
    else if (error.status === 401 || error.status === 403) location.reload();
  } finally {
    S.busy = false;
  }
}

function startRenew() {
  stopRenew();
  S.renew = setInterval(async () => {
    if (!S.task) return;
    try {
      await Page.api("POST", `/api/tasks/${encodeURIComponent(S.task.task_id)}/renew`);
    } catch (error) {
      Page.say("Your lease ended: " + error.message, "error");
      if (error.status === 409 || error.status === 404) await next();
    }
  }, Math.max(1000, (S.leaseSeconds * 1000) / 3));
}

function stopRenew() {
  if (S.renew) clearInterval(S.renew);
  S.renew = null;
}

function onKey(event) {
  if (!S.task || event.ctrlKey && event.key !== "Enter" || event.altKey || event.metaKey) return;
  const target = event.target;
  const typing = target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.tagName === "SELECT";
  if (typing) {
    if (event.key === "Escape") { event.preventDefault(); focusReply(S.focus); }
    else if (event.key === "Enter" && event.ctrlKey) { event.preventDefault(); submit(); }
    return;
  }
  const k = S.task.completions.length;
  const key = event.key;
  if (isSession() && (key === "y" || key === "n")) setOutcome(key === "y" ? 1 : 0);
  else if (/^[1-9]$/.test(key) && Number(key) <= k) setPlace(S.focus, Number(key), true);
  else if (key === "0" || key === "Backspace" || key === "Delete") setPlace(S.focus, null, false);
  else if (key === "ArrowRight" || key === "l") focusReply(S.focus + 1);
  else if (key === "ArrowLeft" || key === "h") focusReply(S.focus - 1);
  else if (key === "ArrowDown" || key === "j") moveTurn(1);
  else if (key === "ArrowUp" || key === "k") moveTurn(-1);
  else if ((key === "u" || key === "d") && S.turn >= 0) thumb(S.turn, key === "u" ? "up" : "down");
  else if (key === "+" || key === "=") stepStrength(1);
  else if (key === "-") stepStrength(-1);
  else if (key === "r") { event.preventDefault(); $("rationale").focus(); return; }
  else if (key === "s") skip();
  else if (key === "Enter" && target.tagName !== "BUTTON") submit();
  else return;
  event.preventDefault();
}

document.addEventListener("keydown", onKey);
$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", skip);
$("reload").addEventListener("click", next);
$("outcome-success").addEventListener("click", () => setOutcome(1));
$("outcome-failure").addEventListener("click", () => setOutcome(0));
Page.start("/api/me", async (me) => { S.leaseSeconds = me.lease_seconds; await next(); });
