"""COCO results entries held as columns (`ResultsTable`).

A COCO results entry as a Python dict (`{image_id, category_id, bbox,
score, segmentation}`) with a mask costs about 950 bytes: the dict, the
bbox list and its four floats, the RLE dict, its size list and the counts
string. Held for every detection of an evaluation, that is 0.5 GB for
COCO val2017 (100 detections on 5000 images) and 5.6 GB for LVIS v1 val
(300 on 19,809). The table holds the same numbers in NumPy columns and
each RLE's counts as one `bytes` object: 264-358 bytes per entry with a
mask on the batches of `bin/bench --op=eval_host` and a 480 x 640 test
set, against 939-988 as dicts (tracemalloc).

Entries become dicts only where a dict is needed: `entries()` (the
evaluator's `results`, and `write_results`, which streams them one at a
time) and the pycocotools reference engine. Scoring
(`cocoeval.score_results`, `lvis.federated_evaluate`) reads the columns
and builds the RLE dicts pycocotools takes a pair of (image, category)
at a time.
"""

import codecs
import json
import re

import numpy as np


class ResultsTable:
    """N COCO results entries, as columns.

    Attributes:
      image_id: int64 [N].
      category_id: int64 [N].
      bbox: float64 [N, 4] (x, y, width, height) in original pixels; NaN
        for entries made without a box (a 'segm'-only results file).
      score: float64 [N].
      mask_size: int64 [N, 2] (height, width) of each compressed RLE, or
        None when the entries have no masks.
      mask_counts: list of N `bytes`, each RLE's compressed counts, or None.
      keypoints: float64 [N, 3K] COCO keypoints (x, y, score per keypoint,
        x and y pixel indices as COCO's annotations hold them), or None.
    """

    __slots__ = ("image_id", "category_id", "bbox", "score", "mask_size", "mask_counts",
                 "keypoints")

    def __init__(self, image_id, category_id, bbox, score, mask_size=None, mask_counts=None,
                 keypoints=None):
        self.image_id = np.asarray(image_id, np.int64).reshape(-1)
        self.category_id = np.asarray(category_id, np.int64).reshape(-1)
        self.bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
        self.score = np.asarray(score, np.float64).reshape(-1)
        n = self.image_id.size
        if (mask_size is None) != (mask_counts is None):
            raise ValueError("ResultsTable: mask_size and mask_counts go together")
        if mask_size is not None:
            mask_size = np.asarray(mask_size, np.int64).reshape(-1, 2)
            mask_counts = list(mask_counts)
        self.mask_size, self.mask_counts = mask_size, mask_counts
        if keypoints is not None:
            keypoints = np.asarray(keypoints, np.float64)
            if keypoints.ndim != 2:   # [N, K, 3], or [] for none
                width = int(np.prod(keypoints.shape[1:])) if keypoints.ndim > 2 else 0
                keypoints = keypoints.reshape(len(keypoints), width)
        self.keypoints = keypoints
        sizes = {len(self.category_id), len(self.bbox), len(self.score)}
        if mask_size is not None:
            sizes |= {len(mask_size), len(mask_counts)}
        if keypoints is not None:
            sizes.add(len(keypoints))
        if sizes != {n}:
            raise ValueError(f"ResultsTable: columns of different lengths ({n}, {sorted(sizes)})")

    @property
    def has_masks(self):
        """Whether the entries carry masks (`mask_size`, `mask_counts`)."""
        return self.mask_counts is not None

    @property
    def has_keypoints(self):
        """Whether the entries carry keypoints."""
        return self.keypoints is not None

    def __len__(self):
        return self.image_id.size

    @classmethod
    def empty(cls, masks=False, keypoints=0):
        """A table of no entries (`masks`: with the mask columns;
        `keypoints` K > 0: with a keypoints column of 3K)."""
        return cls(np.zeros(0), np.zeros(0), np.zeros((0, 4)), np.zeros(0),
                   np.zeros((0, 2)) if masks else None, [] if masks else None,
                   np.zeros((0, 3 * keypoints)) if keypoints else None)

    @classmethod
    def concat(cls, tables):
        """One table of `tables`' entries in order; masks (keypoints) where
        all have them."""
        tables = list(tables)
        if not tables:
            return cls.empty()
        masks = all(t.has_masks for t in tables)
        keypoints = all(t.has_keypoints for t in tables)
        return cls(np.concatenate([t.image_id for t in tables]),
                   np.concatenate([t.category_id for t in tables]),
                   np.concatenate([t.bbox for t in tables]),
                   np.concatenate([t.score for t in tables]),
                   np.concatenate([t.mask_size for t in tables]) if masks else None,
                   [c for t in tables for c in t.mask_counts] if masks else None,
                   np.concatenate([t.keypoints for t in tables]) if keypoints else None)

    @classmethod
    def from_entries(cls, entries, to_rle=None, first_index=0):
        """A table of COCO results dicts (another run's or library's).

        Args:
          entries: sequence of dicts with `image_id`, `category_id`,
            `score`, and `bbox` [x, y, w, h] (NaN where absent); their
            `keypoints` become the keypoints column when every entry has
            them, all of one length.
          to_rle: None (no masks), or a function entry -> compressed RLE
            dict `{size, counts}` (`COCO.annToRLE`, which turns polygons and
            uncompressed RLEs into one at the image's size).
          first_index: the number of `entries[0]` in error messages (its
            position in a file read in parts).

        Raises:
          ValueError: naming the entry (its position in `entries` and its
            image id) whose segmentation `to_rle` cannot turn into a
            compressed RLE.
        """
        nan = [np.nan] * 4
        sizes = counts = None
        if to_rle is not None:
            sizes, counts = [], []
            for i, entry in enumerate(entries, first_index):
                try:
                    rle = to_rle(entry)
                    size = [int(v) for v in rle["size"]]
                    if len(size) != 2 or not isinstance(rle["counts"], (str, bytes)):
                        raise ValueError(f"got {rle!r:.80}")
                except Exception as e:   # pycocotools raises bare Exceptions
                    raise ValueError(
                        f"results entry #{i} (image_id {entry.get('image_id')}): its "
                        f"segmentation is not a COCO polygon list or RLE of the image "
                        f"({type(e).__name__}: {e})") from None
                sizes.append(size)
                counts.append(_bytes(rle["counts"]))
        keypoints = None
        if entries and all("keypoints" in e for e in entries):
            lengths = {len(e["keypoints"]) for e in entries}
            if len(lengths) != 1 or lengths.pop() % 3:
                raise ValueError(f"results entries #{first_index}..: keypoints lists of "
                                 f"lengths {sorted({len(e['keypoints']) for e in entries})}, "
                                 f"not one multiple of 3")
            keypoints = [e["keypoints"] for e in entries]
        return cls([e["image_id"] for e in entries], [e["category_id"] for e in entries],
                   [list(e["bbox"]) if "bbox" in e else nan for e in entries],
                   [e["score"] for e in entries], sizes, counts, keypoints)

    def take(self, index):
        """The entries at `index` (int array [M] or bool [N]), in its order."""
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        return ResultsTable(
            self.image_id[index], self.category_id[index], self.bbox[index],
            self.score[index],
            self.mask_size[index] if self.has_masks else None,
            [self.mask_counts[i] for i in index] if self.has_masks else None,
            self.keypoints[index] if self.has_keypoints else None)

    def rles(self, index):
        """pycocotools RLE dicts `{size, counts: bytes}` of the entries at
        `index` (a slice, or ints), built on demand."""
        if isinstance(index, slice):
            counts = self.mask_counts[index]
        else:
            index = np.asarray(index, np.int64)
            counts = [self.mask_counts[i] for i in index]
        return [{"size": size, "counts": c}
                for size, c in zip(self.mask_size[index].tolist(), counts)]

    def entries(self, boxes=True, masks=True, keypoints=True):
        """The entries as COCO results dicts, one at a time (JSON-safe):
        `{image_id, category_id, bbox, score}` (`boxes`),
        `segmentation: {size, counts: str}` (`masks`, where the table has
        them) and `keypoints: [x, y, score] * K` (`keypoints`, likewise)."""
        masks = masks and self.has_masks
        keypoints = self.keypoints.tolist() if keypoints and self.has_keypoints else None
        image_ids = self.image_id.tolist()
        category_ids = self.category_id.tolist()
        scores = self.score.tolist()
        bboxes = self.bbox.tolist()
        sizes = self.mask_size.tolist() if masks else None
        for i in range(len(self)):
            entry = {"image_id": image_ids[i], "category_id": category_ids[i]}
            if boxes:
                entry["bbox"] = bboxes[i]
            entry["score"] = scores[i]
            if masks:
                entry["segmentation"] = {"size": sizes[i],
                                         "counts": self.mask_counts[i].decode("ascii")}
            if keypoints is not None:
                entry["keypoints"] = keypoints[i]
            yield entry

    def __iter__(self):
        return self.entries()


