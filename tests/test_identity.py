"""Images stay bit-identical across the restructure: a few cheap cases of benchmarks/identity_check.py recomputed
and compared with the digests made at the pre-restructure commit (76052ff; tests/data/identity_digests.json).

The full set (every kind on SD 1.5- and SDXL-shaped pipelines, img2img, inpainting, ControlNet, masks, two
adapters, the embedded world model, eval and the trainer's validation images) runs as
``python benchmarks/identity_check.py --compare tests/data/identity_digests.json`` (~2.5 min on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the world-* cases read the embedded model's shipped weights, retrained since (listed as changed on purpose)
CHEAP = ["sd15-global", "sd15-faceid-plus", "sd15-controls", "sd15-inpaint", "sd15-two-adapters"]


def _script():
    spec = importlib.util.spec_from_file_location("identity_check", ROOT / "benchmarks" / "identity_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cheap_cases_make_the_images_the_pre_restructure_package_made():
    script = _script()
    reference = json.loads((ROOT / "tests" / "data" / "identity_digests.json").read_text())
    assert set(CHEAP) <= set(reference["cases"])
    found = script.run(CHEAP)
    if found["probe"] != reference["probe"]:
        pytest.skip(f"this machine rounds floats unlike the one that made the reference (probe {found['probe']})")
    assert script.compare(found, reference) == []
