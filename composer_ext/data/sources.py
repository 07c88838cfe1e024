"""Raw documents of the six embedded text domains, read from files that pip and Debian packages install.

Nothing here touches the network: every domain reads text that a named package put on this machine.
When a source is missing, :class:`MissingSourceError` says which package to install.

Each domain yields :class:`Document` objects in a fixed, sorted order, so that a build of the corpus is
a pure function of the installed packages.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    'DOMAINS',
    'Document',
    'MissingSourceError',
    'SourceInfo',
    'iter_documents',
    'source_info',
]

DOMAINS = ('code', 'dialogue', 'legal', 'prose', 'math', 'technical')


class MissingSourceError(FileNotFoundError):
    """A domain's source text is not installed; the message names the package that provides it."""


@dataclass(frozen=True)
class Document:
    """One source document: a stable key (unique within its domain) and its text."""

    key: str
    text: str


@dataclass(frozen=True)
class SourceInfo:
    """Where a domain's text comes from: the packages (with installed versions) and the paths read."""

    packages: tuple[str, ...]
    versions: dict[str, str]
    paths: tuple[str, ...]


def _debian_version(package: str) -> str | None:
    if shutil.which('dpkg-query') is None:
        return None
    proc = subprocess.run(['dpkg-query', '-W', '-f=${Version}', package], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _pip_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_debian(domain: str, package: str, path: Path) -> Path:
    if not path.exists():
        raise MissingSourceError(f"Text domain '{domain}' needs {path}, which the Debian package '{package}' "
                                 f'installs. Fix: sudo apt-get install -y {package}')
    return path


def _require_pip_dir(domain: str, package: str, module: str, relative: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(module)
    # A namespace package (licensedcode) has no origin, only search locations.
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise MissingSourceError(f"Text domain '{domain}' needs the Python package '{package}' (module "
                                 f"'{module}'). Fix: pip install {package}")
    path = Path(roots[0]) / relative
    if not path.exists():
        raise MissingSourceError(f"Text domain '{domain}' expected {path} inside the package '{package}'. "
                                 f'Fix: pip install --force-reinstall {package}')
    return path


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
    return raw.decode('utf-8', errors='replace')


def _normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, no form feeds or other control characters but tab and newline."""
    text = text.replace('\r\n', '\n').replace('\r', '\n').replace('\f', '\n')
    text = re.sub(r'[\x00-\x08\x0b-\x1f\x7f]', '', text)
    text = '\n'.join(line.rstrip() for line in text.split('\n'))
    return re.sub(r'\n{3,}', '\n\n', text).strip('\n')


def _split_sections(text: str, heading: re.Pattern[str], key_prefix: str) -> Iterator[Document]:
    """Split at lines matching ``heading``; text before the first heading is its own section."""
    starts = [m.start() for m in heading.finditer(text)]
    bounds = [0] + starts + [len(text)]
    index = 0
    for begin, end in zip(bounds, bounds[1:]):
        section = _normalise(text[begin:end])
        if len(section) >= 40:
            yield Document(f'{key_prefix}#{index}', section)
            index += 1


# --- code: the Python standard library ---------------------------------------------------------------

_CODE_EXCLUDED_DIRS = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', '__pycache__'}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()['stdlib'])


def _code_files() -> list[Path]:
    root = _stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _CODE_EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith('.py'))
    if not files:
        raise MissingSourceError(f"Text domain 'code' found no *.py files under the Python standard library at "
                                 f'{root}. Fix: install a full CPython (e.g. sudo apt-get install -y '
                                 f'libpython3-stdlib) rather than a stripped one.')
    return sorted(files)


def _code_documents() -> Iterator[Document]:
    root = _stdlib_dir()
    for path in _code_files():
        text = _normalise(path.read_text(encoding='utf-8', errors='replace'))
        if text:
            yield Document(str(path.relative_to(root)), text)


# --- dialogue: pip chitchat-dataset --------------------------------------------------------------------


def _dialogue_path() -> Path:
    return _require_pip_dir('dialogue', 'chitchat-dataset', 'chitchat_dataset', 'dataset.json')


def _dialogue_documents() -> Iterator[Document]:
    conversations = json.loads(_dialogue_path().read_text(encoding='utf-8'))
    for conv_id in sorted(conversations):
        speakers: dict[str, str] = {}
        lines = []
        for turn in conversations[conv_id]['messages']:
            for message in turn:
                name = speakers.setdefault(message['sender'], 'AB'[len(speakers) % 2])
                lines.append(f"{name}: {message['text'].strip()}")
        text = _normalise('\n'.join(lines))
        if text:
            yield Document(conv_id, text)


# --- legal: pip licensedcode-data ----------------------------------------------------------------------


def _legal_dir() -> Path:
    return _require_pip_dir('legal', 'licensedcode-data', 'licensedcode', 'data/licenses')


_YAML_HEADER = re.compile(r'\A---\n.*?\n---\n', re.DOTALL)


def _legal_documents() -> Iterator[Document]:
    for path in sorted(_legal_dir().glob('*.LICENSE')):
        text = _normalise(_YAML_HEADER.sub('', path.read_text(encoding='utf-8', errors='replace')))
        if text:
            yield Document(path.stem, text)


# --- prose: Debian bible-kjv (via `bible`) and fortunes ------------------------------------------------

_FORTUNES_DIR = Path('/usr/share/games/fortunes')
_CHAPTER = re.compile(r'^(\S.*\S) (\d+)$', re.MULTILINE)


def _bible_text() -> str:
    if shutil.which('bible') is None:
        raise MissingSourceError("Text domain 'prose' needs the `bible` command from the Debian package "
                                 "'bible-kjv'. Fix: sudo apt-get install -y bible-kjv")
    proc = subprocess.run(['bible', 'Gen1:1-Rev22:21'], capture_output=True, text=True, check=True)
    return proc.stdout


def _fortune_files() -> list[Path]:
    _require_debian('prose', 'fortunes', _FORTUNES_DIR / 'fortunes')
    # The data files are the ones without an extension (the others are indexes and symlinks to them).
    return sorted(p for p in _FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())


def _prose_documents() -> Iterator[Document]:
    text = _bible_text()
    matches = list(_CHAPTER.finditer(text))
    for match, nxt in zip(matches, matches[1:] + [None]):
        chapter = text[match.start():nxt.start() if nxt else len(text)]
        # Verses are wrapped at 80 columns with a leading verse number; rejoin them as one line each.
        verses = re.split(r'\n\s+(?=\d+ )', chapter)
        body = '\n'.join(' '.join(v.split()) for v in verses[1:])
        yield Document(f'kjv/{match.group(1)} {match.group(2)}', _normalise(f'{match.group(0)}\n\n{body}'))
    for path in _fortune_files():
        entries = path.read_text(encoding='utf-8', errors='replace').split('\n%\n')
        for index, entry in enumerate(entries):
            entry = _normalise(entry.strip('%\n'))
            if entry:
                yield Document(f'fortunes/{path.name}#{index}', entry)


# --- math: Debian pari-doc (TeX sources of the PARI/GP manual) ------------------------------------------

_PARI_DIR = Path('/usr/share/pari/doc')
_TEX_SECTION = re.compile(r'^\\(?:section|subsec|subsection|chapter)\b', re.MULTILINE)
_PARI_MACRO_FILES = {'paricfg.tex', 'parimacro.tex', 'pdfmacs.tex'}  # macro definitions, not prose


def _math_files() -> list[Path]:
    _require_debian('math', 'pari-doc', _PARI_DIR / 'usersch1.tex')
    return sorted(p for p in _PARI_DIR.glob('*.tex') if p.name not in _PARI_MACRO_FILES)


def _math_documents() -> Iterator[Document]:
    for path in _math_files():
        yield from _split_sections(path.read_text(encoding='utf-8', errors='replace'), _TEX_SECTION, path.name)


# --- technical: Debian debian-policy, gnu-standards, debian-reference-en -------------------------------

_TECHNICAL_FILES = (
    ('debian-policy', Path('/usr/share/doc/debian-policy/policy.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/upgrading-checklist.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/menu-policy.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/perl-policy.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/debconf_specification.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/copyright-format-1.0.txt.gz')),
    ('debian-policy', Path('/usr/share/doc/debian-policy/fhs/fhs-3.0.txt.gz')),
    ('gnu-standards', Path('/usr/share/doc/gnu-standards/standards.text.gz')),
    ('gnu-standards', Path('/usr/share/doc/gnu-standards/maintain.text.gz')),
    ('debian-reference-en', Path('/usr/share/debian-reference/debian-reference.en.txt.gz')),
)
# Numbered headings ("4.9. Main building script", "Chapter 3") or underlined titles start a section.
_TECH_HEADING = re.compile(r'^(?:\d+(?:\.\d+)*\.? [A-Z`\w].*|Chapter \d+.*|\S.*\n[=\-*~]{3,})$', re.MULTILINE)


def _technical_documents() -> Iterator[Document]:
    for package, path in _TECHNICAL_FILES:
        _require_debian('technical', package, path)
    for package, path in _TECHNICAL_FILES:
        yield from _split_sections(_read_text(path), _TECH_HEADING, f'{package}/{path.name}')


_READERS: dict[str, Callable[[], Iterator[Document]]] = {
    'code': _code_documents,
    'dialogue': _dialogue_documents,
    'legal': _legal_documents,
    'prose': _prose_documents,
    'math': _math_documents,
    'technical': _technical_documents,
}

_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    'code': (('python', 'stdlib'),),
    'dialogue': (('pip', 'chitchat-dataset'),),
    'legal': (('pip', 'licensedcode-data'),),
    'prose': (('debian', 'bible-kjv'), ('debian', 'fortunes')),
    'math': (('debian', 'pari-doc'),),
    'technical': (('debian', 'debian-policy'), ('debian', 'gnu-standards'), ('debian', 'debian-reference-en')),
}


def _check_domain(domain: str) -> None:
    if domain not in _READERS:
        raise ValueError(f'domain={domain!r} is not an embedded text domain. Fix: use one of {list(DOMAINS)}.')


def iter_documents(domain: str) -> Iterator[Document]:
    """Yield the documents of ``domain`` in a fixed order; raise :class:`MissingSourceError` if not installed."""
    _check_domain(domain)
    return _READERS[domain]()


def source_info(domain: str) -> SourceInfo:
    """The packages that provide ``domain`` with their installed versions, and the paths read."""
    _check_domain(domain)
    versions: dict[str, str] = {}
    for kind, name in _PACKAGES[domain]:
        if kind == 'python':
            versions['python'] = sysconfig.get_python_version() + ' ' + os.sys.version.split()[0]
        elif kind == 'pip':
            versions[name] = _pip_version(name) or 'missing'
        else:
            versions[name] = _debian_version(name) or 'unknown'
    paths: list[str] = {
        'code': lambda: [str(_stdlib_dir())],
        'dialogue': lambda: [str(_dialogue_path())],
        'legal': lambda: [str(_legal_dir())],
        'prose': lambda: ['bible Gen1:1-Rev22:21', str(_FORTUNES_DIR)],
        'math': lambda: [str(_PARI_DIR)],
        'technical': lambda: [str(p) for _, p in _TECHNICAL_FILES],
    }[domain]()
    return SourceInfo(tuple(name for _, name in _PACKAGES[domain]), versions, tuple(paths))
