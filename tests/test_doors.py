"""``import ditq`` offers the doors (load, save, describe, quantize_, the configs, sample, evaluate), imported
on first use, so ``import ditq`` and ``ditq --version`` pay for neither torch nor the model code."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ditq


def test_import_ditq_loads_no_torch():
    code = "import sys, ditq; print('torch' in sys.modules, sorted(m for m in sys.modules if 'ditq' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['ditq', 'ditq.errors']"


def test_the_doors_are_the_library_functions():
    from ditq import eval as ditq_eval
    from ditq import formats, quant
    from ditq.pipelines.sample import sample

    assert ditq.load is formats.load and ditq.save is formats.save and ditq.describe is formats.describe
    assert ditq.quantize_ is quant.quantize_ and ditq.QDiTConfig is quant.QDiTConfig
    assert ditq.GPTQConfig is quant.GPTQConfig and ditq.TernaryQATConfig is quant.TernaryQATConfig
    assert ditq.sample is sample and ditq.evaluate is ditq_eval.evaluate
    assert set(ditq.__all__) <= set(dir(ditq))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        ditq.lod  # noqa: B018
