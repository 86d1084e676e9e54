"""Shared fixtures: small real-image folders cut from ../shared/data, and a helper to run scripts as subprocesses."""

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"missing {path}: the tests need ../shared/data beside the checkout")
    return path


def extract_cifar_subset(dst: Path, n_train_per_class: int, n_test_per_class: int) -> Path:
    """Stream the CIFAR-10 JPEG tarball once and keep the first n images of every class in each split."""
    quota = {"train": n_train_per_class, "test": n_test_per_class}
    counts: dict = {}
    with tarfile.open(_shared("cifar10-jpeg.tar.gz"), "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in quota:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= quota[parts[0]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dst / member.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return dst


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a busy machine (no OpenMP spin contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Disk: the runs write ResNet-50 and ViT checkpoints, about 15 GB in a whole suite, and pytest keeps every tmp dir
# of its last 3 sessions. A full disk fails every later run (CI did), so a passed test's tmp_path is deleted at its
# teardown (a failed one's is kept to look at) and module fixtures make their dirs with `module_tmp`.
@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest >= 7 (requirements.txt)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed


_CALL_PASSED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _delete_tmp_path_of_passed_tests(request):
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and request.node.stash.get(_CALL_PASSED, False):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """tmp_path_factory.mktemp for module fixtures: what it made is deleted once the module's tests are done, unless
    one of them failed (kept to look at)."""
    made, failed = [], request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made if request.session.testsfailed == failed else []:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """400 train + 200 test real CIFAR-10 images (JPEG q75 copy) as an image folder with train/ and test/."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar10-mini"), 40, 20)


@pytest.fixture(scope="session")
def small_cifar_dir(cifar_dir, tmp_path_factory) -> Path:
    """100 train + 50 test images: the first 10 and 5 of every class of cifar_dir, linked."""
    dst = tmp_path_factory.mktemp("cifar10-100")
    for split, n in (("train", 10), ("test", 5)):
        for cls in sorted((cifar_dir / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                (dst / split / cls.name / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def cifar2k_dir(tmp_path_factory) -> Path:
    """2,000 train + 500 test real CIFAR-10 images (JPEG q75 copy): enough to show features being learned."""
    return extract_cifar_subset(tmp_path_factory.mktemp("cifar10-2k"), 200, 50)


@pytest.fixture(scope="session")
def imagewoof_dir(tmp_path_factory) -> Path:
    """160 real ImageNet photos (10 dog classes) in the ImageNet folder layout, train/ and val/."""
    dst = tmp_path_factory.mktemp("imagewoof-mini")
    with tarfile.open(_shared("imagewoof-mini.tar")) as tar:
        tar.extractall(dst, filter="data")
    return dst


def start_script(args) -> subprocess.Popen:
    """Start `python script.py args` in the background (output discarded), one thread like run_script."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ddp_beside_reference(ddp_args, reference_args) -> None:
    """A DDP-equality test's two runs at once (2 CI cores): `torchrun --nproc_per_node=2 ddp_args` in the foreground
    and its one-process reference in the background. Either failing fails the test with that run's stderr (the
    reference rerun to show it); a failed DDP run kills the reference, which may wait for its state (ddp_handoff.py)."""
    reference = start_script(reference_args)
    try:
        proc = run_script(ddp_args, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        code = reference.wait(timeout=300)
    finally:
        reference.kill()
    if code != 0:
        pytest.fail(run_script(reference_args).stderr[-3000:])


def run_script(args, timeout=300, nproc=None, env=None) -> subprocess.CompletedProcess:
    """Run `python script.py args` (or `torchrun --standalone --nproc_per_node=nproc ...`) from the project root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}  # env wins
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    """The run failed with exactly one 'error:' line (no traceback) that contains every needle."""
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


def read_log(out) -> list:
    """The records of a run's log.jsonl."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def read_results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def assert_finite_results(res: dict, *keys):
    for key in keys:
        assert isinstance(res.get(key), (int, float)) and math.isfinite(res[key]), (key, res.get(key))


def recipe_cmd(script, recipe: str, base: str, data_dir, out_dir, extra: str = "") -> list:
    """`script recipe` on an image folder (the cifar recipe reads it in memory, imagenet streams it) with the flags
    of base, then extra (later flags override earlier ones), writing to out_dir."""
    folder = ["--dataset", "imagefolder"] if recipe == "cifar" else []
    return [script, recipe, *folder, "--data-dir", data_dir, *base.split(), *extra.split(), "--out-dir", out_dir]
