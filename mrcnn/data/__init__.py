"""COCO-format datasets -> fixed-shape tf.data batches; synthetic shapes data.

- `CocoInput` (gin-configurable): the input pipeline of one split
  (mrcnn/data/pipeline.py documents the batch format).
- `CategoryMap`, `DataError`, `load_split`: the annotation reader
  (mrcnn/data/coco.py).
- `make_shapes`: writes the synthetic shapes dataset (mrcnn/data/shapes.py).
"""

from mrcnn.data.coco import CategoryMap, DataError, load_split
from mrcnn.data.pipeline import CocoInput
from mrcnn.data.shapes import make_shapes

__all__ = ["CategoryMap", "CocoInput", "DataError", "load_split", "make_shapes"]