def _bytes(counts):
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
# One entry of a results file is a few KB (an RLE of a large mask); text that
# long without a complete element is a malformed file, not a slow one.
_MAX_ELEMENT_CHARS = 1 << 28


def iter_json_list(f, chunk_chars=1 << 20):
    """The elements of the JSON array a text file holds, one at a time.

    Reads `chunk_chars` characters at a time, so that a results file of
    millions of entries (LVIS: 300 per image) never becomes one list of
    dicts: `json.load` of one costs about 1 KB per entry with a mask.

    Args:
      f: a file object positioned at the start of the array: text, or
        binary holding UTF-8 (a character cut by a chunk boundary is
        decoded with the next chunk).
      chunk_chars: int, characters (bytes) read per call of `f.read`.

    Yields:
      Each element, as `json.loads` would give it.

    Raises:
      ValueError: the text is not one JSON array (naming the character
        offset where it stops being one).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, consumed, eof = "", 0, 0, False

    def fill():
        nonlocal buf, pos, consumed, eof
        chunk = f.read(chunk_chars)
        eof = not chunk
        if isinstance(chunk, bytes):
            try:
                chunk = utf8.decode(chunk, final=eof)
            except UnicodeDecodeError as e:
                raise ValueError(f"not UTF-8 text: {e}") from None
        consumed += pos
        buf, pos = buf[pos:] + chunk, 0

    def skip_whitespace():
        nonlocal pos
        while True:
            pos = _WHITESPACE.match(buf, pos).end()
            if pos < len(buf) or eof:
                return
            fill()

    def fail(what, at=None):
        raise ValueError(f"not a JSON array: {what} (character "
                         f"{consumed + (pos if at is None else at)})")

    skip_whitespace()
    if buf[pos:pos + 1] != "[":
        fail("no '['")
    pos += 1
    skip_whitespace()
    if buf[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            while True:
                try:
                    element, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if eof:
                        fail(e.msg, e.pos)
                    element, end = None, None
                if end is not None:
                    after = _WHITESPACE.match(buf, end).end()
                    # Complete unless the buffer ends before what follows it,
                    # or it is a number the buffer cut ("3." of "3.5").
                    cut = after == len(buf) or (
                        isinstance(element, (int, float)) and buf[after] in _NUMBER_CHARS)
                    if eof or not cut:
                        break
                if len(buf) - pos > _MAX_ELEMENT_CHARS:
                    fail(f"an element longer than {_MAX_ELEMENT_CHARS} characters")
                fill()
            pos = end
            yield element
            skip_whitespace()
            separator = buf[pos:pos + 1]
            pos += 1
            if separator == "]":
                break
            if separator != ",":
                fail("no ',' or ']' after an element", pos - 1)
            skip_whitespace()
    skip_whitespace()
    if pos < len(buf):
        fail("text after the array")
