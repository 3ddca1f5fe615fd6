"""The training loop: strategy, precision, XLA step, checkpoints, NaN guard, summaries.

A model here is any `keras.Model` whose `call(batch, training=True)` returns
a dict of named float32 scalar losses, each already averaged over the
replica's images; the trainer sums them, averages over replicas and steps the
optimizer. Rerunning `train` with the same `model_dir` resumes from the last
checkpoint with no flag. SIGTERM (a scheduler's preemption) or Ctrl-C ends
the run after the step in flight with a checkpoint of that step, so that
the rerun loses nothing (one machine; see `train`).
"""

import contextlib
import inspect
import json
import math
import os
import signal
import threading
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mrcnn.data import files
from mrcnn.training import ema as ema_lib
from mrcnn.training import optimization

PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16",
                      "float16": "mixed_float16"}


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss became NaN or Inf."""


@gin.configurable
def make_strategy(devices=None):
    """MultiWorkerMirrored under TF_CONFIG, else Mirrored over GPUs, else one CPU.

    Args:
      devices: optional list of device names for MirroredStrategy (tests pass
        two logical CPUs).
    """
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def set_precision(precision):
    """Sets the Keras global dtype policy for 'float32', 'bfloat16' or 'float16'."""
    if precision not in PRECISION_POLICIES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_POLICIES)}, "
                         f"got {precision!r}")
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])


@contextlib.contextmanager
def precision_scope(precision):
    """`set_precision(precision)` inside, Keras' previous global policy after.

    Layers keep the policy they were built with, so a model built inside
    computes in `precision` wherever it is called; code outside (a training
    run that evaluates, a caller's own models) keeps its own.
    """
    previous = keras.mixed_precision.global_policy()
    set_precision(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def _checkpoint_dir(model_dir, strategy):
    # Under MultiWorkerMirroredStrategy every worker must save (the save is a
    # collective), but only the chief's copy is kept in model_dir.
    if _is_chief(strategy):
        return model_dir
    return os.path.join(model_dir, f"worker_tmp_{strategy.cluster_resolver.task_id}")


@contextlib.contextmanager
def _stop_requests(enabled):
    """Within it, SIGTERM and SIGINT ask the training loop to stop.

    Yields a list that the first such signal appends its name to; the loop
    stops after the step in flight and checkpoints it. A second signal
    stops at once, as without the handler (KeyboardInterrupt for SIGINT,
    exit status 128 + 15 for SIGTERM). Python handlers can only be set from
    the main thread: elsewhere, or when not `enabled`, signals keep their
    handlers and the list stays empty.
    """
    requests = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requests
        return
    signums = (signal.SIGTERM, signal.SIGINT)

    def handler(signum, frame):
        del frame
        if requests:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        requests.append(signal.Signals(signum).name)
        logging.warning("%s: stopping after the step in flight and checkpointing "
                        "it (send it again to stop at once)", requests[0])

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield requests
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _weights_finite(model):
    """Whether every floating weight is finite (checked before each save)."""
    for w in model.weights:
        value = np.asarray(w.numpy())
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return False
    return True


def build_canvas(model, canvas_size):
    """(H, W) to build `model`'s variables on for batches on `canvas_size`:
    `model.build_canvas(canvas_size)` where it has one (`MaskRCNN`: a small
    canvas, whose eager call costs a fraction of a full-size one), else
    `canvas_size`."""
    build = getattr(model, "build_canvas", None)
    return tuple(build(canvas_size)) if callable(build) else tuple(canvas_size)


def _zeros_like_spec(spec, canvas_size=None, model=None):
    """A zero batch of `spec`, to build the variables on.

    A dataset whose batches come on several canvases (CocoInput with
    `group_by_orientation`) leaves the image height and width unknown in its
    spec; they are then taken from `canvas_size` (any canvas builds the same
    variables). With `model`, the images are on `build_canvas(model, ...)`.
    """
    def zeros(s):
        shape = s.shape.as_list()
        if None in shape[1:]:
            if canvas_size is None or len(shape) != 4:
                raise ValueError(f"dataset_fn gives a batch of unknown shape {shape} "
                                 f"and no canvas_size to build the model on")
            shape = [shape[0], *canvas_size, shape[3]]
        return tf.zeros(shape, s.dtype)
    batch = tf.nest.map_structure(zeros, spec)
    images = batch.get("images") if isinstance(batch, dict) else None
    if model is not None and images is not None and images.shape.rank == 4:
        batch_size, height, width, channels = images.shape
        batch["images"] = tf.zeros(
            [batch_size, *build_canvas(model, (height, width)), channels], images.dtype)
    return batch


def _format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def check_num_classes(model, dataset):
    """Raises ValueError when a model's and a dataset's class counts differ."""
    ours, theirs = getattr(model, "num_classes", None), getattr(dataset, "num_classes", None)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(
            f"the model has {ours} classes but {getattr(dataset, 'annotation_file', 'the data')} "
            f"has {theirs}: set NUM_CLASSES = {theirs} in the gin config")
    ours = getattr(model, "num_keypoints", 0)
    if ours:
        theirs = getattr(dataset, "num_keypoints", None)
        if theirs is not None and theirs != ours:
            where = getattr(dataset, "annotation_file", "the data")
            raise ValueError(
                f"the model's keypoint head has {ours} keypoints but {where} names "
                f"{theirs or 'none'}" + (f": set NUM_KEYPOINTS = {theirs} in the gin config"
                                         if theirs else
                                         " (a keypoint model reads CocoInput.with_keypoints "
                                         "= True)"))


def _set_class_image_counts(model, dataset_fn):
    """Gives a federated loss (`RoiHeads.fed_loss_classes`) the training
    images per class (`CocoInput.class_image_counts`); a resumed run then
    restores the same counts from its checkpoint."""
    heads = getattr(model, "roi_heads", None)
    variable = getattr(heads, "class_image_counts", None)
    if variable is None:
        return
    counts = getattr(dataset_fn, "class_image_counts", None)
    if counts is None or len(counts) != heads.num_classes:
        raise ValueError("RoiHeads.fed_loss_classes draws classes by their training "
                         "image counts: dataset_fn has no `class_image_counts` for "
                         f"{heads.num_classes} classes (CocoInput has)")
    counts = np.asarray(counts)
    variable.assign(counts.astype(np.float32))
    logging.info("Federated loss: %d classes per step, drawn by image counts of %d "
                 "classes (%d never seen)", heads.fed_loss_classes, len(counts),
                 int((counts == 0).sum()))


def _resumable(dataset_fn):
    """Whether dataset_fn takes the `start` and `seed` keywords (CocoInput does)."""
    try:
        params = inspect.signature(dataset_fn).parameters
    except (TypeError, ValueError):
        return False
    return "start" in params and "seed" in params


def _input_iterator(strategy, dataset_fn):
    """Iterator over the batches of `dataset_fn`, one per replica per step.

    A single-replica CPU run reads the dataset directly: after any call of
    `distribute_datasets_from_function` (even for a trivial dataset), every
    training step of the shapes demo model ran ~70% slower on a 2-core CPU
    (1.1 -> 1.9 s), and a one-device CPU strategy needs none of what it does.
    """
    if strategy.num_replicas_in_sync == 1 and all(
            "CPU" in d.upper() for d in strategy.extended.worker_devices):
        return iter(dataset_fn(tf.distribute.InputContext()))
    return iter(strategy.distribute_datasets_from_function(dataset_fn))


# TensorFlow names each traced function `__inference_<name>_<uid>` from one
# process-wide counter, and its persistent XLA cache (`--xla_cache_dir`) keys
# an entry on that name and on the HLO, which carries it. A resumed run
# restores a checkpoint before it traces its step and a fresh run does not,
# so the counter, and every name, differed between them: the first resume
# after a preemption compiled everything again and added a second set of
# entries (measured: 0 of 6 island programs loaded, then 6 of 6 on the
# next resume). Moving the counter to a round value just before each trace
# gives the same names wherever the run came from; evaluation and
# prediction do the same (`with_aligned_names`).
_NAME_BLOCK = 1 << 20


def align_function_names():
    """Moves TF's function-name counter to the next multiple of 2**20 (at
    most 0.2 s of Python calls), so that the functions traced next get the
    same names in a fresh and in a resumed process."""
    try:
        from tensorflow.python.framework import ops as tf_ops
    except ImportError:  # a TensorFlow without it: names as before
        return
    for _ in range(-(tf_ops.uid() + 1) % _NAME_BLOCK):
        tf_ops.uid()


def with_aligned_names(fn):
    """`fn`, a traced function, whose calls with new input shapes or dtypes
    first `align_function_names`: what it compiles then has the same names
    in every process that runs it (evaluation, prediction), so a persistent
    XLA cache finds the programs an earlier process compiled. Each call
    costs a look at its arguments' shapes."""
    seen = set()

    def call(*args):
        signature = tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(args)
                          if hasattr(t, "shape"))
        if signature not in seen:
            seen.add(signature)
            align_function_names()
        return fn(*args)

    call.__wrapped__ = fn   # the traced function itself
    return call


