"""Shared test fixtures."""

import shutil

import pytest
import torch

from pipeline.data import generate_synthetic


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: on 2 (possibly shared) cores the small models
    of these tests run many times faster without oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generated(request, tmp_path_factory):
    """A synthetic VOC-layout tree generated from the test module's ``SYN`` config, shared by
    the module's tests (read-only)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "tree"
    generate_synthetic(root, request.module.SYN)
    return root


@pytest.fixture
def tree(generated, tmp_path):
    """A private copy of ``generated`` the test may modify."""
    root = tmp_path / "tree"
    shutil.copytree(generated, root)
    return root
