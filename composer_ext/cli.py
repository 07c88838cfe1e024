"""The ``composer-ext`` command line: ``composer-ext COMMAND ...``.

Each subcommand lives in the module that implements it, which provides ``configure_parser(parser)`` and
``cli_main(args) -> int``; only the chosen subcommand's module is imported. Runs unchanged under
Composer's launcher: ``composer -n 2 -m composer_ext.cli run CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ['COMMANDS', 'main']

# name -> (module with configure_parser/cli_main, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    'run': ('composer_ext.runner', 'Train from a YAML config: composer-ext run CONFIG.yaml [key=value ...]'),
    'data': ('composer_ext.data.cli', 'Build or inspect the embedded corpus and image sets.'),
    'score': ('composer_ext.perplexity_pruning.scoring',
              'Score every sample of an MDS dataset by reference-model perplexity.'),
    'select': ('composer_ext.perplexity_pruning.selection',
               'Select a perplexity band from a score index (low/medium/high/random).'),
    'ablate': ('composer_ext.domain_upsampling.ablation',
               'Drop-one-domain anneals from one checkpoint: a table of eval deltas.'),
    'blockwise': ('composer_ext.blockwise.cli', 'Parallel blockwise distillation: train, stitch, report.'),
    'report': ('composer_ext.reports', 'Write a report (PNG + CSV/Markdown) over run directories.'),
}


def _chosen(argv: Sequence[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith('-')), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog='composer-ext',
        description='composer_ext: training techniques for the MosaicML Composer trainer.',
    )
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', title='commands')
    chosen = _chosen(argv)
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Lazy: config imports composer (seconds); `composer-ext --help` and a bad command name must not wait for it.
    from composer_ext.config import ConfigError
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).cli_main(args) or 0)
    except ConfigError as err:
        print(f'composer-ext {args.command}: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
