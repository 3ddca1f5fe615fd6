"""Inference programs' loops: restore a checkpoint, evaluate on COCO, predict on files.

`evaluate` runs whole batches of the eval pipeline through the model, writes
COCO results and the two 12-number tables (bbox, segm) to
`model_dir/eval/`, and logs them to TensorBoard with a few annotated
pictures. `predict` runs the same model on image files and writes JSON and
PNG pictures.
"""

from concurrent import futures
import contextlib
import functools
import itertools
import json
import os
import time

import gin
import numpy as np
import tensorflow as tf
from absl import logging
from pycocotools import mask as mask_util

from mrcnn.data import decode, files, pipeline
from mrcnn.evaluation import coco as coco_eval
from mrcnn.evaluation import lvis as lvis_eval
from mrcnn.evaluation import results as results_lib
from mrcnn.evaluation import visualize
from mrcnn.ops import masks as mask_ops
from mrcnn.training import initialization, trainer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _zero_inference_batch(canvas_size, batch=1):
    h, w = canvas_size
    return {"images": tf.zeros([batch, h, w, 3], tf.uint8),
            "image_info": tf.constant([[h, w, h, w, 1.0]] * batch, tf.float32)}


@gin.configurable(allowlist=["average_weights"])
def restore_model(model_fn, checkpoint, canvas_size, precision="float32",
                  average_weights=True):
    """Builds the model and restores its weights (not the optimizer's).

    Args:
      model_fn: () -> keras.Model (gin's train.model_fn).
      checkpoint: a checkpoint path, or a model_dir whose latest is taken.
      canvas_size: (H, W) of the padded inputs.
      precision: 'float32', 'bfloat16' or 'float16': the model computes in
        it (Keras mixed policy; the weights and the outputs stay float32).
        Keras' global policy is left as it was.
      average_weights: bool, restore the moving average of the weights when
        the checkpoint has one (`train.ema_decay`), else the weights.

    Returns:
      (model, step int, checkpoint path).

    Raises:
      FileNotFoundError: no checkpoint there.
    """
    path = _checkpoint_path(checkpoint)
    with trainer.precision_scope(precision):
        model = model_fn()
        model(_zero_inference_batch(trainer.build_canvas(model, canvas_size)),
              training=False)
    step, path = restore_weights(model, path, average_weights)
    return model, step, path


def _checkpoint_path(checkpoint):
    path = initialization.find_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint} (train first, or give "
                                f"--checkpoint=DIR/ckpt-N)")
    return path


# How often --watch looks for the run's end marker while no checkpoint comes.
_WATCH_POLL_S = 10


def _new_checkpoints(model_dir, timeout, last_metrics):
    """Each new checkpoint of `model_dir` as it appears, until the one of the
    run's last step has been evaluated (`last_metrics()` is the latest
    evaluation's report, or None) or none comes for `timeout` seconds."""
    def done():
        last = last_metrics()
        end = trainer.finished_step(model_dir)
        return last is not None and end is not None and last["step"] >= end

    idle = {"since": time.monotonic()}

    def stop_waiting():
        return done() or time.monotonic() - idle["since"] >= timeout

    for path in tf.train.checkpoints_iterator(
            model_dir, timeout=min(timeout, _WATCH_POLL_S), timeout_fn=stop_waiting):
        yield path
        if done():
            logging.info("Evaluated the run's last checkpoint: done watching")
            return
        idle["since"] = time.monotonic()


def restore_weights(model, checkpoint, average_weights=True):
    """Restores a checkpoint's weights into a built model (`restore_model`'s).

    Args:
      model: keras.Model built as the checkpoint's.
      checkpoint: a checkpoint path, or a model_dir whose latest is taken.
      average_weights: as `restore_model`'s.

    Returns:
      (step int, checkpoint path).
    """
    path = _checkpoint_path(checkpoint)
    step = tf.Variable(0, dtype=tf.int64)
    # The average is a model of the same object graph, saved as `ema`.
    averaged = average_weights and trainer.has_weight_average(path)
    ckpt = tf.train.Checkpoint(step=step, **{"ema" if averaged else "model": model})
    status = ckpt.restore(path)
    status.expect_partial()  # the optimizer's slots are not needed here
    status.assert_existing_objects_matched()
    if averaged:
        logging.info("Restored the moving average of the weights of %s", path)
    return int(step.numpy()), path


def _class_maps(category_map):
    ids = range(1, category_map.num_classes + 1)
    return ({c: category_map.to_coco(c) for c in ids},
            {c: category_map.names[c - 1] for c in ids})


