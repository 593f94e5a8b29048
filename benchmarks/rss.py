"""Peak resident memory of loading a checkpoint, or of a whole command, each in a fresh process.

Method. The peak is the kernel's high-water mark of resident memory, `VmHWM` in /proc/PID/status:
exact, and counting file pages a process maps (safetensors are memory-mapped) as well as the memory
it allocates. (`getrusage().ru_maxrss` would be wrong here: Linux carries it across `exec`, so a child
forked from a large benchmark process inherits the parent's size.) What the interpreter and the
imports of torch, transformers and mqwen occupy is subtracted, so the figure is what the work costs:

- `load KIND DIR`: imports, records RSS (the baseline), runs `from_pretrained(DIR)`, then reads every
  weight once (transformers 5 may leave weights memory-mapped and not yet resident; the first forward
  would bring them in). Prints the peak above the baseline after loading and after that first read.
- `baseline`: the RSS of a fresh interpreter after the same imports, for commands measured from outside.
- `run -- CMD ...`: runs CMD as this process's only child and polls the child's `VmHWM` (and the RSS
  of any grandchildren) every millisecond until it exits; `VmHWM` never decreases, so the last poll
  holds the peak up to a millisecond before exit.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from ..modeling_mqwen import MQwenForCausalLM


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

        total = vm_hwm(self.process.pid)
        if self.tree:
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except (psutil.Error, OSError, RuntimeError):  # the process has exited (or is a zombie)
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size of a live process, in bytes (Linux `VmHWM`)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line; peak RSS needs Linux")


def _imports():
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mqwen  # noqa: F401


def _current_rss():
    import psutil

    return psutil.Process().memory_info().rss


def load(kind: str, path: str | os.PathLike) -> dict[str, float]:
    _imports()
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    gc.collect()
    baseline = _current_rss()
    cls = MQwenForCausalLM if kind == "mqwen" else AutoModelForCausalLM
    start = time.perf_counter()
    model = cls.from_pretrained(path)
    seconds = time.perf_counter() - start
    peak_load = vm_hwm() - baseline
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()  # read every byte once, as a first forward would (no copy: a half-precision
            # `.float()` here would add a transient fp32 copy of the largest tensor to the peak)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "baseline": baseline,
        "peak_load": peak_load,
        "peak": vm_hwm() - baseline,
        "after": _current_rss() - baseline,
        "param_bytes": params,
        "seconds": seconds,
    }


def baseline() -> dict[str, int]:
    _imports()
    import gc

    gc.collect()
    return {"baseline": _current_rss()}


def run(command: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=sys.stderr)  # keep our stdout for the JSON report
    sampler = _Sampler(child.pid, tree=True)
    sampler.start()
    returncode = child.wait()
    peak = sampler.stop()
    return {"peak": peak, "returncode": returncode, "seconds": time.perf_counter() - start}


def measure(
    args: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> dict[str, float]:
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


def main(argv: list[str] | None = None) -> None:
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