def _input_signature(strategy, batch):
    """The shapes and dtypes of one replica's batch: a new one retraces the step."""
    local = strategy.experimental_local_results(batch)[0]
    return tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(local))


def _step_kind(xla, replicas, accumulate=1):
    if not xla:
        return "graph (XLA off)"
    if accumulate > 1:
        return ("XLA: forward and backward per batch, its gradients summed" +
                (" in the same program" if replicas == 1 else "") +
                ", then the update")
    if replicas == 1:
        return "XLA: the whole step, update included"
    return ("XLA: forward and backward per replica, then the gradient sum, "
            "then each device's update")


def make_train_step(model, optimizer, strategy, xla, step=None, weight_decay=0.0,
                    average=None, accumulate=1):
    """The training step `train` runs (and `bin/bench --what=train` times).

    With `xla` and one replica, the forward and backward pass and the
    optimizer update are one XLA program: the update's few ops per variable
    fuse instead of running as hundreds of small kernels. With several
    replicas the forward and backward pass is one XLA program per replica,
    then Keras sums the gradients across replicas (one packed all-reduce,
    which cannot sit inside a replica's XLA program), then each device's
    copy of the variables is updated by one XLA program (`_fuse_updates`).

    Args:
      model: keras.Model returning a dict of float32 scalar losses.
      optimizer: built in `strategy`'s scope.
      strategy: tf.distribute.Strategy.
      xla: bool.
      step: optional int64 tf.Variable incremented once per step.
      weight_decay: float, coupled L2 coefficient (`optimization.l2_penalty`
        joins the losses as 'weight_decay').
      average: optional `ema.WeightAverage`, updated after each step (which
        needs `step`).
      accumulate: int >= 1, batches per replica whose gradients one update
        averages (`_accumulating_step`).

    Returns:
      With `accumulate` 1, a tf.function (distributed batch) -> {loss name:
      mean over replicas, 'total': their sum}; else a function (sequence of
      `accumulate` distributed batches) -> those losses averaged over the
      batches.
    """
    replicas = strategy.num_replicas_in_sync
    if average is not None and step is None:
        raise ValueError("make_train_step: a weight average needs the step variable")
    if int(accumulate) != accumulate or accumulate < 1:
        raise ValueError(f"make_train_step: accumulate={accumulate!r} must be an int >= 1")
    accumulate = int(accumulate)
    if xla and replicas > 1:
        synchronized = [layer.name for layer in model._flatten_layers()
                        if getattr(layer, "synchronized", False)]
        if synchronized:
            raise ValueError(
                f"train.xla = True with {replicas} replicas: the synchronized batch "
                f"norms ({', '.join(synchronized[:3])}, ...) all-reduce their statistics "
                f"inside the forward pass, which cannot sit inside a replica's XLA "
                f"program; set train.xla = False (their XLA islands still compile), or "
                f"norm 'bn' / 'gn'")

    def forward_backward(batch):
        with tf.GradientTape() as tape:
            losses = model(batch, training=True)
            losses = {k: tf.cast(v, tf.float32) for k, v in losses.items()}
            if weight_decay:
                losses["weight_decay"] = optimization.l2_penalty(
                    model.trainable_variables, weight_decay)
            total = tf.add_n(list(losses.values()))
            # Replica gradients are summed, and so are accumulated ones:
            # divide so the update uses their mean.
            scaled = total / (replicas * accumulate)
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        losses["total"] = total
        return losses, grads

    if xla and replicas > 1:
        _fuse_updates(optimizer)
    if accumulate > 1:
        return _accumulating_step(forward_backward, optimizer, model, strategy, xla,
                                  step, average, accumulate)
    if xla and replicas == 1:
        def whole_step(batch):
            losses, grads = forward_backward(batch)
            optimizer.apply(grads, model.trainable_variables)
            return losses

        replica_step = tf.function(whole_step, jit_compile=True, autograph=False)
    else:
        replica_step = _split_step(forward_backward, optimizer, model,
                                   replicas, xla)

    # autograph=False here and in the nested programs: the step is plain
    # TensorFlow, and converting every call it makes cost 10% of tracing it.
    @tf.function(autograph=False)
    def train_step(batch):
        losses = strategy.run(replica_step, args=(batch,))
        if step is not None:
            step.assign_add(1)
        if average is not None:
            average.update(step)
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in losses.items()}

    return train_step


