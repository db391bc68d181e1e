"""Two pytest-xdist workers share the machine's cores: each worker, and every program a test starts, computes on one
thread, so their thread pools do not fight over the same cores (which made the suite about half as fast)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
