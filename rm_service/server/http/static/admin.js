// The admin view: agreement between people, and between people and each judge.
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
  table("labelers", ["annotator", "source", "labels"],
        [...data.people.map((p) => [p.annotator, "HUMAN", p.labels]), ...data.judges.map((j) => [j.annotator, "JUDGE", j.labels])]);
  const s = data.stats;
  table("stats", ["what", "count"], [
    ...Object.entries(s.labels_by_source).map(([k, v]) => [`labels, ${k}`, v]),
    ["tasks in the queue", s.queue_depth], ["tasks leased", s.tasks_leased], ["tasks done", s.tasks_done],
  ]);
}

Page.start("/api/admin/agreement", async (data) => show(data));
