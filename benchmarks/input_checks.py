"""`python -m mqwen.benchmarks.input_checks`: what MQwen's input checks cost next to the forward they guard.

`modeling_mqwen._check_inputs` runs at the top of every forward: types, dtypes and shapes always; token-id
ranges on the CPU; and the vision tower's `_check_pixel_values` makes one min/max pass over the pixels when
images are given. This times the checks alone and the whole forward on the tiny random model (the worst case:
the smaller the model, the larger the checks' share), for a decode step, an image prefill and a training step
with labels.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from ..common.tiny_model import build_tiny
from ..modeling_mqwen import _check_inputs, _check_pixel_values

EXAMPLES = """examples:
  python -m mqwen.benchmarks.input_checks                 # batch 8, 2 images of 224 px for the prefill
  python -m mqwen.benchmarks.input_checks --repeats 2000 --batch 1
"""


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of `fn()` over `repeats` calls (after a few warm-up calls). CPU time, on one thread:
    what the work costs, whatever else a shared machine runs."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def run_checks(model: torch.nn.Module, check_args: tuple) -> None:
    """What a forward checks: its inputs, and the pixels (which the vision tower checks) when there are any."""
    _check_inputs(model, *check_args)
    if check_args[1] is not None:
        _check_pixel_values(check_args[1], model.config.vision_config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.input_checks",
        description=__doc__.split("\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=8, help="samples per forward (default 8)")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per case (default 300)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, _ = build_tiny(seed=0, vision={"image_size": 224})  # 224 px: the pixel pass of a real ViT-L/14 input
    config, batch = model.config, args.batch
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab - 1, (batch, 24))
    prompt[prompt == config.image_token_id] = 0
    image_ids = torch.cat([torch.full((batch, config.image_seq_length), config.image_token_id), prompt], dim=1)
    pixels = torch.randn(batch, 3, 224, 224)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    decode = dict(input_ids=prompt[:, -1:], attention_mask=torch.ones(batch, prompt.shape[1] + 1, dtype=torch.long))
    cases = {
        "decode step (1 token, cached)": (decode, {"past_key_values": cache}),
        f"prefill, {batch} images of 224 px": (
            dict(input_ids=image_ids, pixel_values=pixels, attention_mask=torch.ones_like(image_ids)),
            {},
        ),
        "training step with labels": (
            dict(
                input_ids=image_ids,
                pixel_values=pixels,
                labels=image_ids.clone(),
                attention_mask=torch.ones_like(image_ids),
            ),
            {},
        ),
    }
    print(f"tiny MQwen, batch {batch}, one thread, median CPU time of {args.repeats} calls (forward: a tenth as many)")
    print(f"| {'case':<34} | checks (us) | forward (ms) | share |")
    print(f"|{'-' * 36}|-------------|--------------|-------|")
    for name, (inputs, extra) in cases.items():
        check_args = (
            inputs["input_ids"],
            inputs.get("pixel_values"),
            inputs.get("attention_mask"),
            None,
            inputs.get("labels"),
            extra,
        )
        checks = timed(lambda check_args=check_args: run_checks(model, check_args), args.repeats)

        def forward(inputs=inputs, extra=extra):
            with torch.no_grad():
                model(**inputs, **extra)
            if extra:
                cache.crop(-1)  # back to the prompt for the next decode step

        total = timed(forward, max(args.repeats // 10, 10))
        print(f"| {name:<34} | {checks * 1e6:11.1f} | {total * 1e3:12.2f} | {checks / total:5.1%} |")


if __name__ == "__main__":
    main()
