"""Fail at import, with the fix, on a transformers version the plugin was not tested with."""

from importlib.metadata import version

from packaging.version import Version


TESTED_TRANSFORMERS = (Version("5.24.0"), Version("5.25.0"))  # [lower, upper)


def check_transformers_version() -> None:
    """Raise `ImportError` unless the installed transformers lies in the tested range."""
    installed = Version(version("transformers"))
    lower, upper = TESTED_TRANSFORMERS
    if not lower <= Version(installed.base_version) < upper:
        raise ImportError(
            f"hf_flexattention is tested with transformers >={lower},<{upper} but {installed} is installed. It hooks "
            f"internal contracts (attention and mask interfaces, cache, generate) that change between minor releases: "
            f'run `pip install "transformers>={lower},<{upper}"`.'
        )
