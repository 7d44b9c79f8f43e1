"""The colab/ notebooks run top to bottom with TFQ_FAST=1 (tiny settings), so they cannot rot.

Each notebook asserts its own results (accuracy above chance, learned grids, export parity, ...);
a failing cell fails the test with the cell's traceback. All six run in `make test`: 197 s together
on this 2-core machine (`pytest tests/test_notebooks.py`, 8 tests).
"""
import os
import sys

import pytest

from tfq import data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = ("lsq_plus", "n2uq", "ddq", "adaqat", "pwlq", "end_to_end")
TIMEOUT = 600  # seconds per cell

needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(data.data_dir(), "t10k-labels-idx1-ubyte.gz")),
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")


def _execute(nb, tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_FAST", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def _stdout(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def test_kernel_is_this_virtualenv(tmp_path, monkeypatch):
    """The python3 kernel resolves to the interpreter running the tests (the venv)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys; print(sys.prefix); print(os.environ['TFQ_FAST'])")]
    out = _stdout(_execute(nb, tmp_path, monkeypatch)).split()
    assert os.path.realpath(out[0]) == os.path.realpath(sys.prefix)  # the venv, not the base interpreter
    assert out[1] == "1"


def test_every_notebook_is_valid_and_guards_its_colab_install():
    assert sorted(f[:-6] for f in os.listdir(COLAB) if f.endswith(".ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
        nbformat.validate(nb)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        install = code[0]
        assert "if IN_COLAB:" in install and "pip" in install.split("if IN_COLAB:")[1]
        assert "pip" not in install.split("if IN_COLAB:")[0]       # nothing installed outside Colab
        assert any('os.environ.get("TFQ_FAST"' in c for c in code)  # tiny settings under TFQ_FAST=1
        assert any("assert " in c for c in code)                    # checks its results
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean


def _run(name, tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
    return _stdout(_execute(nb, tmp_path, monkeypatch))


@needs_fashion
def test_end_to_end_notebook(tmp_path, monkeypatch):
    out = _run("end_to_end", tmp_path, monkeypatch)
    assert "IntegerGraph bit-exact with the reference kernels: True" in out


@needs_fashion
@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n != "end_to_end"])
def test_method_notebook(name, tmp_path, monkeypatch):
    out = _run(name, tmp_path, monkeypatch)
    assert "FAST" in out  # the settings cell ran in the tiny configuration
