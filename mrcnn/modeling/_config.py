"""`gin.configurable` for Keras layers.

gin wraps `__init__` in a `(*args, **kwargs)` function; Keras 3 reads
`inspect.getfullargspec(cls.__init__)` when a layer is created and fails on
such a signature. Copying the real signature onto the wrapper fixes both.
"""

import inspect

import gin


def configurable_layer(cls):
    """`gin.configurable(cls)` that keeps `cls.__init__`'s signature."""
    signature = inspect.signature(cls.__init__)
    cls = gin.configurable(cls)
    cls.__init__.__signature__ = signature
    return cls


def checkpointed(owner, layers):
    """Makes a list of sub-layers visible to `tf.train.Checkpoint`; returns it.

    Keras 3 keeps list and dict attributes in its own tracked containers,
    which TensorFlow's checkpoint graph does not traverse, so layers held only
    in `self.convs = [...]` would be missing from every model-only checkpoint
    (their trainable weights survive a resume only through the optimizer,
    their non-trainable ones not at all). Setting each layer also as its own
    attribute, named after the layer, puts it in the graph; Keras tracks each
    layer once either way.

    Args:
      owner: the keras.layers.Layer holding the list.
      layers: list of keras.layers.Layer with unique names.

    Returns:
      `layers`, to assign to the owner's list attribute.
    """
    for layer in layers:
        setattr(owner, layer.name, layer)
    return layers
