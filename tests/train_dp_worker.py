"""Worker of tests/test_train.py::test_two_process_gloo_equals_one_process (run by torchrun, 2 CPU ranks)."""

import json
import sys

from dsv4.train.parallel import Parallel
from dsv4.train.trainer import Trainer
from tests.test_train import dp_config, synthetic_docs

out = sys.argv[1]
par = Parallel.from_env(expert_parallel=True)
trainer = Trainer(dp_config(), out, dist=par, docs=synthetic_docs(), val_docs=synthetic_docs(seed=1))
records = trainer.run(progress=False)
if par.rank == 0:
    print("LOSSES " + json.dumps([r["loss"] for r in records]))
par.close()
