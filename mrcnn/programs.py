"""What every program in bin/ shares: gin flags, parsing, clean failures, and
the XLA compilation cache."""

import os
import sys

import gin
from absl import flags, logging

_GIN_FILE = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file (repeatable; later files override earlier).")
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin binding, e.g. \"train.total_steps=100\" (repeatable).")
_XLA_CACHE_DIR = flags.DEFINE_string(
    "xla_cache_dir", None,
    "Keep the programs XLA compiles (the training step, evaluation's inference) in "
    "this directory and load them from it when the same program is compiled again, "
    "e.g. on resuming. Use one directory per machine type and TensorFlow version.")


def use_xla_cache(directory=None):
    """Points TensorFlow's persistent XLA compilation cache at `directory`
    (default: `--xla_cache_dir`; nothing when neither is set).

    TensorFlow keys each entry on the compiled program's HLO and signature
    and loads it only when that HLO matches exactly, so a changed model or
    shape compiles anew; the executable itself is specific to the machine
    that compiled it. Set through `TF_XLA_FLAGS` (replacing a cache directory
    named there), which TensorFlow reads once, when its runtime starts (the
    process's first TF op; importing it is not yet too late), and which
    child processes inherit. Returns the directory, or None; ValueError
    for a URL (`gs://...`): the cache is a local directory.
    """
    if directory is None and flags.FLAGS.is_parsed():
        directory = _XLA_CACHE_DIR.value
    if not directory:
        return None
    if "://" in directory:
        # Its entries are executables for this machine's devices, read back
        # at each compile: it belongs on the machine, not in a bucket.
        raise ValueError(f"--xla_cache_dir={directory}: give a local directory "
                         f"(the cache is specific to the machine that compiles)")
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    kept = [option for option in os.environ.get("TF_XLA_FLAGS", "").split()
            if not option.startswith("--tf_xla_persistent_cache_directory=")]
    os.environ["TF_XLA_FLAGS"] = " ".join(
        kept + [f"--tf_xla_persistent_cache_directory={directory}"])
    return directory


def _register_configurables():
    # gin resolves `@Name` at parse time: every configurable must be imported.
    import mrcnn.data  # noqa: F401
    import mrcnn.evaluation.export  # noqa: F401
    import mrcnn.evaluation.runner  # noqa: F401
    import mrcnn.modeling.detectron2  # noqa: F401
    import mrcnn.modeling.mask_rcnn  # noqa: F401
    import mrcnn.modeling.retinanet  # noqa: F401
    import mrcnn.modeling.tta  # noqa: F401
    import mrcnn.training.initialization  # noqa: F401
    import mrcnn.training.optimization  # noqa: F401
    import mrcnn.training.trainer  # noqa: F401


def parse_gin_files(files, bindings, finalize=True):
    """Parses gin files and bindings with every configurable registered.

    `include 'gin/r50_fpn_1x.gin'` resolves from the working directory or
    from the repository root, which is on gin's search path. Files may be on
    any filesystem `tf.io.gfile` knows (`gs://...`), as with `gin.tf`.
    """
    _register_configurables()
    import tensorflow as tf  # imported by the configurables above already
    gin.config.register_file_reader(tf.io.gfile.GFile, tf.io.gfile.exists)
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
    use_xla_cache()
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
