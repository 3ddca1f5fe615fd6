"""Two worker processes on 127.0.0.1 train one model (MultiWorkerMirroredStrategy),
on landscape and portrait images batched apart.

One canvas per step for every replica of every worker, the chief's seed and
checkpoint, identical weights: a one-canvas stream (square images) asks
less of all of these, and the trainer's two-replica tests cover it in one
process.

Every case is slow (`make test-slow`): two TensorFlow processes, a gRPC
cluster on loopback and two step traces in each, 50-56 s alone for the
plainest case and 100 s beside the other CI worker on 2 cores, an eighth of
the CI suite's time. The trainer's two-replica tests (MirroredStrategy over
two logical CPUs) keep the in-process distributed path in CI. Alone:
  .venv/bin/python -m pytest -q -p no:xdist -m slow tests/training/test_multiworker.py
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.data import fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# With XLA each device applies its update in one compiled program
# (trainer._fuse_updates): the recipe's multi-machine path, slow here for
# its CPU compiles (`make test-slow`).
# SyncBN in the FPN and heads (gin/r50_fpn_lsj_100ep.gin's norms): statistics
# all-reduced across the workers, so their moving averages agree too (slow).
_SYNC_BN = ["FPN.norm = 'sync_bn'", "RpnHead.num_convs = 2", "BoxHead.num_conv = 2",
            "BoxHead.conv_dim = 64", "BoxHead.num_fc = 1", "BoxHead.norm = 'sync_bn'",
            "MaskHead.norm = 'sync_bn'"]


# Two batches per update (train.accumulate_steps): each replica's own sums,
# all-reduced across the workers once a step (slow).
_ACCUMULATE = ["train.accumulate_steps = 2"]


@pytest.mark.slow
@pytest.mark.parametrize("xla,extra", [(False, []), (True, []),
                                       pytest.param(False, _SYNC_BN, id="sync_bn"),
                                       pytest.param(False, _ACCUMULATE, id="accumulate")])
def test_two_workers_hold_identical_weights(tmp_path, xla, extra):
    data = tmp_path / "shapes"
    subprocess.run([sys.executable, os.path.join(ROOT, "bin", "make_shapes"),
                    f"--out={data}", "--num_train=8", "--num_val=2",
                    "--height=64", "--width=128"],
                   check=True, capture_output=True)
    # Canvases 64 x 128 and 128 x 64; the seeded draw (data seed 0) gives
    # both orientations within the 3 steps, to every replica of a step alike.
    fixtures.transpose_odd_images(data)
    bindings = ";".join(["MIN_SIZE = 64", "MAX_SIZE = 128", "CANVAS = (128, 128)",
                         f"train.xla = {xla}", *extra])
    traces = "n/a" if extra == _ACCUMULATE else 2
    ports = ",".join(str(p) for p in _free_ports(2))
    model_dir = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multiworker_worker.py"), str(i), ports,
         str(model_dir), str(data), str(tmp_path / f"w{i}.npz"), bindings],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        finally:
            p.kill()
        logs.append((p.returncode, out, err[-3000:]))
    for code, out, err in logs:
        assert code == 0, err
        assert "step 3" in out and f"traces {traces}" in out, out
        assert f"fused {int(xla)}" in out, out   # one device per worker
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 0
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # Only the chief keeps checkpoints; the other worker's copy is removed.
    assert (model_dir / "ckpt-3.index").exists()
    assert not list(model_dir.glob("worker_tmp_*"))
