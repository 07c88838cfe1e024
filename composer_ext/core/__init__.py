"""Mechanics every technique shares, each written once.

* :mod:`.timing` -- time arguments: one parser, one policy on units, the window and interval resolvers.
* :mod:`.unwrap` -- from what the Trainer holds (DDP, ``torch.compile``, ``HuggingFaceModel``) to the module.
* :mod:`.checkpoints` -- one checkpoint and model loader (``weights_only=True`` by default).
* :mod:`.provenance` -- content hashes of ids, files, configs and weights.

File writing (atomic files and directories, locks) lives in :mod:`composer_ext.storage`.
"""
