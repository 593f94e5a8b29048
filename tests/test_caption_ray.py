"""`mqwen-caption --engine ray` on a two-node Ray cluster on 127.0.0.1: the captions of a single-process run,
every key exactly once, also when a captioner actor's worker or the driver is SIGKILLed mid-job.

The cluster (`ray.cluster_utils.Cluster`, two nodes of 2 logical CPUs each) is started once for the module and
always shut down by the fixture's finalizer; every driver is a subprocess with a timeout. The model is the tiny
random one, so a job is seconds of captioning and mostly Ray's and the actors' start-up.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from caption_data import MAX_IMAGE_PIXELS, check_rows, write_parquet, write_tars

# Every Ray process of these tests (this one, the nodes, their workers, the drivers) takes 127.0.0.1 as its node
# address: Ray reads this before it is imported. Without it a driver turns the address 127.0.0.1 into the
# machine's network address, where a cluster listening on 127.0.0.1 only cannot be reached.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the caption extra (ray[data]) is not installed")

from mqwen.caption.dataset import caption_dataset  # noqa: E402
from mqwen.caption.shards import read_output, read_shard  # noqa: E402

N_IMAGES = 208
JOB = ["--max-new-tokens", "8", "--batch-size", "4", "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--no-progress"]
DRIVER_TIMEOUT = 240  # seconds a whole driver run may take on a loaded 2-core VM


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=100 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        cluster.shutdown()  # kills the raylets, GCS and their workers, like `ray stop --force` for this cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    tars = write_tars(root / "shards", N_IMAGES, 4)
    parquet = write_parquet(root / "images.parquet", N_IMAGES, row_group_size=13)  # 16 units of 13 rows
    return {"tars": [str(root / "shards" / "{00000..00003}.tar")], "parquet": [str(parquet)], "n_tars": len(tars)}


@pytest.fixture(scope="module")
def reference(tiny_dir, data, tmp_path_factory):
    """key -> caption of the single-process engine (greedy), on the tar shards."""
    out = tmp_path_factory.mktemp("single") / "captions"
    caption_dataset(
        data["tars"], str(tiny_dir), out, max_new_tokens=8, batch_size=4, max_image_pixels=MAX_IMAGE_PIXELS,
        progress=False, device="cpu",
    )  # fmt: skip
    return check_rows(read_output(out), N_IMAGES)


def driver(tiny_dir, cluster, inputs, out, *extra):
    command = [sys.executable, "-m", "mqwen.caption", *inputs, "--model", str(tiny_dir), "--output", str(out)]
    command += [*JOB, "--engine", "ray", "--ray-address", cluster.address, "--actors", "2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
    try:
        output, _ = process.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the driver did not finish in {DRIVER_TIMEOUT} s:\n{output[-3000:]}")
    assert process.returncode == 1, output[-3000:]  # 1: the job finished, and some images could not be read
    return output


def wait_for_shards(out, process, at_least=1, timeout=DRIVER_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = sorted(out.glob("part-*")) if out.is_dir() else []
        if len(shards) >= at_least:
            return shards
        if process.poll() is not None:
            pytest.fail(f"the driver ended before writing a shard:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("no shard was written in time")


def captioner_workers():
    """Processes of Ray's captioner actors (Ray titles them `ray::MapWorker(MapBatches(Captioner))...`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("MapBatches(Captioner)" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_tars_and_parquet_equal_a_single_process_run(tiny_dir, cluster, data, reference, tmp_path):
    for name in ("tars", "parquet"):
        out = tmp_path / name
        output = finish(driver(tiny_dir, cluster, data[name], out))
        assert check_rows(read_output(out), N_IMAGES) == reference, name
        assert "5 images could not be read" in output
    assert len(list((tmp_path / "tars").glob("part-*.parquet"))) == data["n_tars"]  # one shard per tar shard


def test_a_killed_captioner_worker_is_replaced(tiny_dir, cluster, data, reference, tmp_path):
    out = tmp_path / "captions"
    process = driver(tiny_dir, cluster, data["parquet"], out, "--shard-size", "13")
    wait_for_shards(out, process)
    workers = captioner_workers()
    assert workers, "no captioner actor process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    assert len(list(out.glob("part-*"))) < 16, "the job had finished before the kill; the test proves nothing"
    finish(process)
    assert check_rows(read_output(out), N_IMAGES) == reference


def test_a_killed_driver_resumes_without_captioning_done_keys_again(tiny_dir, cluster, data, reference, tmp_path):
    out = tmp_path / "captions"
    process = driver(tiny_dir, cluster, data["parquet"], out, "--shard-size", "13")
    wait_for_shards(out, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    before = {shard.name: shard.read_bytes() for shard in out.glob("part-*")}
    assert 0 < len(before) < 16, "the kill should land mid-job"
    done = {row["key"] for name in before for row in read_shard(out / name)}

    output = finish(driver(tiny_dir, cluster, data["parquet"], out, "--shard-size", "13"))
    assert f"{len(done)} of {N_IMAGES} keys already captioned" in output
    after = {shard.name: shard.read_bytes() for shard in out.glob("part-*")}
    assert {name: after[name] for name in before} == before, "completed shards are left as they were"
    new_rows = [row for name in set(after) - set(before) for row in read_shard(out / name)]
    assert not {row["key"] for row in new_rows} & done, "keys of completed shards were captioned again"
    assert check_rows(read_output(out), N_IMAGES) == reference
