"""Demo models for GAN dissection, trained offline on the procedural ``scenes``.

- :mod:`nethook.gan.generator`: a small DCGAN-style generator ``z -> image``
  (``load_model("nethook.gan.generator:scene_gan")``), layers ``layer1`` ...
  ``layer4`` and ``output``; images are ``[B, 3, 32, 32]`` in [0, 1].
- :mod:`nethook.gan.segnet`: a small segmentation network (object, part and
  material heads) that the ``scenes-seg`` segmenter plugin wraps.
- ``train_gan`` / ``train_segnet``: the resumable scripts that made the shipped
  weights; ``evaluate_gan`` measures the generator's FSD with :mod:`nethook.fsd`. ``MODEL_CARD.md`` has
  the figures.
"""
