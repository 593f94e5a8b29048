"""`python -m convert build`: assemble a Hub-ready MQwen folder from a pretrained LLM and a CLIP vision tower.

Order of work, chosen so that bad input fails before anything heavy runs and memory stays near one tensor:

1. Check OUT_DIR, find the LLM's weights (safetensors, or pickle only with --allow-pickle), read --projector.
2. Read the vision source into OpenCLIP layout (`vision.load_vision`) and derive its config.
3. Load the LLM's config, tokenizer and generation config; add `<image>`; decide whether the embedding
   matrices must grow (only if `<image>` falls outside the existing, padded rows).
4. Build the MQwen model on the meta device: it names and shapes every tensor the checkpoint must hold,
   and the plan below is checked against it, so weight names cannot drift from the model code.
5. Stream: vision tower and projector first, then the LLM tensors in source order, each read, converted
   to --dtype, written and freed (`shards.write_sharded`), into a temporary folder renamed at the end.
"""

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvertError
from .hub import HUB_ID, fetch_repo, find_local_weights, hub_id_from_path
from .shards import TensorPlan, open_weights, parse_size, write_sharded
from .vision import VISION_PREFIX

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LM_PREFIX = "language_model."


@dataclass
class LLMSource:
    folder: Path
    files: list
    hub_id: str = None

    @property
    def name(self):
        return self.hub_id or self.folder.name


def resolve_llm(spec, allow_pickle=False) -> LLMSource:
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


def padding_multiple(rows):
    """The vocabulary padding the LM uses: the largest power of two (<= 128) that divides its row count."""
    multiple = 128
    while rows % multiple:
        multiple //= 2
    return multiple


def _set_dtype(config, dtype):
    name = str(dtype).replace("torch.", "")
    config.dtype = name  # transformers >= 4.56 (and 5.x) name
    if hasattr(type(config), "torch_dtype") or "torch_dtype" in config.__dict__:
        config.torch_dtype = name


def _source_dtype(reader):
    for key in reader.keys():
        dtype, _ = reader.info(key)
        if dtype.is_floating_point:
            return dtype
    return torch.bfloat16


def _meta_state(model):
    """name -> shape of everything the model saves, with tied aliases (e.g. a tied lm_head) left out."""
    aliases, seen = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}, aliases


def _param_name(model, tensor):
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is tensor:
            return name
    return None


