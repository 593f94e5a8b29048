"""MQwen as an lmms-eval model: `lmms-eval --model mqwen --model_args pretrained=DIR_OR_REPO,batch_size=8 ...`.

`MQwenLMMS` subclasses `lmms_eval.api.model.lmms` (a "simple" model: lmms-eval hands it the task's prompt text
and the document's images) and loads the checkpoint the way every MQwen tool does (`runtime.load_for_inference`:
the Auto classes with `trust_remote_code=True`). The `lmms_eval.models` entry point (setup.cfg,
`lmms_manifest.manifest`) registers it when MQwen is installed with `pip install "mqwen[eval]"`.

- `generate_until`: requests with the same generation settings are captioned `batch_size` at a time, left-padded
  (MQwen's processor pads on the left; lmms-eval#648 is what right padding does), greedy unless `temperature` > 0,
  at most `max_new_tokens` new tokens, and each answer is cut at the first of the task's `until` strings (which
  also stop generation early). A prompt is MQwen's chat template over a user turn holding the images and the
  task's text, so a caption task's prompt equals `mqwen-eval --instruction TEXT`'s and its captions are the same.
- `loglikelihood`: the summed log-probability of the continuation after the assistant's turn opens, and whether
  greedy decoding would produce it (the (logprob, is_greedy) pair of lm-eval-harness).
- `generate_until_multi_round`: rounds of `generate_until`, the task's `doc_to_text(doc, previous_output=...,
  round_idx=..., previous_round_info=...)` giving each next round (the protocol of lmms-eval's mmsearch task).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lmms_eval import utils
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from ..runtime import load_for_inference

# Generation settings lmms-eval's task YAMLs use that MQwen reads; others are reported once and ignored.
_GENERATION_KEYS = {"until", "max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample"}


class MQwenLMMS(lmms):
    """An MQwen checkpoint behind lmms-eval's model interface.

    Args (lmms-eval's `--model_args`, comma-separated `key=value`):
        pretrained: a checkpoint folder, a Hub repo, or a `--keep-adapter` training output.
        batch_size: requests per `generate` call (default 1).
        device: auto (cuda, then mps, then cpu), cpu, cuda:N, mps.
        dtype: auto (bf16 on a GPU that has it, else fp32), bf16, fp16, fp32.
        max_new_tokens: the cap when a task does not set one (default 128).
        max_rounds: the most rounds `generate_until_multi_round` runs for one document (default 10).

    `model_args` take precedence over lmms-eval's own `--batch_size` / `--device` flags: its `--batch_size`
    defaults to 1, so `--model_args ...,batch_size=8` would otherwise collide with it.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        device: str | None = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 128,
        max_rounds: int = 10,
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if v is not None and k != "max_batch_size"}
        if unknown:
            raise ValueError(
                f"mqwen does not take the model_args {sorted(unknown)}; it takes pretrained, batch_size, device, "
                "dtype, max_new_tokens, max_rounds."
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a whole number for mqwen (got {batch_size!r})") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size!r})")
        self.max_new_tokens, self.max_rounds = int(max_new_tokens), int(max_rounds)
        self.model, self.processor = load_for_inference(pretrained, device=device or "auto", dtype=dtype)
        self.tokenizer = self.processor.tokenizer
        self._ignored_keys: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MQwenLMMS:
        """lmms-eval's constructor from `--model_args`; its flags fill only what `model_args` leave unset."""
        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- prompts ---------------------------------------------------------------------------------------------

    def prompt(self, context: str, n_images: int) -> str:
        """MQwen's chat-template prompt for a user turn holding `n_images` images and the task's text.

        Where the text already holds exactly `n_images` image placeholders (the processor's `<image>`), the images
        go there; otherwise placeholders are dropped and the images come first, as MQwen was trained.
        """
        token = self.processor.image_token
        pieces = context.split(token)
        if len(pieces) - 1 == n_images and n_images:
            content = []
            for i, piece in enumerate(pieces):
                if i:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece})
        else:
            text = "".join(pieces)
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        template = self.processor.chat_template
        if isinstance(template, dict):
            template = template["default"]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def _inputs(self, contexts: list[str], visuals: list[list]) -> Any:
        prompts = [self.prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        images = [image for group in visuals for image in group]
        batch = self.processor(images=images or None, text=prompts, return_tensors="pt").to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visual = doc_to_visual(self.task_dict[task][split][doc_id])
        if visual is None:
            return []
        return [v for v in (visual if isinstance(visual, (list, tuple)) else [visual]) if v is not None]

    # -- generation ------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """(keyword arguments for `generate`, the `until` strings) from a task's generation_kwargs."""
        gen_kwargs = copy.deepcopy(gen_kwargs or {})
        for key in set(gen_kwargs) - _GENERATION_KEYS - self._ignored_keys:
            self._ignored_keys.add(key)
            print(f"mqwen: generation setting {key!r} is not used by MQwen and is ignored")
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        until = [u for u in until if u]
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = temperature > 0 and gen_kwargs.get("do_sample", True) is not False
        settings = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)}
        settings["num_beams"] = int(gen_kwargs.get("num_beams") or 1)
        if sample:
            settings.update(do_sample=True, temperature=temperature)
            for key in ("top_p", "top_k"):
                if gen_kwargs.get(key) is not None:
                    settings[key] = gen_kwargs[key]
        else:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if until:
            settings.update(stop_strings=until, tokenizer=self.tokenizer)
        return settings, until

    def _generate(self, contexts: list[str], visuals: list[list], settings: dict, until: list[str]) -> list[str]:
        batch = self._inputs(contexts, visuals)
        with torch.inference_mode():
            generated = self.model.generate(**batch, **settings)
        answers = self.processor.decode_captions(generated, batch["input_ids"].shape[1])
        return [_cut(answer, until) for answer in answers]

    def generate_until(self, requests: list) -> list[str]:
        """Answers for `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` requests, in request order."""
        order = utils.Collator([r.args for r in requests], lambda a: (a[4], str(a[5]), a[3]), grouping=True)
        answers = []
        with tqdm(total=len(requests), desc="mqwen generate_until", disable=self.rank != 0) as bar:
            for chunk in order.get_batched(n=self.batch_size):
                settings, until = self._generation_settings(chunk[0][1])
                contexts = [a[0] for a in chunk]
                visuals = [self._visuals(a[2], a[3], a[4], a[5]) for a in chunk]
                for args, answer in zip(chunk, self._generate(contexts, visuals, settings, until)):
                    answers.append(answer)
                    self.cache_hook.add_partial("generate_until", (args[0], args[1]), answer)
                bar.update(len(chunk))
        return order.get_original(answers)

    def generate_until_multi_round(self, requests: list) -> list[list[str]]:
        """Per request `(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)`, the answers of
        every round: round 0 answers the context; each later round asks `doc_to_text(doc, previous_output=answers
        so far, round_idx=r, previous_round_info=...)` for `(visuals, context, done, answers, info)` until done."""
        order = utils.Collator([r.args for r in requests], lambda a: (a[5], str(a[6]), a[4]), grouping=True)
        results = []
        with tqdm(total=len(requests), desc="mqwen multi-round", disable=self.rank != 0) as bar:
            for chunk in order.get_batched(n=self.batch_size):
                settings, until = self._generation_settings(chunk[0][1])
                states = [
                    {
                        "doc": self.task_dict[a[5]][a[6]][a[4]],
                        "context": a[0],
                        "visuals": self._visuals(a[2], a[4], a[5], a[6]),
                        "answers": [],
                        "info": None,
                        "done": False,
                    }
                    for a in chunk
                ]
                for round_idx in range(self.max_rounds + 1):
                    if round_idx:
                        for state, args in zip(states, chunk):
                            if not state["done"]:
                                _next_round(state, args[3], round_idx)
                    active = [s for s in states if not s["done"]]
                    if not active:
                        break
                    if round_idx == self.max_rounds:
                        raise RuntimeError(
                            f"the task's doc_to_text did not end after {self.max_rounds} rounds; raise max_rounds in "
                            "--model_args if it needs more."
                        )
                    answers = self._generate(
                        [s["context"] for s in active], [s["visuals"] for s in active], settings, until
                    )
                    for state, answer in zip(active, answers):
                        state["answers"].append(answer)
                results.extend(list(s["answers"]) for s in states)
                bar.update(len(chunk))
        return order.get_original(results)

    # -- scoring ---------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """`(sum of log p(continuation tokens), greedy)` per `(context, continuation, doc_to_visual, doc_id, task,
        split)` request; the continuation (a string, or a function of the document) follows the prompt's
        opened assistant turn."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [r.args for r in requests], desc="mqwen loglikelihood", disable=self.rank != 0
        ):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            results.append(self.continuation_logprob(context, continuation, visuals))
        return results

    def continuation_logprob(self, context: str, continuation: str, visuals: list) -> tuple[float, bool]:
        """(log-probability of `continuation` after the prompt for `context` and `visuals`, whether greedy
        decoding yields exactly those tokens)."""
        batch = self._inputs([context], [visuals])
        ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        if ids.shape[1] == 0:
            return 0.0, True
        prompt_length = batch["input_ids"].shape[1]
        batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1)
        with torch.inference_mode():
            logits = self.model(**batch).logits[0, prompt_length - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = ids[0]
        total = logprobs.gather(1, target[:, None]).sum().item()
        return float(total), bool((logits.argmax(dim=-1) == target).all().item())


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings."""
    for stop in until:
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    return text


def _next_round(state: dict, doc_to_text: Any, round_idx: int) -> None:
    visuals, context, done, answers, info = doc_to_text(
        state["doc"], previous_output=list(state["answers"]), round_idx=round_idx, previous_round_info=state["info"]
    )
    state["done"] = bool(done)
    if not state["done"]:
        state.update(context=context, info=info, answers=list(answers) if answers is not None else state["answers"])
        state["visuals"] = [v for v in (visuals or []) if v is not None]
