"""COCO box and mask evaluation (pycocotools) and detection drawing.

`mrcnn.evaluation.coco` turns the model's batched inference output into COCO
result entries and runs COCOeval; `mrcnn.evaluation.visualize` draws
detections on an image. Import the submodule you need: `visualize` needs
only numpy and PIL, `coco` also TensorFlow (for mask pasting) and pycocotools.
"""
