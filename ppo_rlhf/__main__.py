"""`python -m ppo_rlhf ...` is the `ppo-rlhf` command (`ppo_rlhf.app.cli`)."""

import sys

from ppo_rlhf.app.cli import main

sys.exit(main())
