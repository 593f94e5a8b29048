"""Peak resident memory of loading a checkpoint, or of a whole command, each in a fresh process.

Method. Peak RSS is the larger of two readings: the kernel's high-water mark (`getrusage` `ru_maxrss`,
exact but since process start) and psutil samples every millisecond (which also see RSS of file pages
the process maps, as `ru_maxrss` does). What the Python interpreter and the imports of torch,
transformers and mqwen occupy is subtracted, so the figure is what loading itself costs:

- `load KIND DIR`: imports, records RSS (the baseline), then `from_pretrained(DIR)`; prints the peak
  above the baseline and the RSS after loading, as JSON.
- `baseline`: the RSS of a fresh interpreter after the same imports, for commands measured from outside.
- `run -- CMD ...`: runs CMD as this process's only child and reports the child's peak RSS: its
  `ru_maxrss` from `getrusage(RUSAGE_CHILDREN)` (this wrapper imports no torch and has no other child,
  so nothing else can set that mark) and psutil samples of the child and its descendants.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


class _Sampler(threading.Thread):
    """Polls the RSS of a process (and, with `tree`, its descendants) until stopped; keeps the maximum."""

    def __init__(self, pid, tree=False, interval=0.001):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self._halt = threading.Event()

    def _rss(self):
        import psutil

        total = self.process.memory_info().rss
        if self.tree:
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def run(self):
        import psutil

        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        return self.peak


def _imports():
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mqwen  # noqa: F401


def _current_rss():
    import psutil

    return psutil.Process().memory_info().rss


def load(kind, path):
    _imports()
    import gc

    from transformers import AutoModelForCausalLM

    from mqwen import MQwenForCausalLM

    gc.collect()
    baseline = _current_rss()
    sampler = _Sampler(os.getpid())
    sampler.start()
    cls = MQwenForCausalLM if kind == "mqwen" else AutoModelForCausalLM
    start = time.perf_counter()
    model = cls.from_pretrained(path)
    seconds = time.perf_counter() - start
    sampled = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "baseline": baseline,
        "peak": max(sampled, maxrss) - baseline,
        "after": _current_rss() - baseline,
        "param_bytes": params,
        "seconds": seconds,
    }


def baseline():
    _imports()
    import gc

    gc.collect()
    return {"baseline": _current_rss()}


def run(command):
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=sys.stderr)  # keep our stdout for the JSON report
    sampler = _Sampler(child.pid, tree=True)
    sampler.start()
    returncode = child.wait()
    sampled = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"peak": max(sampled, maxrss), "returncode": returncode, "seconds": time.perf_counter() - start}


def measure(args, env=None, cwd=None):
    """Run `python -m mqwen.benchmarks.rss ARGS` in a fresh interpreter; return its JSON report."""
    result = subprocess.run(
        [sys.executable, "-m", "mqwen.benchmarks.rss", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(
            f"RSS measurement {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mqwen.benchmarks.rss", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("load")
    p.add_argument("kind", choices=["mqwen", "lm"])
    p.add_argument("path")
    sub.add_parser("baseline")
    p = sub.add_parser("run")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.mode == "load":
        report = load(args.kind, args.path)
    elif args.mode == "baseline":
        report = baseline()
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        report = run(command)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
