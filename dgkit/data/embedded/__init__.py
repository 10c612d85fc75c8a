"""Embedded benchmarks: generated offline from data that installs with packages, cached under ``datasets/``.

- :mod:`~dgkit.data.embedded.digits_dg`: ten digits in four styles (ink, photo, font, street), 32x32.
- :mod:`~dgkit.data.embedded.rotated_digits`: the RotatedMNIST protocol on scikit-learn's digits, 28x28.
- :mod:`~dgkit.data.embedded.hist_maps`: synthetic historical-map tiles for segmentation in four styles, 128x128.
- :mod:`~dgkit.data.embedded.sam_corpus`: a promptable-segmentation corpus (shapes with photo and procedural
  textures on scikit-image photo crops, instance masks; no map styles) to pretrain ``sam_tiny``, 128x128.
- :mod:`~dgkit.data.embedded.synthetic`: a tiny in-memory 3-domain set for tests (never cached).
- :mod:`~dgkit.data.embedded.cache`: the generate-once cache with a checksummed manifest.

Nothing here touches the network. See ``docs/datasets.md``.
"""

from dgkit.data.embedded.cache import array_checksum, load_or_generate, read_manifest

__all__ = ["array_checksum", "load_or_generate", "read_manifest"]
