"""A short run of the main job: the saved model, both PNGs and results.json, and reload fidelity."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from mqwen.demo.run import run
from mqwen.demo.settings import QUICK, DemoSettings

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run(DemoSettings(**QUICK, out_dir=str(out), progress=False), log=lambda *a: None)
    return out, results


def test_writes_model_figures_and_results(demo):
    out, results = demo
    model_dir = out / "model"
    for name in (
        "config.json",
        "model.safetensors",
        "configuration_mqwen.py",
        "modeling_mqwen.py",
        "processing_mqwen.py",
        "tokenizer.json",
        "processor_config.json",
        "generation_config.json",
    ):
        assert (model_dir / name).is_file(), name
    assert not list(out.glob(".*tmp*")), "no temporary files are left behind"
    for name in ("captions.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["steps"] == QUICK["max_steps"]
    assert len(on_disk["loss"]) >= 1 and all(entry["loss"] > 0 for entry in on_disk["loss"])
    # After the one warm-up step its loss stays on beside the caption loss (the demo's vision_aux_weight), and
    # results.json records it on every later step.
    assert [entry["vision_warmup"] for entry in on_disk["loss"]] == [True] + [False] * (QUICK["max_steps"] - 1)
    assert all(("vision_aux_loss" in entry) != entry["vision_warmup"] for entry in on_disk["loss"])
    assert all(entry.get("vision_aux_loss", 1) > 0 for entry in on_disk["loss"])
    for key in ("exact_match", "bleu4", "cider"):
        assert 0 <= on_disk["test"][key] <= (1 if key != "cider" else 10)
    assert on_disk["test"]["images"] == QUICK["test_size"]
    truth = [
        json.loads(line)["caption"] for line in (out / "data" / "test" / "captions.jsonl").read_text().splitlines()
    ]
    assert [s["true"] for s in on_disk["samples"]] == truth


def test_reloaded_captions_equal_in_process_captions(demo):
    out, results = demo
    samples = results["samples"]
    assert [s["predicted"] for s in samples] == [s["in_process"] for s in samples]
    assert results["reload"]["identical_captions"] == len(samples) == QUICK["test_size"]
    # The fresh process used the code files saved with the weights, through the custom pipeline.
    assert results["reload"]["model_class"].startswith("transformers_modules.")
    assert results["reload"]["pipeline_class"] == "MQwenImageToTextPipeline"


def test_saved_weights_are_the_trained_ones(demo):
    """Independently of the demo's own check: load the folder here and caption the test PNGs again."""
    from mqwen import MQwenForCausalLM, MQwenProcessor
    from mqwen.demo.model import PRESETS, build_shapes_model

    out, results = demo
    model = MQwenForCausalLM.from_pretrained(out / "model").eval()
    processor = MQwenProcessor.from_pretrained(out / "model")
    images = [Image.open(out / "data" / "test" / s["file"]).convert("RGB") for s in results["samples"]]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=QUICK["max_new_tokens"])
    assert processor.decode_captions(generated, inputs["input_ids"].shape[1]) == [
        s["predicted"] for s in results["samples"]
    ]
    # Training changed the weights (the saved model is not the initialisation).
    initial, _ = build_shapes_model(PRESETS["quick"], seed=0)
    trained, start = model.state_dict(), initial.state_dict()
    assert trained.keys() == start.keys()
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert any(k.startswith("vision_tower.") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)
    assert any(k.startswith("multi_modal_projector.") for k in changed)


def test_cli_quick_flag_and_validation():
    from mqwen.demo.cli import parse_args

    settings = parse_args(["--quick", "--max-steps", "2", "--out", "x"])
    assert settings.preset == "quick" and settings.max_steps == 2 and settings.out_dir == "x"
    assert parse_args([]).max_steps == DemoSettings().max_steps
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "0"])
    other = parse_args(["--vision-warmup-target", "words", "--no-augment"])
    assert (other.vision_warmup_target, other.augment) == ("words", False)
    other = parse_args(["--vision-warmup-target", "word_pairs", "--augment"])
    assert (other.vision_warmup_target, other.augment) == ("word_pairs", True)
    with pytest.raises(SystemExit):
        parse_args(["--vision-warmup-target", "pairs"])


