"""A conformance kit for task plugins: the checks every task must pass, with no model.

Third-party authors subclass :class:`TaskConformance` in their own test suite::

    class TestMyTask(TaskConformance):
        task_name = "mine"

        def example_spec(self, folder):      # write any input files into folder
            ...
            return {"task": "mine", "image": "image.png", ...}

pytest collects the ``test_*`` methods. Each builds the task's plan on a small synthetic
geometry and checks its contract with the kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .interfaces import EditPlan, Geometry
from .plugins import get_registry
from .specs import parse_spec


class TaskConformance:
    """Subclass with ``task_name`` and :meth:`example_spec`; pytest runs the checks."""

    task_name: str = ""
    feature_channels: tuple[int, ...] = (32, 16)
    batch: int = 2

    def example_spec(self, folder: Path) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------
    def _build(self, tmp_path: Path) -> tuple[Any, Any, EditPlan, Geometry]:
        from .editor import check_spec, working_size
        from .imageio import load_image, to_tensor

        reg = get_registry()
        task = reg.task(self.task_name)
        spec = parse_spec(self.example_spec(tmp_path), base_dir=tmp_path)
        input_hw = check_spec(spec)
        work_hw = working_size(input_hw, spec.resolution or 128)
        geom = Geometry(input_hw, work_hw, 8, spec.feature_scale)
        images = {k: to_tensor(load_image(p), work_hw) for k, p in task.images(spec).items()}
        return task, spec, task.plan(spec, images, geom), geom

    def _features(self, geom: Geometry, levels, requires_grad=False) -> dict[int, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return {
            lv: torch.randn(self.batch, c, *geom.feature_hw, generator=gen).requires_grad_(requires_grad)
            for lv, c in zip(levels, self.feature_channels * len(levels))
        }

    # -- the checks ----------------------------------------------------------------------------
    def test_spec_round_trip(self, tmp_path):
        _, spec, _, _ = self._build(tmp_path)
        again = parse_spec(spec.model_dump(mode="json"), base_dir=tmp_path)
        assert again == spec

    def test_task_is_registered_with_a_version(self):
        task = get_registry().task(self.task_name)
        assert task.name == self.task_name and task.version
        fields = task.spec_model.model_fields
        assert fields["task"].default == self.task_name

    def test_masks_inside_the_image(self, tmp_path):
        _, _, plan, geom = self._build(tmp_path)
        for name, m in plan.masks.items():
            assert tuple(m.shape[-2:]) == tuple(geom.work_hw), name
            assert float(m.min()) >= 0 and float(m.max()) <= 1, name
        for name, m in plan.regions.items():
            assert tuple(m.shape[-2:]) == tuple(geom.latent_hw), name
            assert float(m.min()) >= 0 and float(m.max()) <= 1, name
        if plan.sde_mask is not None:
            assert tuple(plan.sde_mask.shape[-2:]) == tuple(geom.latent_hw)
        assert "source" in plan.images
        for img in plan.images.values():
            assert tuple(img.shape) == (1, 3, *geom.work_hw)

    def test_energy_terms_one_value_per_item_and_finite_gradients(self, tmp_path):
        _, spec, plan, geom = self._build(tmp_path)
        assert plan.energies, "a task needs at least one energy term"
        levels = spec.feature_levels
        refs = {name: {lv: f[:1] for lv, f in self._features(geom, levels).items()} for name in plan.images}
        for term in plan.energies:
            assert term.region in plan.regions, f"{term.name}: unknown region {term.region!r}"
            cur = self._features(geom, levels, requires_grad=True)
            value = term.fn(cur, refs)
            assert value.shape == (self.batch,), f"{term.name}: shape {tuple(value.shape)}"
            assert value.dtype == torch.float32, f"{term.name}: energies are reduced in float32"
            grads = torch.autograd.grad(value.sum(), list(cur.values()), allow_unused=True)
            for g in grads:
                assert g is None or torch.isfinite(g).all(), f"{term.name}: non-finite gradient"

    def test_surgery_keeps_the_latent_shape(self, tmp_path):
        _, _, plan, geom = self._build(tmp_path)
        zt = {name: torch.randn(1, 4, *geom.latent_hw) for name in plan.images}
        z = plan.surgery(zt) if plan.surgery else zt["source"]
        assert z.shape == (1, 4, *geom.latent_hw) and torch.isfinite(z).all()
