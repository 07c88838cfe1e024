"""``composer-ext data``: build, check and repair the embedded data ahead of time, and show the corpus manifest."""

from __future__ import annotations

import json

from composer_ext.config import ConfigError
from composer_ext.data.corpus import (MANIFEST, corpus_root, damage_error, ensure_corpus, read_manifest,
                                      repair_corpus, verify_corpus)
from composer_ext.data.images import fashion_mnist
from composer_ext.storage import CACHE_ENV, is_unwritable

__all__ = ['configure_parser', 'cli_main']


def configure_parser(parser) -> None:
    parser.add_argument('action', choices=['build', 'manifest', 'path', 'verify'],
                        help='build: build the corpus and image caches (and check every corpus file); manifest: '
                        'print the corpus manifest (without the per-file hashes); path: print the corpus directory; '
                        'verify: check every corpus file against the SHA-256 in its manifest (exit 2 if damaged)')
    parser.add_argument('--repair', action='store_true',
                        help='with build: rebuild the damaged files of the corpus cache (or all of it, atomically)')


def _verify() -> int:
    root = corpus_root()
    try:
        files = read_manifest(root)['files']
    except FileNotFoundError:
        raise ConfigError(str(root), '', f'no corpus is built here (no {MANIFEST}).',
                          f'build it with `composer-ext data build` ({CACHE_ENV} chooses the cache).') from None
    damaged = verify_corpus(root, full=True)
    if damaged:
        raise damage_error(root, damaged)
    print(f'ok: the {len(files)} files of {root} match the SHA-256 in {MANIFEST}')
    return 0


def _build(repair: bool) -> int:
    if repair:
        corpus, damaged = repair_corpus()
        print(f'repaired {len(damaged)} damaged file(s): {", ".join(damaged)}' if damaged else 'nothing was damaged')
    else:
        corpus = ensure_corpus()
        damaged = verify_corpus(corpus.root, full=True)
        if damaged:
            raise damage_error(corpus.root, damaged)
    try:
        fashion_mnist('train'), fashion_mnist('test')
    except OSError as err:
        if not is_unwritable(err):
            raise
        raise ConfigError(str(err.filename or ''), '', f'the image cache cannot be written ({err.strerror}).',
                          f'set {CACHE_ENV} to a writable directory.') from None
    print(f'corpus: {corpus.root} (manifest hash {corpus.manifest["manifest_hash"][:16]})')
    return 0


def cli_main(args) -> int:
    if args.repair and args.action != 'build':
        raise ConfigError('composer-ext data', '--repair', f'applies to `data build`, not `data {args.action}`.',
                          'run `composer-ext data build --repair`.')
    if args.action == 'verify':
        return _verify()
    if args.action == 'build':
        return _build(args.repair)
    corpus = ensure_corpus()
    if args.action == 'manifest':
        print(json.dumps({k: v for k, v in corpus.manifest.items() if k != 'files'}, indent=2, sort_keys=True))
    else:
        print(corpus.root)
    return 0
