"""Run by tests/test_train.py under torchrun: trains with bilateral_ops.train's own code, then
saves this process's parameters so that the test can compare the replicas.

    torchrun --nproc_per_node=2 tests/ddp_train_worker.py OUT_DIR TRAIN_ARGS...
"""

import os
import sys

import torch

from bilateral_ops import train

out_dir, argv = sys.argv[1], sys.argv[2:]
model = train.run(train.parse_args(argv))
torch.save(model.state_dict(), os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
