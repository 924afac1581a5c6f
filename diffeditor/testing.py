"""A conformance kit for task plugins: the checks every task must pass, with no model.

Third-party authors subclass :class:`TaskConformance` in their own test suite::

    class TestMyTask(TaskConformance):
        task_name = "mine"

        def example_spec(self, folder):      # write any input files into folder
            ...
            return {"task": "mine", "image": "image.png", ...}

pytest collects the ``test_*`` methods. Each builds the task's plan on a small synthetic
geometry and checks its contract with the kernel, including that the plan can edit at all:
every energy term with a non-zero weight must depend on the current features inside its
region (or guidance has nothing to act on), and a surgery, when the task has one, must change
the initial latent. Energies are fed random features (no model), with the current features
drawn apart from the references' so that no similarity starts at its optimum.

To run the checks on a task that is not installed, override :meth:`TaskConformance.registry`
(e.g. ``return diffeditor.plugins.registry_from([my_plugin])``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .geometry import resample_mask
from .interfaces import EditPlan, Geometry
from .plugins import get_registry
from .specs import parse_spec

GRADIENT_FLOOR = 1e-6
"""Below this (times the energy's size, at least 1), a summed |gradient| counts as zero."""


class TaskConformance:
    """Subclass with ``task_name`` and :meth:`example_spec`; pytest runs the checks."""

    task_name: str = ""
    feature_channels: tuple[int, ...] = (32, 16)
    batch: int = 2

    def example_spec(self, folder: Path) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def registry(self):
        """The registry the task is looked up in: the installed plugins'. Override it to check
        a task that is registered in code only (:func:`diffeditor.plugins.registry_from`)."""
        return get_registry()

    # -- helpers -------------------------------------------------------------------------------
    def _build(self, tmp_path: Path) -> tuple[Any, Any, EditPlan, Geometry]:
        from .editor import check_spec, working_geometry
        from .imageio import load_image, to_tensor

        reg = self.registry()
        task = reg.task(self.task_name)
        spec = parse_spec(self.example_spec(tmp_path), base_dir=tmp_path, registry=reg)
        input_hw = check_spec(spec, registry=reg)
        content_hw, work_hw = working_geometry(input_hw, spec.resolution or 128)
        geom = Geometry(input_hw, work_hw, 8, spec.feature_scale, content_hw)
        images = {k: to_tensor(load_image(p), content_hw, pad=work_hw)
                  for k, p in task.images(spec).items()}
        return task, spec, task.plan(spec, images, geom), geom

    def _features(self, geom: Geometry, levels, requires_grad=False, seed: int = 0,
                  batch: int | None = None) -> dict[int, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            lv: torch.randn(batch or self.batch, c, *geom.feature_hw, generator=gen).requires_grad_(requires_grad)
            for lv, c in zip(levels, self.feature_channels * len(levels))
        }

    def _references(self, plan: EditPlan, geom: Geometry, levels) -> dict[str, dict[int, torch.Tensor]]:
        """One row of random features per image, each image its own draw (seeds 1, 2, ...);
        the current features use seed 0, so no similarity to a reference starts at 1, where a
        cosine's gradient vanishes."""
        return {name: self._features(geom, levels, seed=1 + k, batch=1)
                for k, name in enumerate(plan.images)}

    def _region_cells(self, plan: EditPlan, region: str, geom: Geometry) -> torch.Tensor:
        """A region (latent grid) on the feature grid, nearest: ``(1, 1, Hf, Wf)`` bool."""
        m = plan.regions[region].float()
        return resample_mask(m, geom.feature_hw, "nearest") > 0

    # -- the checks ----------------------------------------------------------------------------
    def test_spec_round_trip(self, tmp_path):
        _, spec, _, _ = self._build(tmp_path)
        again = parse_spec(spec.model_dump(mode="json"), base_dir=tmp_path, registry=self.registry())
        assert again == spec

    def test_task_is_registered_with_a_version(self):
        task = self.registry().task(self.task_name)
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
        refs = self._references(plan, geom, levels)
        for term in plan.energies:
            assert term.region in plan.regions, f"{term.name}: unknown region {term.region!r}"
            cur = self._features(geom, levels, requires_grad=True)
            value = term.fn(cur, refs)
            assert value.shape == (self.batch,), f"{term.name}: shape {tuple(value.shape)}"
            assert value.dtype == torch.float32, f"{term.name}: energies are reduced in float32"
            if not value.requires_grad:  # reported by the next check, with its reason
                continue
            grads = torch.autograd.grad(value.sum(), list(cur.values()), allow_unused=True)
            for g in grads:
                assert g is None or torch.isfinite(g).all(), f"{term.name}: non-finite gradient"

    def test_surgery_keeps_the_latent_shape(self, tmp_path):
        _, _, plan, geom = self._build(tmp_path)
        zt = {name: torch.randn(1, 4, *geom.latent_hw) for name in plan.images}
        z = plan.surgery(zt) if plan.surgery else zt["source"]
        assert z.shape == (1, 4, *geom.latent_hw) and torch.isfinite(z).all()

    def test_energy_terms_depend_on_the_current_features_in_their_region(self, tmp_path):
        """Guidance moves the latent along each term's gradient inside the term's region only:
        a term whose value ignores the current features there cannot edit anything."""
        _, spec, plan, geom = self._build(tmp_path)
        levels = spec.feature_levels
        refs = self._references(plan, geom, levels)
        for term in plan.energies:
            if term.weight == 0:  # the kernel skips zero-weight terms
                continue
            assert term.region in plan.regions, f"{term.name}: unknown region {term.region!r}"
            cells = self._region_cells(plan, term.region, geom)
            where = (f"energy term {term.name!r} of task {self.task_name!r} (region {term.region!r}, "
                     f"{int(cells.sum())} of {cells.numel()} feature cells)")
            assert cells.any(), (
                f"{where}: the region is empty for the example spec, so this term's gradient is "
                "never applied anywhere; check the region mask in plan.regions")
            cur = self._features(geom, levels, requires_grad=True, seed=0)
            value = term.fn(cur, refs)
            grads = (torch.autograd.grad(value.sum(), list(cur.values()), allow_unused=True)
                     if value.requires_grad else [None])
            if all(g is None for g in grads):
                raise AssertionError(
                    f"{where}: its value does not depend on the current features at all (no "
                    "gradient reaches them). An energy must be computed from its first argument, "
                    "`current` (the features of the latent being edited), not only from "
                    "`references`; otherwise guidance has nothing to act on.")
            inside = torch.zeros(self.batch)
            for g in grads:
                if g is not None:
                    inside = inside + (g.detach().abs().sum(1, keepdim=True) * cells).flatten(1).sum(1)
            for b in range(self.batch):
                # float32 rounding leaves ~1e-8 where a gradient vanishes; energies of order 1 on
                # random features of order 1 give 1e-2 or more (first-party tasks: 1e-2 to 5)
                tol = GRADIENT_FLOOR * max(1.0, float(value[b].detach().abs()))
                assert inside[b] > tol, (
                    f"{where}: the gradient of batch item {b}'s energy with respect to the current "
                    f"features is zero on every feature cell of the region (sum of |gradient| "
                    f"{float(inside[b]):.2g} <= {tol:.0e}; random features, "
                    "the references drawn apart from them). The kernel applies this term's "
                    "gradient inside that region only, so guidance cannot act: the energy ignores "
                    "the current features there (or depends only on other batch items, or on "
                    "cells outside its region). Regions are latent-resolution masks; the "
                    f"features are feature_scale = {geom.feature_scale} times finer.")

    def test_surgery_changes_the_initial_latent(self, tmp_path):
        """A surgery that hands back the source's z_T unchanged does nothing: drop it
        (``surgery=None``) or make it move the content the edit is about."""
        _, _, plan, geom = self._build(tmp_path)
        if plan.surgery is None:
            return
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            zt = {name: torch.randn(1, 4, *geom.latent_hw, generator=gen) for name in plan.images}
            before = {name: v.clone() for name, v in zt.items()}
            source = before["source"]
            z = plan.surgery(zt)
            for name, v in zt.items():
                assert torch.equal(v, before[name]), (
                    f"task {self.task_name!r}: plan.surgery modified its input z_T[{name!r}] in "
                    "place; the kernel passes the cached inversion's latents, so the next edit "
                    "of the same image would start from a corrupted latent. Clone first.")
            change = float((z.float() - source).abs().max())
            assert change > 1e-3, (
                f"task {self.task_name!r}: plan.surgery returned z_T['source'] unchanged for the "
                f"example spec (largest change {change:.2g}, random z_T of "
                f"{', '.join(sorted(zt))}, seed {seed}); a surgery must build the edit's initial "
                "latent, e.g. move the object's latent to its destination. If the task needs no "
                "surgery, set plan.surgery = None.")
