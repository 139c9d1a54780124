"""Shared fixtures: tiny random SD1.5-like and SDXL-like models, built in code (no download)."""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="ncp-tests-hf-home-")  # manifests and prompt sets: never the user's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sample  # noqa: E402
from helpers import frozen_copy  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_models():
    return {kind: sample.build_tiny(kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(params=["sd15", "sdxl"])
def models(request, _tiny_models):
    """A fresh copy of a tiny model (tests may add adapters or change weights), both kinds."""
    return frozen_copy(_tiny_models[request.param])
