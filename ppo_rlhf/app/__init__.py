"""The application: the one layer that picks a backend and stands above both.

    cli.py          `ppo-rlhf` (= `python -m ppo_rlhf`): argument parsing and the subcommands'
                    registry; train.py (train, eval), supervised.py (train-rm, pretrain),
                    label.py, annotate.py, demo.py are the subcommands
    backends.py     a core by name (`get_backend`: the `ppo_rlhf.backend.Backend` it exports,
                    imported lazily), and the policy sampler
    pipelines.py    multi-step recipes (pretrain a demo model, sample its gold score)
    evaluate.py     sample with a backend, then the numbers of `ppo_rlhf.eval.policy`
    demo.py         the whole RLHF loop on the built-in task
"""
