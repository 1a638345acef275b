"""Training: the loop, its config, data order, training-state checkpoints and EMA.

- :mod:`ditq.train.loop`: :func:`~ditq.train.loop.fit`.
- :mod:`ditq.train.config`: :class:`~ditq.train.config.TrainRun`, a whole run as YAML-able data.
- :mod:`ditq.train.sampler`: the seeded, resumable data order.
- :mod:`ditq.train.checkpoint`: training states, keep-last-K folders.
- :mod:`ditq.train.resume`: what a training state holds; saving it on rank 0, resuming every rank.
- :mod:`ditq.train.ema`: the exponential moving average of the weights.

``ditq train`` (:mod:`ditq.pipelines.train`) puts these together, with
:mod:`ditq.distributed` (torchrun process groups, DDP / FSDP2 wrapping, rank 0 writes),
which sits outside this package because sampling uses it too.
"""