def _summary_pictures(batch, detections, class_names, limit):
    """uint8 [n, h, w, 3] pictures of the first images of a batch, at the resized size."""
    pictures = []
    info = batch["image_info"]
    for i in range(min(limit, len(info))):
        if batch["image_id"][i] < 0:
            continue
        rh, rw, scale = int(info[i, 2]), int(info[i, 3]), float(info[i, 4])
        image = batch["images"][i, :rh, :rw]
        n = int(detections["num_detections"][i])
        boxes = detections["detection_boxes"][i, :n] * scale
        masks = (mask_ops.paste_masks(detections["detection_masks"][i:i + 1, :n],
                                      boxes[None], (rh, rw)).numpy()[0]
                 if n and "detection_masks" in detections else None)
        pictures.append(visualize.draw_detections(
            image, boxes, detections["detection_classes"][i, :n],
            detections["detection_scores"][i, :n], masks, class_names))
    return pictures


# Up to this many categories, evaluate prints and logs each one's AP (COCO's
# 80); beyond, they are only in the metrics file.
PER_CATEGORY_LIMIT = 100
# Entries of a results file read and added to the evaluator at a time.
_RESULTS_PART = 50_000


@gin.configurable(denylist=["model_dir"])
def evaluate(model_dir, *, model_fn=gin.REQUIRED, dataset_fn=gin.REQUIRED,
             checkpoint=None, precision="float32", xla=False, max_batches=None,
             num_pictures=4, watch=False, watch_timeout=3600, tta=None,
             evaluator="auto", results_file=None, devices=None, host_threads=None,
             reuse=None, best_metric=None, best_mode="max", keypoint_oks_sigmas=None):
    """Evaluates checkpoints of `model_dir` on a COCO-format split.

    Args:
      model_dir: str, the training run's directory.
      model_fn: () -> keras.Model, as for training.
      dataset_fn: a `CocoInput` in evaluation mode (training=False).
      checkpoint: a checkpoint path; the latest in model_dir if None.
      precision: 'float32', 'bfloat16' or 'float16' for inference.
      xla: bool, compile the inference step.
      max_batches: optional int, evaluate only this many batches (a subset;
        the metrics cover only the images seen).
      num_pictures: int, annotated pictures logged to TensorBoard.
      watch: bool, evaluate every new checkpoint until the run's last one
        has been evaluated (`train` marks a run that reached its end), or
        until none comes for `watch_timeout` seconds.
      best_metric, best_mode: with `watch`, keep the best evaluation's
        checkpoint in `model_dir/best/` as `train.best_metric` does (the
        Model Garden's continuous evaluation exports its best); set it
        here or in `train`, not both.
      tta: optional `mrcnn.modeling.tta.TestTimeAugmentation` (Detectron2's
        TEST.AUG): each batch runs at its sizes (relative to the dataset's
        `min_size`) and flipped, merged; files and TensorBoard tags of the
        evaluation get a `-tta` / `_tta` suffix.
      evaluator: 'coco' (COCOeval's numbers, `mrcnn.evaluation.cocoeval`),
        'lvis' (federated, 300 detections per image, APr/APc/APf), 'auto':
        LVIS for a file whose images list `neg_category_ids`, else COCO
        (`mrcnn.evaluation.lvis.build_evaluator`); or 'pycocotools': COCO's
        metrics from pycocotools' COCOeval itself, ~10x slower.
      results_file: optional COCO results json: score it instead of a model
        (`evaluate_results`; `model_dir` is then not read).
      keypoint_oks_sigmas: K floats, the OKS sigmas of a keypoint model's
        keypoints (Detectron2's `TEST.KEYPOINT_OKS_SIGMAS`); None: COCO's
        person sigmas (K = 17).
      devices: where the model runs, one batch per device at a time
        (a MirroredStrategy's replicas; the dataset's batch size is per
        device, as in training): None for every GPU of this machine where
        it has several, else the default device; or a list of device names.
        The results are those of one device, batch for batch.
      host_threads: threads that paste and encode masks on the host beside
        the model (None: as many as CPU cores, at most 8).
      reuse: optional dict the caller keeps between calls (`bin/train`'s
        periodic evaluation, `watch`): the first call keeps its model and
        compiled inference there, and a later call with the same model_fn,
        canvas, sizes, precision, XLA, test-time augmentation and devices
        restores the next checkpoint's weights into them instead of
        building, tracing and compiling again (with the same gin
        configuration too: a changed binding builds anew).

    Returns:
      dict: {'step', 'evaluator': 'coco' or 'lvis', 'bbox': {AP, AP50, ...
      (the evaluator's names)}, 'segm': {...}, 'per_category':
      {'bbox': {category name: AP}, 'segm': {...}}} of the last evaluation
      (-1 for a category without ground truth in the images seen); no
      'segm' for a box-only model or dataset (`CocoInput.with_masks`);
      'keypoints' (COCOeval's OKS AP, `coco.KEYPOINT_STAT_NAMES`) for a
      keypoint model.
      It is also written to `model_dir/eval/metrics-<step>.json` and
      TensorBoard; the per-category APs are printed and logged only up to
      `PER_CATEGORY_LIMIT` categories.
    """
    if dataset_fn.training:
        raise ValueError("evaluate.dataset_fn must be a CocoInput with training=False")
    if results_file is not None:
        return evaluate_results(results_file, dataset_fn, evaluator,
                                keypoint_oks_sigmas=keypoint_oks_sigmas)
    if watch:
        if best_metric is not None:
            trainer.check_best_metric(best_metric, best_mode, owner="evaluate")
        metrics, reuse = None, {} if reuse is None else reuse
        for path in _new_checkpoints(model_dir, watch_timeout, lambda: metrics):
            metrics = evaluate(model_dir, model_fn=model_fn, dataset_fn=dataset_fn,
                               checkpoint=path, precision=precision, xla=xla,
                               max_batches=max_batches, num_pictures=num_pictures,
                               tta=tta, evaluator=evaluator, devices=devices,
                               host_threads=host_threads, reuse=reuse,
                               keypoint_oks_sigmas=keypoint_oks_sigmas)
            if best_metric is not None:
                trainer.keep_best(model_dir, metrics["checkpoint"], metrics["step"],
                                  metrics, best_metric, best_mode)
        return metrics

    # gin's text stands for what model_fn's own bindings build.
    key = (model_fn, tuple(dataset_fn.canvas_size), max(dataset_fn.min_sizes), precision,
           bool(xla), None if tta is None else (tuple(tta.min_sizes), tta.flip),
           None if devices is None else tuple(devices), gin.config_str())
    if reuse is not None and reuse.get("key") == key:
        model, strategy, infer = reuse["model"], reuse["strategy"], reuse["infer"]
        with strategy.scope() if strategy else contextlib.nullcontext():
            step, path = restore_weights(model, checkpoint or model_dir)
    else:
        strategy = _eval_strategy(devices)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model, step, path = restore_model(model_fn, checkpoint or model_dir,
                                              dataset_fn.canvas_size, precision)
        infer = trainer.with_aligned_names(_replicated(
            _inference_fn(model, tta, max(dataset_fn.min_sizes), xla), strategy))
        if reuse is not None:
            reuse.clear()
            reuse.update(key=key, model=model, strategy=strategy, infer=infer)
    trainer.check_num_classes(model, dataset_fn)
    logging.info("Evaluating %s (step %d) on %s", path, step, dataset_fn.annotation_file)
    class_to_category, class_names = _class_maps(dataset_fn.category_map)
    # Masks are scored when the model makes them and the annotations have them.
    with_masks = getattr(model, "has_masks", True) and dataset_fn.with_masks
    with_keypoints = getattr(model, "has_keypoints", False)
    evaluator = lvis_eval.build_evaluator(dataset_fn.annotation_file, class_to_category,
                                          kind=evaluator, include_masks=with_masks,
                                          include_keypoints=with_keypoints,
                                          keypoint_oks_sigmas=keypoint_oks_sigmas)
    suffix = "" if tta is None else "-tta"
    pictures, num_images, start = [], 0, time.perf_counter()

    def convert(detections, batch, images):
        """The evaluator's results for a slice of a batch's images (a thread)."""
        return evaluator.convert({k: v[images].numpy() for k, v in detections.items()},
                                 {k: batch[k][images].numpy() for k in ("image_id", "image_info")})

    def add(parts, detections, batches):
        """A step's converted batches into the evaluator, in order (one thread)."""
        nonlocal num_images
        for part in parts:
            evaluator.add(part.result())  # re-raises the conversion's error
        for detections, batch in zip(detections, batches):
            image_ids = batch["image_id"].numpy()
            num_images += int((image_ids >= 0).sum())
            if len(pictures) < num_pictures and (image_ids >= 0).any():
                pictures.extend(_summary_pictures(
                    {k: v.numpy() for k, v in batch.items()},
                    {k: v.numpy() for k, v in detections.items()},
                    class_names, num_pictures - len(pictures)))

    # While the model runs on step k (a batch per device), `threads` threads
    # paste and encode step k - 1's masks, each a slice of a batch's images
    # (NumPy leaves the GIL in its loops: 1.7x with two threads on two
    # cores), and one thread adds them to the evaluator in order. At most two
    # steps of detections are held.
    threads = host_threads or min(8, os.cpu_count() or 1)
    batches = dataset_fn()
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    with futures.ThreadPoolExecutor(1, thread_name_prefix="eval_host") as host, \
            futures.ThreadPoolExecutor(threads, thread_name_prefix="eval_convert") as pool:
        pending = None
        for group in _groups(batches, 1 if strategy is None else
                             strategy.num_replicas_in_sync):
            detections = infer(group)
            parts = []
            for output, batch in zip(detections, group):
                parts += [pool.submit(convert, output, batch, images) for images in
                          image_slices(int(batch["image_id"].shape[0]), threads)]
            if pending is not None:
                pending.result()   # re-raises the host work's error, if any
            pending = host.submit(add, parts, detections, group)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - start
    metrics = evaluator.evaluate(("bbox",) + ("segm",) * with_masks
                                 + ("keypoints",) * with_keypoints)
    print(f"step {step}: {num_images} images in {seconds:.1f} s "
          f"({num_images / max(seconds, 1e-9):.1f} img/s)")
    print(coco_eval.format_metrics(metrics))
    per_category = evaluator.per_category
    out_dir = os.path.join(model_dir, "eval")
    metrics_file = os.path.join(out_dir, f"metrics-{step}{suffix}.json")
    num_categories = max((len(v) for v in per_category.values()), default=0)
    # LVIS's 1203 rows (and 2406 TensorBoard curves) would drown the summary.
    by_category = num_categories <= PER_CATEGORY_LIMIT
    if by_category:
        print(coco_eval.format_per_category(per_category))
    else:
        print(f"AP of each of the {num_categories} categories: {metrics_file}")

    files.makedirs(out_dir)
    evaluator.write_results(os.path.join(out_dir, f"results-{step}{suffix}.json"))
    report = {"step": step, "checkpoint": path, "num_images": num_images,
              "evaluator": evaluator.kind, **metrics,
              "per_category": per_category}
    if tta is not None:
        report["test_time_augmentation"] = {"min_sizes": list(tta.min_sizes),
                                            "flip": tta.flip}
    with files.open_file(metrics_file, "w") as f:
        json.dump(report, f, indent=2)
    writer = tf.summary.create_file_writer(out_dir)
    with writer.as_default(step=step):
        for iou_type, stats in metrics.items():
            for name, value in stats.items():
                tf.summary.scalar(f"{iou_type}{suffix.replace('-', '_')}/{name}", value)
            for name, value in per_category[iou_type].items():
                if value >= 0 and by_category:
                    tf.summary.scalar(f"{iou_type}{suffix.replace('-', '_')}_per_category"
                                      f"/AP-{name}", value)
        for k, picture in enumerate(pictures):
            tf.summary.image(f"detections/{k}", picture[None], max_outputs=1)
    writer.flush()
    return report