def _fuse_updates(optimizer):
    """Makes `optimizer` update all variables of a device in one XLA program.

    Under a mirrored strategy Keras' TF optimizer runs one
    `extended.update` per variable, which loops over the devices: with R
    replicas and V variables, R x V small groups of kernels, each launched on
    its own. This replaces that loop (`_distributed_tf_update_step`, called
    in cross-replica context after the gradient all-reduce) with one call of
    `extended.update` whose function applies the optimizer's own
    `update_step` to every variable of that device inside one
    `tf.function(jit_compile=True)`, compiled once per device. The
    arithmetic is Keras' (`update_step`), so any Keras optimizer works; the
    gradient sum, unscaling, clipping and the iteration count stay Keras'.

    Args:
      optimizer: a Keras optimizer built in a multi-replica strategy's scope,
        or a LossScaleOptimizer around one.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not hasattr(inner, "_distributed_tf_update_step"):
        logging.warning("Keras %s has no _distributed_tf_update_step: the "
                        "update runs per variable, outside XLA", keras.__version__)
        return
    programs = {}  # device index -> its compiled update

    def update(distribution, grads_and_vars, learning_rate):
        grads, variables = zip(*grads_and_vars)
        first = distribution.experimental_local_results(variables[0])

        def on_device(component, grads, learning_rate):
            # `extended.update` calls this once per device, with that
            # device's copy of variables[0] and of the arguments, inside the
            # update context that makes reads and writes of any mirrored
            # variable (the momentum slots) go to that copy.
            index = next(k for k, c in enumerate(first) if c is component)
            if index not in programs:
                copies = [distribution.experimental_local_results(v)[index]
                          for v in variables]

                def apply(grads, learning_rate):
                    for grad, copy in zip(grads, copies):
                        inner.update_step(grad, copy, learning_rate)

                programs[index] = tf.function(apply, jit_compile=True, autograph=False)
            return programs[index](list(grads), learning_rate)

        distribution.extended.update(variables[0], on_device,
                                     args=(list(grads), learning_rate), group=False)

    # What was compiled, kept on the function: a dict attribute of the
    # optimizer would be tracked and checkpointed.
    update.programs = programs
    inner._distributed_tf_update_step = update


def _split_step(forward_backward, optimizer, model, replicas, xla):
    """Replica step: forward_backward (XLA when `xla`), then the update."""
    # Without XLA, no nested function: a synchronized batch norm's all-reduce
    # (merge_call) is refused inside one.
    compiled = (tf.function(forward_backward, jit_compile=True, autograph=False) if xla
                else forward_backward)
    apply = _replica_update(optimizer, model, replicas)

    def replica_step(batch):
        losses, grads = compiled(batch)
        apply(grads)
        return losses

    return replica_step


def _replica_update(optimizer, model, replicas):
    """(replica's gradients) -> None: the optimizer update, in replica context."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def apply(grads):
        if loss_scaled and replicas > 1:
            # Keras checks finiteness per replica before the gradient sum and
            # follows the first replica; make all replicas skip together, or
            # an overflow elsewhere would reach the weights.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            # ReduceOp has only SUM and MEAN: count the replicas that overflowed.
            overflowed = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            finite = overflowed == 0.0
            grads = [tf.where(finite, g, tf.fill(tf.shape(g), tf.constant(np.nan, g.dtype)))
                     for g in grads]
        optimizer.apply(grads, model.trainable_variables)

    return apply


def _accumulating_step(forward_backward, optimizer, model, strategy, xla, step, average,
                       accumulate):
    """A step whose one update averages the gradients of `accumulate` batches
    per replica: the global batch of a recipe (16 images for the 1x) on fewer
    devices, with the recipe's learning rate and schedule, step for step.

    Each replica adds its gradients (of the loss divided by replicas x
    `accumulate`, see `make_train_step`) into variables of its own, one
    forward and backward pass per batch (one XLA program with `xla`, the
    additions included on one replica), then one update: the replicas'
    sums are all-reduced once per step, the optimizer applies them (loss
    scaling unscales and checks the sum: an overflow in any of the batches
    skips the update) and the sums are zeroed. The batch norms' statistics, where they train,
    follow each batch, as on a device that holds only that batch.

    Returns:
      (sequence of `accumulate` distributed batches) -> {loss name: mean over
      replicas and batches}.
    """
    replicas = strategy.num_replicas_in_sync
    variables = model.trainable_variables
    # Per replica, uncheckpointed: a checkpoint is written between steps,
    # when every sum is zero.
    with strategy.scope():
        sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.SUM,
                            name="gradient_sum")
                for v in variables]

    def adding(gradients_of):
        def add(batch):
            losses, grads = gradients_of(batch)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total.assign_add(tf.convert_to_tensor(grad))
            return losses
        return add

    if xla and replicas == 1:
        replica_add = tf.function(adding(forward_backward), jit_compile=True,
                                  autograph=False)
    elif xla:
        # Adding into the sums inside each replica's XLA program failed here
        # (TF 2.21: "Trying to access resource .../replica_1 ... from device
        # CPU:0"): the additions run after it.
        replica_add = adding(tf.function(forward_backward, jit_compile=True,
                                         autograph=False))
    else:
        # No nested function, as in `_split_step`.
        replica_add = adding(forward_backward)
    apply = _replica_update(optimizer, model, replicas)

    def update():
        apply([total.read_value() for total in sums])
        for total in sums:
            total.assign(tf.zeros_like(total))

    # One replica: the update with the zeroing is one XLA program, as the
    # whole step is without accumulation. Several: the all-reduce cannot sit
    # inside one; `_fuse_updates` compiles each device's update instead.
    replica_update = (tf.function(update, jit_compile=True, autograph=False)
                      if xla and replicas == 1 else update)

    @tf.function(autograph=False)
    def add_batch(batch):
        losses = strategy.run(replica_add, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in losses.items()}

    @tf.function(autograph=False)
    def update_step():
        strategy.run(replica_update)
        if step is not None:
            step.assign_add(1)
        if average is not None:
            average.update(step)

    def train_step(batches):
        if len(batches) != accumulate:
            raise ValueError(f"train_step: {len(batches)} batches, expected {accumulate}")
        losses = [add_batch(batch) for batch in batches]
        update_step()
        return {k: tf.add_n([part[k] for part in losses]) / accumulate for k in losses[0]}

    return train_step