def test_sincos_positions_encode_row_and_column_separately():
    import math

    from mqwen.demo.model import PRESETS, build_shapes_model, sincos_2d

    codes = sincos_2d(4, 16).view(4, 4, 16)  # rows, columns, channels
    assert torch.equal(codes[1, 0, :8], codes[1, 3, :8]) and torch.equal(codes[0, 2, 8:], codes[3, 2, 8:])
    assert not torch.equal(codes[1, 0, :8], codes[2, 0, :8])
    assert codes[2, 3, 0].item() == pytest.approx(math.sin(2)) and codes[2, 3, 8 + 5].item() == pytest.approx(
        math.cos(3 / 10000 ** (1 / 4))
    )
    size = dataclasses.replace(PRESETS["quick"], sincos_positions=0.5)
    model, _ = build_shapes_model(size)
    grid = size.image_size // size.patch_size
    positions = model.vision_tower.positional_embedding.detach()
    assert torch.equal(positions[0], torch.zeros(size.vision_width))  # the class token's row
    torch.testing.assert_close(positions[1:], 0.5 * sincos_2d(grid, size.vision_width))


@pytest.mark.parametrize("std", [0.02, 0.08])
def test_initializer_range_sets_the_random_weights_of_every_part(std):
    """The demo's `initializer_range` reaches the ViT, the projector and the language model alike."""
    from mqwen.demo.model import PRESETS, build_shapes_model

    size = dataclasses.replace(PRESETS["full"], initializer_range=std)
    model, _ = build_shapes_model(size)
    weights = {
        "patch embedding": model.vision_tower.conv1.weight,
        "ViT MLP": model.vision_tower.transformer.resblocks[0].mlp.c_fc.weight,
        "projector": model.multi_modal_projector.linear_1.weight,
        "LM attention": model.language_model.model.layers[0].self_attn.q_proj.weight,
        "LM MLP": model.language_model.model.layers[-1].mlp.down_proj.weight,
        "token embeddings": model.language_model.get_input_embeddings().weight,
        "LM head": model.language_model.get_output_embeddings().weight,
    }
    for name, weight in weights.items():
        assert weight.std().item() == pytest.approx(std, rel=0.1), name


def test_plateau_exit_is_where_the_caption_loss_stays_under_the_threshold():
    from mqwen.demo.run import plateau_exit_step

    log = [
        {"step": 10, "loss": 1.9, "vision_warmup": 1},  # warm-up losses are not caption losses
        {"step": 20, "loss": 0.1, "vision_warmup": 1},
        {"step": 30, "loss": 0.2},  # a curriculum's one-shape steps dip under it ...
        {"step": 40, "loss": 0.9},  # ... before the harder images arrive
        {"step": 50, "loss": 0.24},
        {"step": 55, "grad_norm": 1.0},
        {"step": 60, "loss": 0.2},
    ]
    assert plateau_exit_step(log) == 50
    assert plateau_exit_step(log[:4]) is None
    assert plateau_exit_step(log, threshold=0.21) == 60


def test_time_limit_stops_training_once_the_minutes_are_spent():
    """--max-train-minutes lets steps run until its deadline, then asks the Trainer to stop; no limit by default."""
    import time
    from types import SimpleNamespace

    from mqwen.demo.run import _progress_callbacks

    assert DemoSettings().max_train_minutes is None and _progress_callbacks(None)[1] == _progress_callbacks(0)[1] == []
    for minutes, stops in ((10, False), (1e-9, True)):
        (limit,) = _progress_callbacks(minutes)[1]
        control = SimpleNamespace(should_training_stop=False)
        limit.on_train_begin(None, None, control)
        time.sleep(0.01)
        limit.on_step_end(None, None, control)
        assert control.should_training_stop is stops


def _clocked_run(monkeypatch, warmup_steps: int, readings: list[float]) -> dict:
    """The demo's phase clock over a run whose perf_counter reads `readings`: the start, then each step's end."""
    from types import SimpleNamespace

    import mqwen.demo.run as demo_run

    ticks = iter(readings)
    monkeypatch.setattr(demo_run.time, "perf_counter", lambda: next(ticks))
    clock = demo_run._phase_clock(warmup_steps)
    clock.on_train_begin(None, None, None)
    for step in range(1, len(readings)):
        clock.on_step_end(None, SimpleNamespace(global_step=step), None)
    return clock.ms_per_step()