def evaluate_results(results_file, dataset_fn, evaluator="auto", iou_types=None,
                     keypoint_oks_sigmas=None):
    """Scores a COCO results json (another run's or another library's) on
    the annotations of `dataset_fn`, every image of the file counting
    (`bin/eval --results`, through `evaluate(results_file=...)`).

    Args:
      results_file: str, a JSON list of COCO results entries.
      dataset_fn: a `CocoInput`; only its `annotation_file` is read.
      evaluator: 'auto', 'coco', 'lvis' or 'pycocotools', as `evaluate`'s.
      iou_types: subset of ('bbox', 'segm', 'keypoints'); None: 'segm'
        ('keypoints') too when every entry has a `segmentation`
        (`keypoints`).
      keypoint_oks_sigmas: as `evaluate`'s.

    Returns:
      dict: {'results_file', 'evaluator', 'bbox': {...}, 'segm': {...},
      'per_category': {...}}, also written next to `results_file` as
      `<name>-metrics.json`.
    """
    annotations = dataset_fn.annotation_file
    scorer = lvis_eval.build_evaluator(annotations, {}, kind=evaluator,
                                       include_masks=iou_types is None or "segm" in iou_types,
                                       keypoint_oks_sigmas=keypoint_oks_sigmas)
    # Read and added in parts: an LVIS results file of 6M entries as one
    # list of dicts would take about 6 GB before the first is scored.
    num_results, with_masks, with_keypoints, part = 0, True, True, []
    with tf.io.gfile.GFile(results_file, "rb") as f:   # UTF-8 decoded in iter_json_list
        try:
            for entry in results_lib.iter_json_list(f):
                with_masks = with_masks and isinstance(entry, dict) and "segmentation" in entry
                with_keypoints = (with_keypoints and isinstance(entry, dict)
                                  and "keypoints" in entry)
                part.append(entry)
                if len(part) == _RESULTS_PART:
                    scorer.add_results(part)
                    num_results, part = num_results + len(part), []
            scorer.add_results(part)   # also for none: every image counts
            num_results += len(part)
        except ValueError as e:
            raise ValueError(f"{results_file}: {e}") from None
    with_masks = with_masks and num_results > 0
    with_keypoints = with_keypoints and num_results > 0 and scorer.kind == "coco"
    iou_types = tuple(iou_types or (("bbox",) + ("segm",) * with_masks
                                    + ("keypoints",) * with_keypoints))
    try:
        metrics = scorer.evaluate(iou_types)
    except ValueError as e:
        raise ValueError(f"{results_file}: {e}") from None
    logging.info("%s: %d results on %d images of %s (%s metrics)", results_file,
                 num_results, len(scorer.image_ids), annotations, scorer.kind)
    print(coco_eval.format_metrics(metrics))
    report = {"results_file": results_file, "annotation_file": annotations,
              "evaluator": scorer.kind, **metrics, "per_category": scorer.per_category}
    out = os.path.splitext(results_file)[0] + "-metrics.json"
    with tf.io.gfile.GFile(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"metrics: {out}")
    return report


