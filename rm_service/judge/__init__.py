"""Judges that label: LLMs with position-swap debiasing, and reward models as annotators.

Modules, one idea each:

- settings:      JudgeSettings (RM_JUDGE_*)
- templates:     versioned rubric prompts (pairwise, direct ranking), TOML overrides
- verdict:       strict verdict parsing ([[A]]/[[B]]/[[C]], [[2>1>3]]) and choice from log-probabilities
- backend:       the LLM backend protocol and its errors
- openai_http:   OpenAI-compatible chat completions over HTTP (retries, backoff, concurrency limit)
- local:         an HF causal LM in process (the bundled SmolLM2-135M-Instruct by default)
- pairwise:      both orders of every comparison, the inconsistency policy, K-way, panel votes
- items:         what is judged: leased tasks or JSONL lines
- provenance:    the label written for a judged item (source JUDGE, model id, template, rationale)
- store_client:  LeaseTasks / IngestLabels / GetStats calls
- annotators:    an item to a label, one registry of backends (ANNOTATORS): the LLM panel or a reward model
- runner:        `run_judge`, the concurrent, resumable run

Agreement with human labels (Cohen's kappa, position-bias and length-bias rates) is computed
in rm_service.store.agreement, beside the labels it reads.
"""

from rm_service.judge.runner import JudgeCounts, run_judge
from rm_service.judge.settings import JudgeSettings

__all__ = ["JudgeCounts", "JudgeSettings", "run_judge"]
