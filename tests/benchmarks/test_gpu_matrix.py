"""The GPU matrix driver: case parsing, the time budget, resuming, the table,
and one real case of ours on a tiny model."""

import argparse
import importlib.util
import json
import os

import pytest

from tests.bin.test_programs import ROOT, TINY

_spec = importlib.util.spec_from_file_location(
    "gpu_matrix", os.path.join(ROOT, "benchmarks", "gpu_matrix.py"))
gpu_matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_matrix)


def _record(lib, what, batch, precision, **kw):
    return {"lib": lib, "what": what, "batch": batch, "precision": precision, **kw}


@pytest.mark.parametrize("text,message", [
    ("train:8", "expected what:batch:precision"),
    ("train:x:bfloat16", "expected what:batch:precision"),
    ("fit:8:bfloat16", "train|infer"),
    ("train:8:int8", "float32|bfloat16|float16"),
])
def test_bad_case_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        gpu_matrix.parse_case(text)


def test_budget_skips_runs_that_cannot_start_and_done_cases():
    now = [0.0]
    ran = []

    def runner(lib, case, timeout_s):
        ran.append((lib, case, timeout_s))
        now[0] += 50.0
        return _record(lib, *case, images_per_s=1.0)

    cases = [gpu_matrix.parse_case(c) for c in ("train:8:bfloat16", "train:4:bfloat16")]
    done = [_record("ours", "train", 8, "bfloat16", images_per_s=3.0),
            _record("torchvision", "train", 8, "bfloat16", error="exit 1")]
    out = gpu_matrix.run_matrix(cases, gpu_matrix.LIBS, runner, budget_s=160, done=done,
                                min_start_s=60, clock=lambda: now[0])
    # ours b8 was measured: skipped. torchvision b8 failed: rerun. Then ours
    # b4 with 110 s left; torchvision b4 would start with 60 s: it does.
    assert [(lib, case[1]) for lib, case, _ in ran] == [
        ("torchvision", 8), ("ours", 4), ("torchvision", 4)]
    assert [t for _, _, t in ran] == [160, 110, 60]
    out = gpu_matrix.run_matrix(cases, gpu_matrix.LIBS, runner, budget_s=100,
                                min_start_s=60, clock=lambda: now[0])
    assert [r.get("skipped") for r in out] == [None, "budget", "budget", "budget"]


def test_table_has_ratios_both_ways():
    records = [
        _record("ours", "train", 8, "bfloat16", images_per_s=60.0, compile_s=70.0,
                peak_memory_bytes=2**31),
        _record("torchvision", "train", 8, "bfloat16", images_per_s=40.0),
        _record("ours", "infer", 1, "bfloat16", ms_per_image=20.0),
        _record("torchvision", "infer", 1, "bfloat16", ms_per_image=30.0),
        _record("ours", "train", 4, "float32", error="exit 1: OOM"),
        _record("ours", "train", 4, "float32", images_per_s=10.0),  # a rerun
        _record("torchvision", "train", 4, "float32", skipped="budget"),
    ]
    rows = gpu_matrix.table(records).splitlines()
    assert len(rows) == 2 + 3
    assert rows[2].startswith("| train | 8 | bfloat16 | 60.0 img/s | 40.0 img/s | 1.50 | 70.0 | 2.0 |")
    assert "| train | 4 | float32 | 10.0 img/s | skipped | - |" in rows[3]
    assert rows[4].startswith("| infer | 1 | bfloat16 | 20.0 ms/img | 30.0 ms/img | 1.50 |")


def test_one_real_case_of_ours(tmp_path, capsys):
    out = tmp_path / "matrix.jsonl"
    gpu_matrix.main([f"--out={out}", "--only=ours", "--cases=infer:1:float32",
                     "--image_size=64,64", "--runs=1", "--noxla",
                     f"--gin_file={os.path.join(ROOT, 'gin', 'shapes_demo.gin')}",
                     *[f"--gin_bindings={b}" for b in TINY]])
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in record, record["error"]
    # Nothing else beside it: the GPU machine sends back 8 files from $OUT.
    assert [p.name for p in tmp_path.iterdir()] == ["matrix.jsonl"]
    assert record["ms_per_image"] > 0 and record["mode"] == "graph"
    assert "| infer | 1 | float32 |" in capsys.readouterr().out


def test_peer_command_matches_our_static_detections_and_passes_peer_args():
    args = argparse.Namespace(image_size="800,1216", runs=20, peer_args="--frozen_backbone",
                              xla=True, gin_file=[], gin_bindings=[], profile_dir=None,
                              profile_case="train:8:bfloat16")
    infer = gpu_matrix.command("torchvision", ("infer", 1, "float32"), args, "x.json")
    train = gpu_matrix.command("torchvision", ("train", 8, "bfloat16"), args, "y.json")
    assert "--box_score_thresh=0" in infer and "--box_score_thresh=0" not in train
    assert infer[-1] == train[-1] == "--frozen_backbone"
    ours = gpu_matrix.command("ours", ("train", 8, "bfloat16"), args, "z.json")
    assert "--frozen_backbone" not in ours and "--dtype=bfloat16" in ours