def _raise_score_threshold(model, threshold):
    """Makes `model`'s test threshold keep exactly the scores >= `threshold`.

    Greedy per-class NMS visits boxes by descending score, so boxes under a
    threshold never decide the fate of those above it, and the D best
    detections over it are the first ones of the D best overall: the
    detections at or above `threshold` are the same, only found sooner.
    The model keeps `score > t` in float32; `t` is the float32 just under
    `threshold`'s.
    """
    current = getattr(model, "score_threshold", None)
    if current is None or threshold <= current:
        return
    below = np.nextafter(np.float32(threshold), np.float32(-np.inf))
    model.score_threshold = max(float(below), float(current))


def image_slices(size, threads):
    """At most `threads` contiguous, non-empty slices covering `size` images,
    of sizes differing by at most one: a batch's share per host thread."""
    bounds = np.linspace(0, size, min(size, threads) + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _eval_strategy(devices):
    """The MirroredStrategy `evaluate(devices=...)` runs the model under, or
    None for the default device (`devices` None and at most one GPU)."""
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) < 2:
            return None
        devices = [d.name for d in gpus]
    return _mirrored_strategy(tuple(devices))


@functools.lru_cache(maxsize=None)
def _mirrored_strategy(devices):
    # One per device set in a process: training's evaluations reuse it.
    return tf.distribute.MirroredStrategy(devices=list(devices))


