"""Corpus cache integrity: damaged shards and manifests are detected with a clear error and repaired by one command;
cache files get normal modes; the manifest hash depends only on content; an unwritable cache gives a clear error."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from composer_ext.cli import main
from composer_ext.core.provenance import file_sha256
from composer_ext.data import corpus as corpus_module
from composer_ext.data.corpus import (CorpusCacheError, CorpusConfig, ensure_corpus, manifest_hash, repair_corpus,
                                      verify_corpus)
from composer_ext.data.mds import MDSDataset
from composer_ext.storage import atomic_dir, atomic_write_bytes, atomic_write_json
from tests.conftest import ROOT, composer_ext_cmd

SMALL = CorpusConfig(domains=('technical', 'math'), max_bytes_per_domain=200_000, vocab_size=1024,
                     shard_bytes=1 << 16)
SHARD = 'code/train/shard.00001.mds'


@pytest.fixture
def cache(corpus, tmp_path, monkeypatch):
    """A private copy of the session corpus under ``tmp_path``, the cache (``COMPOSER_EXT_CACHE``) of this test."""
    shutil.copytree(corpus.root, tmp_path / 'corpus' / corpus.root.name)
    if (corpus.root.parent.parent / 'images').is_dir():  # `data build` reads the image cache too
        (tmp_path / 'images').symlink_to(corpus.root.parent.parent / 'images', target_is_directory=True)
    monkeypatch.setattr(corpus_module, '_CHECKED', set())
    monkeypatch.setenv('COMPOSER_EXT_CACHE', str(tmp_path))
    return tmp_path


def _overwrite_same_length(path: Path) -> bytes:
    """Replace the bytes in the middle of ``path`` with other bytes of the same length; return the original."""
    original = path.read_bytes()
    middle = len(original) // 2
    damaged = original[:middle] + bytes(b ^ 0x5A for b in original[middle:middle + 4096]) + original[middle + 4096:]
    assert len(damaged) == len(original) and damaged != original
    path.write_bytes(damaged)
    return original


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``composer-ext ARGS`` here, as a new process would (no corpus checked yet): (exit code, stderr)."""
    capsys.readouterr()
    corpus_module._CHECKED.clear()
    code = main(list(args))
    return code, capsys.readouterr().err


# --- item 6: a shard overwritten at the same length -----------------------------------------------------


def test_same_length_overwrite_is_detected_and_repaired_by_one_command(cache, capsys):
    root = cache / 'corpus' / 'v1'
    shard = 'legal/val/shard.00000.mds'  # a small split: the repair rewrites only it
    original = _overwrite_same_length(root / shard)

    with pytest.raises(CorpusCacheError, match=rf'{root}.*{shard}.*composer-ext data build --repair'):
        ensure_corpus(cache_dir=cache)

    code, err = _cli(capsys, 'data', 'verify')
    assert code == 2 and shard in err and '--repair' in err, err
    code, err = _cli(capsys, 'data', 'build')  # exited 0 before, using the damaged shard
    assert code == 2 and shard in err and '--repair' in err, err

    untouched = (root / SHARD).stat().st_mtime_ns
    code, err = _cli(capsys, 'data', 'build', '--repair')
    assert code == 0, err
    assert (root / shard).read_bytes() == original
    assert (root / SHARD).stat().st_mtime_ns == untouched  # only the damaged split was rewritten
    code, err = _cli(capsys, 'data', 'verify')
    assert code == 0, err
    corpus_module._CHECKED.clear()
    assert ensure_corpus(cache_dir=cache).root == root


def test_verify_corpus_lists_every_damaged_file(cache):
    root = cache / 'corpus' / 'v1'
    assert verify_corpus(root) == []
    _overwrite_same_length(root / SHARD)
    (root / 'math/val/index.json').write_text('{}')
    assert verify_corpus(root) == ['code/train/shard.00001.mds', 'math/val/index.json']


# --- item 5: a truncated or corrupt shard ---------------------------------------------------------------