def test_phase_clock_times_the_warm_up_and_the_caption_steps_apart(monkeypatch):
    """results.json's per-phase step times: the warm-up's steps over the warm-up's time, the rest over the rest."""
    # Training begins at 10 s; steps end at 10.1, 10.2 (the warm-up's last), then 10.5, 10.8 and 11.1.
    times = _clocked_run(monkeypatch, 2, [10.0, 10.1, 10.2, 10.5, 10.8, 11.1])
    assert times == {"vision_warmup_ms_per_step": pytest.approx(100.0), "caption_ms_per_step": pytest.approx(300.0)}
    # No warm-up: every step is a caption step. Stopped inside the warm-up: no caption step.
    assert _clocked_run(monkeypatch, 0, [0.0, 0.1, 0.2, 0.3]) == {
        "vision_warmup_ms_per_step": None,
        "caption_ms_per_step": pytest.approx(100.0),
    }
    assert _clocked_run(monkeypatch, 5, [0.0, 0.1, 0.2, 0.3]) == {
        "vision_warmup_ms_per_step": pytest.approx(100.0),
        "caption_ms_per_step": None,
    }


def test_results_record_each_phase_step_time_and_the_machine(demo):
    from mqwen.common.machine import cpu_model

    _, results = demo
    timings = results["timings"]
    warmup = QUICK["vision_warmup_steps"]
    captions = QUICK["max_steps"] - warmup
    assert timings["vision_warmup_ms_per_step"] > 0 and timings["caption_ms_per_step"] > 0
    # The phases' steps lie inside the training time, which also holds the trainer's start and its end (results.json
    # rounds seconds and milliseconds to one decimal: up to 50 ms, and 0.05 ms a step).
    phases = warmup * timings["vision_warmup_ms_per_step"] + captions * timings["caption_ms_per_step"]
    assert phases <= 1e3 * timings["train_seconds"] + 50 + 0.05 * QUICK["max_steps"]
    assert results["machine"]["cpu"] == cpu_model()
    assert results["machine"]["torch threads"] == results["threads"]


def test_small_shapes_are_drawn_from_their_step_on(tmp_path, monkeypatch):
    """`small_shapes_from_step`: the images the trainer's data loader draws before that step are the usual ones,
    and every image it draws from that step on has its shapes shrunk, the examples marked before training."""
    from mqwen.demo.model import PRESETS, build_shapes_model
    from mqwen.demo.run import train_model
    from mqwen.demo.shapes import LazyExample, lazy_split

    drawn = []
    draw = LazyExample.__call__
    monkeypatch.setattr(LazyExample, "__call__", lambda self: drawn.append((self.index, self.shrink_to)) or draw(self))
    settings = DemoSettings(
        **{**QUICK, "max_steps": 6, "curriculum_steps": 2, "small_shapes_from_step": 4, "small_shapes_scale": 0.6},
        out_dir=str(tmp_path),
        progress=False,
        loader_workers=0,  # the images are drawn in this process, in the order the steps take them
    )
    examples = lazy_split("train", settings.train_size, seed=0, augment=True)
    model, processor = build_shapes_model(PRESETS["quick"], seed=0)
    train_model(settings, model, processor, [(e, e.caption) for e in examples], tmp_path)

    batch = settings.batch_size
    assert len(drawn) >= settings.max_steps * batch
    assert [scale for _, scale in drawn[: 4 * batch]] == [1.0] * 4 * batch
    assert [scale for _, scale in drawn[4 * batch : 6 * batch]] == [0.6] * 2 * batch
    assert sum(e.shrink_to == 0.6 for e in examples) == len(examples) - 4 * batch  # the rest of the epoch's order


def test_small_shapes_need_the_curriculum_order_and_a_scale_in_range():
    from types import SimpleNamespace

    from torch.utils.data import RandomSampler

    from mqwen.demo.run import schedule_small_shapes

    stock = SimpleNamespace(_get_train_sampler=lambda: RandomSampler(range(8)))
    with pytest.raises(ValueError, match="--curriculum-steps"):
        schedule_small_shapes(stock, [], DemoSettings(curriculum_steps=0))
    with pytest.raises(ValueError, match="small_shapes_scale"):
        schedule_small_shapes(stock, [], DemoSettings(small_shapes_scale=1.5))
    for off in (None, 0, DemoSettings().max_steps):  # never, or not before training ends
        assert schedule_small_shapes(stock, [], DemoSettings(small_shapes_from_step=off)) == 0
