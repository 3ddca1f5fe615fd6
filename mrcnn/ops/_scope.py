"""A name scope per public op, so traces and graphs say which op ran."""

import functools

import tensorflow as tf


def scoped(fn):
    """Runs `fn` under `tf.name_scope(fn.__name__)`.

    The ops' TF ops (and, through the tape, their gradients) then carry the
    op's name, e.g. `.../multilevel_roi_align/GatherV2`: a profile
    (`bin/bench --profile_dir`) sums them per op instead of lumping them
    into the calling layer. Name scopes cost nothing when the graph runs.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with tf.name_scope(fn.__name__):
            return fn(*args, **kwargs)

    return wrapper