def test_truncated_shard_gives_an_error_naming_the_cache_and_the_fix(cache):
    root = cache / 'corpus' / 'v1'
    shard = root / SHARD
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    with pytest.raises(CorpusCacheError, match=rf'{root}.*{SHARD}.*composer-ext data build --repair'):
        ensure_corpus(cache_dir=cache)
    # Read directly (past the first-use check), the reader names the file and the fix instead of a raw decode error.
    data = MDSDataset(root / 'code' / 'train')
    first, last = data.shard_range(1)
    with pytest.raises(ValueError, match=rf'{shard}.*damaged.*Fix: .*composer-ext data build --repair'):
        [data[i] for i in range(first, last)]
    with pytest.raises(ValueError, match=rf'{shard}.*damaged'):
        data.read_shard(1)


def test_garbage_offsets_in_a_shard_give_an_error_naming_the_file(cache):
    shard = cache / 'corpus' / 'v1' / SHARD
    raw = bytearray(shard.read_bytes())
    raw[8:40] = b'\xff' * 32  # the offset table of the first samples
    shard.write_bytes(bytes(raw))
    data = MDSDataset(shard.parent)
    first, _ = data.shard_range(1)
    with pytest.raises(ValueError, match=rf'{shard}.*damaged'):
        data[first]


# --- item 7: a garbage manifest.json --------------------------------------------------------------------


def test_garbage_manifest_gives_a_clear_error_in_every_entry(cache, capsys):
    root = cache / 'corpus' / 'v1'
    (root / 'manifest.json').write_bytes(b'\x00\x13 not json {')
    with pytest.raises(CorpusCacheError, match=rf'{root}.*manifest.json.*composer-ext data build --repair'):
        ensure_corpus(cache_dir=cache)
    for action in ('manifest', 'verify', 'build'):  # a JSONDecodeError traceback before
        code, err = _cli(capsys, 'data', action)
        assert code == 2 and f'{root}: manifest.json' in err and '--repair' in err, (action, err)
    # `run` blamed the YAML's model argument (the tokenizer is loaded while the model is built).
    code, err = _cli(capsys, 'run', str(ROOT / 'yamls/domain_upsampling/baseline.yaml'), 'max_duration=1ba')
    assert code == 2 and f'{root}: manifest.json' in err and '--repair' in err, err
    assert 'model:' not in err


def test_a_manifest_whose_hash_does_not_match_is_damaged(cache):
    root = cache / 'corpus' / 'v1'
    manifest = json.loads((root / 'manifest.json').read_text())
    manifest['files'][SHARD] = '0' * 64  # valid JSON, but not what was built
    (root / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(CorpusCacheError, match=r'manifest.json.*hash'):
        ensure_corpus(cache_dir=cache)


def test_garbage_manifest_is_repaired_by_a_rebuild(tmp_path):
    old_umask = os.umask(0o022)
    try:
        built = ensure_corpus(SMALL, cache_dir=tmp_path, progress=False)
        expected = built.manifest['manifest_hash']
        (built.root / 'manifest.json').write_text('garbage')
        corpus_module._CHECKED.discard(str(built.root))
        with pytest.raises(CorpusCacheError, match='manifest.json'):
            ensure_corpus(SMALL, cache_dir=tmp_path, progress=False)
        repaired, rebuilt = repair_corpus(SMALL, cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old_umask)
    assert rebuilt == ['manifest.json']
    # Readable by the other users of a shared cache (item 16: the build directory came from mkdtemp, 0700).
    assert repaired.root.stat().st_mode & 0o777 == 0o755
    assert (repaired.root / 'manifest.json').stat().st_mode & 0o777 == 0o644
    assert repaired.manifest['manifest_hash'] == expected
    assert verify_corpus(repaired.root) == []
    assert ensure_corpus(SMALL, cache_dir=tmp_path, progress=False).manifest['manifest_hash'] == expected


# --- cheap first-use checks -----------------------------------------------------------------------------


def test_first_use_check_hashes_only_files_whose_size_or_mtime_changed(cache, monkeypatch):
    root = cache / 'corpus' / 'v1'
    hashed = []

    def counting_sha256(path):
        hashed.append(Path(path).relative_to(root).as_posix())
        return file_sha256(path)

    monkeypatch.setattr(corpus_module, 'file_sha256', counting_sha256)
    ensure_corpus(cache_dir=cache)  # a copy: new ctimes, so every file is hashed once and the stats are recorded
    files = len(json.loads((root / 'manifest.json').read_text())['files'])
    assert len(hashed) == files
    hashed.clear()
    corpus_module._CHECKED.clear()  # a new process
    ensure_corpus(cache_dir=cache)
    assert hashed == []
    os.utime(root / SHARD)  # touched, same bytes: hashed once, found intact
    corpus_module._CHECKED.clear()
    ensure_corpus(cache_dir=cache)
    assert hashed == [SHARD]
    ensure_corpus(cache_dir=cache)  # checked once per process
    assert hashed == [SHARD]


# --- item 16: modes of files and directories written through storage -------------------------------------


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_storage_writes_get_umask_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / 'a.bin', b'x')
        atomic_write_json(tmp_path / 'b.json', {'x': 1})
        with atomic_dir(tmp_path / 'd') as tmp:
            (tmp / 'f').write_text('x')
        with atomic_dir(tmp_path / 'd') as tmp:  # replacing an existing directory
            (tmp / 'f').write_text('y')
        plain = tmp_path / 'plain'
        plain.mkdir()
        (plain / 'f').write_text('x')
    finally:
        os.umask(old)
    file_mode, dir_mode = (plain / 'f').stat().st_mode & 0o777, plain.stat().st_mode & 0o777
    assert file_mode == 0o666 & ~umask and dir_mode == 0o777 & ~umask
    assert (tmp_path / 'a.bin').stat().st_mode & 0o777 == file_mode
    assert (tmp_path / 'b.json').stat().st_mode & 0o777 == file_mode
    assert (tmp_path / 'd').stat().st_mode & 0o777 == dir_mode