def _groups(batches, size):
    """Lists of `size` consecutive batches, one per device; the last list
    padded with copies of its last batch whose image slots are all padding
    (`image_id` -1), which the evaluator skips."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        padding = dict(group[-1], image_id=tf.fill(tf.shape(group[-1]["image_id"]),
                                                   tf.constant(-1, group[-1]["image_id"].dtype)))
        yield group + [padding] * (size - len(group))


def _replicated(infer, strategy):
    """list of batches -> list of their detections, each batch on a device."""
    if strategy is None:
        return lambda group: [infer(group[0])]

    @tf.function(autograph=False)
    def run(batches):
        # A Python function around the traced one: given a tf.function
        # itself, MirroredStrategy ran its XLA program on the first device
        # with the second one's variables (an error).
        return strategy.run(lambda batch: infer(batch), args=(batches,))

    def on_devices(group):
        batches = strategy.experimental_distribute_values_from_function(
            lambda context: group[context.replica_id_in_sync_group])
        return list(strategy.experimental_local_results(run(batches)))

    return on_devices


def _inference_fn(model, tta, base_min_size, xla=False):
    """The traced detections of a batch: the model's, or through `tta`."""
    # Plain TensorFlow: autograph would only convert every call (10% of a trace).
    if tta is None:
        return tf.function(lambda b: model(b, training=False), jit_compile=xla,
                           autograph=False)
    if getattr(model, "has_keypoints", False):
        # Its merged detections would come without keypoints.
        raise ValueError("test-time augmentation of a keypoint model is not supported "
                         "(Detectron2 has none either)")
    if not hasattr(model, "roi_heads"):
        raise ValueError(f"test-time augmentation runs a two-stage model's RoI heads; "
                         f"a {type(model).__name__} has none (Detectron2's TTA is for "
                         f"R-CNNs too)")
    logging.info("Test-time augmentation: %d runs per batch (sizes %s for %d%s)",
                 tta.num_augmentations, ", ".join(map(str, tta.min_sizes)),
                 base_min_size, ", and flipped" if tta.flip else "")
    return tf.function(lambda b: tta(model, b, base_min_size), jit_compile=xla,
                       autograph=False)


def image_files(inputs):
    """Image files of `inputs`: files, folders (their images, sorted) and
    glob patterns (`gs://bucket/photos/*.jpg`, expanded here where no shell
    reaches); on any filesystem of `mrcnn.data.files`. FileNotFoundError for
    an input that names nothing, or if no image is found."""
    paths = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matched = sorted(p for p in tf.io.gfile.glob(item)   # hidden: as a shell
                             if p.lower().endswith(IMAGE_SUFFIXES)
                             and not os.path.basename(p).startswith("."))
            if not matched:
                raise FileNotFoundError(f"{item}: no image file matches")
            paths += matched
        elif tf.io.gfile.isdir(item):
            paths += sorted(os.path.join(item, name)
                            for name in tf.io.gfile.listdir(item)
                            if name.lower().endswith(IMAGE_SUFFIXES)
                            and not name.startswith("."))
        elif tf.io.gfile.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {inputs}")
    return paths


