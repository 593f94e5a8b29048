"""Test helpers: a local Hugging Face cache that serves a repo id offline, and a fresh-process generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

FRESH_PROCESS_GENERATE = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
source, seeds, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
images = [Image.fromarray((np.random.RandomState(s).rand(64, 80, 3) * 255).astype("uint8")) for s in seeds]
inputs = processor(images=images)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
print("RESULT " + json.dumps({"tokens": out.tolist(), "module": type(model).__module__}))
"""


def generate_in_fresh_process(source, seeds, new_tokens, env=None):
    """Load `source` (folder or repo id) with trust_remote_code in a new interpreter and greedy-generate."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_GENERATE, str(source), json.dumps(seeds), str(new_tokens)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def write_hub_cache(cache_dir, repo_id, files, commit="1" * 40):
    """Lay `files` ({path_in_repo: bytes}) out as huggingface_hub's cache holds a downloaded repo."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for path, data in files.items():
        target = snapshot / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
