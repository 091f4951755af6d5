"""Dataset preparation: turn the files users download into prepared folders (see docs/data.md).

``s2m2 prepare DATASET --source PATH --out DIR`` (:mod:`data_prep.cli`) or ``python -m data_prep.<module>``
with one module per dataset: :mod:`~data_prep.mini_imagenet`, :mod:`~data_prep.tiered_imagenet`,
:mod:`~data_prep.cifar_fs` / :mod:`~data_prep.fc100` (both in :mod:`~data_prep.cifar`), :mod:`~data_prep.cub`,
:mod:`~data_prep.omniglot`; shared decoding, archive reading and split-file handling in
:mod:`~data_prep.common`. The official split files ship in ``data_prep/splits`` (with provenance and
licences), the demo Omniglot copy in ``data_prep/demo``.
"""
