"""A local lmms-eval caption task over the shapes demo's test split, scored as lmms-eval scores COCO captions.

    python -m mqwen.evaluation.lmms_shapes_task OUT_DIR --n 300 --image-size 64
    lmms-eval --model mqwen --model_args pretrained=mqwen-shapes-demo/model,batch_size=8 \\
        --tasks mqwen_shapes_cap --include_path OUT_DIR --output_path OUT_DIR/results
    mqwen-eval --model mqwen-shapes-demo/model --data OUT_DIR/images/captions.jsonl --image-column file  # the same

OUT_DIR holds `data/` (a `datasets` DatasetDict saved with `save_to_disk`: split `test`, columns image,
question_id, id, answer, question), `images/` (the same images as PNGs with `captions.jsonl`, what
`mqwen-eval` reads), and `mqwen_shapes_cap.yaml`, a copy of lmms-eval's `coco2017_cap_val` task over that folder
(`load_from_disk`, no network): lmms-eval's own COCO functions (`lmms_eval.tasks.coco_cap.utils`: pycocoevalcap
with its PTB tokenizer) turn the answers into BLEU-1..4, METEOR, ROUGE-L and CIDEr. Only the prompt differs:
the `question` column (MQwen's default caption instruction unless `--instruction` says otherwise), so that a
model trained on that instruction is asked what it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..common.atomic_files import staged_folder
from ..demo.shapes import make_split, write_split
from ..processing_mqwen import DEFAULT_CAPTION_INSTRUCTION

TASK = "mqwen_shapes_cap"
COCO = "lmms_eval.tasks.coco_cap.utils"
HERE = "mqwen.evaluation.lmms_shapes_task"  # how lmms-eval imports `doc_to_text` (not __name__: "__main__" under -m)
METRICS = {"Bleu_4": "bleu4", "Bleu_3": "bleu3", "Bleu_2": "bleu2", "Bleu_1": "bleu1", "METEOR": "meteor"}
METRICS.update({"ROUGE_L": "rougel", "CIDEr": "cider"})


def doc_to_text(doc: dict) -> str:
    """The prompt text of a document: its `question` column."""
    return doc["question"]


def task_yaml(data_dir: str | os.PathLike) -> str:
    """The task definition over the `datasets` folder `data_dir` (an absolute path is written)."""
    metrics = "".join(
        f"  - metric: coco_{name}\n    aggregation: !function {COCO}.coco_{short}\n    higher_is_better: true\n"
        for name, short in METRICS.items()
    )
    return (
        f"task: {TASK}\n"
        f"dataset_path: {json.dumps(str(Path(data_dir).absolute()))}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {COCO}.coco_doc_to_visual\n"
        f"doc_to_text: !function {HERE}.doc_to_text\n"
        'doc_to_target: "answer"\n'
        "generation_kwargs:\n  max_new_tokens: 64\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function {COCO}.coco_process_result\n"
        f"metric_list:\n{metrics}"
        "metadata:\n  - version: 0.0\n"
    )


def write_shapes_task(
    out_dir: str | os.PathLike,
    n: int = 300,
    seed: int = 0,
    image_size: int = 64,
    instruction: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the task folder for the first `n` test examples of the shapes demo (`demo.shapes.make_split`);
    returns its path. The folder appears complete or not at all (`staged_folder`)."""
    import datasets  # the train extra's; imported here so that `--help` answers without it

    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    examples = make_split("test", n, seed, image_size)
    out_dir = Path(out_dir).absolute()
    with staged_folder(out_dir, overwrite=overwrite) as staging:
        write_split(examples, staging / "images")
        features = datasets.Features(
            image=datasets.Image(),
            question_id=datasets.Value("string"),
            id=datasets.Value("int64"),
            answer=datasets.Sequence(datasets.Value("string")),
            question=datasets.Value("string"),
        )
        rows = {
            "image": [e.image for e in examples],
            "question_id": [f"shapes_{i:05d}.png" for i in range(n)],  # lmms-eval's COCO code reads the id from it
            "id": list(range(n)),
            "answer": [[e.caption] for e in examples],
            "question": [instruction or DEFAULT_CAPTION_INSTRUCTION] * n,
        }
        test = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"test": test}).save_to_disk(str(staging / "data"))
        (staging / f"{TASK}.yaml").write_text(task_yaml(out_dir / "data"))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.evaluation.lmms_shapes_task",
        description="Write a local lmms-eval task (mqwen_shapes_cap) over the shapes demo's test split.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="folder to write (data/, images/, mqwen_shapes_cap.yaml)")
    parser.add_argument("--n", type=int, default=300, help="test images (default 300, the demo's test size)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's --seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="the demo preset's image size (default 64)")
    parser.add_argument("--instruction", help="prompt text (default: MQwen's default caption instruction)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        out = write_shapes_task(args.out_dir, args.n, args.seed, args.image_size, args.instruction, args.overwrite)
    except ValueError as error:  # DestinationError (OUT_DIR exists and is not empty), a bad --n
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {out}: lmms-eval --model mqwen --model_args pretrained=MODEL --tasks {TASK} --include_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
