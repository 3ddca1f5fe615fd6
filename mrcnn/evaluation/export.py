"""SavedModel export with two serving signatures.

- `serve_images(images: uint8 [B, h, w, 3])`: a batch of same-size RGB images.
- `serve_encoded(encoded: string [B])`: JPEG/PNG bytes, any sizes.

`B` is fixed at export (`batch_size`): the model is built on static shapes
so that one XLA program serves every call; export one SavedModel per batch
size you serve. A call runs on the canvas of its images' orientation
(`pipeline.orientation_canvases`: 832 x 1344 or 1344 x 832 for COCO's
sizes) when every image of the call fits it, else on the square
`canvas_size`: the graph holds one model function per canvas, shared by
the two signatures.

Both apply the eval transform of `mrcnn.data.pipeline.preprocess_image`
inside the graph and return `detection_boxes float32 [B, D, 4]` (y1, x1, y2,
x2) in each input image's pixels, `detection_scores float32 [B, D]`,
`detection_classes int32 [B, D]` (contiguous 1..C; padded slots as the model
gives them), `detection_category_ids int32 [B, D]` (COCO ids when known, else
the classes), `detection_masks float32 [B, D, 28, 28]` (mask probabilities
inside each box; paste with `mrcnn.ops.masks.paste_masks`; not from a box-only
model), `detection_keypoints float32 [B, D, K, 3]` ((y, x, score) in each input
image's pixels; only from a keypoint model) and
`num_detections int32 [B]`.

`serve_encoded` decodes JPEGs with libjpeg's accurate integer DCT, as PIL
does in training and `bin/eval`, so both signatures see the same pixels
(TF's default JPEG DCT differs by up to 7 grey levels). It does not read
EXIF orientation tags (TF's decoders ignore them): boxes are in the stored
pixels, so send phone photos turned upright (`mrcnn.data.decode.open_rgb`,
as `bin/predict` and training read them) or decoded to `serve_images`.
"""

import gin
import tensorflow as tf

from mrcnn.data import pipeline
from mrcnn.evaluation import runner
from mrcnn.modeling import compile_ops


def decode_image(data):
    """Decodes JPEG, PNG, GIF or BMP bytes to the pixels PIL gives in training.

    Training and `bin/eval` decode with PIL, whose JPEG decoding uses
    libjpeg's accurate integer DCT; TF's default is the fast DCT, off by up
    to 7 grey levels, so JPEGs take `dct_method='INTEGER_ACCURATE'` here.

    Args:
      data: string scalar, the encoded file.

    Returns:
      uint8 [h, w, 3] (grey images repeated to RGB).
    """
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def _on_fitting_canvas(images, info, detect_on):
    """detect_on[canvas](images cut to the first canvas that holds every
    resized image of the batch, info): the images lie at the top left of the
    bound canvas, zeros beyond, so the cut is the batch padded to that canvas.

    Args:
      images: uint8 [B, H, W, 3] on the bound canvas (H, W).
      info: float32 [B, 5], resized height and width in columns 2 and 3.
      detect_on: {(h, w): fn} with distinct canvases <= (H, W), tried in
        order; the last is taken without a test, so it must hold any batch
        the call can get. fn: (images [B, h, w, 3], info) -> dict of tensors.
    """
    canvases = list(detect_on)

    def on(canvas):
        return lambda: detect_on[canvas](images[:, :canvas[0], :canvas[1]], info)
    if len(canvases) == 1:
        return on(canvases[0])()
    fits = [tf.reduce_all((info[:, 2] <= h) & (info[:, 3] <= w)) for h, w in canvases[:-1]]
    return tf.case([(f, on(c)) for f, c in zip(fits, canvases[:-1])],
                   default=on(canvases[-1]), exclusive=False)


