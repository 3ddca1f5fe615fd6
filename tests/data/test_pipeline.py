"""CocoInput end to end: make_shapes -> batches give back the drawn boxes,
classes, masks and pixels (resized and flipped), static shapes, crowd, eval
padding, sharding, bad input, gin, and the input benchmark."""

import collections
import json
import os
import tempfile

import gin
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image
from pycocotools import mask as mask_util

from mrcnn.benchmarks import input as input_bench
from mrcnn.data import CocoInput, DataError, make_shapes, pipeline
from tests.data import fixtures

H, W = 48, 65                 # source images
MIN_SIZE, MAX_SIZE = 72, 110  # scale 1.5: resized 72 x round(97.5) = 98
CANVAS = (128, 128)
M, S = 8, 16


def _builder(root, **kwargs):
    args = dict(batch_size=4, min_size=MIN_SIZE, max_size=MAX_SIZE,
                canvas_size=CANVAS, max_instances=M, mask_size=S, seed=3)
    args.update(kwargs)
    return CocoInput(root, **args)


def _numpy_batches(ds, n=None):
    it = ds if n is None else ds.take(n)
    return [{k: v.numpy() for k, v in b.items()} for b in it]


def _ref_resize(image, rh, rw):
    """Bilinear with half-pixel centres (output pixel i samples input
    (i + 0.5) * in / out - 0.5, clamped), float64, one axis at a time."""
    def along(x, n_out, axis):
        n_in = x.shape[axis]
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = src - i0
        shape = [1] * x.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        return np.take(x, i0, axis) * (1 - w) + np.take(x, i1, axis) * w
    return along(along(image.astype(np.float64), rh, 0), rw, 1)


def _ref_frame(mask, box, s):
    """Nearest pixel under each cell's sample point (box in mask pixels)."""
    y1, x1, y2, x2 = box
    out = np.zeros((s, s), np.uint8)
    for u in range(s):
        for v in range(s):
            i = int((y1 + (u + 0.5) * (y2 - y1) / s))
            j = int((x1 + (v + 0.5) * (x2 - x1) / s))
            out[u, v] = mask[min(i, mask.shape[0] - 1), min(j, mask.shape[1] - 1)]
    return out


def _locate_crop(ref, got):
    """The (max abs error, oy, ox, flipped) of the best place of `got` [h, w, 3]
    in `ref` or its mirror: the first minimum in (unflipped first, oy, ox)
    order. A place's error is at least its error on a grid of probe pixels, so
    only places whose probe error is under 1 (the test's bound) are compared
    whole; if there is none, the error is infinite and fails the test."""
    h, w = got.shape[:2]
    ny, nx = ref.shape[0] - h + 1, ref.shape[1] - w + 1
    best = (np.inf, -1, -1, False)
    for flipped, r in ((False, ref), (True, ref[:, ::-1])):
        probe = np.zeros((ny, nx))
        for py in range(0, h, 9):
            for px in range(0, w, 9):
                probe = np.maximum(probe, np.abs(
                    r[py:py + ny, px:px + nx] - got[py, px]).max(-1))
        for oy, ox in zip(*np.nonzero(probe < 1.0)):
            error = np.abs(r[oy:oy + h, ox:ox + w] - got).max()
            if error < best[0]:
                best = (error, oy, ox, flipped)
    return best


class ShapesRoundTripTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = os.path.join(cls.tmp.name, "shapes")
        make_shapes(cls.root, num_train=12, num_val=9, image_size=(H, W), seed=7)
        cls.json = {}
        for split in ("train2017", "val2017"):
            with open(os.path.join(cls.root, "annotations",
                                   f"instances_{split}.json")) as f:
                cls.json[split] = json.load(f)
        cls.eval_batches = _numpy_batches(
            _builder(cls.root, split="val2017", training=False)())

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def _annotations(self, split, image_id):
        return [a for a in self.json[split]["annotations"]
                if a["image_id"] == image_id and not a["iscrowd"]]

    def _check_example(self, split, batch, b, flipped=False):
        """Slot b of a batch against the json and the image file."""
        image_id = int(batch["image_id"][b])
        rh, rw = round(H * 1.5), round(W * 1.5)
        self.assertAllClose(batch["image_info"][b], [H, W, rh, rw, 1.5])
        fy, fx = rh / H, rw / W
        coco_to_class = {1: 1, 3: 2, 7: 3}
        anns = self._annotations(split, image_id)
        n = len(anns)
        self.assertAllEqual(batch["gt_valid"][b], np.arange(M) < n)
        masks = "gt_masks" in batch   # training batches only
        self.assertEqual(masks, split == "train2017")
        for key in ("gt_classes", "gt_boxes", "gt_masks")[:3 if masks else 2]:
            self.assertFalse(batch[key][b, n:].any(), msg=key)
        for k, a in enumerate(anns):
            self.assertEqual(batch["gt_classes"][b, k], coco_to_class[a["category_id"]])
            x, y, w, h = a["bbox"]
            box = np.array([y * fy, x * fx, (y + h) * fy, (x + w) * fx])
            if flipped:
                box = np.array([box[0], rw - box[3], box[2], rw - box[1]])
            self.assertAllClose(batch["gt_boxes"][b, k], box, atol=1e-4)
            if not masks:
                continue
            full = mask_util.decode(mask_util.merge(
                mask_util.frPyObjects(a["segmentation"], H, W)))
            if flipped:
                full = full[:, ::-1]
            ref = _ref_frame(full, (box[0] / fy, box[1] / fx, box[2] / fy,
                                    box[3] / fx), S)
            got = batch["gt_masks"][b, k]
            iou = (got & ref).sum() / max((got | ref).sum(), 1)
            self.assertGreater(iou, 0.7, msg=(image_id, a["id"]))
        file_name = f"{image_id:012d}.jpg"
        pixels = np.asarray(Image.open(os.path.join(self.root, split, file_name)))
        ref = _ref_resize(pixels, rh, rw)
        if flipped:
            ref = ref[:, ::-1]
        got = batch["images"][b]
        self.assertEqual(got.dtype, np.uint8)
        # Rounded to whole pixels: within half a grey level of the float resize.
        self.assertAllClose(got[:rh, :rw], ref, atol=0.5 + 1e-3)
        self.assertFalse(batch["images"][b, rh:].any())
        self.assertFalse(batch["images"][b, :, rw:].any())

    def test_eval_round_trip(self):
        slots = [(batch, b) for batch in self.eval_batches
                 for b in range(4) if batch["image_id"][b] >= 0]
        self.assertLen(slots, 9)
        for batch, b in slots:
            self._check_example("val2017", batch, b)

    def test_a_dataset_on_an_object_store_gives_the_same_batches(self):
        # A file:// URL stands in for gs://: json, file checks and images
        # go through tf.io.gfile there.
        from tests.data.fixtures import copy_tree, remote_dir
        remote = remote_dir(self.tmp.name)
        copy_tree(self.root, remote)
        batches = _numpy_batches(_builder(remote, split="val2017", training=False)())
        self.assertLen(batches, len(self.eval_batches))
        for got, want in zip(batches, self.eval_batches):
            self.assertEqual(sorted(got), sorted(want))
            for key in want:
                self.assertAllEqual(got[key], want[key])

    def test_box_only_annotations(self):
        """with_masks=False: annotations without `segmentation` load (they are bad
        annotations with masks), and batches carry the same boxes, no gt_masks."""
        root = os.path.join(self.tmp.name, "boxes_only")
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        if not os.path.exists(os.path.join(root, "train2017")):
            os.symlink(os.path.join(self.root, "train2017"), os.path.join(root, "train2017"))
        data = json.loads(json.dumps(self.json["train2017"]))
        for ann in data["annotations"]:
            del ann["segmentation"]
        with open(os.path.join(root, "annotations", "instances_train2017.json"), "w") as f:
            json.dump(data, f)
        with self.assertRaisesRegex(Exception, "no segmentation"):
            _builder(root, skip_bad=False)
        boxes = _builder(root, with_masks=False)
        full = _builder(self.root)
        self.assertNotIn("gt_masks", boxes().element_spec)
        self.assertEqual(len(boxes.records), len(full.records))
        for ours, theirs in zip(_numpy_batches(boxes(), 2), _numpy_batches(full(), 2)):
            self.assertEqual(sorted(ours), sorted(set(theirs) - {"gt_masks"}))
            for key in ours:
                self.assertAllEqual(ours[key], theirs[key], msg=key)
        with self.assertRaisesRegex(Exception, "no gt_masks"):
            from mrcnn.modeling.mask_rcnn import build_mask_rcnn
            batch = next(iter(boxes()))
            build_mask_rcnn(num_classes=3, depth=18, fpn_channels=16, fc_dim=16,
                            mask_channels=8, num_samples=16, pre_nms_topk_train=20,
                            post_nms_topk_train=20)(batch, training=True)

    def test_scale_jitter_without_a_crop_is_the_plain_resize(self):
        # s = 1: scale min(128 / 48, 128 / 65), as min_size = max_size = 128.
        jittered = _builder(self.root, scale_jitter=(1.0, 1.0))
        plain = _builder(self.root, min_size=128, max_size=128)
        for ours, theirs in zip(_numpy_batches(jittered(), 2), _numpy_batches(plain(), 2)):
            self.assertEqual(sorted(ours), sorted(theirs))
            for key in ours:
                self.assertAllClose(ours[key], theirs[key], atol=1e-6, msg=key)

    def test_scale_jitter_crops_against_the_json(self):
        """s in [1.5, 2]: every image is larger than the canvas and cropped. The
        crop's place is found by matching pixels; each gt box and mask must be
        its annotation's, resized, flipped and cut to the crop."""
        builder = _builder(self.root, scale_jitter=(1.5, 2.0), flip_probability=0.5)
        self.assertIsNone(_builder(self.root, training=False,
                                   scale_jitter=(1.5, 2.0)).scale_jitter)
        s = S
        checked = recropped = 0
        for batch in _numpy_batches(builder(), 3):
            for b in range(4):
                info = batch["image_info"][b]
                self.assertAllClose(info[2:4], CANVAS)   # the whole canvas is image
                image_id = int(batch["image_id"][b])
                pixels = np.asarray(Image.open(os.path.join(
                    self.root, "train2017", f"{image_id:012d}.jpg")))
                rh, rw = round(H * float(info[4])), round(W * float(info[4]))
                ref = _ref_resize(pixels, rh, rw)
                got = batch["images"][b].astype(np.float64)
                error, oy, ox, flipped = _locate_crop(ref, got)
                self.assertLess(error, 1.0, msg=image_id)
                fy, fx = rh / H, rw / W
                wanted = []
                for a in self._annotations("train2017", image_id):
                    x, y, w, h = a["bbox"]
                    box = np.array([y * fy, x * fx, (y + h) * fy, (x + w) * fx])
                    if flipped:
                        box = np.array([box[0], rw - box[3], box[2], rw - box[1]])
                    crop = np.clip(box - [oy, ox, oy, ox], 0, 128)
                    if crop[2] > crop[0] and crop[3] > crop[1]:
                        # What is left of the box, as a share of each side.
                        kept = min((crop[2] - crop[0]) / (box[2] - box[0]),
                                   (crop[3] - crop[1]) / (box[3] - box[1]))
                        wanted.append((a, crop, kept))
                n = len(wanted)
                self.assertAllEqual(batch["gt_valid"][b], np.arange(M) < n)
                for k, (a, crop, kept) in enumerate(wanted):
                    self.assertAllClose(batch["gt_boxes"][b, k], crop, atol=1e-3)
                    if kept < 0.25:   # a sliver: under 4 of the S = 16 mask cells
                        continue
                    full = mask_util.decode(mask_util.merge(
                        mask_util.frPyObjects(a["segmentation"], H, W)))
                    if flipped:   # the crop box is in the flipped image's frame
                        full = full[:, ::-1]
                    orig = (crop + [oy, ox, oy, ox]) / [fy, fx, fy, fx]
                    ref_mask = _ref_frame(full, orig, s)
                    ours = batch["gt_masks"][b, k]
                    iou = (ours & ref_mask).sum() / max((ours | ref_mask).sum(), 1)
                    self.assertGreater(iou, 0.7, msg=(image_id, a["id"]))
                    checked += 1
                    recropped += kept < 1.0
        self.assertGreater(checked, 10)
        self.assertGreater(recropped, 2)   # masks that the crop did cut

    def test_eval_every_image_once_in_order_then_padding(self):
        ids = np.concatenate([b["image_id"] for b in self.eval_batches])
        expected = sorted(i["id"] for i in self.json["val2017"]["images"])
        self.assertAllEqual(ids, expected + [-1, -1, -1])
        last = self.eval_batches[-1]
        self.assertNotIn("gt_masks", last)   # evaluation reads the annotation file
        for key in ("images", "image_info", "gt_boxes", "gt_classes"):
            self.assertAllEqual(last[key][1:], np.zeros_like(last[key][1:]))
        self.assertFalse(last["gt_valid"][1:].any())
        # Index 7 of the split has no instance and is still evaluated.
        empty = self.json["val2017"]["images"][7]["id"]
        slot = list(ids).index(empty)
        self.assertFalse(self.eval_batches[slot // 4]["gt_valid"][slot % 4].any())

    @parameterized.named_parameters(("no_flip", 0.0), ("flip", 1.0))
    def test_training_round_trip(self, flip_probability):
        builder = _builder(self.root, flip_probability=flip_probability)
        for batch in _numpy_batches(builder(), 3):
            for b in range(4):
                self._check_example("train2017", batch, b,
                                    flipped=flip_probability == 1.0)

    def test_flip_mirrors_image_boxes_and_masks(self):
        plain, flipped = (
            _numpy_batches(_builder(self.root, flip_probability=p)(), 2)
            for p in (0.0, 1.0))
        rw = round(W * 1.5)
        for a, f in zip(plain, flipped):
            self.assertAllEqual(a["image_id"], f["image_id"])
            self.assertAllEqual(f["images"][:, :, :rw], a["images"][:, :, :rw][:, :, ::-1])
            valid = a["gt_valid"]
            ab, fb = a["gt_boxes"][valid], f["gt_boxes"][valid]
            self.assertAllClose(fb, np.stack([ab[:, 0], rw - ab[:, 3], ab[:, 2],
                                              rw - ab[:, 1]], 1))
            self.assertAllEqual(f["gt_masks"], a["gt_masks"][..., ::-1])

    def test_start_reads_on_across_epochs_and_seed_fixes_the_order(self):
        builder = _builder(self.root, batch_size=1, min_size=(48, 72))
        n = len(builder.records)
        start = n + 3   # inside the second epoch (reshuffled)

        def stream(ds, count):
            return [(int(b["image_id"][0]), float(b["image_info"][0, 4]),
                     float(tf.reduce_sum(b["images"][0]))) for b in ds.take(count)]

        whole = stream(builder(), start + 5)
        self.assertEqual(stream(builder(start=start), 5), whole[start:])
        # Without CocoInput.seed the caller's seed decides, reproducibly.
        unseeded = _builder(self.root, batch_size=1, seed=None)
        a, b, c = (stream(unseeded(seed=s), n) for s in (11, 11, 12))
        self.assertEqual(a, b)
        self.assertNotEqual([e[0] for e in a], [e[0] for e in c])
        with self.assertRaisesRegex(ValueError, "start is for the training"):
            _builder(self.root, training=False, split="val2017")(start=1)

    def test_multiscale_and_static_shapes(self):
        builder = _builder(self.root, min_size=(48, 72))
        ds = builder()
        for spec in ds.element_spec.values():
            self.assertTrue(spec.shape.is_fully_defined())
        sizes = set()
        for batch in _numpy_batches(ds, 5):
            for key, spec in ds.element_spec.items():
                self.assertEqual(batch[key].shape, tuple(spec.shape))
                self.assertEqual(batch[key].dtype, spec.dtype.as_numpy_dtype)
            for info, boxes, valid in zip(batch["image_info"], batch["gt_boxes"],
                                          batch["gt_valid"]):
                sizes.add(tuple(info[2:4]))
                self.assertTrue((boxes[valid][:, 2] <= info[2] + 1e-4).all())
                self.assertTrue((boxes[valid][:, 3] <= info[3] + 1e-4).all())
        self.assertEqual(sizes, {(48.0, 65.0), (72.0, 98.0)})
        self.assertEqual(tuple(ds.element_spec["images"].shape), (4,) + CANVAS + (3,))

    def test_crowd_never_gt_and_empty_filtered(self):
        builder = _builder(self.root, batch_size=1)
        self.assertGreaterEqual(builder.counts["crowd_annotations"], 1)
        self.assertEqual(builder.counts["empty_images"], 1)   # index 7
        ids = {r.image_id for r in builder.records}
        self.assertLen(ids, 11)
        seen = collections.Counter()
        for batch in _numpy_batches(builder(), 11):
            image_id = int(batch["image_id"][0])
            seen[image_id] += 1
            crowd = [a for a in self.json["train2017"]["annotations"]
                     if a["image_id"] == image_id and a["iscrowd"]]
            self.assertEqual(batch["gt_valid"][0].sum(),
                             len(self._annotations("train2017", image_id)))
            for a in crowd:
                x, y, w, h = a["bbox"]
                crowd_box = np.array([y, x, y + h, x + w]) * 1.5
                for box in batch["gt_boxes"][0][batch["gt_valid"][0]]:
                    self.assertNotAllClose(box[[0, 2]], crowd_box[[0, 2]])
        self.assertEqual(set(seen), ids)   # one shuffled epoch: each once

    def test_category_map_exported(self):
        builder = _builder(self.root)
        cmap = builder.category_map
        self.assertEqual(builder.num_classes, 3)
        self.assertEqual(cmap.names, ("circle", "square", "triangle"))
        self.assertEqual([cmap.to_coco(c) for c in (1, 2, 3)], [1, 3, 7])

    @parameterized.named_parameters(("two", 2), ("three", 3))
    def test_sharding_disjoint(self, num_pipelines):
        builder = _builder(self.root, batch_size=2)  # per replica
        shards = []
        for i in range(num_pipelines):
            context = tf.distribute.InputContext(
                num_input_pipelines=num_pipelines, input_pipeline_id=i,
                num_replicas_in_sync=num_pipelines)
            records = builder.shard_records(context)
            ds = builder(context)
            per_replica = ds.element_spec["image_id"].shape[0]
            self.assertEqual(per_replica, 2)
            ids = [int(e["image_id"]) for e in ds.unbatch().take(len(records))]
            self.assertEqual(sorted(ids), sorted(r.image_id for r in records))
            shards.append({r.path for r in records})
        union = set().union(*shards)
        self.assertEqual(union, {r.path for r in builder.records})
        self.assertEqual(sum(len(s) for s in shards), len(union))

    def test_distribute_datasets_from_function(self):
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        builder = _builder(self.root, batch_size=2)
        dist = strategy.distribute_datasets_from_function(builder)
        batch = next(iter(dist))
        self.assertEqual(tuple(batch["images"].shape), (2,) + CANVAS + (3,))

    def test_mask_memory_per_image(self):
        builder = CocoInput(self.root, split="train2017", training=True)
        spec = builder().element_spec["gt_masks"]
        self.assertEqual(tuple(spec.shape[1:]), (100, 112, 112))
        self.assertLess(np.prod(spec.shape[1:]) * spec.dtype.size, 8 * 2**20)

    def test_gin_binds_builder(self):
        with gin.unlock_config():
            gin.parse_config(["CocoInput.mask_size = 8",
                              "CocoInput.max_instances = 5"])
        try:
            builder = CocoInput(self.root, split="train2017", training=True,
                                batch_size=2, min_size=48, max_size=65,
                                canvas_size=(64, 128))
            spec = builder().element_spec
            self.assertEqual(tuple(spec["gt_masks"].shape), (2, 5, 8, 8))
            self.assertEqual(tuple(spec["images"].shape), (2, 64, 128, 3))
        finally:
            gin.clear_config()

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "multiples of size_divisor"):
            _builder(self.root, canvas_size=(100, 128))
        with self.assertRaisesRegex(ValueError, "larger than canvas_size"):
            _builder(self.root, min_size=200, max_size=300, canvas_size=(128, 256))

    def test_bench_input(self):
        result = input_bench.bench_input(self.root, batch=2, min_size=48,
                                         max_size=65, canvas=128,
                                         num_batches=2, warmup=1)
        self.assertGreater(result["images_per_s"], 0)
        # uint8 images and masks; float32 info and boxes, int64 id, int32 classes, bool valid.
        expected = 2 * (128 * 128 * 3 + 100 * 112 * 112 + 5 * 4 + 8
                        + 100 * (16 + 4 + 1))
        self.assertEqual(result["batch_bytes"], expected)


class BadInputPipelineTest(tf.test.TestCase):
    """Bad files and annotations through CocoInput (fixtures dataset:
    images 11, 12, 13 of 32 x 40)."""

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name

    def _build(self, dataset=None, **kwargs):
        fixtures.write_dataset(self.root, dataset)
        args = dict(batch_size=1, min_size=32, max_size=40, canvas_size=(64, 64),
                    max_instances=4, mask_size=8, seed=0)
        args.update(kwargs)
        return lambda: CocoInput(self.root, **args)

    def _truncate(self, image_id=12):
        path = os.path.join(self.root, "train2017", f"{image_id:06d}.jpg")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 3])
        return path

    def test_truncated_jpeg_skipped_and_counted_in_training(self):
        make = self._build()
        path = self._truncate()
        builder = make()
        ids = [int(b["image_id"][0]) for b in builder().take(6)]
        self.assertNotIn(12, ids)
        self.assertEqual(set(ids), {11, 13})
        self.assertGreaterEqual(builder.counts["undecodable_images"], 1)
        self.assertLen([p for p in builder.problems if path in p], 1)

    def test_all_images_undecodable_raises_in_training(self):
        make = self._build()
        for image_id in (11, 12, 13):
            self._truncate(image_id)
        with self.assertRaisesRegex(tf.errors.OpError, "no image decodes"):
            list(make()().take(2))

    def test_truncated_jpeg_raises_naming_file_in_eval(self):
        make = self._build(training=False)
        path = self._truncate()
        with self.assertRaisesRegex(tf.errors.OpError,
                                    f"{path}: cannot decode image id 12"):
            list(make()())

    def test_garbage_file_raises_without_skip_bad(self):
        make = self._build(skip_bad=False)
        path = os.path.join(self.root, "train2017", "000013.jpg")
        with open(path, "wb") as f:
            f.write(b"not a jpeg")
        with self.assertRaisesRegex(tf.errors.OpError, "image id 13"):
            list(make()().take(6))

    def test_exif_orientation_read_upright_unless_turned_off(self):
        # Image 12 stored as a phone stores a photo: turned a quarter, with
        # the EXIF tag (6) that turns it back to the json's size.
        make = self._build(training=False)   # writes the files: before the rewrite
        stored = self._build(training=False, exif_orientation=False)
        path = os.path.join(self.root, "train2017", "000012.jpg")
        with Image.open(path) as image:
            upright = np.asarray(image)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.rot90(upright, 1)).save(path, exif=exif.tobytes(), quality=100)
        ids = [int(i) for b in make()() for i in b["image_id"] if i >= 0]
        self.assertEqual(ids, [11, 12, 13])
        with self.assertRaisesRegex(tf.errors.OpError,
                                    "image id 12 .*exif_orientation = True"):
            list(stored()())

    def test_missing_file(self):
        make = self._build()
        os.remove(os.path.join(self.root, "train2017", "000011.jpg"))
        builder = make()
        self.assertEqual(builder.counts["skipped_images"], 1)
        self.assertEqual([r.image_id for r in builder.records], [12, 13])
        with self.assertRaisesRegex(DataError, "image id 11: file .*000011.jpg"):
            CocoInput(self.root, training=False, min_size=32, max_size=40,
                      canvas_size=(64, 64))

    def test_bad_annotation_logged_once_and_counted(self):
        dataset = fixtures.base_dataset()
        dataset["annotations"][0]["bbox"] = [4.0, 6.0, 0.0, 8.0]
        dataset["annotations"][3]["category_id"] = 42
        make = self._build(dataset)
        with self.assertLogs("absl", level="WARNING") as logs:
            builder = make()
        self.assertLen(logs.records, 1)
        self.assertIn("skipped 2 images", logs.output[0])
        self.assertIn("annotation id 101", logs.output[0])
        self.assertIn("annotation id 104", logs.output[0])
        self.assertEqual(builder.counts["bad_annotations"], 2)
        self.assertEqual([r.image_id for r in builder.records], [12])
        with self.assertRaisesRegex(DataError, "annotation id 101 .*zero or negative"):
            CocoInput(self.root, skip_bad=False, min_size=32, max_size=40,
                      canvas_size=(64, 64))

    def test_not_coco_json(self):
        dataset = fixtures.base_dataset()
        del dataset["categories"]
        make = self._build(dataset)
        with self.assertRaisesRegex(DataError, "instances_train2017.json.*'categories'"):
            make()

    def test_file_deleted_after_load_named_when_decoded(self):
        builder = self._build(training=False)()
        os.remove(os.path.join(self.root, "train2017", "000011.jpg"))
        with self.assertRaisesRegex(tf.errors.OpError, "000011.jpg.*image id 11"):
            list(builder())


