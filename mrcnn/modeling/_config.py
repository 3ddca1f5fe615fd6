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
