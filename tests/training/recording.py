"""Records the training steps `trainer.train` builds, to count their traces."""

import contextlib
from unittest import mock

from mrcnn.training import trainer


@contextlib.contextmanager
def recorded_train_steps():
    """Within it, each step `trainer.make_train_step` builds is appended to the yielded list."""
    steps = []
    make = trainer.make_train_step

    def recording(*args, **kw):
        steps.append(make(*args, **kw))
        return steps[-1]

    with mock.patch.object(trainer, "make_train_step", side_effect=recording):
        yield steps
