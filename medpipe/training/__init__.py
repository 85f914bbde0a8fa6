"""Training: one loop for every model medpipe trains, and what it needs.

* :mod:`~medpipe.training.loop`: :func:`~medpipe.training.loop.fit` (the loop: AMP, validation cadence,
  keep-best, patience, LR schedule, history, progress, logging), :class:`~medpipe.training.loop.SupervisedStep`,
  :class:`~medpipe.training.loop.Validation`, :class:`~medpipe.training.loop.FitResult`,
  :class:`~medpipe.training.loop.ShuffledBatches`, :func:`~medpipe.training.loop.resolve_amp`.
* :mod:`~medpipe.training.segmentation`, :mod:`~medpipe.training.classification`, :mod:`~medpipe.training.gan`:
  per model kind, the batch preparation or iteration and the validation function (and the classifier's k-fold
  items, the GAN's images and FID feature extractor).
* :mod:`~medpipe.training.losses` (``make_loss``, ``segmenter_loss``), :mod:`~medpipe.training.imbalance`
  (class weights, ``make_sampler``).
"""
