"""``torchgrain study``: where does group aggregation help? A fair, powered comparison.

Cheap tasks on real data (heads trained on frozen all-MiniLM-L6-v2 features of BBC News and of the
VADER lexicon, cached once), so that thousands of runs fit on a CPU. Every method gets its own
learning rate, chosen on a validation split carved from the training pool with selection seeds
distinct from the reported ones; every method is compared with the mean baseline of the same
optimizer on the same seeds.

- ``features.py``: the frozen embeddings, computed once and cached;
- ``heads.py``: the tasks (splits, label noise, the head, per-sample losses, metrics);
- ``train.py``: one run (optimizer, learning rate, aggregation, grouping, averaging, seed);
- ``design.py``: the presets' cells (the axes and their levels) and seed counts;
- ``runner.py``: learning-rate selection and the reported runs, resumable and in shards;
- ``analysis.py``: statistics against the baseline, Holm correction, heat maps, summary;
- ``stability.py``: the theory's own setting, plain SGD on a convex head, neighbouring datasets.
"""
