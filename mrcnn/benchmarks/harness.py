"""Times benchmark entries: warm-up (compile) separately, then median and spread.

Every case is measured beside its baselines in the same process, and ratios
are printed against the first entry (ours): `speedup = baseline / ours`, so a
value above 1 means ours is faster.
"""

import dataclasses
import importlib
import json
import statistics
import time

import numpy as np
import tensorflow as tf

from mrcnn.benchmarks.common import BenchConfig, Entry

# op name -> (module under mrcnn.benchmarks, case builder)
OP_CASES = {
    "anchors": ("ops_anchors", "bench_anchors"),
    "nms": ("ops_nms", "bench_nms"),
    "multiclass_nms": ("ops_nms", "bench_multiclass_nms"),
    "roi_align": ("ops_roi_align", "bench_roi_align"),
    "multilevel_roi_align": ("ops_roi_align", "bench_multilevel_roi_align"),
    "match": ("ops_targets", "bench_match"),
    "mask_targets": ("ops_masks", "bench_mask_targets"),
    "paste_masks": ("ops_masks", "bench_paste_masks"),
    "coco_rle": ("ops_masks", "bench_coco_rle"),
    "coco_eval": ("eval_coco", "bench_coco_eval"),
    "eval_host": ("eval_coco", "bench_eval_host"),
}


def build_entries(op, cfg):
    """The list of `Entry` for one op name of `OP_CASES`."""
    module, fn = OP_CASES[op]
    return getattr(importlib.import_module(f"mrcnn.benchmarks.{module}"), fn)(cfg)


def _sync():
    # Kernels on a GPU run asynchronously; a sync makes the wall time honest.
    sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
    if sync is not None and tf.config.list_logical_devices("GPU"):
        sync()


def time_entry(entry: Entry, runs: int, warmup: int):
    """Runs one entry: returns a dict of compile (first call) and timed stats in ms."""
    fn = entry.fn
    if entry.jit_compile is not None:
        fn = tf.function(entry.fn, jit_compile=entry.jit_compile)
    start = time.perf_counter()
    fn()
    _sync()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    q25, q75 = np.percentile(times, [25, 75])
    return {
        "label": entry.label,
        "xla": entry.jit_compile,
        "first_call_s": round(first_s, 3),
        "median_ms": round(statistics.median(times), 3),
        "p25_ms": round(float(q25), 3),
        "p75_ms": round(float(q75), 3),
        "runs": runs,
        "note": entry.note,
    }


def run_op(op, cfg: BenchConfig, runs=20, warmup=3):
    """Measures ours and the baselines of one op; returns a result dict."""
    results = [time_entry(e, runs, warmup) for e in build_entries(op, cfg)]
    ours = results[0]["median_ms"]
    for r in results:
        r["speedup_of_ours"] = round(r["median_ms"] / ours, 3) if ours > 0 else None
    return {"op": op, "config": dataclasses.asdict(cfg), "results": results}


def format_table(report):
    """Human-readable lines for one `run_op` result."""
    cfg = report["config"]
    lines = [f"== {report['op']}  B={cfg['batch']} dtype={cfg['dtype']} "
             f"xla={cfg['xla']} dist={cfg['distribution']}"]
    lines.append(f"{'entry':44s} {'median ms':>10s} {'p25-p75 ms':>17s} "
                 f"{'1st call s':>10s} {'ours x':>7s}")
    for r in report["results"]:
        spread = f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}"
        lines.append(f"{r['label'][:44]:44s} {r['median_ms']:10.2f} {spread:>17s} "
                     f"{r['first_call_s']:10.2f} {r['speedup_of_ours']:7.2f}")
        if r["note"]:
            lines.append(f"    ({r['note']})")
    return "\n".join(lines)


def write_json(path, reports):
    with open(path, "w") as f:
        json.dump(reports, f, indent=2)
