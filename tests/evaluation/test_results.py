"""ResultsTable: COCO results entries as columns, and back as dicts."""

import io
import json
import random

import numpy as np
import pytest
from pycocotools import mask as mask_util

from mrcnn.evaluation.results import ResultsTable, iter_json_list


def _entries():
    masks = np.zeros((3, 6, 5), np.uint8, order="F")
    masks[0, 1:3, 1:4] = 1
    masks[1, 4:, :] = 1
    out = []
    for k, rle in enumerate(mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))):
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": 7 + k // 2, "category_id": 3 - k,
                    "bbox": [0.5 * k, 1.0, 2.25, 3.0 + k], "score": 0.75 - 0.25 * k,
                    "segmentation": rle})
    return out


def test_entries_come_back_as_they_went_in():
    entries = _entries()
    table = ResultsTable.from_entries(entries, to_rle=lambda e: e["segmentation"])
    assert len(table) == 3 and table.has_masks
    assert isinstance(table.mask_counts[0], bytes)
    assert json.dumps(list(table)) == json.dumps(entries)
    assert list(table.entries(masks=False)) == [
        {k: v for k, v in e.items() if k != "segmentation"} for e in entries]
    boxes = ResultsTable.from_entries(entries)
    assert not boxes.has_masks and list(boxes) == list(table.entries(masks=False))
    # pycocotools reads the RLEs the table hands out.
    assert mask_util.area(table.rles([0, 1, 2])).tolist() == [6, 10, 0]
    assert table.rles(slice(1, 3)) == table.rles(np.array([1, 2]))


def test_take_and_concat_keep_every_column():
    table = ResultsTable.from_entries(_entries(), to_rle=lambda e: e["segmentation"])
    picked = table.take([2, 0])
    assert picked.image_id.tolist() == [8, 7]
    assert picked.mask_counts == [table.mask_counts[2], table.mask_counts[0]]
    assert table.take(np.array([False, True, False])).category_id.tolist() == [2]
    assert len(table.take([])) == 0 and table.take([]).has_masks
    both = ResultsTable.concat([picked, table.take([1])])
    assert list(both) == [list(table)[i] for i in (2, 0, 1)]
    # Masks only where every part has them; no parts: no entries.
    assert not ResultsTable.concat([table, ResultsTable.from_entries(_entries())]).has_masks
    assert len(ResultsTable.concat([])) == 0
    assert len(ResultsTable.empty(masks=True)) == 0 and ResultsTable.empty(True).has_masks


def test_entries_without_a_box_hold_nan():
    entries = [{k: v for k, v in e.items() if k != "bbox"} for e in _entries()]
    table = ResultsTable.from_entries(entries, to_rle=lambda e: e["segmentation"])
    assert np.isnan(table.bbox).all()


def test_segm_of_a_table_without_masks_fails():
    from pycocotools.coco import COCO

    from mrcnn.evaluation import cocoeval
    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "height": 6, "width": 5}], "annotations": [],
                  "categories": [{"id": 3, "name": "a"}]}
    gt.createIndex()
    with pytest.raises(ValueError, match="without masks"):
        cocoeval.coco_evaluate(gt, ResultsTable.from_entries(_entries()), "segm", [7])


def test_columns_of_different_lengths_fail():
    with pytest.raises(ValueError, match="different lengths"):
        ResultsTable([1, 2], [1, 2], np.zeros((2, 4)), [0.5])
    with pytest.raises(ValueError, match="go together"):
        ResultsTable([1], [1], np.zeros((1, 4)), [0.5], mask_size=[[2, 2]])


def _random_json(rng, depth=0):
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-10 ** 6, 10 ** 6)
    if kind == 1:
        return rng.random() * 10.0 ** rng.randrange(-5, 8)
    if kind == 2:   # what a chunk boundary could confuse: brackets, commas, escapes
        return "".join(rng.choice('ab[]{},"\\: \u00e9\n') for _ in range(rng.randrange(8)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.random()): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_json_list_read_in_chunks_is_json_loads():
    rng = random.Random(0)
    for _ in range(200):
        text = json.dumps([_random_json(rng) for _ in range(rng.randrange(6))],
                          indent=rng.choice([None, 0, 2]))
        text = " " * rng.randrange(3) + text + "\n" * rng.randrange(3)
        for chunk_chars in (1, 2, 3, 7, 64, 1 << 20):
            assert list(iter_json_list(io.StringIO(text), chunk_chars)) == json.loads(text), (
                text, chunk_chars)
            # Bytes: a chunk may end inside a character's UTF-8 ("\u00e9": 2 bytes).
            raw = io.BytesIO(json.dumps(json.loads(text), ensure_ascii=False).encode())
            assert list(iter_json_list(raw, chunk_chars)) == json.loads(text), (
                text, chunk_chars)


@pytest.mark.parametrize("text,where", [
    ("", "no '\\[' \\(character 0"), ("{}", "no '\\[' \\(character 0"),
    ("[1,]", "character 3"), ("[1 2]", "no ',' or '\\]' after an element \\(character 3"),
    ("[1", "character 2"), ("[1.]", "character 2"), ("[1e5, tru]", "character 6"),
    ('[{"a": "b}]', "Unterminated string"), ("[1]]", "text after the array \\(character 3")])
def test_json_list_names_where_the_text_stops_being_one(text, where):
    for chunk_chars in (1, 3, 100):
        with pytest.raises(ValueError, match=f"not a JSON array: .*{where}"):
            list(iter_json_list(io.StringIO(text), chunk_chars))
