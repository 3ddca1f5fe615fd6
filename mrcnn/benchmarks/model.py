"""Whole-model benchmarks: the training step `bin/train` runs, and inference.

Inputs are synthetic batches placed on the replicas once (random images,
`num_gt` random boxes with elliptic masks per image), so the figures measure
the model and step, not the input pipeline (`--what=input` measures that).
The first call (tracing and XLA compilation) is reported apart; then the
median of `steps` timed calls.
"""

import resource
import statistics
import time

import gin
import numpy as np
import tensorflow as tf

from mrcnn.training import optimization, trainer


def synthetic_batch(batch, image_size, num_gt=10, num_classes=80, mask_size=112,
                    seed=0, canvas=None):
    """A training batch in the data pipeline's format (see mrcnn.data).

    Args:
      image_size: (h, w) of the random images.
      canvas: (H, W) >= image_size they are padded to (zeros bottom and
        right, as the pipeline pads); image_size by default.

    Returns:
      dict of tensors: images uint8 [B, H, W, 3], image_info [B, 5], image_id [B],
      gt_boxes [B, M, 4], gt_classes [B, M], gt_valid [B, M],
      gt_masks uint8 [B, M, S, S] with M = num_gt.
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    centre = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w], (batch, num_gt, 2))
    size = rng.uniform(24, 0.4 * min(h, w), (batch, num_gt, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1)
    boxes = np.clip(boxes, 0, [h, w, h, w]).astype(np.float32)
    u = (np.arange(mask_size) + 0.5) / mask_size - 0.5
    ellipse = ((u[:, None] / 0.5) ** 2 + (u[None] / 0.5) ** 2 <= 1).astype(np.uint8)
    ch, cw = canvas or image_size
    images = np.zeros((batch, ch, cw, 3), np.uint8)
    images[:, :h, :w] = rng.integers(0, 256, (batch, h, w, 3))
    return {
        "images": tf.constant(images),
        "image_info": tf.constant([[h, w, h, w, 1.0]] * batch, tf.float32),
        "image_id": tf.range(batch, dtype=tf.int64),
        "gt_boxes": tf.constant(boxes),
        "gt_classes": tf.constant(rng.integers(1, num_classes + 1, (batch, num_gt)),
                                  tf.int32),
        "gt_valid": tf.ones([batch, num_gt], tf.bool),
        "gt_masks": tf.constant(np.broadcast_to(ellipse, (batch, num_gt) + ellipse.shape)),
    }


def _gin_train_arg(name):
    """`train.<name>` as gin binds it, or None where it is not bound."""
    try:
        return gin.query_parameter(f"train.{name}")
    except ValueError:
        return None


def _model_fn():
    try:
        return gin.query_parameter("train.model_fn").scoped_configurable_fn
    except ValueError:
        from mrcnn.modeling.mask_rcnn import MaskRCNN
        return MaskRCNN


def _reset_peak_memory():
    """Starts the peak that `_peak_memory` reads again from what is in use now."""
    gpus = tf.config.list_logical_devices("GPU")
    for g in gpus:
        tf.config.experimental.reset_memory_stats(g.name)
    if not gpus:
        # The host's high-water mark (VmHWM) restarts too, so a process that
        # measures case after case (bin/bench --serve) reports each its own.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # not Linux: the process's peak so far


def _peak_memory():
    """Peak bytes since `_reset_peak_memory`: on the GPUs, or the host's RSS."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return sum(tf.config.experimental.get_memory_info(g.name)["peak"] for g in gpus)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def float_ops(fn, *args):
    """Float operations of one call of `fn` on `args`, as TensorFlow's
    profiler counts them on the traced graph.

    Its convention: 2 per multiply-add of a convolution or matmul, about 1
    per element of an elementwise op; ops without a registered count
    (gathers, sorts, NMS) or without static shapes add nothing. Detectron2's
    `analyze_model` (fvcore) counts one per multiply-add, about half.

    Args:
      fn: a Python function of tensors (traced here in graph mode, even
        when tf.functions run eagerly).
      *args: its arguments (nests of tensors).

    Returns:
      int.
    """
    was_eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(False)
    try:
        graph = tf.function(fn).get_concrete_function(*args).graph
    finally:
        tf.config.run_functions_eagerly(was_eager)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def bench_model(what, *, batch=8, image_size=(800, 1216), precision="bfloat16",
                xla=True, eager=False, steps=20, warmup=3, num_gt=10,
                profile_dir=None, profile_steps=5, flops=False):
    """Times the training step (`what='train'`) or inference (`'infer'`).

    Args:
      what: 'train' or 'infer'.
      batch: int, images per replica.
      image_size: (h, w) of the images. They are padded, as the input
        pipeline pads, to the next multiple of 2**max_level of the model's
        FPN (64 with P6): 800 x 1216 runs on an 832 x 1216 canvas.
      precision: 'float32', 'bfloat16' or 'float16'.
      xla: bool, compile the step with XLA.
      eager: bool, run every tf.function eagerly (op by op, no graph): the
        baseline the graph and XLA modes are measured against; `xla` is
        then ignored.
      steps, warmup: timed and untimed calls after the first.
      num_gt: gt boxes per image.
      profile_dir: str or None; if set, `profile_steps` more calls are
        traced there with the TF profiler (after the timed ones, so the
        tracing does not slow them) and summed per op type and scope.
      profile_steps: int, calls traced.
      flops: bool, also count the float operations per image of the
        forward pass (infer) or of the forward and backward passes (train)
        with `float_ops`: `gflops_per_image`.

    Returns:
      dict: compile_s, median_s, p25_s, p75_s, images_per_s (train) or
      ms_per_image (infer), peak_memory_bytes, parameters and
      trainable_parameters, device, mode ('eager', 'graph' or 'xla'),
      canvas, ema_decay (gin's train.ema_decay: the step then updates a
      weight average, as `bin/train`'s; None without), accumulate_steps
      (gin's train.accumulate_steps: a step is then that many batches, one
      update, and images_per_s counts them all; 1 without), and the arguments;
      with `profile_dir`, `profile` (see `mrcnn.benchmarks.profile.summarize`);
      with `flops`, `gflops_per_image`.
    """
    was_eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(eager)
    try:
        return _bench_model(what, batch, image_size, precision, xla and not eager,
                            steps, warmup, num_gt, "eager" if eager else
                            "xla" if xla else "graph", profile_dir, profile_steps, flops)
    finally:
        tf.config.run_functions_eagerly(was_eager)


