"""Worker of tests/test_train.py's data-parallel tests (run by torchrun, 2 CPU ranks). argv[1]: a JSON list
of runs, done one after another in one process group (a torchrun start costs seconds), each
{"out": folder, "config": TrainConfig fields over dp_config(), "resume": bool}. Rank 0 prints one line
`RECORDS [...]` per run."""

import json
import sys

from dsv4.train.parallel import Parallel
from dsv4.train.trainer import Trainer
from tests.test_train import dp_config, synthetic_docs

par = Parallel.from_env(expert_parallel=True)
for run in json.loads(sys.argv[1]):
    trainer = Trainer(dp_config().replace(**run.get("config", {})), run["out"], dist=par, docs=synthetic_docs(),
                      val_docs=synthetic_docs(seed=1))
    if run.get("resume"):
        assert trainer.resume(), f"no checkpoint in {run['out']}"
    records = trainer.run(progress=False)
    if par.rank == 0:
        print("RECORDS " + json.dumps(records), flush=True)
par.close()
