"""Benchmarks (`ufo bench ...`): speed and memory figures live here, never in tests.

One module per benchmark: `model` (supernet vs plain ViT, one process), `data` (loader throughput,
JPEG decode and augmentation), `train` (DeepSpeed ranks, every ZeRO stage's memory), `scale`
(bytes per rank and per step as tasks grow, projected to ViT-H), `export` (peak memory of
pruning), `weighting`, `elastic` and `ufo` (training runs compared). What several share
(spawning and joining ranks, counting collective bytes, the plain-ViT baseline, fresh run
directories, printing a result) is in `harness`. Each `bench_*` returns a JSON-able dict and its
`format_*` the table `ufo bench` prints.
"""
