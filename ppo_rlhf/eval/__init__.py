"""Evaluation numbers, plots and reports (backend-neutral).

    policy.py       how good a policy is: reward-model and gold scores, KL to a reference,
                    win-rate, samples (`ppo_rlhf.app.evaluate` samples with a backend)
    preferences.py  how good a reward model is on preference data: accuracy, normalisation
    plots.py        a run's curves from its metrics.jsonl
"""
