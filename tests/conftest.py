"""Shared fixtures: tiny random SD1.5-like and SDXL-like models, built in code (no download)."""

import copy
import os
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="ncp-tests-hf-home-")  # manifests and prompt sets: never the user's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sample  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_models():
    return {kind: sample.build_tiny(kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(params=["sd15", "sdxl"])
def models(request, _tiny_models):
    """A fresh copy of a tiny model (tests may add adapters or change weights), both kinds."""
    m = copy.deepcopy(_tiny_models[request.param])
    for module in [m.unet, m.vae, *m.text_encoders]:
        module.requires_grad_(False).eval()
    return m