def build(
    llm,
    vision,
    out_dir,
    dtype=None,
    image_token_pooling=1,
    projector=None,
    projector_type=None,
    overwrite=False,
    allow_pickle=False,
    push_to_hub=None,
    private=False,
    max_shard_size="5GB",
    seed=0,
    command=None,
):
    """Build an MQwen checkpoint in `out_dir`; returns its path. See `python -m convert build --help`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from mqwen import MQwenConfig, MQwenForCausalLM, MQwenVisionConfig

    from .card import read_card_license, write_model_card
    from .projector import PROJECTOR_PREFIX, check_projector, fresh_projector, projector_type_of, read_projector
    from .staging import check_destination, staged_folder
    from .tiny import build_processor, generation_defaults
    from .tokenizer import add_image_token
    from .vision import load_vision

    # 1. cheap checks first
    check_destination(out_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    source = resolve_llm(llm, allow_pickle)
    projector_state = read_projector(projector, allow_pickle) if projector else None
    if projector_state is not None:
        found_type = projector_type_of(projector_state)
        if projector_type and projector_type != found_type:
            raise ConvertError(f"--projector {projector} is a {found_type} projector, not {projector_type}.")
        projector_type = found_type
    readers = [open_weights(file) for file in source.files]
    target_dtype = DTYPES[dtype] if dtype else _source_dtype(readers[0])

    # 2. vision
    print(f"Vision: reading {vision}")
    vision_weights = load_vision(vision, allow_pickle)
    print(f"Vision: {vision_weights.source}")

    # 3. language model pieces
    try:
        text_config = AutoConfig.from_pretrained(source.folder)
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except Exception as error:
        raise ConvertError(f"transformers could not load the LLM's config or tokenizer from {source.folder}: {error}")
    source_tokens = len(tokenizer)
    source_rows = text_config.vocab_size
    image_token_id = add_image_token(tokenizer)
    new_rows = source_rows
    if image_token_id >= source_rows:
        new_rows = -(-(image_token_id + 1) // padding_multiple(source_rows)) * padding_multiple(source_rows)
    text_config.vocab_size = new_rows
    text_config._name_or_path = source.hub_id or ""
    _set_dtype(text_config, target_dtype)
    _adopt_chat_template(tokenizer)

    # 4. config + meta model: the single statement of what the checkpoint holds
    try:
        config = MQwenConfig(
            text_config=text_config,
            vision_config=MQwenVisionConfig(**vision_weights.config),
            image_token_pooling=image_token_pooling,
            image_token_id=image_token_id,
            projector_type=projector_type or "mlp2x_gelu",
        )
    except ValueError as error:
        raise ConvertError(str(error)) from error
    _set_dtype(config, target_dtype)
    with torch.device("meta"):
        model = MQwenForCausalLM(config)
    expected, aliases = _meta_state(model)

    lm = model.language_model
    embed_name = LM_PREFIX + _param_name(lm, lm.get_input_embeddings().weight)
    output = lm.get_output_embeddings()
    output_name = None
    if output is not None and output.weight is not lm.get_input_embeddings().weight:
        output_name = LM_PREFIX + _param_name(lm, output.weight)

    projector_expected = {
        name[len(PROJECTOR_PREFIX) :]: shape for name, shape in expected.items() if name.startswith(PROJECTOR_PREFIX)
    }
    if projector_state is None:
        projector_state = fresh_projector(model, seed)
    else:
        check_projector(projector_state, projector_expected, projector, config.vision_config.width,
                        config.text_config.hidden_size)

    # 5. the plan: every tensor of the output, its name, dtype, shape and producer
    plan = []
    vision_state = vision_weights.state_dict
    for name, tensor in list(vision_state.items()):
        plan.append(TensorPlan(VISION_PREFIX + name, target_dtype, tuple(tensor.shape),
                               lambda name=name: vision_state.pop(name)))
    for name, tensor in projector_state.items():
        plan.append(TensorPlan(PROJECTOR_PREFIX + name, target_dtype, tuple(tensor.shape), lambda t=tensor: t))

    base_prefix = getattr(lm, "base_model_prefix", "") or ""
    ignored = [pattern for pattern in (getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = []
    for reader in readers:
        for key in reader.keys():
            name = LM_PREFIX + key
            if name not in expected and base_prefix and LM_PREFIX + f"{base_prefix}.{key}" in expected:
                name = LM_PREFIX + f"{base_prefix}.{key}"  # checkpoint saved from the base model class
            if name in aliases:
                continue  # a tied copy (e.g. lm_head.weight with tie_word_embeddings) is not stored
            if name not in expected:
                if not any(re.search(pattern, key) for pattern in ignored):
                    unexpected.append(key)
                continue
            src_dtype, shape = reader.info(key)
            out_dtype = target_dtype if src_dtype.is_floating_point else src_dtype
            load = (lambda reader=reader, key=key: reader.get(key))
            if name in (embed_name, output_name):
                if shape[0] != source_rows:
                    raise ConvertError(
                        f"LLM {key} has {shape[0]} rows but its config says vocab_size={source_rows}."
                    )
                if new_rows != source_rows:
                    shape = (new_rows, *shape[1:])
                    load = _grown_embedding(load, new_rows, min(source_tokens, source_rows))
            plan.append(TensorPlan(name, out_dtype, tuple(shape), load))
    planned = {entry.name: entry.shape for entry in plan}
    missing = sorted(set(expected) - set(planned))
    wrong = [f"{n}: {planned[n]} != {expected[n]}" for n in sorted(set(planned) & set(expected))
             if tuple(planned[n]) != tuple(expected[n])]
    if unexpected or missing or wrong:
        raise ConvertError(
            f"The LLM checkpoint does not match the {type(lm).__name__} transformers builds from its config: "
            f"unexpected {unexpected[:6]}, missing {missing[:6]}, wrong shapes {wrong[:6]}. Architectures whose "
            "checkpoints transformers renames while loading (e.g. fused MoE experts) are not supported."
        )

    # 6. processor and generation config
    processor = build_processor(tokenizer, config.vision_config, config.image_seq_length)
    image_processor = processor.image_processor
    image_processor.resample = vision_weights.resample
    if vision_weights.resize_mode == "squash":
        size = config.vision_config.image_size
        image_processor.size = {"height": size, "width": size}
        image_processor.do_center_crop = False
    try:
        generation_config = GenerationConfig.from_pretrained(source.folder)
    except OSError:  # the LLM ships none: stop on ChatML's end of turn / end of text
        generation_config = generation_defaults(tokenizer)

    # 7. write
    llm_license = read_card_license(source.folder / "README.md")
    total = sum(entry.nbytes for entry in plan)
    from tqdm.auto import tqdm

    print(f"Writing {len(plan)} tensors ({total / 1e9:.2f} GB, {str(target_dtype).replace('torch.', '')}) to {out_dir}")
    with staged_folder(out_dir, overwrite) as staging:
        with tqdm(total=total, unit="B", unit_scale=True, desc="Writing weights") as progress:
            write_sharded(staging, plan, max_bytes, progress)
        del plan, vision_state
        _save_metadata(staging, model, config, processor, generation_config)
        write_model_card(
            staging / "README.md",
            llm_name=source.name,
            llm_id=source.hub_id,
            llm_license=llm_license,
            vision=vision_weights,
            config=config,
            dtype=str(target_dtype).replace("torch.", ""),
            projector_source=str(projector) if projector else None,
            command=command or "(built from Python: mqwen.convert.build.build)",
            repo_id=push_to_hub,
        )
    print(f"Built {out_dir}")
    if push_to_hub:
        from .push import push

        print(push(out_dir, push_to_hub, private=private))
    return Path(out_dir)


def _adopt_chat_template(tokenizer):
    """Give the tokenizer MQwen's image-aware ChatML template, warning if the LLM's own renders text differently.

    transformers keeps one chat template per folder, shared by the tokenizer and the processor, and the
    processor needs one that renders image parts; for ChatML models (Qwen2, Qwen2.5, Qwen3) text-only
    conversations with a system prompt render exactly as before.
    """
    from mqwen.processing_mqwen import CHAT_TEMPLATE

    sample = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Describe it."},
    ]
    kwargs = dict(tokenize=False, add_generation_prompt=True)
    ours = tokenizer.apply_chat_template(sample, chat_template=CHAT_TEMPLATE, **kwargs)
    theirs = None
    if tokenizer.chat_template:
        try:
            theirs = tokenizer.apply_chat_template(sample, **kwargs)
        except Exception:  # a template that needs other arguments
            pass
    if theirs != ours:
        logger.warning(
            "The LLM's chat template %s MQwen's ChatML template, which the built folder uses (tokenizer and processor "
            "share one template). Check that prompts suit this LLM.",
            "renders conversations differently from" if theirs else "is missing or unusable; using",
        )
    tokenizer.chat_template = CHAT_TEMPLATE


def _grown_embedding(load, rows, mean_over):
    """Append rows equal to the mean of the first `mean_over` rows (the tokens the source tokenizer has)."""

    def grown():
        weight = load()
        mean = weight[:mean_over].float().mean(dim=0, keepdim=True).to(weight.dtype)
        return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])

    return grown


def _save_metadata(folder, model, config, processor, generation_config):
    from transformers.dynamic_module_utils import custom_object_save

    custom_object_save(model, folder, config=config)  # modeling_mqwen.py + configuration_mqwen.py, auto_map
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)  # tokenizer, chat template, image processor, processing_mqwen.py


def main(args):
    build(
        args.llm,
        args.vision,
        args.out_dir,
        dtype=args.dtype,
        image_token_pooling=args.image_token_pooling,
        projector=args.projector,
        projector_type=args.projector_type,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        push_to_hub=args.push_to_hub,
        private=args.private,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        command="python -m convert " + " ".join(shlex.quote(str(arg)) for arg in args.argv),
    )
    return 0
