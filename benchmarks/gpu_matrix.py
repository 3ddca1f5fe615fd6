#!/usr/bin/env python3
"""Our model beside torchvision's, case by case, within a time budget.

Runs `bin/bench --what=train|infer` and `benchmarks/peers/torchvision_maskrcnn.py`
on the same work for each case, in priority order (the issue's targets
first), in one process per library that measures case after case (so
TensorFlow and torch start once; `--isolate` gives each case a process of
its own), and appends each report to a JSON-lines file as soon as it exists, so a call that runs out of time still
returns what it measured. Cases already in `--done` files are skipped, so a
second call continues where the first stopped. Prints a table with ratios:
`ours x` above 1 means ours is faster.

  python benchmarks/gpu_matrix.py --out=$OUT/matrix.jsonl --budget_s=540
  python benchmarks/gpu_matrix.py --table matrix.jsonl more.jsonl   # table only

A case is `what:batch:precision`, e.g. `train:8:bfloat16`.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = ("ours", "torchvision")
SERVE_MARK = "@@bench "  # bin/bench's and the peer's --serve answers
# The targets first (bf16 batch 8 and 4), then the rest of its table.
DEFAULT_CASES = ("train:8:bfloat16", "train:4:bfloat16", "train:8:float16",
                 "train:4:float16", "train:8:float32", "train:4:float32",
                 "infer:1:bfloat16", "infer:8:bfloat16")


def parse_case(text):
    """'train:8:bfloat16' -> ('train', 8, 'bfloat16'), with a clear error."""
    try:
        what, batch, precision = text.split(":")
        batch = int(batch)
    except ValueError:
        raise ValueError(f"case {text!r}: expected what:batch:precision, "
                         "e.g. train:8:bfloat16") from None
    if what not in ("train", "infer") or precision not in (
            "float32", "bfloat16", "float16") or batch < 1:
        raise ValueError(f"case {text!r}: what is train|infer, batch >= 1, "
                         "precision float32|bfloat16|float16")
    return what, batch, precision


def base_command(lib, args):
    """The argv that starts `lib`'s program with the flags every case shares."""
    if lib == "torchvision":
        return [sys.executable, os.path.join(ROOT, "benchmarks", "peers",
                                             "torchvision_maskrcnn.py"),
                f"--image_size={args.image_size}", f"--steps={args.runs}"]
    return [sys.executable, os.path.join(ROOT, "bin", "bench"),
            f"--image_size={args.image_size}", f"--runs={args.runs}",
            "--xla" if args.xla else "--noxla",
            *[f"--gin_file={f}" for f in args.gin_file],
            *[f"--gin_bindings={b}" for b in args.gin_bindings]]


def case_flags(lib, case, args, json_path):
    """The flags that make `lib`'s program measure `case` ('what', batch, precision)."""
    what, batch, precision = case
    common = [f"--what={what}", f"--batch={batch}", f"--json={json_path}"]
    if lib == "torchvision":
        return [*common, f"--precision={precision}",
                # Ours always runs the mask head on 100 static detections.
                *(["--box_score_thresh=0"] if what == "infer" else []),
                *args.peer_args.split()]
    flags = [*common, f"--dtype={precision}"]
    if args.profile_dir and ":".join(map(str, case)) == args.profile_case:
        flags.append(f"--profile_dir={args.profile_dir}")
    return flags


def command(lib, case, args, json_path):
    """The argv that measures `case` with `lib` in a process of its own."""
    return base_command(lib, args) + case_flags(lib, case, args, json_path)


def _key(record):
    return (record["lib"], record["what"], int(record["batch"]), record["precision"])


def load(paths):
    """Records of JSON-lines files (missing files give none)."""
    records = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
    return records


