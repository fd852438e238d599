"""The local judge: an HF causal LM (default the bundled SmolLM2-135M-Instruct) in process.

The chat is rendered with the model's own chat template (generation prompt appended).
`choose` reads the next-token log-probabilities after the rubric: one forward pass, no
sampling, and an answer for every chat. The chats of one call usually share a long prefix
(the rubric and the conversation; the two orders of a pair differ only from the first
reply on), so that prefix is run once and its KV cache reused (cropped back after each chat).
"""

from __future__ import annotations

import logging
import threading

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.models.resolver import BUNDLED, resolve
from rm_service.settings import ModelSettings

log = logging.getLogger(__name__)


class LocalBackend:
    def __init__(self, name_or_path: str, device: str = "auto", models: ModelSettings | None = None, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)  # process-wide; oversubscribed cores make every extra thread spin

        path = resolve(name_or_path, models)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise InvalidArgument("model", f"cannot load a tokenizer from {path}: {exc}") from None
        if not self.tokenizer.chat_template:
            raise InvalidArgument(
                "model", f"{name_or_path!r} has no chat template; the judge needs an instruction-tuned chat model"
            )
        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        except (OSError, ValueError) as exc:  # no weights, or not a causal LM (e.g. an encoder)
            raise InvalidArgument("model", f"cannot load {name_or_path!r} as a causal language model: {exc}") from None
        self.model_id = name_or_path if name_or_path in BUNDLED else path.name
        self._lock = threading.Lock()  # one forward pass at a time: more threads do not help on CPU
        self._label_ids: dict[str, list[int]] = {}

    def close(self) -> None:
        pass

    def _ids(self, chat: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [m.as_dict() for m in chat], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _label_token_ids(self, label: str) -> list[int]:
        """Single tokens that spell the label ("A" and " A"); a label with none cannot be chosen."""
        if label not in self._label_ids:
            variants = {tuple(self.tokenizer.encode(v, add_special_tokens=False)) for v in (label, " " + label)}
            ids = sorted(v[0] for v in variants if len(v) == 1)
            if not ids:
                raise InvalidArgument(
                    "decision", f"choice mode needs {label!r} to be a single token of {self.model_id}'s tokenizer"
                )
            self._label_ids[label] = ids
        return self._label_ids[label]

    def choose(self, chats: list[list[Message]], labels: tuple[str, ...]) -> list[dict[str, float]]:
        import torch

        label_ids = {label: self._label_token_ids(label) for label in labels}
        seqs = [self._ids(chat) for chat in chats]
        shared = _common_prefix_len(seqs)
        out = []
        with self._lock, torch.inference_mode():
            cache = None
            if shared:
                prefix = torch.tensor([seqs[0][:shared]], device=self.device)  # [1, shared]
                cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            for seq in seqs:
                logits = self.model(
                    input_ids=torch.tensor([seq[shared:]], device=self.device),
                    past_key_values=cache,
                    use_cache=cache is not None,
                    logits_to_keep=1,
                ).logits  # [1, 1, V]
                logp = torch.log_softmax(logits[0, -1].float(), dim=-1)  # [V]
                out.append({label: float(torch.logsumexp(logp[ids], dim=0)) for label, ids in label_ids.items()})
                if cache is not None and cache.get_seq_length() > shared:
                    cache.crop(shared - cache.get_seq_length())  # negative: drop this chat's own tokens
        return out

    def generate(self, chat: list[Message], max_new_tokens: int, temperature: float) -> str:
        import torch
        from transformers import GenerationConfig

        ids = torch.tensor([self._ids(chat)], device=self.device)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )
        with self._lock, torch.inference_mode():
            generated = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config
            )  # [1, T + new]
        return self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)


def _common_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to run."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - 1
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return max(n, 0)
