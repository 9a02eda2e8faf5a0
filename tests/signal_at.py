"""`python -m tests.signal_at ARGS`: run `ppo-rlhf ARGS` in this process and send it a signal right
after its N-th metrics record is written -- a deterministic point inside the host loop -- to test
SIGTERM / SIGINT handling of every trainer the same way (test harness only).

    PPO_TEST_SIGNAL_AT_RECORD=N   the record after which the signal comes
    PPO_TEST_SIGNAL=TERM|INT      which signal (default TERM)
"""

from __future__ import annotations

import os
import signal
import sys

from ppo_rlhf.app.cli import main
from ppo_rlhf.runtime import metrics

_AT = int(os.environ["PPO_TEST_SIGNAL_AT_RECORD"])
_SIGNAL = getattr(signal, "SIG" + os.environ.get("PPO_TEST_SIGNAL", "TERM"))
_write = metrics.MetricsWriter.write
_count = 0


def _write_then_signal(self, record):
    global _count
    _write(self, record)
    _count += 1
    if _count == _AT:
        os.kill(os.getpid(), _SIGNAL)


metrics.MetricsWriter.write = _write_then_signal

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
