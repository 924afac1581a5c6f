"""Every example spec in ``specs/`` gives the same PNG, bit for bit, as when the hashes in
``tests/data/spec_hashes.json`` were written (shapes model, CPU, float32, the spec's seed,
``steps`` overridden to a small count where every schedule window is still non-empty).

A refactor of the sampler must keep these green. Regenerate the file only for a deliberate
change of the maths: ``python tools/spec_hashes.py --write`` (it pins one
thread: the bits depend on the thread count) on the CPU whose set changes; the file keeps
one set per CPU family, as the low bits differ between them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if REPO.name == "mutants":
    REPO = REPO.parent
DATA = json.loads((REPO / "tests" / "data" / "spec_hashes.json").read_text())


def _tool():
    spec = importlib.util.spec_from_file_location("spec_hashes", REPO / "tools" / "spec_hashes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_spec_has_a_hash():
    tool = _tool()
    names = {p.name for p in (REPO / "specs").glob("*.yaml")} | set(tool.EXTRA)
    assert DATA["machines"]
    # one family's set is complete; the others may lack the specs whose hash a deliberate
    # change made stale (tools/spec_hashes.py drops them) but hold nothing else
    assert any(names == set(h) for h in DATA["machines"].values()), \
        "run tools/spec_hashes.py --write for new specs"
    for key, hashes in DATA["machines"].items():
        assert set(hashes) <= names, f"{key}: hashes of specs that no longer exist"
    assert tool.STEPS == DATA["steps"]


def test_a_changed_hash_drops_the_stale_entries_of_the_other_families():
    tool = _tool()
    machines = {"AuthenticAMD": {"a": "1", "b": "2"}, "GenuineIntel/AVX512": {"a": "3", "b": "4"}}
    out = tool.merge(machines, "GenuineIntel/AVX512", {"a": "3", "b": "5", "c": "6"})
    assert out == {"AuthenticAMD": {"a": "1"}, "GenuineIntel/AVX512": {"a": "3", "b": "5", "c": "6"}}
    assert machines["AuthenticAMD"] == {"a": "1", "b": "2"}  # not mutated
    # a new family's first set changes nothing elsewhere
    assert tool.merge(machines, "GenuineIntel/AVX2", {"a": "9"})["AuthenticAMD"] == {"a": "1", "b": "2"}


def test_the_hashes_are_found_by_vendor_and_capability():
    tool = _tool()
    data = {"machines": {"AuthenticAMD": {"a": "1"}, "GenuineIntel/AVX512": {"a": "2"}}}
    assert tool.hashes_for(data, "AuthenticAMD/AVX2") == {"a": "1"}
    assert tool.hashes_for(data, "GenuineIntel/AVX512") == {"a": "2"}
    assert tool.hashes_for(data, "GenuineIntel/AVX2") is None
    assert tool.machine().count("/") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set().union(*DATA["machines"].values())))
def test_example_spec_png_is_bit_identical(name, editor_shapes):
    if name == "face.yaml":
        pytest.importorskip("dlib", reason="the face task needs the 'face' extra")
    tool = _tool()
    key = tool.machine()
    want = tool.hashes_for(DATA, key)
    if want is None:
        pytest.skip(f"no hashes recorded for a {key} CPU (the low bits differ by CPU family): "
                    f"run python tools/spec_hashes.py --write on a trusted commit to add them")
    if name not in want:
        pytest.skip(f"{name}: its hash changed on purpose on another CPU family and none is "
                    f"recorded for {key} yet: run python tools/spec_hashes.py --write here")
    file, overrides = tool.EXTRA.get(name, (name, None))
    got = tool.spec_hash(editor_shapes, REPO / "specs" / file, DATA["steps"], overrides)
    assert got == want[name], key