def _bench_model(what, batch, image_size, precision, xla, steps, warmup, num_gt, mode,
                 profile_dir, profile_steps, flops):
    trainer.set_precision(precision)
    strategy = trainer.make_strategy()
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = _model_fn()()
    num_classes = getattr(model, "num_classes", 80)
    divisor = 2 ** getattr(getattr(model, "fpn", None), "max_level", 6)
    canvas = tuple(-(-side // divisor) * divisor for side in image_size)
    data = synthetic_batch(batch, image_size, num_gt, num_classes, canvas=canvas)
    if what == "infer":
        data = {k: data[k] for k in ("images", "image_info")}
    dist = strategy.experimental_distribute_values_from_function(lambda ctx: data)
    ema_decay, accumulate = None, 1
    # The variables come from one eager call on a small batch: eagerly at
    # full size (op by op, each new conv shape autotuned on a GPU) it costs
    # far more than the compiled step, and the result does not depend on it.
    small = synthetic_batch(1, trainer.build_canvas(model, canvas), 2, num_classes)
    small = {k: small[k] for k in data}
    small = strategy.experimental_distribute_values_from_function(lambda ctx: small)
    with strategy.scope():
        strategy.run(lambda b: model(b, training=what == "train"), args=(small,))
        if what == "train":
            # As `trainer.train` with train.accumulate_steps: a step is that
            # many batches per replica and one update.
            accumulate = _gin_train_arg("accumulate_steps") or 1
            optimizer, _, weight_decay = optimization.build_optimizer(
                batch * replicas * accumulate, 1000, 10000, precision=precision)
            optimizer.build(model.trainable_variables)
            step, average = None, None
            ema_decay = _gin_train_arg("ema_decay")
            if ema_decay is not None:
                # As `trainer.train` with train.ema_decay: a second model,
                # averaged after every step.
                from mrcnn.training import ema
                averaged = _model_fn()()
                strategy.run(lambda b: averaged(b, training=True), args=(small,))
                step = tf.Variable(0, dtype=tf.int64, trainable=False)
                warmup_ema = _gin_train_arg("ema_warmup")
                average = ema.WeightAverage(
                    model, averaged, strategy, decay=ema_decay, xla=xla,
                    warmup=True if warmup_ema is None else warmup_ema)
            fn = trainer.make_train_step(model, optimizer, strategy, xla, step=step,
                                         weight_decay=weight_decay, average=average,
                                         accumulate=accumulate)
        else:
            infer = tf.function(lambda b: model(b, training=False), jit_compile=xla)
            fn = tf.function(lambda b: strategy.run(infer, args=(b,)))

    def call():
        out = fn(dist if accumulate == 1 else [dist] * accumulate)
        # Fetching one scalar waits for the step without copying outputs.
        first = tf.nest.flatten(strategy.experimental_local_results(out))[0]
        float(tf.reduce_sum(tf.cast(first, tf.float32)))

    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        call()
    _reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    q25, q75 = np.percentile(times, [25, 75])
    report = {
        "what": what, "batch_per_replica": batch, "replicas": replicas,
        "image_size": list(image_size), "canvas": list(canvas),
        "precision": precision, "xla": xla,
        "num_gt": num_gt, "steps": steps, "compile_s": round(compile_s, 2),
        "ema_decay": ema_decay, "accumulate_steps": accumulate,
        "mode": mode, "median_s": round(median, 4), "p25_s": round(float(q25), 4),
        "p75_s": round(float(q75), 4), "peak_memory_bytes": int(_peak_memory()),
        "parameters": int(sum(np.prod(w.shape) for w in model.weights)),
        "trainable_parameters": int(sum(np.prod(w.shape)
                                        for w in model.trainable_weights)),
        "device": tf.config.list_logical_devices("GPU")[0].name
        if tf.config.list_logical_devices("GPU") else "CPU",
    }
    if profile_dir:
        from mrcnn.benchmarks import profile
        profile.trace(call, profile_steps, profile_dir)
        report["profile"] = profile.summarize(profile_dir, profile_steps)
        report["profile_dir"] = profile_dir
    if flops:
        report["gflops_per_image"] = round(_step_float_ops(model, data, what) / batch / 1e9, 3)
    images = batch * replicas * accumulate
    if what == "train":
        report["images_per_s"] = round(images / median, 2)
    else:
        report["ms_per_image"] = round(1e3 * median / images, 2)
    return report


def _step_float_ops(model, batch, what):
    """`float_ops` of one replica's inference, or of its losses' forward and
    backward passes (no optimizer update), on `batch`."""
    if what == "infer":
        return float_ops(lambda b: model(b, training=False), batch)

    def forward_backward(b):
        with tf.GradientTape() as tape:
            total = tf.add_n(list(model(b, training=True).values()))
        return tape.gradient(total, model.trainable_variables)
    return float_ops(forward_backward, batch)