def _shifted(dataset, by):
    """`dataset` with image and annotation ids moved by `by` (other colours)."""
    for image in dataset["images"]:
        image["id"] += by
        image["file_name"] = f"{image['id']:06d}.jpg"
    for ann in dataset["annotations"]:
        ann["id"] += by
        ann["image_id"] += by
    return dataset


class SeveralSplitsTest(tf.test.TestCase):
    """Training on several COCO jsons at once (Detectron2's DATASETS.TRAIN
    tuple): fixtures' images 11-13 in train2017, 111-113 in 'extra'."""

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        self.first = fixtures.write_dataset(self.root)
        self.second = fixtures.write_dataset(
            self.root, _shifted(fixtures.base_dataset(), 100), split="extra")

    def _build(self, **kwargs):
        args = dict(batch_size=1, min_size=32, max_size=40, canvas_size=(64, 64),
                    max_instances=4, mask_size=8, seed=0)
        args.update(kwargs)
        return CocoInput(**args)

    def _epoch_ids(self, builder):
        # Two epochs of the stream: every image comes, from both files.
        return {int(b["image_id"][0]) for b in builder().take(2 * len(builder.records))}

    def test_splits_of_one_layout_are_one_stream(self):
        builder = self._build(data_dir=self.root, split=("train2017", "extra"))
        self.assertLen(builder.records, 6)
        self.assertEqual(builder.annotation_files, (self.first[0], self.second[0]))
        self.assertEqual(builder.image_dirs, (self.first[1], self.second[1]))
        self.assertEqual(builder.annotation_file, self.first[0])
        self.assertEqual(self._epoch_ids(builder), {11, 12, 13, 111, 112, 113})
        # Each image with its own pixels: the fixtures' colour of its id.
        for b in builder().take(6):
            image_id = int(b["image_id"][0])
            self.assertEqual(int(b["images"][0, 0, 0, 0]), image_id * 37 % 256)
        single = self._build(data_dir=self.root, split="train2017")
        self.assertEqual(builder.category_map, single.category_map)
        self.assertEqual(single.annotation_files, (self.first[0],))

    def test_files_of_other_roots_and_a_gin_tuple(self):
        other = os.path.join(self.root, "other")
        second = fixtures.write_dataset(other, _shifted(fixtures.base_dataset(), 200))
        builder = self._build(annotation_file=(self.first[0], second[0]),
                              image_dir=[self.first[1], second[1]])
        self.assertEqual(self._epoch_ids(builder), {11, 12, 13, 211, 212, 213})
        with gin.unlock_config():
            gin.parse_config([f"CocoInput.data_dir = '{self.root}'",
                              "CocoInput.split = ('extra', 'train2017')"])
        try:
            self.assertEqual(self._build().annotation_files,
                             (self.second[0], self.first[0]))
        finally:
            gin.clear_config()

    def test_categories_must_agree(self):
        renamed = fixtures.base_dataset()
        renamed["categories"][0]["name"] = "kitten"
        fixtures.write_dataset(self.root, _shifted(renamed, 100), split="extra")
        with self.assertRaisesRegex(
                DataError, r"instances_extra.json: its categories differ from those of "
                r".*instances_train2017.json \(category id 5 is 'cat' in .* and 'kitten'"):
            self._build(data_dir=self.root, split=("train2017", "extra"))
        more = fixtures.base_dataset()
        more["categories"].append({"id": 9, "name": "bird"})
        fixtures.write_dataset(self.root, _shifted(more, 100), split="extra")
        with self.assertRaisesRegex(DataError, r"category ids \[\] only in .*"
                                    r"train2017.json, \[9\] only in .*extra.json"):
            self._build(data_dir=self.root, split=("train2017", "extra"))

    def test_problems_name_their_file(self):
        bad = _shifted(fixtures.base_dataset(), 100)
        bad["annotations"][0]["bbox"] = [1.0, 1.0, -4.0, 2.0]
        fixtures.write_dataset(self.root, bad, split="extra")
        builder = self._build(data_dir=self.root, split=("train2017", "extra"))
        self.assertTrue(builder.problems)
        self.assertTrue(all(p.startswith(self.second[0] + ": ") for p in builder.problems),
                        builder.problems)
        self.assertLen(builder.records, 6 - builder.counts["skipped_images"])

    def test_evaluation_and_length_errors(self):
        with self.assertRaisesRegex(ValueError, "evaluation reads one annotation file, got 2"):
            self._build(data_dir=self.root, split=("train2017", "extra"), training=False)
        with self.assertRaisesRegex(ValueError, "split has 2, annotation_file has 3 entries"):
            self._build(data_dir=self.root, split=("train2017", "extra"),
                        annotation_file=[self.first[0]] * 3)
        with self.assertRaisesRegex(ValueError, "no split given"):
            self._build(data_dir=self.root, split=())
        with self.assertRaisesRegex(ValueError, "give data_dir, or annotation_file and"):
            self._build(annotation_file=(self.first[0], self.second[0]))


