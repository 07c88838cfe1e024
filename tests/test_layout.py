"""The package layout: no import circles, no private cross-module imports, our imports at top level, and every
public name the README documents importable from its documented path."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'composer_ext'


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == '__init__.py'


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ''
    base = importer.split('.')
    base = base if _is_package(importer) else base[:-1]
    base = base[:len(base) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, list[str], ast.stmt]]:
    """(imported module, names taken from it, node) for every import of one of our modules, anywhere in the file."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node) for alias in node.names if alias.name.split('.')[0] == 'composer_ext']
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, node)
            if module.split('.')[0] != 'composer_ext':
                continue
            plain = []
            for alias in node.names:
                if f'{module}.{alias.name}' in MODULES:  # `from package import submodule`
                    found.append((f'{module}.{alias.name}', [], node))
                else:
                    plain.append(alias.name)
            if plain:
                found.append((module, plain, node))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, _, _ in _imports(name):
            if module not in MODULES:
                raise AssertionError(f'{name} imports {module}, which does not exist')
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = module.split('.')
            for i in range(2, len(parts) + 1):
                target = '.'.join(parts[:i])
                if target != name and target in MODULES:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_import_graph_has_no_circle():
    assert _cycles(_graph()) == []


def test_the_circle_finder_finds_a_planted_circle():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert _cycles(graph) == [['a', 'b', 'c']]


def test_no_module_imports_a_private_name_of_another_module():
    offenders = [f'{name}: from {module} import {n}' for name in MODULES for module, names, _ in _imports(name)
                 for n in names if n.startswith('_') and module != name]
    assert offenders == []


def _function_level_imports(name: str) -> list[tuple[int, str]]:
    """Our own imports inside a function body without a comment (on the line or the one above) saying why."""
    source = MODULES[name].read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    inside: list[tuple[int, str]] = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                ours = any(alias.name.split('.')[0] == 'composer_ext' for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                ours = _resolve(name, node).split('.')[0] == 'composer_ext'
            else:
                ours = False
            if ours:
                line = lines[node.lineno - 1]
                above = lines[node.lineno - 2] if node.lineno > 1 else ''
                if '#' not in line and not above.strip().startswith('#'):
                    inside.append((node.lineno, line.strip()))
    return sorted(set(inside))


def test_our_imports_are_at_top_level_or_say_why_not():
    offenders = [f'{MODULES[name].relative_to(ROOT)}:{line}: {text}' for name in MODULES
                 for line, text in _function_level_imports(name)]
    assert offenders == []


# --- the public API the README documents ----------------------------------------------------------------------

_README_IMPORT = re.compile(r'^from (composer_ext[\w.]*) import ([\w, ]+)$', re.MULTILINE)
_README_DOTTED = re.compile(r'`(composer_ext(?:\.\w+)+)')


def _readme_names() -> list[tuple[str, str]]:
    text = (ROOT / 'README.md').read_text()
    names = [(module, n.strip()) for module, listed in _README_IMPORT.findall(text) for n in listed.split(',')]
    for dotted in _README_DOTTED.findall(text):
        module, _, attribute = dotted.rpartition('.')
        names.append((module, attribute))
    return sorted(set(names))


def test_readme_documents_names_to_check():
    names = _readme_names()
    assert ('composer_ext.algorithms', 'KnowledgeDistillation') in names and len(names) > 20


@pytest.mark.parametrize('module,name', _readme_names())
def test_every_public_name_in_the_readme_imports_from_its_documented_path(module, name):
    try:
        imported = importlib.import_module(f'{module}.{name}')  # a documented module path
    except ModuleNotFoundError:
        imported = getattr(importlib.import_module(module), name)
    assert imported is not None


# The names users imported before the technique packages existed keep working (lazy re-exports).
COMPATIBILITY = {
    'composer_ext.algorithms': ['DomainUpsampling', 'KnowledgeDistillation', 'MagnitudePruning', 'kd_loss',
                                'load_teacher'],
    'composer_ext.algorithms.blockwise': ['find_blocks', 'make_student', 'stitch', 'train_blocks', 'run_blockwise',
                                          'load_blockwise_config'],
    'composer_ext.callbacks': ['BiasProbe', 'LoRAProbe'],
    'composer_ext.metrics': ['ClassBias', 'cev_sde', 'delta_w_spectrum'],
    'composer_ext.data': ['MixtureSchedule', 'MixtureDataset', 'MixtureDataLoader', 'build_mixture_dataloader',
                          'select_band', 'SelectedDataset', 'split_for_reference', 'ReferenceSplit', 'ScoreIndex',
                          'PerplexityScorer', 'score_mds', 'select_from_scores', 'MDSDataset', 'ensure_corpus',
                          'build_image_dataloader', 'build_text_evaluators', 'load_tokenizer'],
    'composer_ext.lora': ['lora_config', 'small_gpt_from_checkpoint', 'LoRARecommendationWarning'],
    'composer_ext.models': ['small_gpt', 'small_resnet', 'small_vgg'],
}


@pytest.mark.parametrize('module,name', [(m, n) for m, names in COMPATIBILITY.items() for n in names])
def test_compatibility_paths_resolve_to_the_technique_packages(module, name):
    value = getattr(importlib.import_module(module), name)
    assert name in dir(importlib.import_module(module))
    home = getattr(value, '__module__', '') or ''
    assert home.startswith('composer_ext.'), (module, name, home)


def test_every_package_export_resolves():
    for name, path in MODULES.items():
        if path.name != '__init__.py' and 'lazy_exports' not in path.read_text():
            continue
        module = importlib.import_module(name)
        for exported in getattr(module, '__all__', []):
            assert getattr(module, exported) is not None, (name, exported)


def test_each_technique_package_has_a_readme_linked_from_the_top_readme():
    top = (ROOT / 'README.md').read_text()
    for technique in ('domain_upsampling', 'perplexity_pruning', 'distillation', 'blockwise', 'lora_probe',
                      'fairness'):
        readme = PACKAGE / technique / 'README.md'
        assert readme.is_file(), readme
        assert f'composer_ext/{technique}/README.md' in top, technique
