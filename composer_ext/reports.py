"""``composer-ext report KIND RUN_DIR... [--out DIR]``: dispatch to the report module of ``KIND``.

Each report module provides ``configure_parser(parser)`` and ``cli_main(args) -> int``, like a top-level
command; add yours to :data:`REPORTS`.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ['REPORTS', 'configure_parser', 'cli_main']

REPORTS: dict[str, tuple[str, str]] = {
    'lora': ('composer_ext.lora_probe.report',
             'Learning vs forgetting Pareto plot and ΔW rank table of LoRA/full runs.'),
    'bias': ('composer_ext.fairness.report', 'CEV/SDE vs sparsity, ΔFNR vs ΔFPR scatter, CEV vs similarity.'),
}


def configure_parser(parser) -> None:
    """Add one sub-command per report kind, each with its module's arguments."""
    # Building the parser imports every report module (each declares its own arguments); they keep their slowest
    # import, matplotlib, inside the function that draws.
    kinds = parser.add_subparsers(dest='report_kind', metavar='KIND', title='report kinds')
    for name, (module, help_text) in REPORTS.items():
        importlib.import_module(module).configure_parser(kinds.add_parser(name, help=help_text,
                                                                          description=help_text))


def cli_main(args) -> int:
    """Run the chosen kind's report; exit status 2 when no kind was given."""
    if args.report_kind is None:
        print(f'composer-ext report: choose a KIND: {", ".join(REPORTS)}', file=sys.stderr)
        return 2
    return int(importlib.import_module(REPORTS[args.report_kind][0]).cli_main(args) or 0)
