"""One worker of tests/training/test_multiworker.py (run as a script).

  python multiworker_worker.py TASK_INDEX PORT0,PORT1 MODEL_DIR DATA_DIR OUT.npz [BINDINGS]

Sets TF_CONFIG for a two-worker cluster on 127.0.0.1, trains a few steps of
a tiny shapes config through `trainer.train` (as bin/train does), then
writes its copy of the weights and prints how often the step was traced
and how many fused update programs (trainer._fuse_updates) it compiled.
BINDINGS: more gin bindings, separated by ';'.
"""

import json
import os
import sys

task, ports, model_dir, data_dir, out = sys.argv[1:6]
extra = [b for b in (sys.argv[6] if len(sys.argv) > 6 else "").split(";") if b]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
    "task": {"type": "worker", "index": int(task)},
})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "bin"))

import numpy as np  # noqa: E402

from mrcnn import programs  # noqa: E402
from mrcnn.training import optimization, trainer  # noqa: E402
from test_programs import TINY  # noqa: E402
from tests.training.recording import recorded_calls, recorded_train_steps  # noqa: E402

programs.parse_gin_files(
    [os.path.join(ROOT, "gin", "shapes_demo.gin")],
    TINY + [f"DATA_DIR = '{data_dir}'", "train.total_steps = 3",
            "train.checkpoint_every = 3", "train/CocoInput.seed = 0"] + extra)
with recorded_train_steps() as steps, \
        recorded_calls(optimization, "build_optimizer") as optimizers:
    result = trainer.train(model_dir)
np.savez(out, *[w.numpy() for w in result["model"].weights])
optimizer = optimizers[0].optimizer
update = getattr(optimizer, "inner_optimizer", optimizer)._distributed_tf_update_step
print(f"worker {task}: step {result['step']} losses {result['losses']} "
      # An accumulating step is two tf.functions, counted by no one number.
      f"traces {getattr(steps[0], 'experimental_get_tracing_count', lambda: 'n/a')()} "
      f"fused {len(getattr(update, 'programs', {}))}")
