// The admin view: agreement between people, between people and each judge, and on sessions (thumbs, outcomes).
"use strict";

// Counts print as they are; rates (the columns in `rates`) with three decimals; undefined as n/a.
const fmt = (v, rate) => (v === null || v === undefined ? "n/a" : rate && typeof v === "number" ? v.toFixed(3) : String(v));

function table(id, head, rows, rates = []) {
  const t = Page.$(id);
  t.replaceChildren();
  const tr = document.createElement("tr");
  head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; th.scope = "col"; tr.append(th); });
  t.append(tr);
  if (!rows.length) rows = [[`none yet`, ...head.slice(1).map(() => "")]];
  rows.forEach((r) => {
    const row = document.createElement("tr");
    r.forEach((v, i) => { const td = document.createElement("td"); td.textContent = fmt(v, rates.includes(i)); row.append(td); });
    t.append(row);
  });
}

function show(data) {
  table("between-people", ["person A", "person B", "shared pairs", "agreement", "Cohen's kappa", "B tied where A decided"],
        data.between_people.map((r) => [r.a, r.b, r.shared_pairs, r.agreement, r.kappa, r.judge_ties]), [3, 4]);
  const judges = data.people_and_judges.map((r) => [r.judge, r.shared_pairs, r.agreement, r.kappa, r.judge_ties, r.position_bias_rate,
                                                     r.judge_longer, r.reference_longer]);
  const all = data.people_and_all_judges;
  if (data.people_and_judges.length > 1) {
    judges.push(["all judges", all.shared_pairs, all.agreement, all.kappa, all.judge_ties, all.position_bias_rate, all.judge_longer,
                 all.reference_longer]);
  }
  table("people-judges", ["judge", "shared pairs", "agreement", "Cohen's kappa", "judge tied where people decided", "position-bias rate",
                          "judge prefers longer", "people prefer longer"], judges, [2, 3, 5, 6, 7]);
  const s = data.stats;  // judge feedback (thumbs, outcomes) against people's on the same turns and sessions
  table("sessions-judges", ["on sessions", "shared", "agreement", "Cohen's kappa"], [
    ["thumbs on assistant turns", s.judge_human_shared_thumbs, s.judge_human_thumb_agreement, s.judge_human_thumb_kappa],
    ["session outcomes", s.judge_human_shared_outcomes, s.judge_human_outcome_agreement, null],
  ], [2, 3]);
  table("labelers", ["annotator", "source", "labels"],
        [...data.people.map((p) => [p.annotator, "HUMAN", p.labels]), ...data.judges.map((j) => [j.annotator, "JUDGE", j.labels])]);
  table("stats", ["what", "count"], [
    ...Object.entries(s.labels_by_source).map(([k, v]) => [`labels, ${k}`, v]),
    ["tasks in the queue", s.queue_depth], ["session tasks in the queue", s.session_queue_depth],
    ["tasks leased", s.tasks_leased], ["tasks done", s.tasks_done],
  ]);
}

Page.start("/api/admin/agreement", async (data) => show(data));
