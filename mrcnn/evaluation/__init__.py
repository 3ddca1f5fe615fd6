"""COCO box and mask evaluation (pycocotools) and detection drawing.

`mrcnn.evaluation.coco` turns the model's batched inference output into COCO
result entries, held as columns (`mrcnn.evaluation.results.ResultsTable`), and
scores them with COCO's metrics (`mrcnn.evaluation.cocoeval`:
pycocotools' COCOeval numbers, vectorized); `mrcnn.evaluation.lvis` scores the same
entries with LVIS's federated metrics (and `build_evaluator` picks one of
the two for an annotation file); `mrcnn.evaluation.visualize` draws
detections on an image; `mrcnn.evaluation.runner` holds the programs' loops
(evaluate, predict, `Predictor` for in-memory images, visualize_data) and
`mrcnn.evaluation.export` the SavedModel export. Import the submodule you
need: `visualize` needs only numpy and PIL, the others TensorFlow and
pycocotools.
"""
