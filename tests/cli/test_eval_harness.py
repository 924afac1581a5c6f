"""The evaluation plugin (plugins/diffeditor-eval): DragBench loader, metrics, CLI wiring."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# An installed diffeditor-eval (or PYTHONPATH) wins; otherwise use the source tree.
sys.path.append(str(Path(__file__).resolve().parents[2] / "plugins/diffeditor-eval/src"))

from diffeditor_eval import dragbench as DB
from diffeditor_eval import metrics as M
from diffeditor_eval import plugin

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DIFFEDITOR_SHARED", REPO.parent / "shared"))
SAMPLE = SHARED / "data" / "dragbench-sample"

needs_sample = pytest.mark.skipif(
    not (SAMPLE / "README.md").is_file(),
    reason=f"DragBench sample not found at {SAMPLE} (set DIFFEDITOR_SHARED to the shared/ folder)",
)


@pytest.fixture(scope="module")
def sample_cases():
    if not (SAMPLE / "README.md").is_file():
        pytest.skip(
            f"DragBench sample not found at {SAMPLE} (set DIFFEDITOR_SHARED to the shared/ folder)"
        )
    return {c.key: c for c in DB.iter_dragbench(SAMPLE)}


def _write_case(folder: Path, meta_bytes: bytes, size=(16, 12)) -> Path:
    folder.mkdir(parents=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / DB.IMAGE_FILE)
    (folder / DB.META_FILE).write_bytes(meta_bytes)
    return folder


def _meta(points, mask_shape=(12, 16), prompt="p"):
    return pickle.dumps(
        {"prompt": prompt, "points": points, "mask": np.ones(mask_shape, np.uint8)}, protocol=4
    )


# -- DragBench loader on the real sample ---------------------------------------------------------


@needs_sample
def test_sample_loads_all_ten_cases(sample_cases):
    assert len(sample_cases) == 10
    assert len({c.category for c in sample_cases.values()}) == 10
    for case in sample_cases.values():
        w, h = case.image.size
        assert w == 512 and 288 <= h <= 913
        assert case.mask.shape == (h, w) and case.mask.dtype == bool
        assert 0 < case.mask.mean() < 1
        assert case.handles.shape == case.targets.shape and case.handles.shape[1] == 2
        for pts in (case.handles, case.targets):
            assert (pts >= 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] < h).all()
        assert isinstance(case.prompt, str) and case.prompt


@needs_sample
def test_sample_awkward_cases_match_readme(sample_cases):
    tall = sample_cases["human_upper_body/SY_2023-09-15-1912-30"]
    assert tall.image.size == (512, 913)
    zero = sample_cases["interior_design/SY_2023-09-15-1656-05"]
    assert len(zero.handles) == 6
    assert (zero.drag_lengths == 0).sum() >= 1
    city = sample_cases["building_city_view/YAN_2023-09-15-2236-24"]
    assert city.image.size == (512, 341) and len(city.handles) == 4
    longest = sample_cases["other_objects/JH_2023-09-15-1020-36"]
    assert longest.drag_lengths.max() == pytest.approx(428, abs=0.5)
    assert max(c.drag_lengths.max() for c in sample_cases.values()) == longest.drag_lengths.max()
    otter = sample_cases["animals/JH_2023-09-14-1827-57"]
    assert otter.prompt == "a photo of a otter"
    np.testing.assert_array_equal(otter.handles, [[270, 337]])
    np.testing.assert_array_equal(otter.targets, [[258, 273]])


@needs_sample
def test_single_case_folder_is_a_root(sample_cases):
    folder = SAMPLE / "animals" / "JH_2023-09-14-1827-57"
    (case,) = DB.iter_dragbench(folder)
    assert case.name == folder.name and case.category is None


# -- untrusted pickles ---------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _Evil(marker)}, protocol=4
    )
    # sanity: the payload really would run os.system under a plain pickle.load
    assert b"system" in payload
    folder = _write_case(tmp_path / "evil", payload)
    with pytest.raises(DB.UnsafePickleError, match=r"(posix|nt|os)\.system") as info:
        DB.load_case(folder)
    assert str(folder / DB.META_FILE) in str(info.value)
    assert not marker.exists()
    with pytest.raises(DB.UnsafePickleError):
        list(DB.iter_dragbench(tmp_path, strict=False))  # never skipped silently
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=4),  # builtins.eval: a builtin, but not an allowed one
        pickle.dumps(np.array([1, "a"], dtype=object), protocol=4),  # object arrays
        pickle.dumps(np.ma.masked_array([1, 2]), protocol=4),  # ndarray subclasses
    ],
    ids=["builtins.eval", "object-array", "ndarray-subclass"],
)
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(DB.UnsafePickleError):
        DB.restricted_load(payload)


def test_restricted_unpickler_reads_plain_arrays_and_scalars():
    data = {
        "a": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "s": np.int64(7),
        "f": np.float32(0.5),
        "l": [1, (2, 3)],
    }
    for protocol in (2, 4, 5):
        out = DB.restricted_load(pickle.dumps(data, protocol=protocol))
        np.testing.assert_array_equal(out["a"], data["a"])
        assert out["s"] == 7 and out["f"] == 0.5 and out["l"] == [1, (2, 3)]


class _Crafted:
    """Pickles as ``func(*args)`` followed by BUILD with ``state``: hand-made numpy payloads."""

    def __init__(self, func, args, state):
        self.reduced = (func, args, state)

    def __reduce__(self):
        return self.reduced


def _dtype_u1(state=(3, "|", None, None, None, -1, -1, 0)):
    return _Crafted(np.dtype, ("u1", False, True), state)


def _array(dtype, raw, shape=(2,)):
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    return _Crafted(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


def test_numpy_state_is_validated_not_trusted():
    ok = DB.restricted_load(pickle.dumps({"m": _array(_dtype_u1(), b"\x01\x02")}, protocol=4))
    np.testing.assert_array_equal(ok["m"], [1, 2])
    assert type(ok["m"]) is np.ndarray and ok["m"].flags.writeable
    # dtype flags claiming "holds Python objects" (NPY_ITEM_REFCOUNT, ...) are ignored
    lying = DB.restricted_load(
        pickle.dumps(_array(_dtype_u1((3, "|", None, None, None, -1, -1, 63)), b"ab"), protocol=4)
    )
    assert not lying.dtype.hasobject and lying.tolist() == [97, 98]
    with pytest.raises(DB.UnsafePickleError, match="structured"):
        DB.restricted_load(
            pickle.dumps(_dtype_u1((3, "|", None, ("a",), {"a": None}, 1, 1, 0)), protocol=4)
        )
    with pytest.raises(DB.UnsafePickleError, match="3 bytes for shape"):
        DB.restricted_load(pickle.dumps(_array(_dtype_u1(), b"abc"), protocol=4))
    with pytest.raises(DB.UnsafePickleError, match="object arrays"):
        DB.restricted_load(pickle.dumps(_array(_dtype_u1(), [1, 2]), protocol=4))


def test_odd_point_count_names_the_file(tmp_path):
    folder = _write_case(tmp_path / "odd", _meta([[1, 1], [2, 2], [3, 3]]))
    with pytest.raises(DB.DragBenchFormatError, match="odd") as info:
        DB.load_case(folder)
    assert str(folder / DB.META_FILE) in str(info.value)


def test_mask_size_and_point_range_are_checked(tmp_path):
    with pytest.raises(DB.DragBenchFormatError, match="shape"):
        DB.load_case(_write_case(tmp_path / "a", _meta([[1, 1], [2, 2]], mask_shape=(16, 12))))
    with pytest.raises(DB.DragBenchFormatError, match="outside the 16x12 image"):
        DB.load_case(_write_case(tmp_path / "b", _meta([[1, 1], [16, 2]])))
    good = DB.load_case(_write_case(tmp_path / "c", _meta([[1, 1], [15, 11]])))
    assert good.handles.tolist() == [[1, 1]] and good.targets.tolist() == [[15, 11]]
    cases = list(DB.iter_dragbench(tmp_path, strict=False))
    assert [c.name for c in cases] == ["c"]


# -- case_to_spec --------------------------------------------------------------------------------


@needs_sample
def test_case_to_spec_writes_mask_and_relative_paths(sample_cases, tmp_path):
    case = sample_cases["interior_design/SY_2023-09-15-1656-05"]
    out = tmp_path / "specs" / "interior"
    spec = DB.case_to_spec(case, out)
    assert spec["task"] == "drag" and spec["prompt"] == case.prompt
    assert spec["handles"] == case.handles.astype(int).tolist()
    assert spec["targets"] == case.targets.astype(int).tolist()
    assert not Path(spec["image"]).is_absolute() and not Path(spec["mask"]).is_absolute()
    mask = np.asarray(Image.open(out / spec["mask"]))
    assert mask.shape == case.mask.shape
    np.testing.assert_array_equal(mask == 255, case.mask)
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / spec["image"]).size == case.image.size
    assert json.loads((out / "spec.json").read_text()) == spec

    ref = DB.case_to_spec(case, tmp_path / "ref", copy_image=False, spec_name=None)
    assert not Path(ref["image"]).is_absolute()
    assert (tmp_path / "ref" / ref["image"]).resolve() == case.image_path.resolve()
    assert not (tmp_path / "ref" / "spec.json").exists()


# -- MD ------------------------------------------------------------------------------------------


def _one_hot(h: int, w: int) -> torch.Tensor:
    """(h*w, h, w): the feature of cell (y, x) is the basis vector y*w + x."""
    return torch.eye(h * w).reshape(h * w, h, w)


def test_md_one_hot_exact_at_feature_resolution():
    f0 = _one_hot(10, 12)
    f1 = torch.roll(f0, shifts=(2, 3), dims=(1, 2))  # content moved by dx=3, dy=2
    handles = [[1, 1], [5, 4], [8, 6]]
    moved = [[4, 3], [8, 6], [11, 8]]
    res = M.mean_distance(f0, f1, handles, moved, (12, 10))
    assert res["md"] == 0.0 and res["matches"] == moved
    assert res["metric"] == M.MD_VARIANT == "MD (DIFT, global search, unnormalised px)"
    # targets 3-4-5 away from where the content really went
    res = M.mean_distance(f0, f1, handles, [[7, 7], [8, 6], [11, 3]], (12, 10))
    assert res["distances"] == pytest.approx([5.0, 0.0, 5.0])
    assert res["md"] == pytest.approx(10 / 3)


def test_md_upsampled_features_match_the_exact_pixel():
    # 8x8 features on a 32x32 image: bilinear upsampling makes each pixel a unique mix of cells,
    # so the best match of a handle is exactly the handle moved by the shift (4 px per cell).
    f0 = _one_hot(8, 8)
    f1 = torch.roll(f0, shifts=(1, 2), dims=(1, 2))
    res = M.mean_distance(f0, f1, [[13, 10], [9, 14]], [[21, 14], [17, 18]], (32, 32))
    assert res["matches"] == [[21.0, 14.0], [17.0, 18.0]] and res["md"] == 0.0
    res = M.mean_distance(f0, f1, [[13, 10]], [[24, 18]], (32, 32), chunk=5)  # chunking is exact
    assert res["md"] == pytest.approx(5.0)


def test_md_cell_variant_maps_cells_back_to_pixel_centres():
    f0 = _one_hot(8, 8)
    f1 = torch.roll(f0, shifts=(1, 2), dims=(1, 2))
    res = M.mean_distance(f0, f1, [[5, 5]], [[13.5, 9.5]], (32, 32), upsample=False)
    assert res["metric"] == M.MD_VARIANT_CELLS
    assert res["matches"] == [[13.5, 9.5]] and res["md"] == 0.0


def test_md_rejects_mismatched_inputs():
    f = _one_hot(4, 4)
    with pytest.raises(ValueError, match="shape"):
        M.mean_distance(f, _one_hot(2, 2), [[0, 0]], [[1, 1]], (4, 4))
    with pytest.raises(ValueError, match="same non-zero number"):
        M.mean_distance(f, f, [[0, 0]], [[1, 1], [2, 2]], (4, 4))


# -- DIFT on a tiny random UNet ------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_dift(ensemble_size=3, **kwargs):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=50,
            hidden_size=12,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()

    class Tokenizer:  # a stand-in for CLIPTokenizer: hashes characters into the tiny vocabulary
        model_max_length = 8

        def __call__(self, prompts, padding, max_length, truncation, return_tensors):
            ids = [[(ord(c) % 48) + 1 for c in p][:max_length] for p in prompts]
            return {"input_ids": torch.tensor([i + [0] * (max_length - len(i)) for i in ids])}

    return M.DIFTFeatures(unet, vae, text, Tokenizer(), ensemble_size=ensemble_size, **kwargs)


def test_dift_features_shape_on_a_tiny_unet(one_thread):
    dift = _tiny_dift()
    # a height that is not a multiple of 8, as DragBench's 913-high image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 96, 3), dtype=np.uint8))
    block = dift.unet.up_blocks[1]
    ft = dift.features(image, "cat photo", seed=3)
    # latent 9x12 -> down 9x12, 5x6, 3x3; up_blocks[1] works at 5x6 and upsamples to 9x12
    assert ft.shape == (block.resnets[-1].out_channels, 9, 12)
    assert ft.dtype == torch.float32 and torch.isfinite(ft).all()
    assert not block._forward_hooks  # the hook is removed
    torch.testing.assert_close(dift(image, "cat photo", seed=3), ft)  # seeded: repeatable
    assert not torch.allclose(dift(image, "cat photo", seed=4), ft)
    assert not torch.allclose(dift(image, "dog photo", seed=3), ft)
    # the ensemble may run in smaller batches (memory); the result is still the ensemble mean
    small = _tiny_dift(ensemble_size=3, batch_size=2).features(image, "cat photo", seed=3)
    assert small.shape == ft.shape and torch.isfinite(small).all()
    # one noise sample equals one UNet pass read directly at the hooked block
    one = _tiny_dift(ensemble_size=1)
    embeds = one.encode_prompt("x")
    g = torch.Generator().manual_seed(5)
    latents = (
        one.vae.encode(one.image_tensor(image)).latent_dist.sample(generator=g)
        * one.vae.config.scaling_factor
    )
    noisy = one.scheduler.add_noise(
        latents, torch.randn(latents.shape, generator=g), torch.tensor([one.t])
    )
    torch.testing.assert_close(
        one.features(image, "x", seed=5), one.unet_features(noisy, one.t, embeds)[0]
    )
    # and the whole chain ends in MD
    md = M.mean_distance(ft, ft, [[10, 10]], [[10, 10]], image.size)
    assert md["md"] < 3.0


def test_dift_up_ft_index_is_checked(one_thread):
    with pytest.raises(ValueError, match="up_ft_index"):
        _tiny_dift(up_ft_index=3)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_dift_missing_weights_message(tmp_path):
    missing = tmp_path / "no-sd21-here"
    with pytest.raises(M.MetricWeightsMissing) as info:
        M.DIFTFeatures.from_pretrained(missing)
    msg = str(info.value)
    assert str(missing) in msg and M.SD21 in msg and "huggingface-cli download" in msg
    # a hub id, offline and not cached: the hub's OSError becomes MetricWeightsMissing
    with pytest.raises(M.MetricWeightsMissing, match="unet"):
        M.DIFTFeatures.from_pretrained("diffeditor-tests/not-a-real-model", local_files_only=True)


# -- IF ------------------------------------------------------------------------------------------


def test_image_fidelity_without_lpips_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    monkeypatch.setattr(M, "_LPIPS_CACHE", {})
    img = Image.new("RGB", (32, 32))
    with pytest.raises(M.MetricWeightsMissing, match=r"pip install .*lpips"):
        M.image_fidelity(img, img)


def test_image_fidelity_without_alexnet_weights_says_where_they_go(monkeypatch):
    class FakeLpips:
        @staticmethod
        def LPIPS(net, verbose):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setitem(sys.modules, "lpips", FakeLpips)
    monkeypatch.setattr(M, "_LPIPS_CACHE", {})
    with pytest.raises(M.MetricWeightsMissing, match=M.ALEXNET_FILE):
        M.image_fidelity(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))


def test_image_fidelity_feeds_224_images_in_minus_one_to_one():
    seen = []

    def fake_lpips(x, y):
        seen.append((x, y))
        return (x - y).abs().mean()

    a = Image.new("RGB", (512, 341), (255, 255, 255))
    b = Image.new("RGB", (300, 200), (0, 0, 0))
    assert M.image_fidelity(a, a, model=fake_lpips) == pytest.approx(1.0)
    assert M.image_fidelity(a, b, model=fake_lpips) == pytest.approx(1.0 - 2.0)
    x, y = seen[-1]
    assert x.shape == y.shape == (1, 3, 224, 224)
    assert x.max() == 1.0 and y.min() == -1.0


# -- landmark MSE and DAI ------------------------------------------------------------------------


def test_landmark_mse_known_values():
    target = np.zeros((68, 2))
    pred = target.copy()
    pred[0] = [3, 4]  # one point 5 px off
    assert M.landmark_mse(pred, target) == pytest.approx(25 / 68)
    assert M.landmark_mse(target + [1, 1], target) == pytest.approx(2.0)
    assert M.landmark_mse(np.stack([pred, target]), np.stack([target, target])) == pytest.approx(
        25 / 136
    )
    with pytest.raises(ValueError):
        M.landmark_mse(np.zeros((68, 2)), np.zeros((17, 2)))


def test_drag100_dai_known_values():
    orig = np.zeros((64, 64, 3), np.uint8)
    orig[18:23, 18:23] = (255, 0, 0)  # a 5x5 red square centred on the handle (20, 20)
    moved = np.zeros_like(orig)
    moved[38:43, 48:53] = (255, 0, 0)  # ... moved to the target (50, 40)
    handles, targets = [[20, 20]], [[50, 40]]
    assert M.drag100_dai(orig, moved, handles, targets) == {1: 0.0, 5: 0.0, 10: 0.0, 20: 0.0}
    stayed = M.drag100_dai(orig, orig, handles, targets, radii=(1, 2, 5))
    # the handle patch is red, the target patch black: 1 per red pixel (red channel only)
    assert stayed == pytest.approx({1: 1.0, 2: 1.0, 5: 25 / 121})
    grey = np.full_like(orig, 0)
    half = np.full(orig.shape, 0.5)
    assert M.drag100_dai(
        grey / 255.0, half, [[0, 0], [63, 63]], [[10, 10], [63, 0]]
    ) == pytest.approx({1: 0.75, 5: 0.75, 10: 0.75, 20: 0.75})
    # mean over pairs
    two = M.drag100_dai(orig, orig, [[20, 20], [5, 60]], [[50, 40], [5, 60]], radii=(1,))
    assert two == pytest.approx({1: 0.5})


# -- the CLI -------------------------------------------------------------------------------------


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffeditor")
    plugin.register_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_plugin_hook_validates_with_pluggy():
    from diffeditor.plugins import registry_from

    reg = registry_from([plugin])
    assert "register_commands" in next(p.hooks for p in reg.plugins() if "plugin" in p.name)


def test_package_exports_and_plugin_import_stays_light():
    import subprocess

    import diffeditor_eval

    assert diffeditor_eval.__all__ == sorted(diffeditor_eval._LAZY)
    assert diffeditor_eval.mean_distance is M.mean_distance
    assert diffeditor_eval.DragCase is DB.DragCase
    # plugin discovery imports diffeditor_eval.plugin: it must not pull in torch
    code = "import sys, diffeditor_eval.plugin; print('torch' in sys.modules)"
    src = str(REPO / "plugins" / "diffeditor-eval" / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"


def test_distribution_declares_the_entry_point():
    import tomllib

    meta = tomllib.loads((REPO / "plugins" / "diffeditor-eval" / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "diffeditor-eval"
    assert meta["project"]["entry-points"]["diffeditor"] == {"eval": "diffeditor_eval.plugin"}
    deps = " ".join(meta["project"]["dependencies"])
    assert "diffeditor" in deps and "lpips" not in deps  # lpips stays an optional extra
    assert "lpips" in " ".join(meta["project"]["optional-dependencies"]["lpips"])


def test_a_new_benchmark_is_one_function(monkeypatch):
    monkeypatch.setattr(plugin, "EVAL_COMMANDS", list(plugin.EVAL_COMMANDS))

    @plugin.eval_command
    def add_toy(benchmarks):
        benchmarks.add_parser("toy").set_defaults(func=lambda args: 0)

    args = _cli().parse_args(["eval", "toy"])
    assert args.benchmark == "toy" and args.func(args) == 0
    assert _cli().parse_args(["eval", "dragbench", "b", "--edited", "e"]).benchmark == "dragbench"


def test_eval_parser_has_dragbench_and_rejects_unknown_metrics(tmp_path):
    args = _cli().parse_args(["eval", "dragbench", "bench", "--edited", "out", "--json", "r.json"])
    assert args.func is plugin.run_dragbench and args.metrics == ["md", "if"]
    assert args.bench == Path("bench") and args.json == Path("r.json")
    with pytest.raises(SystemExit):
        _cli().parse_args(["eval", "dragbench", "bench", "--edited", "out", "--metrics", "md,fid"])
    with pytest.raises(SystemExit):
        _cli().parse_args(["eval"])


@needs_sample
def test_cli_dragbench_dai_on_copied_originals(sample_cases, tmp_path, capsys):
    edited = tmp_path / "edited"
    keys = ["interior_design/SY_2023-09-15-1656-05", "animals/JH_2023-09-14-1827-57"]
    for key in keys:  # the "edit" is the original itself, in DragDiffusion's result layout
        (edited / key).mkdir(parents=True)
        sample_cases[key].image.save(edited / key / "dragged_image.png")
    out = tmp_path / "res.json"
    args = _cli().parse_args(
        [
            "eval",
            "dragbench",
            str(SAMPLE),
            "--edited",
            str(edited),
            "--json",
            str(out),
            "--metrics",
            "dai",
        ]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert sorted(r["case"] for r in res["cases"]) == sorted(keys)
    assert len(res["missing"]) == 8 and res["summary"]["pairs"] == 7
    interior = next(r for r in res["cases"] if r["case"] == keys[0])
    case = sample_cases[keys[0]]
    expected = M.dai_per_pair(case.image, case.image, case.handles, case.targets)
    assert interior["dai"]["1"] == pytest.approx(expected[:, 0].mean())
    assert expected[0].tolist() == [0, 0, 0, 0]  # the zero-length pair
    assert "DAI" in capsys.readouterr().out


@needs_sample
def test_cli_dragbench_reports_missing_weights(sample_cases, tmp_path, capsys):
    edited = tmp_path / "edited"
    key = "animals/JH_2023-09-14-1827-57"
    (edited / key).mkdir(parents=True)
    sample_cases[key].image.save(edited / key / "dragged_image.png")
    args = _cli().parse_args(
        [
            "eval",
            "dragbench",
            str(SAMPLE),
            "--edited",
            str(edited),
            "--metrics",
            "md,dai",
            "--dift-model",
            str(tmp_path / "missing-sd21"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.func(args) == plugin.EXIT_METRIC_SKIPPED
    assert "MetricWeightsMissing" not in capsys.readouterr().err  # a message, not a traceback
    res = json.loads((tmp_path / "r.json").read_text())
    assert (
        "missing-sd21" in res["skipped"]["md"]
        and "huggingface-cli download" in res["skipped"]["md"]
    )
    assert any(k.startswith("DAI") for k in res["summary"])


def test_cli_dragbench_nothing_to_score(tmp_path):
    bench = tmp_path / "bench"
    _write_case(bench / "cat" / "case1", _meta([[1, 1], [2, 2]]))
    args = _cli().parse_args(
        ["eval", "dragbench", str(bench), "--edited", str(tmp_path / "none"), "--metrics", "dai"]
    )
    assert args.func(args) == plugin.EXIT_NOTHING_SCORED


def test_shapes_ablation_wins_over_set_overrides():
    """``--set image_prompt_scale=1 --ablation no_image_prompt`` must switch the image prompt
    off: the ablation's fields override ``--set``'s, and ``--set`` still applies to the rest."""
    from diffeditor_eval.shapes_eval import ABLATIONS, case_overrides

    given = {"image_prompt_scale": 1.0, "energy_scale": 2000.0,
             "schedule": {"time_travel_repeats": 5, "guidance": [{"start": 0.0, "stop": 0.5}]}}
    assert case_overrides("full", given) == given
    assert case_overrides("no_image_prompt", given)["image_prompt_scale"] == 0.0
    assert case_overrides("no_image_prompt", given)["energy_scale"] == 2000.0
    tt = case_overrides("no_time_travel", given)["schedule"]
    assert tt["time_travel_repeats"] == ABLATIONS["no_time_travel"]["schedule"]["time_travel_repeats"]
    assert tt["guidance"] == [{"start": 0.0, "stop": 0.5}]
    assert given["image_prompt_scale"] == 1.0  # not mutated


def test_every_shapes_ablation_is_a_valid_spec_for_the_tasks_it_runs_and_skips_the_rest(tmp_path):
    """Each ablation's fields exist in the spec of every task it runs on (a typo or a field a
    task lacks would fail that task's validation), the tasks it skips are exactly those whose
    spec rejects its fields, and the run plan leaves those pairs out."""
    import pytest as _pytest
    from diffeditor_eval.shapes_eval import (
        ABLATION_TASKS,
        ABLATIONS,
        TASKS,
        case_overrides,
        work_items,
    )
    from diffeditor_shapes.scenes import make_case, save_case

    from diffeditor.errors import SpecError
    from diffeditor.specs import parse_spec

    for task in TASKS:
        folder = tmp_path / task
        spec = json.loads(save_case(make_case(task, 3), folder).read_text())
        for ab in ABLATIONS:
            data = {**spec, **case_overrides(ab)}
            if task in ABLATION_TASKS.get(ab, TASKS):
                got = parse_spec(data, base_dir=folder)
                for field, value in ABLATIONS[ab].items():
                    if not isinstance(value, dict):
                        assert getattr(got, field) == value, (ab, task, field)
            else:
                with _pytest.raises(SpecError):
                    parse_spec(data, base_dir=folder)
    work = work_items(TASKS, 2, ["full", "latent_surgery"], seed=5)
    assert len(work) == 2 * len(TASKS) + 2 * 4
    assert {t for ab, t, *_ in work if ab == "latent_surgery"} == {"move", "resize", "appearance", "paste"}
    assert {s for _, _, s, *_ in work} == {5, 6}


def test_shapes_eval_with_workers_reports_a_bad_model_in_one_line(tmp_path, capfd):
    """With ``--jobs 2`` the model loads in worker processes; a model that does not load must
    still end in the one-line error and exit 2 (an exception in a pool's initializer used to
    surface as a BrokenProcessPool traceback and exit 1)."""
    from diffeditor.cli import main

    missing = tmp_path / "no-such-model"
    rc = main(["eval", "shapes", "--model", str(missing), "--jobs", "2", "--cases", "2",
               "--task", "move"])
    err = capfd.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("diffeditor: error:")]
    assert len(lines) == 1 and str(missing) in lines[0], err
