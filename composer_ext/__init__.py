"""composer_ext: training techniques for the MosaicML Composer trainer.

Each technique is a Composer ``Algorithm`` or ``Callback`` (plus a functional form) that you attach to the
``Trainer`` you already have. See the README for the list, and ``composer-ext --help`` for the CLI.
"""

__version__ = '0.1.0'