class OrientationGroupingTest(tf.test.TestCase):
    """group_by_orientation on `fixtures.write_orientations`' dataset."""

    LANDSCAPE, PORTRAIT = {1, 2, 3, 4, 5, 6}, {7, 8, 9, 10}

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = tmp.name
        fixtures.write_orientations(self.root)

    def _build(self, **kwargs):
        args = dict(batch_size=2, min_size=32, max_size=40, canvas_size=(64, 64),
                    size_divisor=8, max_instances=4, mask_size=8, seed=5,
                    group_by_orientation=True)
        args.update(kwargs)
        return CocoInput(self.root, **args)

    def _check_batch(self, batch):
        """One orientation, its canvas, and each slot the image its id names."""
        ids = [int(i) for i in batch["image_id"] if i >= 0]
        portrait = ids[0] in self.PORTRAIT
        self.assertTrue({*ids} <= (self.PORTRAIT if portrait else self.LANDSCAPE), ids)
        canvas = (40, 32) if portrait else (32, 40)
        self.assertEqual(batch["images"].shape[1:3], canvas)
        for b, image_id in enumerate(ids):
            rh, rw = (int(v) for v in batch["image_info"][b, 2:4])
            self.assertEqual((rh, rw), {True: (40, 32), False: (32, 40)}[portrait]
                             if image_id != 6 else (32, 32))
            pixels = batch["images"][b]
            self.assertAllClose(pixels[:rh, :rw], np.full((rh, rw, 3), image_id * 37 % 256),
                                atol=3.0)
            self.assertFalse(batch["images"][b, rh:].any())
            self.assertFalse(batch["images"][b, :, rw:].any())
        return portrait

    def test_training_batches_share_an_orientation_and_its_canvas(self):
        builder = self._build()
        # The tightest multiples of 8 (square 36 x 36 resizes to 32 x 32).
        self.assertEqual(builder.canvases, ((32, 40), (40, 32)))
        spec = builder().element_spec["images"]
        self.assertEqual(spec.shape.as_list(), [2, None, None, 3])
        batches = _numpy_batches(builder(), 40)
        orientations = [self._check_batch(b) for b in batches]
        self.assertTrue(any(orientations) and not all(orientations))
        seen = {int(i) for b in batches for i in b["image_id"]}
        self.assertEqual(seen, self.LANDSCAPE | self.PORTRAIT)
        # One seeded draw per step: landscape with its share of the dataset (6/10).
        share = 1 - np.mean(orientations)
        self.assertBetween(share, 0.35, 0.85)

    def test_replicas_of_a_step_share_it_across_pipelines(self):
        builder = self._build(batch_size=1, seed=None)
        steps = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=pipeline_id,
                num_replicas_in_sync=4)   # two replicas per pipeline
            batches = _numpy_batches(builder(context, seed=21), 24)
            portrait = [self._check_batch(b) for b in batches]
            # The iterator hands consecutive batches to a pipeline's replicas.
            self.assertEqual(portrait[0::2], portrait[1::2])
            steps.append(portrait[0::2])
        self.assertEqual(steps[0], steps[1])
        self.assertTrue(any(steps[0]) and not all(steps[0]))
        with self.assertRaisesRegex(ValueError, "needs a seed"):
            builder(context)

    def test_start_reads_on_the_grouped_stream(self):
        builder = self._build()

        def stream(ds, count):
            return [(tuple(b["image_id"]), b["images"].shape, float(b["images"].sum()))
                    for b in _numpy_batches(ds, count)]

        whole = stream(builder(), 12)
        self.assertEqual(stream(builder(start=14), 5), whole[7:])

    def test_shards_per_orientation_and_an_empty_one_is_an_error(self):
        builder = self._build()
        # Each orientation is sharded on its own (landscapes 1-6, portraits
        # 7-10): with 10 pipelines, pipeline 5 has no portrait.
        for pipelines, pipeline_id, ids in ((5, 0, {1, 6, 7}), (5, 3, {4, 10})):
            context = tf.distribute.InputContext(
                num_input_pipelines=pipelines, input_pipeline_id=pipeline_id)
            self.assertEqual({r.image_id for r in builder.shard_records(context)}, ids)
        context = tf.distribute.InputContext(num_input_pipelines=10,
                                             input_pipeline_id=5, num_replicas_in_sync=10)
        with self.assertRaisesRegex(ValueError, "pipeline 5 of 10 has no portrait"):
            builder(context, seed=1)

    def test_evaluation_reads_each_orientation_in_order_then_pads_it(self):
        builder = self._build(split="val2017", training=False, batch_size=4)
        batches = _numpy_batches(builder())
        self.assertLen(batches, builder.num_batches())
        self.assertEqual([b["image_id"].tolist() for b in batches],
                         [[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, 10]])
        for b in batches:
            self._check_batch(b)

    def test_undecodable_image_replaced_by_one_of_its_orientation(self):
        path = os.path.join(self.root, "train2017", "000010.jpg")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 3])
        builder = self._build()
        batches = _numpy_batches(builder(), 30)
        for b in batches:
            self._check_batch(b)
        seen = collections.Counter(int(i) for b in batches for i in b["image_id"])
        self.assertNotIn(10, seen)
        self.assertEqual(set(seen), (self.LANDSCAPE | self.PORTRAIT) - {10})
        self.assertGreaterEqual(builder.counts["undecodable_images"], 1)
        # The next portrait, cyclically, stands in for 10: 7 comes about
        # twice as often as the other portraits.
        self.assertGreater(seen[7], max(seen[8], seen[9]))

    def test_coco_sizes_get_832_by_1344(self):
        # The json alone decides the canvases: COCO's common sizes, no pixels.
        sizes = [(427, 640), (640, 427), (360, 640), (480, 640), (640, 480), (640, 360)]
        dataset = {"images": [{"id": i, "file_name": f"{i:06d}.jpg", "height": h,
                               "width": w} for i, (h, w) in enumerate(sizes, 1)],
                   "annotations": [{"id": i, "image_id": i, "category_id": 5,
                                    "bbox": [1.0, 1.0, 20.0, 20.0], "area": 400.0,
                                    "iscrowd": 0, "segmentation": [fixtures._square(1, 1, 20, 20)]}
                                   for i in range(1, len(sizes) + 1)],
                   "categories": fixtures.base_dataset()["categories"]}
        os.makedirs(os.path.join(self.root, "coco", "annotations"))
        with open(os.path.join(self.root, "coco", "annotations",
                               "instances_train2017.json"), "w") as f:
            json.dump(dataset, f)
        builder = CocoInput(os.path.join(self.root, "coco"), group_by_orientation=True,
                            check_files=False)
        self.assertEqual(builder.canvases, ((832, 1344), (1344, 832)))
        # The bound predict uses for images it has not seen is the same here.
        self.assertEqual(pipeline.orientation_canvases(800, 1333, (1344, 1344), 64),
                         builder.canvases)

    def test_orientation_canvases_hold_every_resize(self):
        rng = np.random.default_rng(0)
        for min_size, max_size, bound in ((800, 1333, (1344, 1344)), (64, 128, (128, 128)),
                                          (600, 1000, (1024, 1024)), (128, 128, (128, 128))):
            canvases = pipeline.orientation_canvases(min_size, max_size, bound, 64)
            for canvas in canvases:
                self.assertTrue(all(c % 64 == 0 and c <= b for c, b in zip(canvas, bound)))
            sizes = np.concatenate([rng.integers(50, 2000, (30, 2)),
                                    [[40, 3000], [3000, 40], [100, 100], [7, 8]]])
            for h, w in sizes:
                image = tf.zeros([int(h), int(w), 3], tf.uint8)
                _, _, resized, _ = pipeline.resize_image(image, min_size, max_size)
                canvas = canvases[int(h > w)]
                self.assertTrue(resized[0] <= canvas[0] and resized[1] <= canvas[1],
                                (h, w, resized.numpy(), canvas))
        self.assertEqual(pipeline.orientation_canvases(128, 128, (128, 128), 64),
                         ((128, 128), (128, 128)))

    def test_orientations_on_one_canvas_are_one_group(self):
        # At multiples of 64 both orientations fit 64 x 64: one group, the
        # ungrouped stream, and fully static shapes.
        grouped = self._build(size_divisor=64)
        self.assertEqual(grouped.canvases, ((64, 64),))
        self.assertTrue(grouped().element_spec["images"].shape.is_fully_defined())
        plain = self._build(size_divisor=64, group_by_orientation=False)
        ids = [[b["image_id"].tolist() for b in _numpy_batches(x(), 8)]
               for x in (grouped, plain)]
        self.assertEqual(ids[0], ids[1])
        # Grouping needs no bigger canvas than canvas_size to check against.
        with self.assertRaisesRegex(ValueError, "larger than canvas_size"):
            self._build(canvas_size=(32, 32))

if __name__ == "__main__":
    tf.test.main()
