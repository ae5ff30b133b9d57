import pytest

from hf_flexattention import _version_check


@pytest.mark.parametrize("installed", ["5.23.9", "5.25.0", "6.0.0"])
def test_an_untested_transformers_fails_at_import_with_the_fix(monkeypatch, installed):
    monkeypatch.setattr(_version_check, "version", lambda _: installed)
    with pytest.raises(ImportError, match=r'pip install "transformers>=5.24.0,<5.25.0"'):
        _version_check.check_transformers_version()


@pytest.mark.parametrize("installed", ["5.24.0", "5.24.3", "5.24.1.dev0"])
def test_the_tested_range_passes(monkeypatch, installed):
    monkeypatch.setattr(_version_check, "version", lambda _: installed)
    _version_check.check_transformers_version()
