"""Every command line works from any directory, the way an installed user runs it: `python -m mqwen.<folder>`
and the console scripts of setup.cfg, each with `--help` examples; one convention (`cli.py` with
`main(argv=None)`, `__main__.py` only calls it)."""

import configparser
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mqwen.train import configs

REPO = Path(__file__).resolve().parents[1]


def console_scripts():
    """{script name: "module:function"} from setup.cfg."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


SCRIPTS = console_scripts()
MODULES = ["convert", "train", "train.eval", "train.configs", "caption", "benchmarks", "demo"]


def run_elsewhere(command, cwd):
    """`command` in `cwd`, outside the checkout: `import mqwen` must come from the installed package (or, in a
    checkout under test, the PYTHONPATH pointing at it), never from the current directory."""
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_every_cli_has_a_console_script():
    assert set(SCRIPTS) == {
        "mqwen-convert",
        "mqwen-train",
        "mqwen-eval",
        "mqwen-caption",
        "mqwen-bench",
        "mqwen-demo",
        "mqwen-app",
    }
    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        entry = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(entry).parameters) == ["argv"], name  # main(argv=None) everywhere
        assert inspect.signature(entry).parameters["argv"].default is None, name


@pytest.mark.parametrize("folder", ["convert", "train", "caption", "benchmarks"])
def test_each_folder_has_cli_py_and_main_only_calls_it(folder):
    main = (REPO / folder / "__main__.py").read_text()
    assert "from .cli import main" in main and "def " not in main and "argparse" not in main
    assert (REPO / folder / "cli.py").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_python_dash_m_works_from_another_directory(module, tmp_path):
    done = run_elsewhere([sys.executable, "-m", f"mqwen.{module}", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "example" in done.stdout
    # The old spelling is not what works: from outside the checkout there is no top-level `convert` etc.
    old = run_elsewhere([sys.executable, "-m", module, "--help"], tmp_path)
    assert old.returncode != 0


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_where_installed(script, tmp_path):
    path = shutil.which(script, path=str(Path(sys.executable).parent)) or shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not installed in this environment (pip install -e . installs it)")
    done = run_elsewhere([path, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "example" in done.stdout


def test_readme_uses_commands_that_work_anywhere():
    readme = (REPO / "README.md").read_text()
    for old in ("python -m convert", "python -m train", "python -m benchmarks", "python -m caption", "-m train "):
        assert old not in readme, f"README still says {old!r}: use the console script or python -m mqwen.*"
    for old in ("--config_file train/configs", "--deepspeed train/configs"):  # a checkout's path, not an install's
        assert old not in readme, f"README still says {old!r}: use $(python -m mqwen.train.configs NAME)"


def test_shipped_launcher_configs_are_found_by_name_from_anywhere(tmp_path):
    """`python -m mqwen.train.configs NAME` prints the path of the config shipped with the package (the same file as
    the checkout's train/configs/NAME); without a name it lists them; an unknown name says which exist."""
    shipped = sorted(p.name for p in (REPO / "train" / "configs").iterdir() if p.suffix in (".yaml", ".json"))
    listed = run_elsewhere([sys.executable, "-m", "mqwen.train.configs"], tmp_path)
    assert listed.returncode == 0 and listed.stdout.split() == shipped
    # One lookup through the command (a process costs seconds: it imports transformers); the rest through the
    # function it prints, each checked against the checkout's file.
    found = run_elsewhere([sys.executable, "-m", "mqwen.train.configs", shipped[0]], tmp_path)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == configs.path(shipped[0])
    for name in shipped:
        assert configs.path(name).read_bytes() == (REPO / "train" / "configs" / name).read_bytes()
    unknown = run_elsewhere([sys.executable, "-m", "mqwen.train.configs", "fsdp.yml"], tmp_path)
    assert unknown.returncode == 2 and "fsdp.yml" in unknown.stderr and "fsdp_cpu.yaml" in unknown.stderr


def test_the_wheel_holds_every_cli_and_the_runtime(tmp_path):
    """`pip install .` (not editable) installs what the commands import: build the wheel, run from it."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout: the tracked files to build from are unknown")
    source = tmp_path / "source"  # a copy, so that setuptools' build/ and egg-info never land in the checkout
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode and "No module named pip" in done.stderr:
        pytest.skip("pip is not installed in this environment")
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("mqwen-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        listed = archive.read(entry_points).decode()
    assert {"mqwen/runtime.py", "mqwen/app.py", "mqwen/train/configs/fsdp.yaml"} <= names
    assert {"mqwen/train/configs/deepspeed_zero3.json", "mqwen/train/configs/cli.py"} <= names
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in listed
        assert f"mqwen/{target.split(':')[0].replace('.', '/').removeprefix('mqwen/')}.py" in names
    env = dict(os.environ, PYTHONPATH=str(site))
    for module in ("convert", "train"):
        ran = subprocess.run(
            [sys.executable, "-m", f"mqwen.{module}", "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0, ran.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import mqwen.runtime as r; print(r.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.stdout.strip() == str(site / "mqwen" / "runtime.py")
    config = subprocess.run(
        [sys.executable, "-m", "mqwen.train.configs", "fsdp_cpu.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert config.stdout.strip() == str(site / "mqwen" / "train" / "configs" / "fsdp_cpu.yaml"), config.stderr
