"""Fine-tuning: initialise a model from another run's checkpoint (`train.init_fn`).

Detectron2's `MODEL.WEIGHTS` and the Model Garden's `init_checkpoint`: the
weights of a trained mrcnn run (COCO, say) start a run on other data. Each
variable of the model is matched to the checkpoint by its attribute path
(`roi_heads/box_head/class_logits/_kernel`), as `tf.train.Checkpoint`
restores, through the checkpoint's object graph. A variable whose shape
differs from the checkpoint's, as the class-dependent predictors do when
the class counts differ, keeps its fresh initial value and is named in the
log; so is a variable the checkpoint does not hold.
"""

import gin
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

# MaskRCNN's parts, then RetinaNet's head.
MODULES = ("backbone", "fpn", "rpn_head", "roi_heads", "head")


def find_checkpoint(path):
    """`path` if it is a checkpoint prefix (DIR/ckpt-N), else the latest
    checkpoint of run directory `path`; None when there is neither.

    The prefix is tried first: some filesystems (ram://) call any prefix of
    a file name a directory.
    """
    path = str(path)
    if tf.io.gfile.exists(path + ".index"):
        return path
    if tf.io.gfile.isdir(path):
        found = tf.train.latest_checkpoint(path)
        if found and tf.io.gfile.exists(found + ".index"):
            return found
    return None


def _checkpoint_path(path):
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"init_from_checkpoint: no checkpoint at {path} (give a "
                                f"run directory or DIR/ckpt-N)")
    return found


def _variable_keys(reader, root_name):
    """{attribute path under `root_name`: (checkpoint key, shape)} of a checkpoint."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    shapes = reader.get_variable_to_shape_map()
    roots = [c.node_id for c in graph.nodes[0].children if c.local_name == root_name]
    keys, stack, seen = {}, [(n, "") for n in roots], set()
    while stack:
        node, path = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for attribute in graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE" and attribute.checkpoint_key in shapes:
                keys[path] = (attribute.checkpoint_key,
                              tuple(shapes[attribute.checkpoint_key]))
        for child in graph.nodes[node].children:
            stack.append((child.node_id, f"{path}/{child.local_name}" if path
                          else child.local_name))
    return keys


def _resolve(obj, path):
    """The object at `path` (attribute names, list indices, dict keys) or None."""
    for name in path.split("/"):
        if isinstance(obj, (list, tuple)) and name.isdigit() and int(name) < len(obj):
            obj = obj[int(name)]
        elif isinstance(obj, dict) and name in obj:
            obj = obj[name]
        elif hasattr(obj, name):
            obj = getattr(obj, name)
        else:
            return None
    return obj


@gin.configurable(denylist=["model"])
def init_from_checkpoint(model, *, path=gin.REQUIRED, modules=None,
                         root_name="model"):
    """Loads a trained run's weights into `model`, a fresh start's `train.init_fn`.

    Args:
      model: the built keras.Model (MaskRCNN, RetinaNet) to initialise.
      path: str, a checkpoint (`DIR/ckpt-N`) or a run directory (its latest).
      modules: the model's top-level parts to load, of `MODULES`; e.g.
        ('backbone', 'fpn') keeps fresh RPN and RoI heads (or starts a
        RetinaNet from a Mask R-CNN run); None (default): every part the
        model has.
      root_name: the model's name in the checkpoint (`train` saves it as
        'model').

    Returns:
      dict: 'loaded', 'mismatched' (shape differs: kept fresh) and
      'missing' (not in the checkpoint: kept fresh) lists of attribute paths.

    Raises:
      FileNotFoundError: no checkpoint at `path`.
      ValueError: an unknown module, or not one variable of `modules` found
        in the checkpoint (another kind of file or model).
    """
    present = [m for m in MODULES if hasattr(model, m)]
    modules = present if modules is None else tuple(modules)
    unknown = set(modules) - set(present)
    if unknown:
        raise ValueError(f"init_from_checkpoint: unknown modules {sorted(unknown)}; "
                         f"this {type(model).__name__} has {tuple(present)}")
    path = _checkpoint_path(path)
    reader = tf.train.load_checkpoint(path)
    keys = _variable_keys(reader, root_name)
    wanted = {id(v): v for m in modules for v in getattr(model, m).variables}
    loaded, mismatched, reached = [], [], set()
    for name, (key, shape) in sorted(keys.items()):
        if name.split("/")[0] not in modules:
            continue
        variable = _resolve(model, name)
        if id(variable) not in wanted:   # a tracked value that is not one of ours
            continue
        reached.add(id(variable))
        if tuple(variable.shape) != shape:
            mismatched.append(f"{name} {tuple(variable.shape)} (checkpoint {shape})")
            continue
        variable.assign(tf.cast(reader.get_tensor(key), variable.dtype))
        loaded.append(name)
    missing = sorted(v.path for i, v in wanted.items() if i not in reached)
    if not loaded:
        raise ValueError(f"init_from_checkpoint: {path} holds none of the {len(wanted)} "
                         f"variables of {', '.join(modules)} under '{root_name}' "
                         f"(is it an mrcnn training checkpoint?)")
    logging.info("Initialised %d variables of %s from %s", len(loaded),
                 ", ".join(modules), path)
    if mismatched:
        logging.warning("Kept %d variables fresh, their shapes differ from the "
                        "checkpoint's (other class count?):\n  %s", len(mismatched),
                        "\n  ".join(mismatched))
    if missing:
        logging.warning("Kept %d variables fresh, the checkpoint does not hold them:\n  %s",
                        len(missing), "\n  ".join(missing))
    return {"loaded": loaded, "mismatched": mismatched, "missing": missing}
