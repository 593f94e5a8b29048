"""Caption evaluation the way papers report it (install with `pip install "mqwen[eval]"`).

- `coco_metrics`: `caption_scores(predictions, references, tokenizer="ptb")`, the COCO caption metrics
  (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when its models are present) by pycocoevalcap's own code and its
  Java PTB tokenizer; `tokenizer="simple"` scores Java-free, labelled not comparable.
- `clipscore`: CLIPScore and RefCLIPScore (Hessel et al. 2021) with an OpenCLIP model the user names.
- `lmms_model`: MQwen as an lmms-eval model (`lmms-eval --model mqwen ...`), registered by the
  `lmms_eval.models` entry point (`lmms_manifest`).

`mqwen-eval` (train/cli.py) and `mqwen.train.evaluate_captions` report these scores. Named `evaluation`, not
`evaluate`: the repository root is the package, and a top-level `evaluate/` folder would shadow Hugging Face's
`evaluate` library (an lmms-eval dependency) whenever the root is on `sys.path` (`python -m ...` run there).
"""