@gin.configurable(denylist=["model_dir"])
def train(model_dir, *, model_fn=gin.REQUIRED, dataset_fn=gin.REQUIRED,
          init_fn=None, num_train_images=None, epochs=12,
          total_steps=None, precision="float32", xla=True,
          checkpoint_every=1000, keep_checkpoints=5, log_every=20,
          stop_after=None, strategy=None, eval_fn=None, eval_every=None,
          best_metric=None, best_mode="max", ema_decay=None, ema_warmup=True,
          accumulate_steps=1):
    """Trains a model, resuming from `model_dir` if it holds a checkpoint.

    Args:
      model_dir: str, where checkpoints, summaries and the gin config go.
      model_fn: () -> keras.Model whose call(batch, training=True) returns a
        dict of float32 scalar losses.
      dataset_fn: (input_context: tf.distribute.InputContext) -> infinite
        tf.data.Dataset of per-replica batches with a static batch size
        (`mrcnn.data.CocoInput` is one: its batch_size is per replica). If
        it also takes keywords `start` (images this input pipeline already
        read) and `seed` (a run seed, kept in the checkpoint), as CocoInput
        does, a resumed run reads on where the interrupted one stopped.
        Batches may come on several canvases (image height and width left
        unknown in the spec, as with CocoInput's `group_by_orientation`):
        the replicas of a step must then share one, the step is traced and
        compiled once per canvas, and `dataset_fn.canvas_size` gives the
        canvas the model is built on.
      init_fn: optional (model) -> None, run once on a fresh start and never
        over a resumed checkpoint: ImageNet backbone weights
        (`load_backbone_weights`).
      num_train_images: int, images in one epoch; by default
        `len(dataset_fn.records)` when the dataset builder has records.
      epochs: float, length of the run in epochs unless `total_steps`.
      total_steps: int, length of the run in steps (overrides `epochs`).
      precision: 'float32', 'bfloat16' or 'float16' (dynamic loss scaling).
      xla: bool, compile the forward and backward pass with XLA.
      checkpoint_every: int, steps between checkpoints (one is also written
        at the end).
      keep_checkpoints: int, checkpoints kept.
      log_every: int, steps between progress lines and summaries.
      stop_after: optional int, return after this many steps of this call
        (the schedule still spans `total_steps`); tests use it to simulate
        an interrupted run.
      strategy: optional tf.distribute.Strategy; `make_strategy()` if None.
      eval_fn: optional (model_dir, checkpoint=path) -> metrics dict, run by
        the chief on the checkpoint of the last step and of every
        `eval_every`-th (Detectron2's `TEST.EVAL_PERIOD`): `@evaluate` in gin,
        which restores its own copy of the model and writes
        `model_dir/eval/` as `bin/eval` does. Training waits for it (other
        workers at their next step).
      eval_every: optional int, steps between those evaluations (each also
        writes a checkpoint); None: the last step only.
      best_metric: optional 'group/name' of `eval_fn`'s metrics, e.g.
        'segm/AP' or 'bbox/AP50' (Detectron2's `BestCheckpointer`, the Model
        Garden's `best_checkpoint_eval_metric`): the checkpoint of the best
        evaluation so far is copied to `model_dir/best/` (a checkpoint
        directory: `--checkpoint` of `bin/eval`, `bin/predict` and
        `bin/export`), with `best.json` naming its step and value; kept
        across resumes, never pruned by `keep_checkpoints`.
      best_mode: 'max' (default) or 'min': which value of `best_metric` is best.
      ema_decay: optional float in (0, 1), e.g. 0.9998: keep an exponential
        moving average of the weights (`ema.WeightAverage`), updated after
        every step and checkpointed under `ema/`; evaluation, prediction and
        export then use it (`restore_model.average_weights`). None: off.
      ema_warmup: bool, the average's decay is min(ema_decay, (1 + step) /
        (10 + step)) (Model Garden's `dynamic_decay`).
      accumulate_steps: int >= 1, batches per replica in one step: each
        update averages their gradients, so a step trains on `replicas x
        batch_size x accumulate_steps` images, and the learning rate, epochs,
        `total_steps` and every `*_every` count those steps. The 1x recipe's
        16 images per step on one GPU: `train/CocoInput.batch_size = 4`,
        `train.accumulate_steps = 4`. (Batch norms that train see each
        batch alone; the recipes' frozen ones and GroupNorm are unaffected.)

    A SIGTERM or SIGINT (Ctrl-C) during the loop ends it after the step in
    flight, which is checkpointed (after the NaN checks); rerunning resumes
    there, the input position included. Under multi-worker training the
    workers could stop at different steps and wait on each other, so there
    the signals keep their default effect and the last periodic checkpoint
    is what a stopped run keeps.

    Returns:
      dict with the final `step`, the last logged `losses`, the trained
      `model`, `average`: the model holding the weight average (None
      without `ema_decay`), `stopped_by`: the name of the signal that stopped the run
      early, else None, `metrics`: `eval_fn`'s last result (None
      without one), and `best`: `best.json`'s content with `best_metric`
      (else None).

    Raises:
      NonFiniteLossError: a loss became NaN or Inf; the last checkpoint
        written before it is kept.
    """
    _check_best(best_metric, best_mode, eval_fn)
    set_precision(precision)
    strategy = strategy or make_strategy()
    replicas = strategy.num_replicas_in_sync
    # The per-replica batch is the data config's fact; read it off the spec.
    spec = dataset_fn(tf.distribute.InputContext(
        num_replicas_in_sync=replicas)).element_spec
    per_replica_batch = tf.nest.flatten(spec)[0].shape[0]
    if per_replica_batch is None:
        raise ValueError("dataset_fn must batch with drop_remainder=True "
                         "(static shapes), got an unknown batch size")
    if int(accumulate_steps) != accumulate_steps or accumulate_steps < 1:
        raise ValueError(f"train.accumulate_steps={accumulate_steps!r} must be an int >= 1")
    accumulate_steps = int(accumulate_steps)
    # Images per step (one update each): the learning rate scales with it.
    step_images = per_replica_batch * replicas * accumulate_steps
    if num_train_images is None:
        if not hasattr(dataset_fn, "records"):
            raise ValueError("train.num_train_images is needed: dataset_fn has no "
                             "`records` to count")
        num_train_images = len(dataset_fn.records)
    steps_per_epoch = max(math.ceil(num_train_images / step_images), 1)
    if total_steps is None:
        total_steps = int(round(epochs * steps_per_epoch))
    tf.io.gfile.makedirs(model_dir)

    with strategy.scope():
        model = model_fn()
    check_num_classes(model, dataset_fn)
    with strategy.scope():
        optimizer, schedule, weight_decay = optimization.build_optimizer(
            step_images, steps_per_epoch, total_steps, precision=precision)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # Drawn once per run and checkpointed, so that the data order survives
        # restarts; under MultiWorkerMirroredStrategy the chief's initial
        # value is broadcast, so every worker holds the same seed.
        data_seed = tf.Variable(int.from_bytes(os.urandom(4), "little") >> 1,
                                dtype=tf.int64, trainable=False, name="data_seed")

    # Variables exist only after a first call: build them on a zero batch so
    # that the restore below fills every one of them.
    with strategy.scope():
        canvas = getattr(dataset_fn, "canvas_size", None)
        strategy.run(lambda: model(_zeros_like_spec(spec, canvas, model), training=True))
        optimizer.build(model.trainable_variables)
        average = None
        if ema_decay is not None:
            averaged = model_fn()   # built as the model, on the same zero batch
            strategy.run(lambda: averaged(_zeros_like_spec(spec, canvas, averaged),
                                          training=True))
            average = ema_lib.WeightAverage(model, averaged, strategy, decay=ema_decay,
                                            warmup=ema_warmup, xla=xla)

    _set_class_image_counts(model, dataset_fn)
    objects = dict(model=model, optimizer=optimizer, step=step, data_seed=data_seed)
    if average is not None:
        objects["ema"] = average.average
    checkpoint = tf.train.Checkpoint(**objects)
    manager = tf.train.CheckpointManager(
        checkpoint, _checkpoint_dir(model_dir, strategy), max_to_keep=keep_checkpoints)
    # Every worker resumes from the chief's checkpoint in model_dir (other
    # workers' own copies are scratch, removed at the end of a run).
    latest = tf.train.latest_checkpoint(model_dir)
    fresh_average = average is not None
    if latest:
        if average is not None and not has_weight_average(latest):
            logging.warning("%s holds no weight average: it starts from the restored "
                            "weights", latest)
            objects.pop("ema")
            tf.train.Checkpoint(**objects).restore(latest).assert_existing_objects_matched()
        else:
            checkpoint.restore(latest).assert_existing_objects_matched()
            fresh_average = False
        logging.info("Resumed from %s at step %d", latest, int(step))
    elif init_fn is not None:
        init_fn(model)
    if fresh_average:
        with strategy.scope():
            average.reset()
    start = int(step.numpy())
    if start >= total_steps:
        logging.info("Nothing to do: step %d >= total_steps %d", start, total_steps)
        return {"step": start, "losses": {}, "model": model, "stopped_by": None,
                "metrics": None, "average": average and average.average,
                "best": read_best(model_dir) if best_metric else None}
    if eval_every is not None and int(eval_every) < 1:
        raise ValueError(f"train.eval_every={eval_every} must be >= 1 (or None)")
    if _is_chief(strategy):
        with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.config_str())
        # A run taken further (a larger total_steps) is not done any more.
        if tf.io.gfile.exists(os.path.join(model_dir, DONE_FILE)):
            tf.io.gfile.remove(os.path.join(model_dir, DONE_FILE))

    # The input position is the step: each input pipeline has read
    # step * step_images / pipelines images of its stream.
    if _resumable(dataset_fn):
        seed = int(data_seed.numpy())

        def positioned_fn(ctx):
            return dataset_fn(ctx, start=start * step_images // ctx.num_input_pipelines,
                              seed=seed)
    else:
        if start:
            logging.warning("dataset_fn takes no `start`: the resumed run starts a "
                            "new pass over the data")
        positioned_fn = dataset_fn
    iterator = _input_iterator(strategy, positioned_fn)

    train_step = make_train_step(model, optimizer, strategy, xla, step, weight_decay,
                                 average=average, accumulate=accumulate_steps)

    writer = tf.summary.create_file_writer(os.path.join(model_dir, "train")) \
        if _is_chief(strategy) else tf.summary.create_noop_writer()
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    last_losses = {}
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    logging.info("Training steps %d-%d of %d: %d replica(s) x %d images%s, precision "
                 "%s, %s", start + 1, end, total_steps, replicas, per_replica_batch,
                 f" x {accumulate_steps} batches accumulated" if accumulate_steps > 1 else "",
                 precision, _step_kind(xla, replicas, accumulate_steps))

    def check_finite(current, losses):
        if not np.isfinite(float(losses["total"])):
            named = {k: float(v) for k, v in losses.items()}
            raise NonFiniteLossError(
                f"loss became non-finite at step {current}: {named}; the last good "
                f"checkpoint ({manager.latest_checkpoint or 'none'}) is kept. Lower the "
                f"learning rate or enable gradient clipping "
                f"(build_optimizer.clip_norm).")

    # Reading a loss on the host waits for its step to finish. Step k's loss
    # is read after step k + 1 is dispatched, so that an accelerator is not
    # left idle while the host fetches the next batch and launches the step;
    # before a log line or a checkpoint the step's own loss is read.
    multi_worker = bool(getattr(getattr(strategy, "cluster_resolver", None),
                                "task_type", None))
    stop = contextlib.ExitStack()
    stop_requests = stop.enter_context(_stop_requests(not multi_worker))
    stopped_by, metrics = None, None
    try:
        pending = None
        signatures = set()
        eval_reuse = {}   # the evaluation's model and compiled inference
        for current in range(start + 1, end + 1):
            batches = [next(iterator) for _ in range(accumulate_steps)]
            new = {_input_signature(strategy, batch) for batch in batches} - signatures
            if new:   # this call traces the step
                signatures |= new
                align_function_names()
            losses = train_step(batches if accumulate_steps > 1 else batches[0])
            if pending is not None:
                check_finite(*pending)
            pending = (current, losses)
            window_images += step_images
            first = current == start + 1
            logged = current % log_every == 0 or current == end
            if first or logged or current % checkpoint_every == 0:
                check_finite(current, losses)
                pending = None
            if first and not logged:
                # The first step traces (and with XLA compiles) the step: keep it
                # out of the first window's img/s and ETA.
                logging.info("Step %d took %.1f s (tracing%s the step)", current,
                             time.perf_counter() - run_start, " and compiling" if xla else "")
                window_start, window_images = time.perf_counter(), 0
            if logged:
                now = time.perf_counter()
                ips = window_images / max(now - window_start, 1e-9)
                last_losses = {k: float(v) for k, v in losses.items()}
                lr = float(schedule(current))
                eta = (total_steps - current) * step_images / max(ips, 1e-9)
                loss_text = "  ".join(f"{k} {v:.4f}" for k, v in last_losses.items())
                logging.info("step %d/%d  %s  lr %.5f  %.1f img/s  ETA %s", current,
                             total_steps, loss_text, lr, ips, _format_eta(eta))
                with writer.as_default(step=current):
                    for k, v in last_losses.items():
                        tf.summary.scalar(f"loss/{k}", v)
                    tf.summary.scalar("learning_rate", lr)
                    tf.summary.scalar("images_per_second", ips)
                    tf.summary.scalar("step_time_s", step_images / max(ips, 1e-9))
                writer.flush()
                window_start, window_images = time.perf_counter(), 0
            if stop_requests:
                stopped_by = stop_requests[0]
                if pending is not None:
                    check_finite(*pending)
            evaluated = eval_fn is not None and not stopped_by and (
                current == end or (eval_every and current % eval_every == 0))
            if current % checkpoint_every == 0 or current == end or stopped_by or evaluated:
                if not _weights_finite(model):
                    raise NonFiniteLossError(
                        f"weights became non-finite at step {current}; the last good "
                        f"checkpoint ({manager.latest_checkpoint or 'none'}) is kept")
                manager.save(checkpoint_number=current)
            if evaluated and _is_chief(strategy):
                metrics = _evaluate(eval_fn, model_dir, manager.latest_checkpoint,
                                    precision, eval_reuse)
                if best_metric:
                    keep_best(model_dir, manager.latest_checkpoint, current, metrics,
                              best_metric, best_mode)
                # The evaluation's time stays out of the next window's img/s.
                window_start, window_images = time.perf_counter(), 0
            if stopped_by:
                logging.warning("Stopped by %s at step %d of %d: checkpoint %s; rerun "
                                "the same command to resume", stopped_by, current,
                                total_steps, manager.latest_checkpoint)
                end = current
                break
    finally:
        stop.close()
        # However the loop ends: an exception's traceback keeps this frame
        # alive until the interpreter exits, and a tf.data iterator alive then
        # can hang the process (its numpy_function decoders wait for a GIL that
        # finalisation no longer gives; tensorflow/tensorflow#21277).
        del iterator
    if not _is_chief(strategy):
        tf.io.gfile.rmtree(_checkpoint_dir(model_dir, strategy))
    elif end == total_steps:
        # `bin/eval --watch` beside the run stops once it has evaluated this step.
        with tf.io.gfile.GFile(os.path.join(model_dir, DONE_FILE), "w") as f:
            json.dump({"step": end, "checkpoint": manager.latest_checkpoint}, f)
    logging.info("Trained steps %d-%d in %.1f s", start + 1, end,
                 time.perf_counter() - run_start)
    return {"step": end, "losses": last_losses, "model": model, "stopped_by": stopped_by,
            "metrics": metrics, "average": average and average.average,
            "best": read_best(model_dir) if best_metric else None}


