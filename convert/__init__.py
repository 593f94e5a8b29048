"""Building and publishing MQwen checkpoints (`mqwen-convert --help`).

- `build.py`      `mqwen-convert build`: pretrained LLM + CLIP ViT -> Hub-ready MQwen folder
- `vision.py`     every vision source -> OpenCLIP-layout weights + vision config (the one key mapping)
- `llm.py`        the LLM's weights, vocabulary growth for `<image>`, and its tensor plan
- `chat_template.py` the LLM's own chat template, made to render image parts (or ChatML, with a warning)
- `tokenizer.py`  `<image>`, stop and pad tokens of the LLM's tokenizer
- `projector.py`  fresh or loaded (shape-checked) projector weights
- `shards.py`     streaming, sharded safetensors reading and writing
- `hub.py`        weight-file discovery and minimal Hub downloads
- `card.py`       the model card
- `licenses.py`   the sources' licenses, read from their model cards
- `push.py`       `mqwen-convert push`: one-commit upload with huggingface_hub
"""
