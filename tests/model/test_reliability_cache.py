"""The inversion cache is an optimisation, never a failure (issue 14): a cache file is used only
when its structure, dtypes, shapes, finiteness and checksum are right; anything else is
ignored with a warning and the images are inverted again; a cache that cannot be written
leaves the edit going."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffeditor.attention import MemoryBank
from diffeditor.engine import CACHE_FORMAT, Inversion, InversionCache, _cache_checksum

KEY = "k" * 64


def _inversion(steps: int = 3) -> Inversion:
    g = torch.Generator().manual_seed(0)
    latents = {"source": [torch.randn(1, 4, 8, 8, generator=g) for _ in range(steps + 1)]}
    bank = MemoryBank(image_index={"source": 0}, latent_hw=(8, 8), record_steps=frozenset({0, 1}))
    for s in (0, 1):
        bank.store[(s, "up.1.attn")] = (torch.randn(1, 64, 8, generator=g),
                                       torch.randn(1, 64, 8, generator=g))
    return Inversion(latents, bank, 1.5)


def _saved(tmp_path) -> tuple[InversionCache, dict]:
    cache = InversionCache(2, tmp_path)
    cache.put(KEY, _inversion())
    path = cache._path(KEY)
    return cache, torch.load(path, weights_only=True)


def _rewrite(tmp_path, data: dict, checksum: bool = True) -> None:
    if checksum and isinstance(data, dict) and "checksum" in data:
        try:
            data["checksum"] = _cache_checksum(data)
        except (KeyError, ValueError, TypeError):  # too broken to checksum: the old one stays
            pass
    torch.save(data, InversionCache(1, tmp_path)._path(KEY))


def test_round_trip_is_exact(tmp_path):
    _saved(tmp_path)
    again = InversionCache(2, tmp_path).get(KEY)  # a new process: from disk
    ref = _inversion()
    assert again is not None
    for a, b in zip(again.latents["source"], ref.latents["source"]):
        assert torch.equal(a, b)
    assert again.bank.store.keys() == ref.bank.store.keys()
    assert again.bank.record_steps == frozenset({0, 1}) and again.seconds == 1.5


def _nan_latent(d):
    d["latents"]["source"][1][0, 0, 0, 0] = float("nan")


def _inf_bank(d):
    d["bank"]["0|up.1.attn"][0][0, 0, 0] = float("inf")


def _wrong_shape(d):
    d["latents"]["source"][2] = torch.zeros(1, 4, 8, 9)


def _int_dtype(d):
    d["latents"]["source"] = [z.to(torch.int64) for z in d["latents"]["source"]]


def _bank_not_pair(d):
    d["bank"]["0|up.1.attn"] = [d["bank"]["0|up.1.attn"][0]]


def _bank_bad_step(d):
    d["bank"]["99|up.1.attn"] = d["bank"].pop("0|up.1.attn")


def _missing_field(d):
    del d["image_index"]


def _other_key(d):
    d["key"] = "x" * 64


def _other_format(d):
    d["format"] = CACHE_FORMAT + 1


def _index_mismatch(d):
    d["image_index"] = {"reference": 0}


def _steps_mismatch(d):
    d["latents"]["reference"] = d["latents"]["source"][:2]
    d["image_index"]["reference"] = 1


def _negative_seconds(d):
    d["seconds"] = -1.0


@pytest.mark.parametrize("damage", [
    _nan_latent, _inf_bank, _wrong_shape, _int_dtype, _bank_not_pair, _bank_bad_step,
    _missing_field, _other_key, _other_format, _index_mismatch, _steps_mismatch,
    _negative_seconds,
], ids=lambda f: f.__name__.strip("_"))
def test_wrong_content_with_a_valid_checksum_is_ignored(tmp_path, caplog, damage):
    """Even a file whose checksum was recomputed after the damage is refused by the checks."""
    _, data = _saved(tmp_path)
    damage(data)
    _rewrite(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="diffeditor"):
        assert InversionCache(2, tmp_path).get(KEY) is None
    assert "ignoring inversion cache file" in caplog.text


@pytest.mark.parametrize("payload", [
    [1, 2, 3], "a string", {"key": KEY}, None, {"format": CACHE_FORMAT},
], ids=["list", "str", "dict-missing-fields", "none", "only-format"])
def test_wrong_structure_is_ignored(tmp_path, caplog, payload):
    _rewrite(tmp_path, payload, checksum=False)
    with caplog.at_level(logging.WARNING, logger="diffeditor"):
        assert InversionCache(2, tmp_path).get(KEY) is None
    assert "ignoring inversion cache file" in caplog.text


def test_changed_value_without_a_new_checksum_is_refused(tmp_path, caplog):
    _, data = _saved(tmp_path)
    data["latents"]["source"][1][0, 0, 0, 0] += 1e-3
    _rewrite(tmp_path, data, checksum=False)
    with caplog.at_level(logging.WARNING, logger="diffeditor"):
        assert InversionCache(2, tmp_path).get(KEY) is None
    assert "checksum" in caplog.text


def test_every_flipped_byte_is_caught(tmp_path):
    """Flip bytes across the file (the zip container, headers, tensor data): every load either
    fails (ignored) or, never, returns data different from what was saved."""
    _saved(tmp_path)
    path = InversionCache(1, tmp_path)._path(KEY)
    raw = path.read_bytes()
    ref = _inversion()
    rng = np.random.default_rng(0)
    for pos in sorted(set(rng.integers(0, len(raw), 60).tolist())):
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0x10]) + raw[pos + 1:])
        got = InversionCache(1, tmp_path).get(KEY)
        if got is not None:  # a flip in bytes nobody reads (zip padding, unused metadata)
            for a, b in zip(got.latents["source"], ref.latents["source"]):
                assert torch.equal(a, b), pos


@pytest.mark.parametrize("content", [b"", b"damaged", b"PK\x03\x04" + b"\x00" * 40])
def test_unreadable_file_is_ignored(tmp_path, content):
    InversionCache(1, tmp_path)._path(KEY).write_bytes(content)
    assert InversionCache(1, tmp_path).get(KEY) is None


def test_malicious_pickle_in_the_cache_is_refused_not_run(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')",))

    InversionCache(1, tmp_path)._path(KEY).write_bytes(pickle.dumps(Boom()))
    assert InversionCache(1, tmp_path).get(KEY) is None
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_unwritable_cache_warns_once_and_keeps_going(tmp_path, caplog, where):
    (tmp_path / "f").write_text("x")
    folder = tmp_path / "f" if where == "a-file" else tmp_path / "f" / "sub"
    cache = InversionCache(2, folder)
    with caplog.at_level(logging.WARNING, logger="diffeditor"):
        cache.put(KEY, _inversion())
        cache.put("j" * 64, _inversion())
    assert cache.get(KEY) is not None  # still served from memory
    warnings = [r for r in caplog.records if "cannot write the inversion cache" in r.getMessage()]
    assert len(warnings) == 1
    assert (tmp_path / "f").read_text() == "x"


def test_nan_cache_file_under_the_right_key_is_not_used(editor, tmp_path, caplog):
    """End to end: a cache file with NaN latents under the edit's own key (checksum made to
    match) gave a black image reported as a cached inversion; it is refused and recomputed."""
    from conftest import write_disc_scene

    write_disc_scene(tmp_path)
    spec = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [12, 0], "steps": 2,
            "prompt": "nan-cache"}
    eng = editor.engine
    saved = eng.cache
    try:
        eng.cache = InversionCache(2, tmp_path / "cache")
        first = editor.edit(spec, base_dir=tmp_path)
        (path,) = (tmp_path / "cache").glob("*.pt")
        data = torch.load(path, weights_only=True)
        for z in data["latents"]["source"]:
            z.fill_(float("nan"))
        data["checksum"] = _cache_checksum(data)
        torch.save(data, path)
        eng.cache = InversionCache(2, tmp_path / "cache")  # a new process
        with caplog.at_level(logging.WARNING, logger="diffeditor"):
            again = editor.edit(spec, base_dir=tmp_path)
    finally:
        eng.cache = saved
    assert not again.metadata["inversion_cached"] and "NaN" in caplog.text
    assert np.asarray(again.image).std() > 5  # an image, not a black frame
    torch.testing.assert_close(again.latent, first.latent)
