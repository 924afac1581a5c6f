"""Model folders (issue 14): a truncated weights file, a hostile pickle, an absurd or broken
config are one ModelError line, found before anything is allocated."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from diffeditor.cli import main
from diffeditor.errors import ModelError
from diffeditor.models import _bin_elements, check_model_folder


def _linked_copy(src: Path, dst: Path, replace: set[str]) -> Path:
    """A model folder of symlinks to ``src``'s files, except the ``replace`` ones, copied."""
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in replace:
            (dst / rel).write_bytes(f.read_bytes())
        else:
            os.symlink(f, dst / rel)
    return dst


TE = "text_encoder/model.safetensors"
UNET_CFG = "unet/config.json"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _break(folder: Path, case: str) -> None:
    te = folder / TE
    if case == "truncated-half":
        te.write_bytes(te.read_bytes()[: te.stat().st_size // 2])
    elif case == "truncated-4-bytes":
        te.write_bytes(te.read_bytes()[:4])
    elif case == "header-garbage":
        raw = te.read_bytes()
        te.write_bytes(raw[:8] + b"\xff" * 64 + raw[72:])
    elif case == "header-length-huge":
        raw = te.read_bytes()
        te.write_bytes((2**60).to_bytes(8, "little") + raw[8:])
    elif case == "malicious-bin":
        te.unlink()
        (folder / "text_encoder" / "pytorch_model.bin").write_bytes(
            pickle.dumps(Payload(folder / "pwned")))
    else:
        cfg = json.loads((folder / UNET_CFG).read_text())
        if case == "absurd-channels":
            cfg["block_out_channels"] = [100000] * 4
        elif case == "absurd-layers":
            cfg["layers_per_block"] = 10**7
        elif case == "huge-int":
            cfg["cross_attention_dim"] = 10**12
        elif case == "wrong-type":
            cfg["block_out_channels"] = "many"
        (folder / UNET_CFG).unlink()
        (folder / UNET_CFG).write_text(json.dumps(cfg))
    if case == "config-not-json":
        (folder / UNET_CFG).write_text("{not json")
    elif case == "config-a-list":
        (folder / UNET_CFG).write_text("[1, 2]")


CASES = {
    "truncated-half": "truncated or damaged", "truncated-4-bytes": "truncated or damaged",
    "header-garbage": "truncated or damaged", "header-length-huge": "truncated or damaged",
    "malicious-bin": "refused", "absurd-channels": "does not match the weights",
    "absurd-layers": "not a real model's", "huge-int": "not a real model's",
    "wrong-type": "not a valid UNet2DConditionModel config",
    "config-not-json": "not a readable JSON file", "config-a-list": "expected a JSON mapping",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_folder_is_one_line_before_allocation(shapes_model, tmp_path, case):
    folder = _linked_copy(shapes_model, tmp_path / "m", {TE, UNET_CFG})
    _break(folder, case)
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as info:
        check_model_folder(folder)
    assert time.perf_counter() - t0 < 30
    msg = str(info.value)
    assert CASES[case] in msg and "\n" not in msg and len(msg) < 400, msg
    assert not (folder / "pwned").exists()


def test_the_real_folder_passes(shapes_model):
    check_model_folder(shapes_model)


@pytest.mark.parametrize("case", ["truncated-half", "malicious-bin", "absurd-channels"])
def test_cli_reports_a_bad_model_in_one_line(shapes_model, tmp_path, capsys, case):
    from conftest import write_disc_scene

    folder = _linked_copy(shapes_model, tmp_path / "m", {TE, UNET_CFG})
    _break(folder, case)
    write_disc_scene(tmp_path)
    (tmp_path / "s.yaml").write_text("task: move\nimage: i.png\nmask: m.png\noffset: [5, 0]\n")
    code = main(["edit", str(tmp_path / "s.yaml"), "--model", str(folder), "--device", "cpu",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and CASES[case] in err, err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()
    assert not (folder / "pwned").exists()


def test_plain_bin_weights_are_read_without_loading(tmp_path):
    torch.save({"a": torch.zeros(3, 4), "b": torch.ones(5)}, tmp_path / "w.bin")
    assert _bin_elements(tmp_path / "w.bin") == 17


@pytest.mark.slow
def test_nan_result_raises_instead_of_writing_a_black_image(shapes_model, tmp_path):
    """A model whose decoder gives NaN (a damaged weight, made here) must not produce a black
    image with exit 0: the edit raises one clear error."""
    from conftest import write_disc_scene
    from safetensors.torch import load_file, save_file

    from diffeditor import Editor
    from diffeditor.errors import DiffEditorError

    vae = "vae/diffusion_pytorch_model.safetensors"
    folder = _linked_copy(shapes_model, tmp_path / "m", {vae})
    weights = load_file(folder / vae)
    weights["decoder.conv_out.bias"][0] = float("nan")
    save_file(weights, folder / vae)
    editor = Editor.from_pretrained(str(folder), device="cpu", dtype="float32")
    write_disc_scene(tmp_path)
    with pytest.raises(DiffEditorError, match="non-finite values"):
        editor.edit({"task": "move", "image": "i.png", "mask": "m.png", "offset": [8, 0],
                     "steps": 2}, base_dir=tmp_path)