def run_matrix(cases, libs, runner, budget_s, done=(), min_start_s=60,
               clock=time.monotonic):
    """Runs each (case, lib) not in `done` while the budget lasts.

    Args:
      cases: list of (what, batch, precision).
      libs: library names, each run per case in this order.
      runner: fn(lib, case, timeout_s) -> record dict (with 'error' on failure).
      budget_s: float, seconds for the whole matrix.
      done: records already measured; their cases are skipped.
      min_start_s: a run does not start with less time than this left.
      clock: fn() -> seconds.

    Returns:
      list of the new records, in run order; one that did not start for lack
      of time is a record with `skipped: 'budget'`.
    """
    have = {_key(r) for r in done if "error" not in r and not r.get("skipped")}
    start = clock()
    records = []
    for case in cases:
        for lib in libs:
            what, batch, precision = case
            if (lib, what, batch, precision) in have:
                continue
            left = budget_s - (clock() - start)
            if left < min_start_s:
                records.append({"lib": lib, "what": what, "batch": batch,
                                "precision": precision, "skipped": "budget"})
                continue
            records.append(runner(lib, case, left))
    return records


def _finish(record, began, out_path):
    """Stamps the wall time, appends `record` to `out_path` and prints its gist."""
    record["wall_s"] = round(time.monotonic() - began, 1)
    with open(out_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record.get(k) for k in (
        "lib", "what", "batch", "precision", "images_per_s", "ms_per_image",
        "compile_s", "wall_s", "error")}), flush=True)
    return record


def _runner(out_path, measure):
    """A runner for `run_matrix`: `measure`s each case, appends it to `out_path`.

    Args:
      measure: fn(lib, case, json_path, timeout_s, scratch) -> dict: {} or
        more fields for the record when the program has written its report
        to `json_path` (merged in), or one with `error`. The reports go to a
        scratch folder outside `out_path`'s: the lent GPU machine sends back
        at most eight files from $OUT, and sixteen case files beside
        matrix.jsonl could crowd it out.
    """
    scratch = tempfile.mkdtemp(prefix="matrix_cases_")

    def run(lib, case, timeout_s):
        what, batch, precision = case
        json_path = os.path.join(scratch, f"{lib}-{what}-{batch}-{precision}.json")
        record = {"lib": lib, "what": what, "batch": batch, "precision": precision}
        began = time.monotonic()
        extra = measure(lib, case, json_path, timeout_s, scratch)
        if "error" not in extra:
            with open(json_path) as f:
                record.update(json.load(f))
        record.update(extra)
        return _finish(record, began, out_path)

    return run


