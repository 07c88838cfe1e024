"""``composer-ext data``: build the embedded data ahead of time and show its manifest."""

from __future__ import annotations

import json

__all__ = ['configure_parser', 'cli_main']


def configure_parser(parser) -> None:
    parser.add_argument('action', choices=['build', 'manifest', 'path'],
                        help='build: build the corpus and image caches; manifest: print the corpus manifest '
                        '(without the per-file hashes); path: print the corpus directory')


def cli_main(args) -> int:
    from composer_ext.data.corpus import ensure_corpus

    corpus = ensure_corpus()
    if args.action == 'build':
        from composer_ext.data.images import fashion_mnist
        fashion_mnist('train'), fashion_mnist('test')
        print(f'corpus: {corpus.root} (manifest hash {corpus.manifest["manifest_hash"][:16]})')
    elif args.action == 'manifest':
        print(json.dumps({k: v for k, v in corpus.manifest.items() if k != 'files'}, indent=2, sort_keys=True))
    else:
        print(corpus.root)
    return 0
