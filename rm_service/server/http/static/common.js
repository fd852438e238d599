// Shared by the labeling and admin pages: the bearer token (kept in this tab's sessionStorage),
// JSON calls that turn an error status into a message, and the sign-in flow.
"use strict";

const Page = {
  token: sessionStorage.getItem("rm-token") || "",
  $: (id) => document.getElementById(id),

  async api(method, path, body) {
    const headers = {"Accept": "application/json"};
    if (Page.token) headers["Authorization"] = "Bearer " + Page.token;
    // Every state-changing call is JSON (the server refuses anything else: no cross-site form can pass).
    if (method !== "GET" && body === undefined) body = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(data.error || response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  },

  say(text, kind) {
    const m = Page.$("message");
    m.textContent = text || "";
    m.className = "message" + (kind ? " " + kind : "");
  },

  showProgress(p) {
    if (p) Page.$("progress").textContent = `Labeled today: ${p.labeled_today} · Left in queue: ${p.queue_left}`;
  },

  // Ask /api/me (or the page's own path) who we are; show the sign-in form on 401/403.
  async start(mePath, onSignedIn) {
    const form = Page.$("signin-form");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      Page.token = Page.$("token").value.trim();
      await Page.tryIn(mePath, onSignedIn);
    });
    Page.$("signout").addEventListener("click", () => {
      sessionStorage.removeItem("rm-token");
      Page.token = "";
      location.reload();
    });
    await Page.tryIn(mePath, onSignedIn);
  },

  async tryIn(mePath, onSignedIn) {
    try {
      const me = await Page.api("GET", mePath);
      if (Page.token) sessionStorage.setItem("rm-token", Page.token);
      Page.$("signin").hidden = true;
      Page.$("work").hidden = false;
      Page.$("signout").hidden = !Page.token;
      Page.$("who").textContent = me.annotator ? "Signed in as " + me.annotator : "";
      Page.say("");
      await onSignedIn(me);
    } catch (error) {
      if (error.status === 401 || error.status === 403) {
        sessionStorage.removeItem("rm-token");
        Page.$("signin").hidden = false;
        Page.$("work").hidden = true;
        Page.say(Page.token ? "Refused: " + error.message : "", Page.token ? "error" : "");
        Page.$("token").value = "";
        Page.$("token").focus();
      } else {
        Page.say(error.message, "error");
      }
    }
  },
};