def subprocess_runner(args, out_path):
    """A runner for `run_matrix` that runs `command`, a process per case."""

    def measure(lib, case, json_path, timeout_s, scratch):
        try:
            proc = subprocess.run(command(lib, case, args, json_path), cwd=ROOT,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(json_path):
            return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        return {}

    return _runner(out_path, measure)


class Server:
    """One library's program under `--serve`, kept for case after case.

    Started on the first `ask`; a process that dies is started again on the
    next, and one that overruns its time is killed. Its stderr and the
    stdout lines that are not answers go to `log_path`.
    """

    def __init__(self, argv, log_path):
        self.argv, self.log_path = list(argv), log_path
        self.proc = None

    def _start(self):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv + ["--serve"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, bufsize=1)
        self.answers = queue.Queue()

        def read(proc, answers):
            for line in proc.stdout:
                if line.startswith(SERVE_MARK):
                    answers.put(line[len(SERVE_MARK):])
                else:
                    log.write(line)
                    log.flush()
            answers.put(None)

        threading.Thread(target=read, args=(self.proc, self.answers), daemon=True).start()

    def _log_tail(self, offset):
        with open(self.log_path) as f:
            f.seek(offset)
            return f.read()[-1500:]

    def ask(self, flags, timeout_s):
        """Measures one case; returns the program's answer, a dict with
        `json` (the report's path) or `error`."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        offset = os.path.getsize(self.log_path)
        try:
            self.proc.stdin.write(json.dumps(flags) + "\n")
            self.proc.stdin.flush()
            line = self.answers.get(timeout=timeout_s)
        except queue.Empty:
            self.close(wait_s=0)
            return {"error": f"timed out after {timeout_s:.0f} s"}
        except BrokenPipeError:
            line = None
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"error": f"exit {code}: {self._log_tail(offset)}"}
        answer = json.loads(line)
        if "error" in answer:
            answer["error"] += "\n" + self._log_tail(offset)[-1000:]
        return answer

    def close(self, wait_s=60):
        """Ends the program: closes its stdin, then kills it after `wait_s`."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=wait_s)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def server_runner(args, out_path, servers):
    """A runner for `run_matrix` that asks each library's `Server`.

    TensorFlow and torch start once per library, not once per case (about
    15 s of imports and device start a case on the GPU machine). A case
    measured after others in the same process reports `case_in_process`
    above 1: its compile time can be shorter than in a fresh process, whose
    autotuning caches start empty (`--isolate` runs a process per case).

    Args:
      servers: dict, filled with one `Server` per library; close them after.
    """

    def measure(lib, case, json_path, timeout_s, scratch):
        if lib not in servers:
            servers[lib] = Server(base_command(lib, args),
                                  os.path.join(scratch, f"{lib}.log"))
        answer = servers[lib].ask(case_flags(lib, case, args, json_path), timeout_s)
        return {k: v for k, v in answer.items() if k != "json"}

    return _runner(out_path, measure)


def _speed(record):
    if record is None or "error" in record or record.get("skipped"):
        return None
    return record.get("images_per_s", record.get("ms_per_image"))


def table(records):
    """Markdown table of the newest record per (lib, case), with `ours x`."""
    latest = {}
    for r in records:
        if _speed(r) is not None or _key(r) not in latest:
            latest[_key(r)] = r
    cases = sorted({k[1:] for k in latest}, key=lambda c: (c[0] != "train", c[2], -c[1]))
    lines = ["| what | batch | precision | ours | torchvision | ours x | ours compile s "
             "| ours peak GiB | torchvision peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for what, batch, precision in cases:
        ours = latest.get(("ours", what, batch, precision))
        peer = latest.get(("torchvision", what, batch, precision))
        a, b = _speed(ours), _speed(peer)
        ratio = "-"
        if a and b:
            ratio = f"{a / b:.2f}" if what == "train" else f"{b / a:.2f}"
        unit = "img/s" if what == "train" else "ms/img"

        def cell(r, v):
            if v is not None:
                return f"{v} {unit}"
            if r is None:
                return "-"
            return "skipped" if r.get("skipped") else "failed"

        def gib(r):
            m = (r or {}).get("peak_memory_bytes")
            return f"{m / 2**30:.1f}" if m else "-"

        lines.append(f"| {what} | {batch} | {precision} | {cell(ours, a)} | "
                     f"{cell(peer, b)} | {ratio} | {(ours or {}).get('compile_s', '-')} "
                     f"| {gib(ours)} | {gib(peer)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON-lines file the reports are appended to")
    p.add_argument("--table", nargs="+", metavar="JSONL",
                   help="only print the table of these files")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--only", choices=LIBS, help="run one library only")
    p.add_argument("--done", nargs="*", default=[],
                   help="JSON-lines files whose measured cases are skipped")
    p.add_argument("--budget_s", type=float, default=540.0)
    p.add_argument("--min_start_s", type=float, default=60.0)
    p.add_argument("--image_size", default="800,1216")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--gin_file", action="append", default=None)
    p.add_argument("--gin_bindings", action="append", default=[])
    p.add_argument("--noxla", dest="xla", action="store_false")
    p.add_argument("--peer_args", default="",
                   help="more flags for the torchvision script, e.g. --frozen_backbone")
    p.add_argument("--isolate", action="store_true",
                   help="a fresh process per case and library, as a user's first run "
                        "(by default each library's process measures case after case)")
    p.add_argument("--profile_case", default="train:8:bfloat16")
    p.add_argument("--profile_dir", default=None,
                   help="trace --profile_case of ours there (bin/bench --profile_dir)")
    args = p.parse_args(argv)
    if args.table:
        print(table(load(args.table)))
        return 0
    if not args.out:
        p.error("--out is required (or --table)")
    args.gin_file = args.gin_file or [os.path.join(ROOT, "gin", "r50_fpn_1x.gin")]
    try:
        cases = [parse_case(c) for c in args.cases.split(",") if c]
    except ValueError as e:
        p.error(str(e))
    libs = (args.only,) if args.only else LIBS
    servers = {}
    runner = (subprocess_runner(args, args.out) if args.isolate
              else server_runner(args, args.out, servers))
    try:
        run_matrix(cases, libs, runner, args.budget_s, done=load(args.done),
                   min_start_s=args.min_start_s)
    finally:
        for server in servers.values():
            server.close()
    print(table(load(args.done + [args.out])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
