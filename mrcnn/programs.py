"""What every program in bin/ shares: gin flags, parsing, and clean failures."""

import sys

import gin
from absl import flags, logging

_GIN_FILE = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file (repeatable; later files override earlier).")
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin binding, e.g. \"train.total_steps=100\" (repeatable).")


def _register_configurables():
    # gin resolves `@Name` at parse time: every configurable must be imported.
    import mrcnn.data  # noqa: F401
    import mrcnn.evaluation.export  # noqa: F401
    import mrcnn.evaluation.runner  # noqa: F401
    import mrcnn.modeling.detectron2  # noqa: F401
    import mrcnn.modeling.mask_rcnn  # noqa: F401
    import mrcnn.modeling.tta  # noqa: F401
    import mrcnn.training.initialization  # noqa: F401
    import mrcnn.training.optimization  # noqa: F401
    import mrcnn.training.trainer  # noqa: F401


def parse_gin_files(files, bindings, finalize=True):
    """Parses gin files and bindings with every configurable registered.

    `include 'gin/r50_fpn_1x.gin'` resolves from the working directory or
    from the repository root, which is on gin's search path.
    """
    import os
    _register_configurables()
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if root not in gin.config._LOCATION_PREFIXES:
        gin.add_config_file_search_path(root)
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=finalize)


def parse_gin(finalize=True):
    """Parses --gin_file and --gin_bindings (see `parse_gin_files`)."""
    parse_gin_files(_GIN_FILE.value, _GIN_BINDINGS.value, finalize)


def fail(message):
    """Ends the program with a one-paragraph error instead of a stack trace."""
    logging.error(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def run(main_fn, config_dir=None):
    """Parses gin, runs `main_fn()`, writes the operative config to `config_dir`.

    Bad user input (a gin typo, a missing file, an unreadable image, a class
    count mismatch, a loss that became NaN) ends the program with one clear
    message; `--verbosity=1` logs the traceback too.
    """
    import tensorflow as tf
    try:
        parse_gin()
        result = main_fn()
    except (ValueError, FileNotFoundError, RuntimeError, tf.errors.OpError) as e:
        logging.debug("traceback", exc_info=True)
        text = getattr(e, "message", None) or str(e)
        if len(text) > 2000:
            text = text[:2000] + " ..."
        fail(f"{type(e).__name__}: {text}")
    if config_dir:
        tf.io.gfile.makedirs(config_dir)
        with tf.io.gfile.GFile(f"{config_dir}/operative_config.gin", "w") as f:
            f.write(gin.operative_config_str())
    return result
