"""mrcnn.data.files: local paths keep Python's files, others go through
tf.io.gfile (`fixtures.remote_dir`'s file:// URLs stand in for gs://)."""

import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mrcnn.data import DataError, coco, decode, files
from tests.data import fixtures
from tests.data.fixtures import copy_tree, remote_dir


@pytest.mark.parametrize("remote", [False, True])
def test_write_then_read(tmp_path, remote):
    root = remote_dir(tmp_path) if remote else str(tmp_path)
    path = f"{root}/a/b/x.json"
    files.make_parent(path)
    with files.open_file(path, "w") as f:
        f.write('{"name": "café"}')
    assert files.read_json(path) == {"name": "café"}
    assert files.read_bytes(path) == '{"name": "café"}'.encode()
    assert files.is_local(path) is not remote
    with pytest.raises(files.READ_ERRORS):
        files.read_bytes(f"{root}/a/missing.json")


def test_file_checker_lists_each_remote_directory_once(tmp_path):
    root = remote_dir(tmp_path)
    files.makedirs(f"{root}/images")
    for name in ("a.jpg", "b.jpg"):
        with files.open_file(f"{root}/images/{name}", "wb") as f:
            f.write(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    checker = files.FileChecker()
    with mock.patch.object(tf.io.gfile, "listdir", wraps=tf.io.gfile.listdir) as listdir:
        found = [checker.isfile(f"{root}/images/{n}") for n in ("a.jpg", "b.jpg", "c.jpg")]
        assert not checker.isfile(f"{root}/nowhere/a.jpg")
        assert checker.isfile(str(tmp_path / "c.jpg")) and not checker.isfile(str(tmp_path / "a.jpg"))
    assert found == [True, True, False]
    assert [c.args[0] for c in listdir.call_args_list] == [f"{root}/images", f"{root}/nowhere"]


def test_load_split_and_decode_from_an_object_store(tmp_path):
    local_json, local_images = fixtures.write_dataset(str(tmp_path / "local"))
    root = remote_dir(tmp_path)
    copy_tree(str(tmp_path / "local"), root)
    remote = coco.load_split(f"{root}/annotations/instances_train2017.json",
                             f"{root}/train2017")
    here = coco.load_split(local_json, local_images)
    assert [r.path for r in remote.records] == [
        r.path.replace(str(tmp_path / "local"), root, 1) for r in here.records]
    for a, b in zip(remote.records, here.records):
        np.testing.assert_array_equal(decode.read_image(a.path, a.image_id, a.height, a.width),
                                      decode.read_image(b.path, b.image_id, b.height, b.width))

    # A missing remote image is named, as a local one is.
    tf.io.gfile.remove(f"{root}/train2017/000012.jpg")
    with pytest.raises(DataError, match=f"{root}/train2017/000012.jpg is missing"):
        coco.load_split(f"{root}/annotations/instances_train2017.json", f"{root}/train2017",
                        on_bad="raise")
    with pytest.raises(DataError, match="000012.jpg: cannot decode image id 12"):
        decode.read_image(f"{root}/train2017/000012.jpg", 12, fixtures.HEIGHT, fixtures.WIDTH)
    with pytest.raises(DataError, match="cannot read COCO json"):
        coco.load_split(f"{root}/annotations/missing.json", f"{root}/train2017")


def test_remote_image_keeps_its_exif_orientation(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6   # stored pixels turned a quarter clockwise for display
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    root = remote_dir(tmp_path)
    tf.io.gfile.makedirs(root)
    tf.io.gfile.copy(str(tmp_path / "turned.jpg"), f"{root}/turned.jpg")
    here, orientation = decode.open_rgb(str(tmp_path / "turned.jpg"))
    there, remote_orientation = decode.open_rgb(f"{root}/turned.jpg")
    assert here.shape == (6, 4, 3) and orientation == remote_orientation == 6
    np.testing.assert_array_equal(here, there)
