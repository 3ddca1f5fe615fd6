"""The GPU matrix driver: case parsing, the time budget, resuming, the table,
and one real case of ours on a tiny model."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

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


# 30 s served, 13 s more with a process per case (`--isolate`): the fake
# servers above check the protocol in CI; run `make test-slow` before a GPU
# session's matrix.
@pytest.mark.slow
@pytest.mark.parametrize("isolate", [False, True])
def test_real_cases_of_ours(tmp_path, capsys, isolate):
    # Served: one process measures both cases (the second says so); with
    # --isolate each case has a process of its own.
    out = tmp_path / "matrix.jsonl"
    cases = "infer:1:float32" if isolate else "infer:1:float32,infer:2:bfloat16"
    gpu_matrix.main([f"--out={out}", "--only=ours", f"--cases={cases}",
                     "--image_size=64,64", "--runs=1", "--noxla",
                     *(["--isolate"] if isolate else []),
                     f"--gin_file={os.path.join(ROOT, 'gin', 'shapes_demo.gin')}",
                     *[f"--gin_bindings={b}" for b in TINY]])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(cases.split(","))
    for record in records:
        assert "error" not in record, record["error"]
        assert record["ms_per_image"] > 0 and record["mode"] == "graph"
        assert record["peak_memory_bytes"] > 0
    assert [r["precision"] for r in records] == [c.split(":")[2] for c in cases.split(",")]
    assert [r.get("case_in_process") for r in records] == (
        [None] if isolate else [1, 2])
    # Nothing else beside it: the GPU machine sends back 8 files from $OUT.
    assert [p.name for p in tmp_path.iterdir()] == ["matrix.jsonl"]
    assert "| infer | 1 | float32 |" in capsys.readouterr().out


_FAKE_SERVER = """
import json, os, sys, time
for line in sys.stdin:
    flags = json.loads(line)
    print("a line that is not an answer", flush=True)
    if flags == ["--crash"]:
        print("dying on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if flags == ["--hang"]:
        time.sleep(600)
    if flags == ["--fail"]:
        print("why it failed", file=sys.stderr, flush=True)
        print("@@bench " + json.dumps({"error": "ValueError: bad case"}), flush=True)
        continue
    print("@@bench " + json.dumps({"json": str(os.getpid()), "args": sys.argv[1:] + flags}),
          flush=True)
"""


def test_server_keeps_its_process_restarts_after_a_crash_and_kills_a_hang(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(_FAKE_SERVER)
    log = tmp_path / "fake.log"
    server = gpu_matrix.Server([sys.executable, str(script), "--base"], str(log))
    try:
        first = server.ask(["--case=1"], timeout_s=30)
        assert first["args"] == ["--base", "--serve", "--case=1"]
        assert server.ask(["--case=2"], timeout_s=30)["json"] == first["json"]
        failed = server.ask(["--fail"], timeout_s=30)
        assert failed["error"].startswith("ValueError: bad case") and "why it failed" in failed["error"]
        assert server.ask(["--case=3"], timeout_s=30)["json"] == first["json"]
        crashed = server.ask(["--crash"], timeout_s=30)
        assert crashed["error"].startswith("exit 3") and "dying on purpose" in crashed["error"]
        second = server.ask(["--case=4"], timeout_s=30)["json"]
        assert second != first["json"]
        assert server.ask(["--hang"], timeout_s=1) == {"error": "timed out after 1 s"}
        assert server.ask(["--case=5"], timeout_s=30)["json"] not in (first["json"], second)
        assert "a line that is not an answer" in log.read_text()
    finally:
        server.close()
    assert server.proc is None


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
    # A served case sends only its own flags; the process has the rest.
    flags = gpu_matrix.case_flags("ours", ("train", 8, "bfloat16"), args, "z.json")
    assert ours == gpu_matrix.base_command("ours", args) + flags
    assert "--image_size=800,1216" not in flags and "--json=z.json" in flags
@pytest.mark.slow   # 16 s; run `make test-slow` before a GPU session's matrix
def test_bench_serve_names_a_bad_request_and_goes_on(tmp_path):
    args = argparse.Namespace(image_size="64,64", runs=1, xla=False, gin_bindings=TINY,
                              gin_file=[os.path.join(ROOT, "gin", "shapes_demo.gin")])
    server = gpu_matrix.Server(gpu_matrix.base_command("ours", args), str(tmp_path / "log"))
    report = tmp_path / "case.json"
    try:
        bogus = server.ask(["--what=infer", "--bogus=1"], timeout_s=120)
        assert "bogus" in bogus["error"]
        assert "--what=train|infer" in server.ask(["--what=ops"], timeout_s=60)["error"]
        assert "expected a JSON list" in server.ask({"what": "infer"}, timeout_s=60)["error"]
        answer = server.ask(["--what=infer", "--batch=1", f"--json={report}"], timeout_s=120)
        assert answer == {"json": str(report), "case_in_process": 1}
        assert json.loads(report.read_text())["ms_per_image"] > 0
    finally:
        server.close()


@pytest.mark.skipif(not os.environ.get("MRCNN_TORCH_PYTHON"),
                    reason="set MRCNN_TORCH_PYTHON to a Python with torch and torchvision")
def test_torchvision_serves_cases(tmp_path):
    out = tmp_path / "matrix.jsonl"
    subprocess.run([os.environ["MRCNN_TORCH_PYTHON"],
                    os.path.join(ROOT, "benchmarks", "gpu_matrix.py"), f"--out={out}",
                    "--only=torchvision", "--cases=infer:1:float32,train:1:bfloat16",
                    "--image_size=96,128", "--runs=1", "--peer_args=--warmup=0"],
                   check=True, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        assert "error" not in record, record["error"]
    assert [r["case_in_process"] for r in records] == [1, 2]
    assert records[0]["ms_per_image"] > 0 and records[1]["images_per_s"] > 0
    assert records[0]["box_score_thresh"] == 0 and records[1]["precision"] == "bfloat16"
