"""``composer-ext blockwise CONFIG.yaml [key=value ...] [--stage STAGE ...]``: run parallel blockwise distillation.

Runs under Composer's launcher, one block set per rank::

    composer -n 2 -m composer_ext.cli blockwise yamls/blockwise/vgg.yaml     # 2 ranks (gloo on CPU, NCCL on GPU)
    composer-ext blockwise yamls/blockwise/vgg.yaml                          # 1 rank: the sequential baseline

Every stage resumes: rerunning the same command after a crash skips finished blocks, continues the block
that was in progress from its last checkpoint, and autoresumes the finetune run.
"""

from __future__ import annotations

import sys

from composer_ext.blockwise.config import load_blockwise_config
from composer_ext.blockwise.pipeline import STAGES, run_blockwise
from composer_ext.blockwise.stitching import MissingBlockCheckpointError
from composer_ext.blockwise.training import BlockCheckpointMismatchError
from composer_ext.config import ConfigError

__all__ = ['cli_main', 'configure_parser']


def configure_parser(parser) -> None:
    """Arguments of ``composer-ext blockwise``."""
    parser.add_argument('config', help='the blockwise YAML (see yamls/blockwise/vgg.yaml)')
    parser.add_argument('overrides', nargs='*', metavar='key=value',
                        help='dotted overrides, e.g. block_training.epochs=1 data.num_samples=5000')
    parser.add_argument('--stage', action='append', choices=STAGES, dest='stages',
                        help='run only these stages (repeatable; default: all, in order: ' + ', '.join(STAGES) + ')')


def cli_main(args) -> int:
    """Run the stages of ``args`` on this rank; input problems become a :class:`ConfigError` (exit status 2)."""
    config = load_blockwise_config(args.config, tuple(args.overrides))
    stages = tuple(s for s in STAGES if s in (args.stages or STAGES))
    try:
        run_blockwise(config, stages, stream=sys.stdout)
    except MissingBlockCheckpointError as err:  # at stitch time: an input problem, not a crash
        raise ConfigError(config.source, 'stitch', str(err), '') from None
    except BlockCheckpointMismatchError as err:  # blocks of another configuration or teacher in the output folder
        raise ConfigError(config.source, 'output_folder', str(err), '') from None
    return 0