class Predictor:
    """Detections on one in-memory image at a time (Detectron2's DefaultPredictor).

        predictor = Predictor("runs/shapes_demo", model_fn=MaskRCNN, min_size=128,
                              max_size=128, canvas_size=(128, 128))
        out = predictor(image)   # uint8 [H, W, 3] RGB
        # or, after parsing the gin files of the run: Predictor.from_gin(model_dir)

    Each image gets the evaluation transform and is padded to the first of
    `pipeline.orientation_canvases` (landscape, portrait: 832 x 1344 and
    1344 x 832 for COCO's sizes) that holds its resize, the rule of the
    exported model's `serve_images`, so the model is traced at most twice.

    Args:
      model_dir: str, run directory (its latest checkpoint) unless `checkpoint`.
      model_fn: () -> keras.Model.
      dataset_fn: optional `CocoInput` whose category map names the classes.
      min_size, max_size: the eval transform (as CocoInput's).
      canvas_size: (H, W), the bound on both orientations' canvases.
      size_divisor: int, 2**max_level of the FPN.
      score_threshold: float, detections kept at or above it. Above the
        model's own test threshold (`score_threshold`, 0.05) it
        becomes the model's, as Detectron2's demo sets SCORE_THRESH_TEST:
        the same detections, but the mask head runs on the confident ones
        only, not on all D slots.
      checkpoint: optional checkpoint path instead of model_dir's latest.
      batch_size: int, images per model call in `batch` (a GPU wants 8 or
        more; the model is traced once per canvas at this batch size).
      tta: optional `TestTimeAugmentation` (sizes relative to `min_size`).
      precision: 'float32', 'bfloat16' or 'float16', what the model computes
        in (`restore_model`): bfloat16 on a CPU with AMX or AVX512-BF16
        (R50-FPN inference 3.5x faster than float32 on this project's Xeon),
        bfloat16 or float16 on a GPU.
      xla: bool, compile each canvas's whole inference with XLA (as
        `evaluate.xla`); else a graph, with the model's XLA islands.

    Attributes:
      step, checkpoint_path: of the restored checkpoint.
      canvases_used: {(h, w): images run on that canvas}.
    """

    def __init__(self, model_dir, *, model_fn, dataset_fn=None, min_size=800,
                 max_size=1333, canvas_size=(1344, 1344), size_divisor=64,
                 score_threshold=0.5, checkpoint=None, batch_size=1, tta=None,
                 precision="float32", xla=False):
        self.min_size, self.max_size = min_size, max_size
        self.canvas_size = tuple(int(v) for v in canvas_size)
        self.score_threshold = score_threshold
        if int(batch_size) < 1:
            raise ValueError(f"Predictor: batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.category_names = (dataset_fn.category_map.names if dataset_fn is not None
                               else None)
        # The keypoints' names (CocoInput.with_keypoints), for reports.
        self.keypoint_names = tuple(getattr(dataset_fn, "keypoint_names", ()) or ())
        self.keypoint_skeleton = tuple(getattr(dataset_fn, "keypoint_skeleton", ()) or ())
        self.canvases = pipeline.orientation_canvases(min_size, max_size,
                                                      self.canvas_size, size_divisor)
        self.model, self.step, self.checkpoint_path = restore_model(
            model_fn, checkpoint or model_dir, self.canvases[0], precision)
        if dataset_fn is not None:
            trainer.check_num_classes(self.model, dataset_fn)
        _raise_score_threshold(self.model, score_threshold)
        self._infer = trainer.with_aligned_names(
            _inference_fn(self.model, tta, min_size, xla))
        self.canvases_used = {}

    @classmethod
    def from_gin(cls, model_dir, checkpoint=None):
        """The Predictor `bin/predict` builds, from the parsed gin config's
        `predict.*` bindings."""
        kwargs = {k: v for k, v in gin.get_bindings("predict").items()
                  if k not in ("checkpoint",)}
        return cls(model_dir, checkpoint=checkpoint, **kwargs)

    def name(self, class_id):
        """The class's name from `dataset_fn`'s categories, else its number."""
        names = self.category_names
        return names[class_id - 1] if names and class_id <= len(names) else str(class_id)

    def __call__(self, image):
        """Detections of one image.

        Args:
          image: uint8 [H, W, 3] RGB.

        Returns:
          dict, K detections scoring at least `score_threshold`, by score:
          `boxes` float32 [K, 4] (y1, x1, y2, x2) in the image's pixels,
          `scores` float32 [K], `classes` int32 [K] (1..C), `names` list of
          K str, and from a model with a mask head `masks` bool [K, H, W]
          and `rles` (the same masks as K COCO RLE dicts); None without.
          From a keypoint model, `keypoints` float32 [K, P, 3] (y, x,
          score) in the image's pixels (continuous: pixel i spans [i, i +
          1)); None without.
        """
        return self.batch([image])[0]

    def batch(self, images):
        """Detections of several images, as `__call__`'s, in their order.

        Images of one canvas run `batch_size` at a time; a last, partial
        batch is padded with empty slots (zero image and image_info, as the
        evaluation pipeline pads), so each canvas keeps one static shape.

        Args:
          images: list of uint8 [H_i, W_i, 3] RGB arrays.

        Returns:
          list of dicts, one per image.
        """
        prepared = []
        for image in images:
            padded, info = pipeline.preprocess_image(
                image, min_size=self.min_size, max_size=self.max_size,
                canvas_size=self.canvas_size)
            rh, rw = float(info[2]), float(info[3])
            canvas = next((c for c in self.canvases if rh <= c[0] and rw <= c[1]),
                          self.canvas_size)
            self.canvases_used[canvas] = self.canvases_used.get(canvas, 0) + 1
            prepared.append((canvas, padded[:canvas[0], :canvas[1]], info))
        results = [None] * len(images)
        n = self.batch_size
        for canvas in sorted({c for c, _, _ in prepared}):
            members = [i for i, (c, _, _) in enumerate(prepared) if c == canvas]
            for start in range(0, len(members), n):
                chunk = members[start:start + n]
                pad = n - len(chunk)
                batch = {"images": tf.stack([prepared[i][1] for i in chunk]
                                            + [tf.zeros(canvas + (3,), tf.uint8)] * pad),
                         "image_info": tf.stack([prepared[i][2] for i in chunk]
                                                + [tf.zeros([5], tf.float32)] * pad)}
                det = {k: v.numpy() for k, v in self._infer(batch).items()}
                for slot, i in enumerate(chunk):
                    results[i] = self._select({k: v[slot] for k, v in det.items()},
                                              images[i].shape[:2])
        return results

    def _select(self, det, size):
        """One image's detections at or above the threshold, masks pasted at `size`."""
        keep = np.arange(int(det["num_detections"]))
        keep = keep[det["detection_scores"][keep] >= self.score_threshold]
        boxes = det["detection_boxes"][keep]
        rles = masks = None   # a box-only model
        if "detection_masks" in det:
            rles = coco_eval.paste_masks_rle(det["detection_masks"][keep], boxes, size)
            masks = (np.transpose(mask_util.decode(rles), (2, 0, 1)).astype(bool) if rles
                     else np.zeros((0,) + tuple(size), bool))
        classes = det["detection_classes"][keep].astype(np.int32)
        keypoints = (det["detection_keypoints"][keep].astype(np.float32)
                     if "detection_keypoints" in det else None)
        return {"boxes": boxes.astype(np.float32),
                "scores": det["detection_scores"][keep].astype(np.float32),
                "classes": classes, "names": [self.name(int(c)) for c in classes],
                "masks": masks, "rles": rles, "keypoints": keypoints}


