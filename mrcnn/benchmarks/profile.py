"""Where a step's time goes: a TF profiler trace, summed per op type and scope.

`trace(call, steps, logdir)` records `steps` calls with `tf.profiler`; the
trace opens in TensorBoard's profile tab. `summarize(logdir, steps)` reads
the `.xplane.pb` it wrote with TF's own protos and sums op time per step:

- graph mode: each TF op event (`scope/name:Type`) counts, on the host
  threads that ran it;
- XLA: each HLO event (`hlo_module`, `hlo_op` stats) counts, named by the TF
  op it was lowered from (the HLO instruction's `metadata.op_name`, read
  from the HLO protos the trace carries).

Where the trace has device planes (`/device:GPU:N`), only their kernel
streams count (the host only launches); otherwise the host plane does. A
kernel is named by its HLO op (XLA) or by its `tf_op` stat (graph mode,
`scope/name:Type`), else by the kernel's own name.
Op time is not wall time: ops on parallel threads or streams add up.
"""

import collections
import glob
import os
import re

import tensorflow as tf

# Scope components that say how an op was called, not which module it is in.
_WRAPPERS = re.compile(r"^((Stateful)?PartitionedCall|while|cond|body|Identity|"
                       r"replica|gradient_tape)?(_\d+)?$|_inference_")
_BACKWARD = ("gradient_tape",)


def trace(call, steps, logdir):
    """Records `steps` calls of `call()` (each waiting for its step) into `logdir`."""
    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            call()
    finally:
        tf.profiler.experimental.stop()


def _xspace(logdir):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {logdir}")
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    return space


def _hlo_op_names(space):
    """{(module name, instruction name): (TF op name, TF op type or opcode)}."""
    try:
        from tensorflow.compiler.xla.service import hlo_pb2
    except ImportError:  # pragma: no cover - moved in some TF builds
        from xla.service import hlo_pb2
    names = {}
    for plane in space.planes:
        if plane.name != "/host:metadata":
            continue
        for meta in plane.event_metadata.values():
            for stat in meta.stats:
                if not stat.bytes_value:
                    continue
                proto = hlo_pb2.HloProto()
                try:
                    proto.ParseFromString(stat.bytes_value)
                except Exception:  # noqa: BLE001 - other bytes stats: not HLO
                    continue
                module = proto.hlo_module
                comps = {c.id: c for c in module.computations}
                for comp in module.computations:
                    for inst in comp.instructions:
                        names[(module.name, inst.name)] = _hlo_origin(inst, comps)
                        names.setdefault(("", inst.name), names[(module.name, inst.name)])
    return names


def _hlo_origin(inst, comps, depth=0):
    """(TF op name, op type) of an HLO instruction; a fusion's from its body.

    XLA often leaves a fusion's own metadata empty: its root instruction, or
    else the first instruction of the fused computation that has a TF name,
    says where it came from.
    """
    if inst.metadata.op_name or not inst.called_computation_ids or depth > 4:
        return inst.metadata.op_name, inst.metadata.op_type or inst.opcode
    comp = comps.get(inst.called_computation_ids[0])
    if comp is None:
        return "", inst.opcode
    by_id = {i.id: i for i in comp.instructions}
    root = by_id.get(comp.root_id)
    candidates = ([root] if root is not None else []) + list(comp.instructions)
    for cand in candidates:
        name, kind = _hlo_origin(cand, comps, depth + 1)
        if name:
            return name, kind
    return "", inst.opcode


def _stat_value(stat, stat_names):
    if stat.HasField("ref_value"):
        return stat_names.get(stat.ref_value, "")
    for field in ("str_value", "int64_value", "uint64_value", "double_value"):
        if stat.HasField(field):
            return getattr(stat, field)
    return None


def _events(space):
    """Yields (TF op name, op type, picoseconds) for each counted event."""
    hlo = None
    device = [p for p in space.planes if p.name.startswith("/device:")]
    planes = device or [p for p in space.planes if p.name.startswith("/host:CPU")]
    for plane in planes:
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        hlo_module = next((k for k, v in stat_names.items() if v == "hlo_module"), None)
        hlo_op = next((k for k, v in stat_names.items() if v == "hlo_op"), None)
        tf_op = next((k for k, v in stat_names.items() if v == "tf_op"), None)
        for line in plane.lines:
            if device and not line.name.startswith("Stream"):
                continue  # derived lines (XLA Ops, TensorFlow Ops) repeat the kernels
            for event in line.events:
                stats = {s.metadata_id: s for s in event.stats}
                if hlo_op is not None and hlo_op in stats:
                    if hlo is None:
                        hlo = _hlo_op_names(space)
                    op = _stat_value(stats[hlo_op], stat_names)
                    module = (_stat_value(stats[hlo_module], stat_names)
                              if hlo_module in stats else "")
                    name, kind = hlo.get((module, op)) or hlo.get(("", op)) or ("", "")
                    yield name or f"(xla) {op}", kind or "hlo", event.duration_ps
                    continue
                if device:
                    value = (_stat_value(stats[tf_op], stat_names)
                             if tf_op in stats else None)
                    if value and ":" in value:
                        op, kind = value.rsplit(":", 1)
                        yield op, kind, event.duration_ps
                    else:
                        name = plane.event_metadata[event.metadata_id].name
                        yield f"(kernel) {name}", "kernel", event.duration_ps
                    continue
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name or " " in name:
                    continue  # runtime TraceMes, not ops
                op, kind = name.rsplit(":", 1)
                if op == kind or kind.startswith("__inference") or op.startswith("__"):
                    continue  # a function call: its ops count themselves
                yield op, kind, event.duration_ps


def _scope(op_name, depth):
    parts = op_name.split("/")
    backward = any(p in _BACKWARD for p in parts)
    parts = [p for p in parts[:-1] if not _WRAPPERS.search(p)]
    scope = "/".join(parts[:depth]) or "(top level)"
    return scope + (" [backward]" if backward else "")


def summarize(logdir, steps, depth=3, top=15):
    """Op time per step from the trace `trace` wrote.

    Args:
      logdir: str, the directory given to `trace`.
      steps: int, calls the trace recorded (the figures are per call).
      depth: int, scope components kept (`mask_rcnn/roi_heads/mask_head`).
      top: int, rows kept in each table.

    Returns:
      dict: op_ms_per_step (float), by_type and by_scope, each a list of
      [name, ms per step, share of op time] sorted by time, longest first.
    """
    by_type = collections.Counter()
    by_scope = collections.Counter()
    for op, kind, ps in _events(_xspace(logdir)):
        ms = ps / 1e9 / steps
        by_type[kind] += ms
        by_scope[_scope(op, depth)] += ms
    total = sum(by_type.values())

    def table(counter):
        return [[k, round(v, 3), round(v / total, 4) if total else 0.0]
                for k, v in counter.most_common(top)]

    return {"op_ms_per_step": round(total, 3), "by_type": table(by_type),
            "by_scope": table(by_scope)}


def format_summary(summary):
    """The summary as two text tables."""
    lines = [f"op time per step: {summary['op_ms_per_step']:.1f} ms "
             "(summed over threads/streams)"]
    for title, key in (("op type", "by_type"), ("scope", "by_scope")):
        lines.append(f"{'ms/step':>9} {'share':>6}  {title}")
        lines += [f"{ms:9.1f} {share:6.1%}  {name}" for name, ms, share in summary[key]]
    return "\n".join(lines)
