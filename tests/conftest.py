"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared beside the checkout: FairFace images and offline weights, present on development machines.
SHARED_ROOT = Path(__file__).resolve().parents[1].parent / "shared"


def require_shared(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it when RC_REQUIRE_SHARED=1."""
    if path.exists():
        return path
    message = f"shared data not found: {path} (set RC_REQUIRE_SHARED=1 to make this a failure)"
    if os.environ.get("RC_REQUIRE_SHARED", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"RC_REQUIRE_SHARED is set but {path} is absent")
    pytest.skip(message)


@pytest.fixture
def shared_dir(request) -> Path:
    """The ../shared folder. Paths given to the test's ``shared`` marker, relative to it, must exist too:

    ``@pytest.mark.shared("data/fairface")`` skips (or fails, with RC_REQUIRE_SHARED=1) without them.
    """
    root = require_shared(SHARED_ROOT)
    marker = request.node.get_closest_marker("shared")
    for relative in (marker.args if marker else ()):
        require_shared(root / relative)
    return root
