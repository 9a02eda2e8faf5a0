"""The host runtime: what every trainer does on the host, the same for both backends (numpy and
the standard library only; no jax, no torch).

    loop.py         the ONE host loop of PPO, reward-model and SFT training: progress, metrics,
                    checkpoint cadence and retention, resume, SIGTERM/SIGINT, the non-finite
                    update guard, several processes
    ppo.py          the PPO trainers' host side: prompts, host rewards, the missing-EOS penalty,
                    the iteration's stats
    supervised.py   the reward-model and SFT trainers' host side: learning-rate schedule, steps,
                    evaluation, reward normalisation
    checkpoints.py  atomic, checksummed checkpoint directories
    metrics.py      metrics.jsonl, phase timers
    seeds.py        every random choice as a pure function of (seed, position)
    processes.py    mesh specs and coordination of several processes
"""
