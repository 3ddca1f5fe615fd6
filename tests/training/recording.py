"""Records what a module-level function returns while the trainer runs."""

import contextlib
from unittest import mock

from mrcnn.training import trainer


@contextlib.contextmanager
def recorded_calls(module, name):
    """Within it, each value `module.name(...)` returns is appended to the yielded list."""
    results = []
    original = getattr(module, name)

    def recording(*args, **kw):
        results.append(original(*args, **kw))
        return results[-1]

    with mock.patch.object(module, name, side_effect=recording):
        yield results


def recorded_train_steps():
    """Each step `trainer.make_train_step` builds, to count its traces."""
    return recorded_calls(trainer, "make_train_step")