@gin.configurable(denylist=["model_dir", "inputs", "out_dir"])
def predict(model_dir, inputs, out_dir, *, model_fn=gin.REQUIRED, exif_orientation=True,
            **kwargs):
    """Detects objects in image files; writes detections.json and one PNG per image.

    detections.json holds, per image, its picture's file name and each
    detection's box (y1, x1, y2, x2 in the image's pixels), class, name,
    score and mask (`segmentation`, COCO RLE at the image's size:
    `pycocotools.mask.decode` gives [H, W]; not from a box-only model), and
    from a keypoint model `keypoints_yxs`, [y, x, score] per keypoint in the
    image's pixels, in the order of the top-level `keypoint_names`.
    Files that cannot be decoded are skipped with a warning and listed
    under `unreadable`; ValueError when none can be.

    Args:
      model_dir: str, run directory (its latest checkpoint) unless `checkpoint`.
      inputs: list of image files or folders.
      out_dir: str, where `detections.json` and `<name>.png` go.
      exif_orientation: bool, turn each file upright by its EXIF orientation
        tag first (`mrcnn.data.decode.open_rgb`): boxes and masks are then
        in the upright image's pixels, as a viewer shows a phone photo.
      model_fn, **kwargs: `Predictor`'s (dataset_fn, min_size, max_size,
        canvas_size, size_divisor, score_threshold, checkpoint, batch_size, tta,
        precision, xla).

    Returns:
      list of per-image dicts as written to detections.json.
    """
    paths = image_files(inputs)
    predictor = Predictor(model_dir, model_fn=model_fn, **kwargs)
    files.makedirs(out_dir)
    written, unreadable, pictures = [], [], set()
    # Files are read a few batches at a time, so that each canvas's batches fill.
    chunk = 4 * predictor.batch_size
    for first in range(0, len(paths), chunk):
        images = []
        for file in paths[first:first + chunk]:
            try:
                # Upright by its EXIF tag, as a viewer shows a phone photo
                # (and as `CocoInput.exif_orientation` reads training images).
                images.append((file, decode.open_rgb(file, exif_orientation)[0]))
            except decode.DECODE_ERRORS as e:
                # One bad file in a folder must not cost the others.
                logging.warning("%s: cannot read image (%s); skipped", file, e)
                unreadable.append({"file": file, "error": str(e)})
        outs = predictor.batch([image for _, image in images])
        for (file, image), out in zip(images, outs):
            written.append(_write_prediction(file, image, out, predictor, out_dir,
                                             pictures))
    if not written:
        raise ValueError(f"none of the {len(paths)} image files could be read: "
                         + "; ".join(f"{u['file']}: {u['error']}" for u in unreadable))
    report = {"checkpoint": predictor.checkpoint_path, "step": predictor.step,
              "images": written}
    if getattr(predictor.model, "has_keypoints", False):
        report["keypoint_names"] = list(predictor.keypoint_names or ())
    if unreadable:
        report["unreadable"] = unreadable
    with files.open_file(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(report, f, indent=2)
    logging.info("Predicted %d images: %s", len(written), ", ".join(
        f"{n} on {h}x{w}" for (h, w), n in sorted(predictor.canvases_used.items())))
    if unreadable:
        logging.warning("%d of %d files could not be read (listed under 'unreadable' "
                        "in detections.json)", len(unreadable), len(paths))
    return written


def _write_prediction(file, image, out, predictor, out_dir, pictures):
    """Saves one image's picture; its detections.json entry."""
    names = dict(zip(out["classes"].tolist(), out["names"]))
    picture = visualize.draw_detections(image, out["boxes"], out["classes"],
                                        out["scores"], out["masks"], names,
                                        score_threshold=predictor.score_threshold,
                                        keypoints=out.get("keypoints"),
                                        skeleton=predictor.keypoint_skeleton)
    picture_name = _unique_png_name(file, pictures)
    visualize.save_png(os.path.join(out_dir, picture_name), picture)
    entries = [{"box_yxyx": [round(float(v), 2) for v in b], "class": int(c),
                "name": n, "score": round(float(s), 4)}
               for b, c, n, s in zip(out["boxes"], out["classes"], out["names"],
                                     out["scores"])]
    for entry, rle in zip(entries, out["rles"] or ()):
        entry["segmentation"] = rle
    if out.get("keypoints") is not None:
        for entry, points in zip(entries, out["keypoints"]):
            entry["keypoints_yxs"] = [[round(float(v), 2) for v in p[:2]]
                                      + [round(float(p[2]), 4)] for p in points]
    return {"file": file, "picture": picture_name, "detections": entries}


@gin.configurable(denylist=["out_dir"])
def visualize_data(out_dir, *, dataset_fn=gin.REQUIRED, num_images=16):
    """Draws what the model is fed: batch images with their gt boxes, classes, masks.

    Detectron2's tools/visualize_data.py: the pictures show the pipeline's
    output (resize, flip, scale jitter and crop, bad annotations dropped),
    each cropped to its image's area of the canvas, as `<k>_<image id>.png`.

    Args:
      out_dir: str, where the PNGs go.
      dataset_fn: a `CocoInput` (train.dataset_fn's, by the recipes' gin).
      num_images: int, pictures written.

    Returns:
      list of the PNG paths written.
    """
    names = dict(enumerate(dataset_fn.category_map.names, start=1))
    files.makedirs(out_dir)
    paths = []
    for batch in dataset_fn(seed=0) if dataset_fn.training else dataset_fn():
        for b in range(batch["images"].shape[0]):
            if len(paths) >= num_images:
                return paths
            image_id = int(batch["image_id"][b])
            if image_id < 0:   # an evaluation batch's padding
                continue
            rh, rw = (int(v) for v in batch["image_info"][b, 2:4])
            valid = batch["gt_valid"][b].numpy()
            boxes = batch["gt_boxes"][b].numpy()[valid]
            classes = batch["gt_classes"][b].numpy()[valid]
            masks = None
            if "gt_masks" in batch and len(boxes):
                frames = tf.cast(batch["gt_masks"][b][valid], tf.float32)[None]
                masks = mask_ops.paste_masks(frames, tf.constant(boxes)[None],
                                             (rh, rw)).numpy()[0]
            keypoints = None
            if "gt_keypoints" in batch:   # (y, x, v): labelled points drawn
                keypoints = batch["gt_keypoints"][b].numpy()[valid]
            picture = visualize.draw_detections(batch["images"][b, :rh, :rw].numpy(),
                                                boxes, classes, None, masks, names,
                                                keypoints=keypoints, keypoint_threshold=0.0,
                                                skeleton=getattr(dataset_fn,
                                                                 "keypoint_skeleton", ()))
            path = os.path.join(out_dir, f"{len(paths)}_{image_id}.png")
            visualize.save_png(path, picture)
            paths.append(path)
    return paths


def _unique_png_name(file, taken):
    """`<stem>.png`, or `<stem>_<k>.png` for the k-th file of the same stem.

    a.jpg and a.png, or two folders' 000001.jpg, would otherwise overwrite
    each other's picture. `taken` (a set of names) is updated.
    """
    stem = os.path.splitext(os.path.basename(file))[0]
    name, k = f"{stem}.png", 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}.png"
    taken.add(name)
    return name