@gin.configurable(denylist=["model_dir", "export_dir"])
def export_saved_model(model_dir, export_dir, *, model_fn=gin.REQUIRED,
                       min_size=800, max_size=1333, canvas_size=(1344, 1344),
                       size_divisor=64, dataset_fn=None, batch_size=1,
                       checkpoint=None, precision="float32"):
    """Writes a SavedModel of the latest (or given) checkpoint to `export_dir`.

    Args:
      model_dir: str, training run directory.
      export_dir: str, output SavedModel directory.
      model_fn: () -> keras.Model.
      min_size, max_size: the eval transform (as CocoInput's).
      canvas_size: (H, W), the square bound; a call whose images all share
        an orientation runs on that orientation's smaller canvas.
      size_divisor: int, 2**max_level of the FPN.
      dataset_fn: optional `CocoInput` whose category map gives the COCO
        category ids returned beside the contiguous classes.
      batch_size: int, images per call of both signatures.
      checkpoint: optional checkpoint path instead of the latest.
      precision: 'float32', 'bfloat16' or 'float16', what the exported graph
        computes in (`runner.restore_model`); the signatures' inputs and
        outputs are the same in all three. A bfloat16 model wants a GPU or
        a CPU with bfloat16 units (AMX, AVX512-BF16), float16 a GPU.

    Returns:
      (step, checkpoint path) of the exported weights.
    """
    canvas_size = tuple(int(v) for v in canvas_size)
    landscape, portrait = pipeline.orientation_canvases(min_size, max_size, canvas_size,
                                                        size_divisor)
    # serve_images' images share one size, so one of the two canvases holds
    # them all; serve_encoded's may mix orientations when batch_size > 1.
    same_size = list(dict.fromkeys([landscape, portrait]))
    mixed = list(dict.fromkeys(same_size + ([canvas_size] if batch_size > 1 else [])))
    model, step, path = runner.restore_model(model_fn, checkpoint or model_dir,
                                             landscape, precision)
    table = None
    if dataset_fn is not None:
        from mrcnn.training import trainer
        trainer.check_num_classes(model, dataset_fn)
        cmap = dataset_fn.category_map
        table = tf.constant([0] + [cmap.to_coco(c) for c in range(1, cmap.num_classes + 1)],
                            tf.int32)

    def preprocess(image):
        return pipeline.preprocess_image(image, min_size=min_size, max_size=max_size,
                                         canvas_size=canvas_size)

    def detect(images, info):
        out = model({"images": images, "image_info": info}, training=False)
        classes = tf.cast(out["detection_classes"], tf.int32)
        if table is not None:
            ids = tf.gather(table, tf.maximum(classes, 0))
            ids = tf.where(classes > 0, ids, classes)
        else:
            ids = classes
        result = {"detection_boxes": out["detection_boxes"],
                  "detection_scores": tf.cast(out["detection_scores"], tf.float32),
                  "detection_classes": classes,
                  "detection_category_ids": ids,
                  "num_detections": tf.cast(out["num_detections"], tf.int32)}
        if "detection_masks" in out:   # not from a box-only model
            result["detection_masks"] = tf.cast(out["detection_masks"], tf.float32)
        if "detection_keypoints" in out:   # Keypoint R-CNN
            result["detection_keypoints"] = tf.cast(out["detection_keypoints"], tf.float32)
        return result

    # One function per canvas, called by both signatures: the SavedModel
    # holds each canvas's model graph once, traced once, inside
    # tf.saved_model.save (whose save context is part of TF's trace cache
    # key, so a trace made before it would be made again).
    detect_on = {canvas: tf.function(
        detect, autograph=False,
        input_signature=[tf.TensorSpec([batch_size, *canvas, 3], tf.uint8),
                         tf.TensorSpec([batch_size, 5], tf.float32)])
        for canvas in mixed}
    signature = (tf.TensorSpec(canvas_size + (3,), tf.uint8),
                 tf.TensorSpec([5], tf.float32))

    def serve_images(images):
        images, info = tf.map_fn(preprocess, images, fn_output_signature=signature)
        return _on_fitting_canvas(images, info, {c: detect_on[c] for c in same_size})

    def serve_encoded(encoded):
        def one(data):
            return preprocess(decode_image(data))
        images, info = tf.map_fn(one, encoded, fn_output_signature=signature)
        return _on_fitting_canvas(images, info, detect_on)

    # A plain tf.Module rather than keras.export.ExportArchive: the archive
    # traced every canvas's model once more before saving, to list the
    # variables, which are known here (the shapes demo: 18 s, then 11 s).
    root = tf.Module()
    root.model_variables = list(model.variables)
    root.serve_images = tf.function(
        serve_images, autograph=False,
        input_signature=[tf.TensorSpec([batch_size, None, None, 3], tf.uint8, name="images")])
    root.serve_encoded = tf.function(
        serve_encoded, autograph=False,
        input_signature=[tf.TensorSpec([batch_size], tf.string, name="encoded")])
    # Plain graphs, without the model's XLA islands (`mrcnn.modeling._xla`):
    # the SavedModel then runs wherever TensorFlow does, XLA or not.
    with compile_ops(False):
        tf.saved_model.save(root, export_dir, signatures={
            "serving_default": root.serve_images, "serve_images": root.serve_images,
            "serve_encoded": root.serve_encoded})
    return step, path
