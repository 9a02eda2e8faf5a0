"""Human feedback: preference labels from people -- K responses per prompt, chosen, ranked or
rated -- or from the synthetic labeller that stands in for them, as the pairwise / ranking /
rating records of `ppo_rlhf.data` that `ppo-rlhf train-rm` reads.

    labeller.py     the synthetic labeller (Bradley-Terry draws around a gold reward) and its
                    noise ceiling
    terminal.py     the terminal labelling tool (`ppo-rlhf label`)
    annotate/       the web annotation app for a team (`ppo-rlhf annotate`): SQLite store,
                    HTTP server and page, export and inter-annotator agreement
    samplers.py     where responses come from: a file, or a policy
"""
