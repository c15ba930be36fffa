"""FTP: fine-grained token-wise pruning by token routing (Li et al., arXiv 2412.11494).

    router.py     the router MLP, the static/random scorers, selection rules, router files
    factors.py    the four per-token factors the router sees
    forward.py    the token-skipping forward over `model.model.layers` (with its KV cache)
    generate.py   `generate_pruned`, what rollout workers call
    losses.py     guide, one-sided sparsity and distillation losses
    train.py      router training with the LLM frozen
    scheduler.py  genetic search of per-block sparsities under a global budget
    config.py     `FTPConfig`, the `ftp` section of the job file

Kept import-light (the config is loaded by the CLI): import from the submodules.
"""