# --- item 17: the manifest hash depends only on content ---------------------------------------------------


def test_manifest_hash_does_not_depend_on_install_paths_or_versions(corpus):
    manifest = corpus.manifest
    text = json.dumps(manifest)
    moved = json.loads(text.replace('/', '/elsewhere/').replace('"3.', '"9.'))  # another install, same content
    moved['files'], moved['config'] = manifest['files'], manifest['config']  # (file names are content)
    moved['tokenizer'] = manifest['tokenizer']
    assert moved != manifest
    assert manifest_hash(moved) == manifest_hash(manifest) == manifest['manifest_hash']


def test_a_cache_with_the_previous_manifest_is_migrated_in_place(cache):
    root = cache / 'corpus' / 'v1'
    manifest = json.loads((root / 'manifest.json').read_text())
    current = manifest['manifest_hash']
    # The previous format: install paths and versions inside each domain's sources, all of it hashed.
    install = manifest.pop('install')
    for domain, entry in manifest['domains'].items():
        entry['sources'].update(install[domain])
    manifest['manifest_hash'] = manifest_hash({k: v for k, v in manifest.items() if k != 'manifest_hash'})
    atomic_write_json(root / 'manifest.json', manifest)
    shard_mtime = (root / SHARD).stat().st_mtime_ns
    migrated = ensure_corpus(cache_dir=cache)
    assert migrated.manifest['manifest_hash'] == current
    assert (root / SHARD).stat().st_mtime_ns == shard_mtime  # not rebuilt
    assert verify_corpus(root) == []


# --- item 11: an unwritable cache directory -------------------------------------------------------------


def _without_root_override():
    """In the child: drop the capabilities that let root write anywhere, so directory modes apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the bounding set at exec
            raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')


def test_read_only_empty_cache_gives_a_clear_error(cli_env):
    read_only = Path(tempfile.mkdtemp(prefix='composer-ext-ro-'))
    try:
        read_only.chmod(0o555)
        env = {**cli_env, 'COMPOSER_EXT_CACHE': str(read_only)}
        probe = subprocess.run(['touch', str(read_only / 'probe')], preexec_fn=_without_root_override,
                               capture_output=True)
        if probe.returncode == 0:
            pytest.skip('this user can write into a 0555 directory (root with capabilities that cannot be dropped)')
        proc = subprocess.run(composer_ext_cmd() + ['data', 'path'], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300, preexec_fn=_without_root_override)
        assert proc.returncode == 2, proc.stderr
        assert 'Traceback' not in proc.stderr
        assert str(read_only) in proc.stderr and 'COMPOSER_EXT_CACHE' in proc.stderr and 'writable' in proc.stderr
    finally:
        read_only.chmod(0o755)
        shutil.rmtree(read_only, ignore_errors=True)