BEST_DIR = "best"
# Written by the chief when a run reaches its total_steps: {"step", "checkpoint"}.
DONE_FILE = "done.json"


def finished_step(model_dir):
    """The last step of a run that has reached its end (`done.json`), else None."""
    path = os.path.join(model_dir, DONE_FILE)
    return int(files.read_json(path)["step"]) if tf.io.gfile.exists(path) else None


def check_best_metric(metric, mode, owner="train"):
    """ValueError for a `best_metric` / `best_mode` pair no evaluation could
    serve (`owner` names the gin configurable in the message)."""
    if mode not in ("max", "min"):
        raise ValueError(f"{owner}.best_mode={mode!r} must be 'max' or 'min'")
    if not isinstance(metric, str) or metric.count("/") != 1 or "" in metric.split("/"):
        raise ValueError(f"{owner}.best_metric={metric!r} must be 'group/name' of the "
                         f"evaluation's metrics, e.g. 'segm/AP' or 'bbox/AP'")


def _check_best(metric, mode, eval_fn):
    if metric is None:
        return
    if eval_fn is None:
        raise ValueError(f"train.best_metric={metric!r} needs train.eval_fn "
                         f"(e.g. @evaluate) to evaluate the checkpoints")
    check_best_metric(metric, mode)


def read_best(model_dir):
    """`model_dir/best/best.json` as a dict, or None before any."""
    path = os.path.join(model_dir, BEST_DIR, "best.json")
    return files.read_json(path) if tf.io.gfile.exists(path) else None


