"""Fixtures shared by the test modules: one intra-op thread, the bundled digits, a pickled payload, the finished
smoke study (run once per session) and private copies of it."""

import json
import os
import shutil
import time
from pathlib import Path

# One intra-op thread in each test process unless told otherwise (the workflow's jobs and the launchers set their
# own): the two test workers share two cores, where OpenMP threads spin-waiting beside each other cost more time
# than they save. Set before torch is imported, which reads it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """The CI box has 2 shared cores: one intra-op thread is faster (no OpenMP spin-waiting on tiny GEMMs) and
    deterministic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    """sklearn's bundled 8×8 digits through training.dataset (float32 in [−1, 1], labels)."""
    from training.dataset import load_dataset

    return load_dataset("digits")


class Payload:
    """Pickles as a call of os.system that creates `marker`: what a crafted data file would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def payload():
    """payload(marker) -> an object whose unpickling would create the file `marker`."""
    return Payload


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The smoke study (workflow/config/smoke.yaml) run to the end once per test session. Tests that change it work
    on their own copy (`study_copy`)."""
    from test_workflow import CONFIGS, smk

    d = tmp_path_factory.mktemp("smoke")
    t0 = time.time()
    smk("--configfile", CONFIGS / "smoke.yaml", "--cores", "2", directory=d, timeout=1800)
    print(f"\nsmoke study wall time: {time.time() - t0:.0f} s")
    return d


def copy_study(src: Path, dst: Path) -> Path:
    """A copy of a finished study folder that Snakemake sees as finished too (modification times kept, its
    .snakemake records with it) and whose checksum sidecars name the copy in their rebuild commands."""
    shutil.copytree(src, dst, symlinks=True)
    for side in (dst / "results").rglob("*.sha256"):
        rec = json.loads(side.read_text())
        if "rebuild" in rec:
            rec["rebuild"] = rec["rebuild"].replace(str(src), str(dst))
            stat = side.stat()
            side.write_text(json.dumps(rec, indent=1) + "\n")
            os.utime(side, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return dst


@pytest.fixture
def study_copy(smoke_study, tmp_path):
    """A private copy of the finished smoke study, to damage."""
    return copy_study(smoke_study, tmp_path / "study")

