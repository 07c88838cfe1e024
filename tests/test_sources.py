"""The six text domains read real text from installed packages, and say which package is missing."""

import pytest

from composer_ext.data import sources
from composer_ext.data.sources import DOMAINS, MissingSourceError, iter_documents, source_info


@pytest.mark.parametrize('domain', DOMAINS)
def test_domain_has_megabytes_of_unique_documents(domain):
    docs = list(iter_documents(domain))
    assert len({d.key for d in docs}) == len(docs)
    assert sum(len(d.text.encode()) for d in docs) > 1_000_000
    assert all(d.text.strip() for d in docs)
    info = source_info(domain)
    assert info.packages and info.paths


def test_code_domain_excludes_tests_and_idlelib():
    keys = [d.key for d in iter_documents('code')]
    assert 'json/decoder.py' in keys
    assert not [k for k in keys if k.split('/')[0] in ('test', 'tests', 'idlelib') or '/tests/' in k]


def test_legal_domain_strips_yaml_header():
    doc = next(d for d in iter_documents('legal') if d.key == 'mit')
    assert not doc.text.startswith('---') and 'key: mit' not in doc.text
    assert 'Permission is hereby granted' in doc.text


def test_prose_domain_has_bible_chapters_and_fortunes():
    keys = [d.key for d in iter_documents('prose')]
    assert 'kjv/Genesis 1' in keys and 'kjv/Revelation 22' in keys
    assert sum(k.startswith('kjv/') for k in keys) == 1189  # chapters of the KJV
    assert any(k.startswith('fortunes/') for k in keys)


def test_missing_debian_source_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, '_PARI_DIR', tmp_path / 'nothing')
    with pytest.raises(MissingSourceError, match=r"pari-doc.*apt-get install -y pari-doc"):
        list(iter_documents('math'))


def test_missing_bible_command_names_the_package(monkeypatch):
    monkeypatch.setattr(sources.shutil, 'which', lambda name: None)
    with pytest.raises(MissingSourceError, match='bible-kjv'):
        list(iter_documents('prose'))


def test_missing_pip_source_names_the_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'chitchat_dataset' else real(name, *a))
    with pytest.raises(MissingSourceError, match='pip install chitchat-dataset'):
        list(iter_documents('dialogue'))


def test_unknown_domain():
    with pytest.raises(ValueError, match="domain='poetry'.*Fix: use one of"):
        iter_documents('poetry')
