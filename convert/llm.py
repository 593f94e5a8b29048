"""The language model side of a build: where its weights are, how its vocabulary grows, and its tensor plan.

The plan maps every source tensor to its MQwen name (`language_model.` + the source name) and is checked
against an MQwen model built on the meta device, so a name or shape that would not load is caught before
anything is written.
"""

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvertError
from .hub import HUB_ID, fetch_repo, find_local_weights, hub_id_from_path
from .shards import PickleFile, SafetensorsFile, TensorPlan

LM_PREFIX = "language_model."


@dataclass
class LLMSource:
    folder: Path
    files: list
    hub_id: str = None

    @property
    def name(self) -> str:
        return self.hub_id or self.folder.name


def resolve_llm(spec: str | os.PathLike, allow_pickle: bool = False) -> LLMSource:
    """A local folder or Hub id of a transformers causal LM, with its weight files."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConvertError(f"LLM folder {path} has no config.json; point at a transformers model folder.")
        return LLMSource(path, find_local_weights(path, allow_pickle, "LLM folder"), hub_id_from_path(path))
    if path.exists():
        raise ConvertError(f"LLM {path} is a file; pass the folder that holds config.json and the weights.")
    if HUB_ID.match(str(spec)):
        folder = fetch_repo(str(spec), allow_pickle, "LLM")
        return LLMSource(folder, find_local_weights(folder, allow_pickle, "LLM"), str(spec))
    raise ConvertError(f"LLM {spec!r} is neither an existing folder nor a Hub id like Qwen/Qwen2.5-7B-Instruct.")


def padding_multiple(rows: int) -> int:
    """The vocabulary padding the LM uses: the largest power of two (<= 128) that divides its row count."""
    multiple = 128
    while rows % multiple:
        multiple //= 2
    return multiple


@dataclass
class Vocabulary:
    """How the embedding matrices change when `<image>` is added."""

    source_tokens: int  # len(tokenizer) before `<image>`
    source_rows: int  # embedding rows in the checkpoint (vocab_size, usually padded)
    image_token_id: int

    @property
    def rows(self) -> int:
        """Unchanged when `<image>` lands in the padding; else grown to the next padding multiple."""
        if self.image_token_id < self.source_rows:
            return self.source_rows
        multiple = padding_multiple(self.source_rows)
        return -(-(self.image_token_id + 1) // multiple) * multiple

    def grow(self, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Wrap a loader so that new rows equal the mean of the rows of the tokens the tokenizer had."""
        rows, mean_over = self.rows, min(self.source_tokens, self.source_rows)

        def grown():
            weight = load()
            mean = weight[:mean_over].float().mean(dim=0, keepdim=True).to(weight.dtype)
            return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])

        return grown


def meta_state(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """name -> shape of everything the model saves, and the tied aliases (e.g. a tied lm_head) it does not."""
    aliases, seen = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}, aliases


def _name_of(module, tensor):
    return next(name for name, param in module.named_parameters(remove_duplicate=False) if param is tensor)


def plan_language_model(
    readers: Iterable[SafetensorsFile | PickleFile], model: torch.nn.Module, vocabulary: Vocabulary, dtype: torch.dtype
) -> list[TensorPlan]:
    """TensorPlans for every LM tensor of the source, named and shaped as `model` (on meta) expects."""
    expected, aliases = meta_state(model)
    lm = model.language_model
    embeddings = {LM_PREFIX + _name_of(lm, lm.get_input_embeddings().weight)}
    output = lm.get_output_embeddings()
    if output is not None and output.weight is not lm.get_input_embeddings().weight:
        embeddings.add(LM_PREFIX + _name_of(lm, output.weight))
    base_prefix = getattr(lm, "base_model_prefix", "") or ""
    ignored = list(getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or [])

    plan, unexpected = [], []
    for reader in readers:
        for key in reader.keys():
            name = LM_PREFIX + key
            if name not in expected and base_prefix and f"{LM_PREFIX}{base_prefix}.{key}" in expected:
                name = f"{LM_PREFIX}{base_prefix}.{key}"  # saved from the base model class
            if name in aliases:
                continue  # a tied copy (lm_head.weight with tie_word_embeddings) is not stored
            if name not in expected:
                if not any(re.search(pattern, key) for pattern in ignored):
                    unexpected.append(key)
                continue
            source_dtype, shape = reader.info(key)
            load = lambda reader=reader, key=key: reader.get(key)  # noqa: E731
            if name in embeddings:
                if shape[0] != vocabulary.source_rows:
                    raise ConvertError(
                        f"LLM {key} has {shape[0]} rows but its config says vocab_size={vocabulary.source_rows}."
                    )
                if vocabulary.rows != vocabulary.source_rows:
                    shape, load = (vocabulary.rows, *shape[1:]), vocabulary.grow(load)
            plan.append(TensorPlan(name, dtype if source_dtype.is_floating_point else source_dtype, shape, load))

    planned = {entry.name: tuple(entry.shape) for entry in plan}
    expected_lm = {name: shape for name, shape in expected.items() if name.startswith(LM_PREFIX)}
    missing = sorted(set(expected_lm) - set(planned))
    wrong = [
        f"{n}: {planned[n]} != {expected_lm[n]}"
        for n in sorted(set(planned) & set(expected_lm))
        if planned[n] != tuple(expected_lm[n])
    ]
    if unexpected or missing or wrong:
        raise ConvertError(
            f"The LLM checkpoint does not match the {type(lm).__name__} transformers builds from its config: "
            f"unexpected {unexpected[:6]}, missing {missing[:6]}, wrong shapes {wrong[:6]}. Architectures whose "
            "checkpoints transformers renames while loading (e.g. fused MoE experts) are not supported."
        )
    return plan