def keep_best(model_dir, checkpoint, step, metrics, metric, mode="max"):
    """Copies `checkpoint` to `model_dir/best/` if `metrics` beat the best
    kept so far (by `metric`, 'group/name', and `mode`); returns whether.

    The new files are copied before the directory's state file and
    `best.json` name them, and the previous best's are removed last, so an
    interruption leaves a whole checkpoint where the state file points.
    """
    group, name = metric.split("/")
    scores = (metrics or {}).get(group)
    value = scores.get(name) if isinstance(scores, dict) else None
    if value is None:
        available = sorted(f"{g}/{n}" for g, v in (metrics or {}).items()
                           if isinstance(v, dict) for n in v)
        raise ValueError(f"best_metric={metric!r} is not among the evaluation's "
                         f"metrics {available}; checkpoint {checkpoint} is kept")
    value = float(value)
    best = read_best(model_dir)
    if best is not None and best["metric"] == metric and not (
            value > best["value"] if mode == "max" else value < best["value"]):
        return False
    sources = tf.io.gfile.glob(checkpoint + ".*")
    if checkpoint + ".index" not in sources:
        # bin/eval --watch lags the run: keep_checkpoints may have pruned it.
        logging.warning("%s (%s %.4f, the best so far) is gone before it could be kept "
                        "as the best; raise train.keep_checkpoints", checkpoint, metric, value)
        return False
    best_dir = os.path.join(model_dir, BEST_DIR)
    tf.io.gfile.makedirs(best_dir)
    prefix = os.path.basename(checkpoint)
    old = set(tf.io.gfile.glob(os.path.join(best_dir, "ckpt-*")))
    for source in sources:
        target = os.path.join(best_dir, os.path.basename(source))
        tf.io.gfile.copy(source, target, overwrite=True)
        old.discard(target)
    # The state file `tf.train.latest_checkpoint(best_dir)` reads.
    with tf.io.gfile.GFile(os.path.join(best_dir, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{prefix}"\n'
                f'all_model_checkpoint_paths: "{prefix}"\n')
    with tf.io.gfile.GFile(os.path.join(best_dir, "best.json"), "w") as f:
        json.dump({"metric": metric, "mode": mode, "value": value, "step": int(step),
                   "checkpoint": os.path.join(best_dir, prefix)}, f, indent=2)
    for path in old:
        tf.io.gfile.remove(path)
    logging.info("Best %s so far: %.4f at step %d, kept in %s", metric, value, step,
                 best_dir)
    return True


def has_weight_average(checkpoint):
    """Whether the checkpoint at path `checkpoint` holds a weight average (`ema/`)."""
    return any(name.startswith("ema/") for name, _ in tf.train.list_variables(checkpoint))


def _evaluate(eval_fn, model_dir, checkpoint, precision, reuse):
    """`eval_fn` on a checkpoint of the run; the training precision restored.
    An `eval_fn` that takes `reuse` (`runner.evaluate`) gets the run's dict:
    its model and compiled inference serve every evaluation of the run."""
    start = time.perf_counter()
    kwargs = {}
    try:
        if "reuse" in inspect.signature(eval_fn).parameters:
            kwargs["reuse"] = reuse
    except (TypeError, ValueError):   # no signature to read
        pass
    try:
        metrics = eval_fn(model_dir, checkpoint=checkpoint, **kwargs)
    finally:
        set_precision(precision)   # the evaluation may set its own
    logging.info("Evaluated %s in %.1f s%s", checkpoint, time.perf_counter() - start,
                 "".join(f"; {k} AP {v['AP']:.3f}" for k, v in (metrics or {}).items()
                         if isinstance(v, dict) and "AP" in v))
    return metrics

