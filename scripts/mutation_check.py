#!/usr/bin/env python3
"""Mutation check: single-line breakages of the lines that decide results must fail the tests.

Each mutant below changes one line (or one expression) of a result-critical module — losses, ramps,
schedules, sampling, augmentation, selection, metrics, occlusion boxes, report statistics — and names
the test files that must catch it. For every mutant the checker copies the work tree to a temporary
folder, applies the change there (the work tree is never modified), and runs pytest on those files
with the copy first on ``PYTHONPATH`` (subprocesses started by the tests import the copy too). A
mutant is *killed* when pytest fails; it *survives* when the tests still pass.

Not part of the README's test command: run it before resolving an issue that touches these modules.

    python scripts/mutation_check.py               # every mutant, 2 workers; exit 0 only if all are killed
    python scripts/mutation_check.py --list        # the mutants and their test files
    python scripts/mutation_check.py --only d1,t3  # some mutants
    python scripts/mutation_check.py --all-tests   # each mutant against the whole suite (slow)
    python scripts/mutation_check.py --json out.json

Before the mutants, the same test files run once on the unmodified copy and must pass (otherwise a
"killed" mutant would mean nothing). A mutant whose text is not found exactly once, or whose file no
longer compiles after the change, is an error of this list (exit 2), never counted as killed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# test files per area (each mutant runs the union of the groups it names)
DATA = ["tests/test_guard_data.py", "tests/test_data.py"]
TRAINER = ["tests/test_guard_trainer.py"]
PROTOCOLS = ["tests/test_guard_protocols.py"]
LOSSES = ["tests/test_guard_losses.py", "tests/test_losses.py"]
METRICS = ["tests/test_metrics.py", "tests/test_evaluate.py", "tests/test_postprocess.py"]
OCCLUSION = ["tests/test_occlusion.py"]
REPORT = ["tests/test_report.py", "tests/test_guard_protocols.py"]
SWEEP = ["tests/test_sweep.py", "tests/test_guard_protocols.py"]
SCALE = ["tests/test_schedule_scale.py"]
DERIVE = ["tests/test_derive.py"]
TRACK = ["tests/test_track_report.py", "tests/test_cpu_track.py"]
FAULTS = ["tests/test_faults.py"]


def method_tests(name: str) -> list[str]:
    return ["tests/test_guard_losses.py", f"tests/test_{name}.py"]


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str


def M(id, path, find, replace, tests, why):  # noqa: N802  (a compact table below)
    return Mutant(id, path, find, replace, tuple(dict.fromkeys(tests)), why)


MUTANTS = [
    # -- data pipeline: split, augmentation, sampling (docs/methods.md §1.2-§1.4) ----------------------
    M("d1", "ssl_bench/data.py",
      "    label = _flip(_rot90(label, k), axis)",
      "    label = _flip(_rot90(label, k), 1 - axis)",
      DATA, "label flipped along another axis than its image"),
    M("d2", "ssl_bench/data.py",
      "    return image[sl], label[sl]",
      "    return image[sl], label[tuple(slice(o + 1, o + 1 + t) for o, t in zip(origin, patch))]",
      DATA, "label cropped one voxel off the image's crop origin"),
    M("d3", "ssl_bench/data.py",
      "origin.append(int(rng.integers(0, s - t)))",
      "origin.append(int(rng.integers(0, s - t + 1)))",
      DATA, "crop origin upper bound made inclusive (the reference's is exclusive)"),
    M("d4", "ssl_bench/data.py",
      "pads = [max((t - s) // 2 + 3, 0)",
      "pads = [max((t - s) // 2 + 2, 0)",
      DATA, "padding +2 per side instead of the reference's +3"),
    M("d5", "ssl_bench/data.py",
      "if not any(s <= t for s, t in zip(shape, patch)):",
      "if not any(s < t for s, t in zip(shape, patch)):",
      DATA, "padding skipped when a side equals the patch"),
    M("d6", "ssl_bench/data.py",
      "k = int(rng.integers(0, 4))",
      "k = int(rng.integers(0, 3))",
      DATA, "rotation never by 270 degrees"),
    M("d7", "ssl_bench/data.py",
      "[self.split.unlabeled[i] for i in unl]",
      "[self.split.test[i % len(self.split.test)] for i in unl]",
      DATA, "unlabeled cases drawn from the test list"),
    M("d8", "ssl_bench/data.py",
      "self._unlabeled_queue = self.rng.permutation(self.n_unlabeled).tolist()",
      "self._unlabeled_queue = self.rng.integers(0, self.n_unlabeled, self.n_unlabeled).tolist()",
      DATA, "unlabeled stream drawn with replacement"),
    M("d9", "ssl_bench/data.py",
      "            self._unlabeled_queue = []\n",
      "            pass\n",
      DATA, "unlabeled permutation not restarted at a new labeled epoch"),
    M("d10", "ssl_bench/data.py",
      '        self.rng.bit_generator.state = state["rng"]',
      "        pass",
      DATA + TRAINER, "augmentation RNG not restored on resume"),
    M("d11", "ssl_bench/data.py",
      "return Split(tuple(self.train_ids[:labeled]), tuple(self.train_ids[labeled:]), tuple(self.test_ids))",
      "return Split(tuple(self.train_ids[:labeled]), tuple(self.train_ids[labeled - 1:]), tuple(self.test_ids))",
      DATA, "a labeled case also in the unlabeled pool"),
    M("d12", "ssl_bench/data.py",
      "n_full = self.n_labeled // self.b_labeled",
      "n_full = -(-self.n_labeled // self.b_labeled)",
      DATA, "labeled epoch keeps the short leftover batch"),
    M("d13", "ssl_bench/data.py",
      '        self._unlabeled_queue = list(state["unlabeled_queue"])',
      "        self._unlabeled_queue = []",
      DATA + TRAINER, "sampler's unlabeled queue not restored on resume"),

    # -- the trainer's wiring: steps, schedules, resume, selection ---------------------------------
    M("t1", "ssl_bench/trainer.py",
      "        stage.after_step(nets, it0)",
      "        pass",
      TRAINER + method_tests("uamt"), "the EMA teacher update never called"),
    M("t2", "ssl_bench/trainer.py",
      "                lr = stage.lr(done)",
      "                lr = stage.lr(it0)",
      TRAINER, "learning-rate schedule one iteration late"),
    M("t3", "ssl_bench/trainer.py",
      'g["lr"] = stage.lr(start) if',
      'g["lr"] = stage.lr(0) if',
      TRAINER, "a resumed run restarts the learning-rate schedule"),
    M("t4", "ssl_bench/trainer.py",
      '            opt.load_state_dict(state["optimizers"][name])',
      "            pass",
      TRAINER, "optimiser state (momentum, Adam moments) lost on resume"),
    M("t5", "ssl_bench/trainer.py",
      '        stage.load_extra_state(state.get("extra"))',
      "        pass",
      TRAINER, "SS-Net's memory bank not restored on resume"),
    M("t6", "ssl_bench/trainer.py",
      '        torch.set_rng_state(state["torch_rng"])',
      "        pass",
      TRAINER, "torch RNG (dropout, noise, cut masks) not restored on resume"),
    M("t7", "ssl_bench/trainer.py",
      "                opt.zero_grad(set_to_none=True)",
      "                pass",
      TRAINER, "gradients accumulate across iterations"),
    M("t8", "ssl_bench/selection.py",
      'if best["dice"] is None or dice > best["dice"]:',
      'if best["dice"] is None or dice < best["dice"]:',
      PROTOCOLS, "best-on-test keeps the worst checkpoint"),
    M("t9", "ssl_bench/selection.py",
      'if best["dice"] is None or dice > best["dice"]:',
      'if best["dice"] is None or dice >= best["dice"]:',
      PROTOCOLS, "a tie replaces the best (the references need strictly greater)"),
    M("t12", "ssl_bench/selection.py",
      'self.best = {"dice": round(dice, 4), "iteration": done}',
      'self.best = {"dice": dice, "iteration": done}',
      PROTOCOLS, "the running best is not rounded to 4 decimals (Decision 9)"),
    M("t10", "ssl_bench/trainer.py",
      '        if selector.selected:',
      "        if False:",
      PROTOCOLS, "literature protocol hands on the last weights, not the selected ones"),
    M("t11", "ssl_bench/trainer.py",
      '            for opt in opts.values():\n                opt.zero_grad(set_to_none=True)\n',
      '            opts[phase].zero_grad(set_to_none=True)\n',
      TRAINER + method_tests("sassnet"),
      "only the current phase's gradients cleared (SASSNet's discriminator phase sees the main phase's)"),

    # -- shared losses, ramps, EMA, SDF (docs/methods.md §1.6-§1.7) -------------------------------------
    M("l1", "ssl_bench/losses.py",
      "torch._foreach_mul_(t_params, alpha)\n        if fused:\n            torch._foreach_add_(t_params, s_data, alpha=1.0 - alpha)",
      "torch._foreach_mul_(t_params, 1.0 - alpha)\n        if fused:\n            torch._foreach_add_(t_params, s_data, alpha=alpha)",
      LOSSES + TRAINER, "EMA weights swapped"),
    M("l2", "ssl_bench/losses.py",
      "return min(1.0 - 1.0 / (int(iteration0) + 1), float(cap))",
      "return min(1.0 - 1.0 / (int(iteration0) + 2), float(cap))",
      LOSSES + TRAINER + method_tests("uamt"), "UA-MT EMA warm-up off by one"),
    M("l3", "ssl_bench/losses.py",
      "return float(math.exp(-5.0 * phase * phase))",
      "return float(math.exp(-4.0 * phase * phase))",
      LOSSES, "sigmoid ramp-up with the wrong slope"),
    M("l4", "ssl_bench/losses.py",
      "(torch.sum(p * p) + torch.sum(g * g) + smooth)",
      "(torch.sum(p) + torch.sum(g) + smooth)",
      LOSSES, "DiceFG-sq with a linear denominator"),
    M("l5", "ssl_bench/losses.py",
      "dice = (2.0 * inter + smooth) / (union + smooth)",
      "dice = (inter + smooth) / (union + smooth)",
      LOSSES, "DiceMC without the factor 2"),
    M("l6", "ssl_bench/losses.py",
      "return torch.sum(ce * m) / (torch.sum(m) + 1e-16)",
      "return torch.mean(ce * m)",
      LOSSES + method_tests("bcp"), "masked CE normalised by all voxels, not the mask"),
    M("l7", "ssl_bench/losses.py",
      "pb = torch.softmax(_acc(b_logits), dim=1)",
      "pb = torch.sigmoid(_acc(b_logits))",
      LOSSES, "softmax-MSE target through a sigmoid"),
    M("l8", "ssl_bench/losses.py",
      "    sdm = np.where(bg, neg_term, -pos_term)",
      "    sdm = np.where(bg, -neg_term, pos_term)",
      LOSSES + method_tests("dtc"), "signed-distance target with the sign flipped"),
    M("l9", "ssl_bench/losses.py",
      "    sdm[inner_boundary(fg)] = 0.0",
      "    pass",
      LOSSES + method_tests("dtc"), "SDF boundary not set to 0"),

    # -- each method's total (docs/methods.md §3) -------------------------------------------------------
    M("m1", "methods/vnet.py",
      "return 0.5 * (ce + dice), {",
      "return (ce + dice), {",
      ["tests/test_guard_losses.py"], "V-Net baseline loss without the 0.5"),
    M("m2", "methods/uamt.py",
      "loss = supervised + weight * cons",
      "loss = supervised - weight * cons",
      method_tests("uamt"), "UA-MT consistency subtracted"),
    M("m3", "methods/uamt.py",
      "supervised = 0.5 * (ce + dice)",
      "supervised = 0.5 * ce",
      method_tests("uamt"), "UA-MT Dice term dropped"),
    M("m4", "methods/uamt.py",
      "mask = (uncertainty < threshold).float()",
      "mask = (uncertainty > threshold).float()",
      method_tests("uamt"), "UA-MT keeps the uncertain voxels"),
    M("m5", "methods/uamt.py",
      "return CONSISTENCY * sigmoid_rampup(it0 // every, RAMPUP_LENGTH)",
      "return CONSISTENCY * sigmoid_rampup((it0 + 1) // every, RAMPUP_LENGTH)",
      method_tests("uamt"), "UA-MT ramp one iteration early"),
    M("m6", "methods/sassnet.py",
      "supervised = dice + BETA * sdf",
      "supervised = dice + sdf",
      method_tests("sassnet"), "SASSNet SDF term without its weight"),
    M("m7", "methods/sassnet.py",
      "[1] * n_labeled + [0] * n_unlabeled",
      "[0] * n_labeled + [1] * n_unlabeled",
      method_tests("sassnet"), "SASSNet discriminator targets swapped"),
    M("m8", "methods/sassnet.py",
      "fool = torch.ones(",
      "fool = torch.zeros(",
      method_tests("sassnet"), "SASSNet adversarial term pushes towards 'unlabeled'"),
    M("m9", "methods/dtc.py",
      "consistency = torch.mean((sdm_to_mask(sdm) - prob) ** 2)",
      "consistency = torch.mean((sdm_to_mask(sdm[:nl]) - prob[:nl]) ** 2)",
      method_tests("dtc"), "DTC dual-task consistency on labeled samples only"),
    M("m10", "methods/dtc.py",
      "sigmoid_rampup(it0 // self.scaled(150), self.rampup_length)",
      "sigmoid_rampup((it0 + 1) // self.scaled(150), self.rampup_length)",
      method_tests("dtc"), "DTC ramp one iteration early"),
    M("m11", "methods/dtc.py",
      "return torch.sigmoid(-k * sdm)",
      "return torch.sigmoid(k * sdm)",
      method_tests("dtc"), "DTC Heaviside approximation with the sign flipped"),
    M("m12", "methods/ssnet.py",
      "batch.image, distance=dice_fg_lin,",
      "batch.image[:2], distance=dice_fg_lin,",
      method_tests("ssnet"), "SS-Net VAT on half of the batch"),
    M("m13", "methods/ssnet.py",
      "sigmoid_rampup((it0 + 1) // self.scaled(150), self.rampup_length)",
      "sigmoid_rampup(it0 // self.scaled(150), self.rampup_length)",
      method_tests("ssnet"), "SS-Net ramp without the reference's early increment"),
    M("m14", "methods/ssnet.py",
      "(vat + self.contrastive_weight * (cl_l + cl_u))",
      "(vat + self.contrastive_weight * cl_l)",
      method_tests("ssnet"), "SS-Net unlabeled contrastive term dropped"),
    M("m15", "methods/ssnet.py",
      "order = torch.sort(score, dim=0).indices",
      "order = torch.sort(score, dim=0, descending=True).indices",
      method_tests("ssnet"), "SS-Net memory keeps the highest-scored vectors"),
    M("m24", "methods/ssnet.py",
      "v = (1.0 / s) * s if",
      "v = s / s if",
      method_tests("ssnet"), "SS-Net memory weights as s/s, not the reference's (1/s)·s"),
    M("m16", "methods/bcp.py",
      "loss_in = mix_loss(z_in, y_a, plab_a, m, w_out=1.0, w_in=self.u_weight)",
      "loss_in = mix_loss(z_in, y_a, plab_a, m, w_out=self.u_weight, w_in=1.0)",
      method_tests("bcp"), "BCP pseudo-label weight on the labeled region"),
    M("m17", "methods/bcp.py",
      "x_in = mix(l_a, u_a, m)",
      "x_in = mix(u_a, l_a, m)",
      method_tests("bcp"), "BCP mix with labeled and unlabeled swapped"),
    M("m18", "methods/bcp.py",
      "ema_alpha = 0.99",
      "ema_alpha = 0.999",
      method_tests("bcp") + TRAINER, "BCP EMA decay"),
    M("m19", "methods/omf.py",
      "return self.weight * loss_a, {",
      "return loss_a, {",
      method_tests("omf"), "OMF stage-2 weight 1.7 dropped"),
    M("m20", "methods/omf.py",
      "return self.base_lr * (0.1 if done >= self.scaled(10000) else 1.0)",
      "return self.base_lr * (0.1 if done > self.scaled(10000) else 1.0)",
      method_tests("omf") + TRAINER, "OMF stage-1 lr step one iteration late"),
    M("m21", "methods/omf.py",
      "return self.base_lr * 0.8 ** (done // self.scaled(2500))",
      "return self.base_lr * 0.1 ** (done // self.scaled(2500))",
      method_tests("omf") + TRAINER, "OMF stage-2 lr decays by 0.1, not 0.8"),
    M("m22", "methods/omf.py",
      "loss_a = softmax_mse(z_s, z_q).mean()",
      "loss_a = softmax_mse(z_s, z_p).mean()",
      method_tests("omf"), "OMF stage-2 target is the teacher on P, not on the clean Q"),
    M("m23", "methods/omf.py",
      "return loss_ov + loss_a + loss_b, {",
      "return loss_ov + loss_a, {",
      method_tests("omf"), "OMF orgloss without L_B"),

    # -- mixing (BCP / OMF) ------------------------------------------------------------------------
    M("x1", "ssl_bench/mixing.py",
      "return mix(y_foreground, y_background, y_foreground)",
      "return y_foreground * y_background",
      ["tests/test_mixing.py"] + method_tests("omf"), "OMF overlay label: intersection instead of union"),
    M("x2", "ssl_bench/mixing.py",
      "return tuple(int(n) * 2 // 3 for n in shape)",
      "return tuple(int(n) // 2 for n in shape)",
      ["tests/test_mixing.py"] + method_tests("bcp"), "BCP cuboid sides 1/2 instead of 2/3"),
    M("x3", "ssl_bench/mixing.py",
      "int(torch.randint(0, int(n) - side, (1,)",
      "int(torch.randint(0, int(n) - side + 1, (1,)",
      ["tests/test_mixing.py"] + method_tests("bcp"), "BCP cuboid origin bound made inclusive"),
    M("x4", "ssl_bench/mixing.py",
      "fg = torch.softmax(logits.float(), dim=1)[:, 1] >= 0.5",
      "fg = torch.softmax(logits.float(), dim=1)[:, 1] > 0.5",
      ["tests/test_mixing.py"] + method_tests("bcp"), "pseudo-label excludes probability exactly 0.5"),

    # -- evaluation and metrics (docs/methods.md §2) ----------------------------------------------------
    M("q1", "ssl_bench/metrics.py",
      '"hd95": float(np.percentile(np.hstack((d_rg, d_gr)), 95)),',
      '"hd95": float(np.percentile(np.hstack((d_rg, d_gr)), 90)),',
      METRICS, "HD95 at the 90th percentile"),
    M("q2", "ssl_bench/metrics.py",
      '"asd": float(d_rg.mean()),',
      '"asd": float(d_gr.mean()),',
      METRICS, "ASD in the reference->prediction direction"),
    M("q3", "ssl_bench/metrics.py",
      "diag = float(math.sqrt(sum(int(s) ** 2 for s in r.shape)))",
      "diag = 0.0",
      METRICS, "empty prediction scored with zero distances under the penalty policy"),
    M("q4", "ssl_bench/metrics.py",
      '"jaccard": _jaccard_from_counts(inter, n_union),',
      '"jaccard": _jaccard_from_counts(inter, n_r + n_g),',
      METRICS, "Jaccard over the sum instead of the union"),
    M("q5", "ssl_bench/postprocess.py",
      "cc3d.connected_components(vol, connectivity=26, return_N=True)",
      "cc3d.connected_components(vol, connectivity=6, return_N=True)",
      METRICS, "LCC with 6- instead of 26-connectivity"),
    M("q6", "ssl_bench/evaluate.py",
      "n = math.ceil((size - patch) / stride) + 1",
      "n = (size - patch) // stride + 1",
      METRICS, "sliding window misses the last window"),
    M("q7", "ssl_bench/evaluate.py",
      's[m + "_std"] = float(vals.std())',
      's[m + "_std"] = float(vals.std(ddof=1))',
      METRICS, "per-run std over cases with n-1"),

    # -- occlusion boxes (docs/methods.md §3.7.8) -------------------------------------------------------
    M("o1", "ssl_bench/occlusion.py",
      "round(ratio * 1_000_000), repeat, case_key])",
      "round(ratio * 1_000_000), repeat])",
      OCCLUSION, "the same box for every case"),
    M("o2", "ssl_bench/occlusion.py",
      "math.floor(d * proportion ** (1.0 / 3.0) + 0.5)",
      "math.floor(d * proportion ** 0.5 + 0.5)",
      OCCLUSION, "box sides from the square root of the proportion"),
    M("o3", "ssl_bench/occlusion.py",
      "origin = [int(rng.integers(0, d - s + 1)) for d, s in zip(shape, side)]",
      "origin = [int(rng.integers(0, d - s)) for d, s in zip(shape, side)]",
      OCCLUSION, "box never touches the far border"),

    # -- report statistics and what a report may read ----------------------------------------------
    M("r1", "ssl_bench/report_rows.py",
      'return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")\n\n\ndef last_stats',
      'return float(arr.mean()), float(arr.std(ddof=0)) if len(arr) > 1 else float("nan")\n\n\ndef last_stats',
      REPORT, "std over seeds with n instead of n-1"),
    M("r2", "ssl_bench/report_rows.py",
      'return pd.concat(frames).groupby("case")["dice"].mean()',
      'return pd.concat(frames).groupby("case")["dice"].max()',
      REPORT, "per-case Dice takes the best seed instead of the mean"),
    M("r3", "ssl_bench/report_rows.py",
      "res = wilcoxon(a[common].values, b[common].values)",
      "res = wilcoxon(a[common].values - 0.01, b[common].values)",
      REPORT, "paired test on shifted values"),
    M("s1", "ssl_bench/sweep.py",
      "            if diff:\n                problems.append(f\"{out} is not this cell",
      "            if False:\n                problems.append(f\"{out} is not this cell",
      SWEEP, "a finished folder with other settings counted as the cell"),

    # -- this session: validation-split selection, data-set settings, prefetch, host-side SDF/LCC --------
    M("v1", "ssl_bench/run_setup.py",
      'self.selection_ids = list(self.split.val) if cfg.protocol == "val" else self.test_ids',
      "self.selection_ids = self.test_ids",
      ["tests/test_val_protocol.py"], "`val` selects on the test set"),
    M("v2", "ssl_bench/data.py",
      "    val = split.unlabeled[-k:]",
      "    val = split.unlabeled[:k]",
      ["tests/test_val_protocol.py"], "validation cases not the last K of train.list"),
    M("g1", "ssl_bench/config.py",
      'values = {"method": method, "profile": profile, **(dataset_defaults or {}), **PROFILES[profile]}',
      'values = {"method": method, "profile": profile, **PROFILES[profile]}',
      ["tests/test_dataset_runs.py"], "an imported data set's patch and strides ignored"),
    M("g2", "ssl_bench/evaluate.py",
      'row.update(hd95=mm["hd95_mm"], asd=mm["asd_mm"])',
      'row.update(hd95=mm["hd95_mm"])',
      ["tests/test_dataset_runs.py"], "--units mm leaves ASD in voxels"),
    M("p1", "ssl_bench/prefetch.py",
      "        self._state = state\n",
      "        self._state = None\n",
      ["tests/test_host.py"] + TRAINER, "checkpointed stream state taken after the prefetched batch was drawn"),
    M("h1", "ssl_bench/losses.py",
      "    neg_max = np.max(np.where(bg, dist, zero))  # max EDT(bg)",
      "    neg_max = np.max(dist)  # max EDT(bg)",
      ["tests/test_host.py"] + LOSSES, "SDF background term normalised by the overall maximum"),
    # -- the CPU track (issue 21): schedule scale, derived data, the track's report ---------------------------
    M("k1", "ssl_bench/method.py",
      "return max(1, int(round(n * scale)))", "return max(1, int(round(n)))",
      SCALE, "schedule scale ignored: every constant stays the paper's"),
    M("k2", "ssl_bench/method.py",
      "return self.base_lr * 0.1 ** (done // self.scaled(2500))", "return self.base_lr * 0.1 ** (done // 2500)",
      SCALE, "the step schedule's 2500 does not follow the scale"),
    M("k3", "methods/uamt.py",
      "return consistency_weight(it0, self.scaled(RAMPUP_EVERY))", "return consistency_weight(it0)",
      SCALE, "UA-MT's ramp unit 150 does not follow the scale"),
    M("k4", "methods/sassnet.py",
      "sigmoid_rampup(it0 // self.scaled(RAMPUP_EVERY), RAMPUP_LENGTH)", "sigmoid_rampup(it0 // RAMPUP_EVERY, RAMPUP_LENGTH)",
      SCALE, "SASSNet's ramp unit 150 does not follow the scale"),
    M("k5", "ssl_bench/run_setup.py",
      "selection = (stage.scaled(selection[0]) if selection[0] else 0, stage.scaled(selection[1]))",
      "selection = (selection[0], stage.scaled(selection[1]))",
      SCALE, "the selection start (SS-Net's 2000) does not follow the scale"),
    M("k6", "ssl_bench/run_setup.py",
      "return selection, self.cfg.selection_every or (selection[1] if selection else stage.scaled(200))",
      "return selection, self.cfg.selection_every or (200 if selection else stage.scaled(200))",
      SCALE, "the selection interval does not follow the scale"),
    M("k7", "ssl_bench/method.py",
      "else self.scaled(self.iterations))", "else self.iterations)",
      SCALE, "stage lengths do not follow the scale"),
    M("e1", "ssl_bench/derive.py",
      "lab = ndimage.zoom(label.astype(np.float32), factors, order=1,", "lab = ndimage.zoom(label.astype(np.float32), factors, order=0,",
      DERIVE, "derived labels by nearest neighbour, not the declared 50 % rule"),
    M("e2", "ssl_bench/derive.py",
      '"source_sha256": sha256_file(src.case_path(cid)), "sha256": digest}', '"source_sha256": digest, "sha256": digest}',
      DERIVE, "the record names the derived file's checksum as the source's"),
    M("e3", "ssl_bench/derive.py",
      "stride_z = max(1, int(round(LA_STRIDES[1] * zoom[2])))", "stride_z = max(1, int(round(LA_STRIDES[1])))",
      DERIVE, "the default z stride not scaled with the zoom"),
    M("r11", "ssl_bench/report_rows.py",
      '"metrics": last["metrics"],', '"metrics": run.summary["metrics"],',
      TRACK, "honest rows from a val run's selected weights instead of its last"),
    M("r12", "ssl_bench/report_rows.py",
      "if len(stages) != 1 or", "if len(stages) < 1 or",
      TRACK, "honest from val also for two-stage methods (their stage 2 starts from a selection)"),
    M("r13", "ssl_bench/track_report.py",
      "    if diff:\n        raise UserError(f\"{folder} is not a run of the", "    if False:\n        raise UserError(f\"{folder} is not a run of the",
      TRACK, "a user's run with other settings accepted"),
    M("r14", "ssl_bench/track_report.py",
      "if len(found) > 1:", "if len(found) > 2:",
      TRACK, "a cell in two --runs-dir folders accepted"),
    M("r15", "ssl_bench/report_rows.py",
      'df["rank"] = df.groupby(keys)["dice"].rank(ascending=False, method="min")',
      'df["rank"] = df.groupby(keys)["dice"].rank(ascending=True, method="min")',
      TRACK, "methods ranked worst first"),
    M("f1", "ssl_bench/runs.py",
      "if op.name in _CODE_OPCODES:", "if False:",
      FAULTS, "a protocol-4/5 pickle that runs code taken for a damaged file (fallback to previous.pt)"),
    M("c1", "ssl_bench/method.py",
      "if found.parent != builtin:", "if False:",
      ["tests/test_plugins.py"], "a user's methods.py silently replaces the built-in methods"),
    # issue 22/23 report (helper B)
    M("r16", "ssl_bench/report_rows.py",
      'dice_std=("dice", lambda s: s.std(ddof=1) if len(s) > 1', 'dice_std=("dice", lambda s: s.std(ddof=0) if len(s) > 1',
      REPORT, "Fig. 3 std over repeats with n instead of n-1"),
    M("r17", "ssl_bench/report_rows.py",
      'per_rep = df.groupby(key + ["repeat", "seed"])["dice"].mean().reset_index()',
      'per_rep = df.groupby(key + ["repeat", "seed"])["dice"].max().reset_index()',
      REPORT, "Fig. 3 takes the best case instead of the case mean"),
    M("r18", "ssl_bench/report_rows.py",
      'df.groupby(key + ["repeat", "seed"])', 'df.groupby(key + ["repeat"])',
      REPORT, "Fig. 3 pools the seeds' cases instead of averaging per-seed case means"),
    M("r19", "ssl_bench/report_rows.py",
      'np.argsort([order.index(m) for m in out["method"]], kind="stable")', 'np.argsort([0 for m in out["method"]], kind="stable")',
      REPORT, "Fig. 3 rows not in the experiment's method order"),
    M("r20", "ssl_bench/report_rows.py",
      'return df[df["paper_post"].astype(str).str.lower().isin(("true", "1"))]', "return df",
      REPORT, "occlusion rows of both post-processings mixed, not each method's own"),
    M("r21", "ssl_bench/report_rows.py",
      'df = df[df["variant"].astype(str) == exp.occlusion.variant]', "df = df",
      REPORT, "occlusion rows of the other variant counted in the experiment's Fig. 3"),
    M("r22", "ssl_bench/report_rows.py",
      'sum(int(m.get("n_cases", 0)) for m in got)', 'int(got[0].get("n_cases", 0))',
      REPORT, "evaluated cases counted for the first seed only"),
    M("r23", "ssl_bench/report_rows.py",
      'a = per_case_dice(ref, ref.post if post == "own" else post)', 'a = per_case_dice(ref, "raw" if post == "own" else post)',
      REPORT, "paired test of the reference without its own post-processing"),
    M("r24", "ssl_bench/report_rows.py",
      'frames = [r.per_case[r.per_case["post"] == post][["case", "dice"]] for r in row.runs]',
      'frames = [r.per_case[["case", "dice"]] for r in row.runs]',
      REPORT, "per-case Dice averages raw and LCC together"),
    M("r25", "ssl_bench/report_rows.py",
      "                if not _number(m.get(key)):", "                if False:",
      REPORT, "a summary.json without a metric read (traceback instead of one line)"),
    M("r26", "ssl_bench/report_rows.py",
      "if len(df) and not pd.api.types.is_numeric_dtype(df[col]):", "if False:",
      REPORT, "a metrics CSV with text in a metric column read (traceback instead of one line)"),
    M("r27", "ssl_bench/report_rows.py",
      'return "complete" if len(row.runs) == len(row.planned) else "partial"', 'return "complete"',
      REPORT, "a row with fewer seeds than planned reported complete"),
    M("r28", "ssl_bench/report_rows.py",
      "(other.protocol, other.labeled, other.precision) != (ref.protocol, ref.labeled, ref.precision)",
      "(other.labeled, other.precision) != (ref.labeled, ref.precision)",
      REPORT, "paired tests across protocols"),
    M("r29", "ssl_bench/report.py",
      'seeds + (" (partial)" if n < len(row.planned) else "")', "seeds",
      REPORT, "partial rows not marked in the main table"),
    M("r30", "ssl_bench/report.py",
      "atomic_write_text(out / REPRODUCTION,", "atomic_write_text(out.parent / REPRODUCTION,",
      REPORT, "REPRODUCTION.md written beside --out"),
    M("r31", "ssl_bench/report.py",
      "with lock_folder(out, busy=", 'with lock_folder(out, ".report-lock", busy=',
      REPORT, "a second report on the same output not refused (not the folder's one-writer lock)"),
    M("r32", "ssl_bench/report.py",
      "if not any(r.runs for r in rows):", "if False:",
      REPORT, "a report with no finished cell exits 0 with an all-missing table"),
    # issue 23 (helper A): import bounds and names, a full disk, the evaluator's case count, sweep checks before
    # Ray, occlusion units, signed distances in float64, BCP's EMA arithmetic, the plugin switch
    M("ha1", "ssl_bench/importer.py",
      '        check_voxels(img.shape, f"case {case_id}: {what} {path} (its header)")\n', "",
      ["tests/test_faults.py"], "a NIfTI header's voxel count not bounded before its voxels are read"),
    M("ha2", "ssl_bench/importer.py",
      "            if total > limit:\n                return None", "            if False:\n                return None",
      ["tests/test_faults.py"], "a gzip stream's inflated size not bounded (a gzip bomb read)"),
    M("ha3", "ssl_bench/importer.py",
      "sizes = [n * (s / t) for n, s, t in zip(shape, spacing, target)]",
      "sizes = [n * (t / s) for n, s, t in zip(shape, spacing, target)]",
      ["tests/test_importer.py", "tests/test_faults.py"], "resampled shape from the inverted spacing ratio"),
    M("ha4", "ssl_bench/importer.py",
      "elif isinstance(key, str) and _INTEGER.fullmatch(key.strip()):",
      'elif isinstance(key, str) and key.strip().lstrip("-").isdigit():',
      ["tests/test_faults.py"], "a label name such as ² taken for a value (a traceback)"),
    M("ha5", "ssl_bench/importer.py",
      "    for cid in image_ids + label_ids:  # before any message", "    for cid in []:  # before any message",
      ["tests/test_faults.py"], "a case file name with a newline imported (bogus ids in train.list)"),
    M("ha6", "ssl_bench/importer.py",
      "        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial data set took",
      "        pass  # frees what the partial data set took",
      ["tests/test_faults.py"], "a full disk during import leaves the temporary folder (the space not freed)"),
    M("ha7", "ssl_bench/data.py",
      "    for n, case_id in enumerate(ids, 1):  # an id is a folder", "    for n, case_id in []:  # an id is a folder",
      ["tests/test_faults.py"], "a case list entry such as ../x read (outside the data folder)"),
    M("ha8", "ssl_bench/evaluate.py",
      "            windows, padded = window_counts(image.shape, settings, device)\n"
      "            n_windows, n_padded = n_windows + windows,",
      "            n, padded = window_counts(image.shape, settings, device)\n            n_windows, n_padded = n_windows + n,",
      ["tests/test_evaluate.py"], "the evaluation progress bar counts windows, not cases"),
    M("ha9", "ssl_bench/sweep.py",
      "            check_cells(cells, data, runs_dir, gpus_per_trial, defaults)", "            pass",
      ["tests/test_faults.py"], "a cell the data set cannot give reaches Ray (retried trials, hundreds of lines)"),
    M("ha10", "ssl_bench/sweep.py",
      'if config.get("units") == "mm" and test not in with_spacing:', "if False:",
      ["tests/test_sweep.py"], "a units = mm cell on a data set without spacings not refused before Ray"),
    M("ha11", "ssl_bench/occlusion.py",
      "        if r.units != first.units:", "        if False:",
      ["tests/test_faults.py"], "occlusion of a voxel run and an mm run together"),
    M("ha12", "ssl_bench/occlusion.py",
      '"test_cases": test_ids, "units": runs[0].units,', '"test_cases": test_ids, "units": "voxel",',
      ["tests/test_occlusion.py"], "occlusion.json says voxel for mm runs"),
    M("ha13", "ssl_bench/occlusion.py",
      '*METRIC_COLS, "empty", "units")  # units last', '*METRIC_COLS, "empty")  # units last',
      ["tests/test_occlusion.py"], "occlusion_per_case.csv without its units column"),
    M("ha14", "ssl_bench/losses.py",
      "    return np.sqrt(edt.edtsq(two, black_border=False, parallel=threads).astype(np.float64))",
      "    return edt.edt(two, black_border=False, parallel=threads)",
      ["tests/test_dtc.py"], "signed distances from edt's float32 square root (not scipy's float64)"),
    M("ha15", "ssl_bench/losses.py",
      "    neg_term, pos_term = dist / neg_max, dist / pos_max",
      "    neg_term, pos_term = dist.astype(np.float32) / np.float32(neg_max), dist.astype(np.float32) / np.float32(pos_max)",
      ["tests/test_dtc.py"], "signed-distance normalisation in float32 (the reference's is float64)"),
    M("ha16", "methods/bcp.py",
      'ema_update(nets["teacher"], nets["student"], self.ema_alpha, fused=False)',
      'ema_update(nets["teacher"], nets["student"], self.ema_alpha)',
      ["tests/test_bcp.py"], "BCP's EMA in the fused arithmetic (UA-MT's), not BCP's own"),
    M("ha17", "ssl_bench/losses.py",
      "torch._foreach_add_(t_params, torch._foreach_mul(s_data, 1.0 - alpha))",
      "torch._foreach_add_(t_params, s_data, alpha=1.0 - alpha)",
      ["tests/test_bcp.py"], "the non-fused EMA computed fused"),
    M("ha18", "ssl_bench/plugins.py",
      "    return value is None or bool(value.strip())", "    return True",
      ["tests/test_plugins.py"], "SSL_BENCH_PLUGINS= does not switch entry-point plugins off"),
    # issue 22/23 (run folder, config, loop): the schema module, the stored config's checks, the selector's state
    M("rf1", "ssl_bench/run_folder.py",
      'if keep_until is None or (row["stage"], row["iteration"]) <= keep_until:',
      'if keep_until is None or (row["stage"], row["iteration"]) < keep_until:',
      ["tests/test_run_folder.py"], "a resumed run's log loses the checkpoint's own line"),
    M("rf2", "ssl_bench/run_folder.py",
      '            lines = [ln for ln in lines if json.loads(ln)["stage"] in done]', "            pass",
      ["tests/test_run_folder.py"], "an interrupted stage's log lines kept when it restarts from its beginning"),
    M("rf3", "ssl_bench/run_folder.py",
      "w.writerow({c: (repr(float(r[c])) if c in floats else r[c]) for c in METRIC_COLUMNS})",
      "w.writerow({c: (str(round(float(r[c]), 6)) if c in floats else r[c]) for c in METRIC_COLUMNS})",
      ["tests/test_run_folder.py"], "metrics CSV rounds (the report's statistics no longer exact)"),
    M("rf4", "ssl_bench/run_folder.py",
      '        missing = [c for c in METRIC_COLUMNS if c not in df.columns]', "        missing = []",
      ["tests/test_run_folder.py"], "a metrics CSV without its columns read as if whole"),
    M("ev1", "ssl_bench/evaluation.py",
      '    if folder.has_stage(len(setup.stages), "last"):', "    if False:",
      PROTOCOLS + ["tests/test_val_protocol.py"], "the last weights beside a selected checkpoint never evaluated"),
    M("ev2", "ssl_bench/evaluation.py",
      "    folder.write_metrics(rows, which)", "    folder.write_metrics(rows)",
      PROTOCOLS + ["tests/test_val_protocol.py"], "the last weights' metrics overwrite the selected ones' CSV"),
    M("tr1", "ssl_bench/trainer.py",
      '            selector.best = state["best"]', "            pass",
      PROTOCOLS + ["tests/test_val_protocol.py"], "a resumed selecting stage forgets its running best"),
    M("c2", "ssl_bench/config.py",
      "            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)", "            ok = True",
      ["tests/test_hardening.py"], "an edited config.json's types not checked (a string labeled count)"),
    M("c3", "ssl_bench/config.py",
      "        if self.patch[0] * self.patch[1] * self.patch[2] > MAX_PATCH_VOXELS:", "        if False:",
      ["tests/test_hardening.py"], "an edited config.json's 2048³ patch allocated"),
    M("c4", "ssl_bench/config.py",
      "        if self.eval_stride_xy < 1 or self.eval_stride_z < 1:", "        if False:",
      ["tests/test_hardening.py"], "a zero evaluation stride (ZeroDivisionError) not refused"),
    M("f2", "ssl_bench/runs.py",
      "        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):", "        if False:",
      FAULTS, "a killed writer's temporary file never removed"),
    M("f3", "ssl_bench/runs.py",
      "    except ProcessLookupError:\n        return False", "    except ProcessLookupError:\n        return True",
      FAULTS, "no writer ever counted as gone: its temporary files stay"),
    # issue 23's fault matrix: every reader of a run folder refuses a linked entry; records checked against each other
    M("rf5", "ssl_bench/run_folder.py",
      "        return require_regular(path, reading=True)", "        return path",
      ["tests/test_run_folder.py"], "a run-folder entry read through a symbolic link (another folder's file as its own)"),
    M("rf6", "ssl_bench/run_folder.py",
      "        return self.own(self.summary_path).is_file()", "        return self.summary_path.is_file()",
      ["tests/test_run_folder.py"], "a linked summary.json makes an interrupted run count as finished"),
    M("rf7", "ssl_bench/run_folder.py",
      '        if df[["case", "post", "empty"]].isna().any().any():', "        if False:",
      ["tests/test_run_folder.py"], "a metrics CSV whose last row was cut short read as whole"),
    M("r33", "ssl_bench/report_rows.py",
      '        if "n_cases" in m and len(rows) != m["n_cases"]:', "        if False:",
      REPORT, "a metrics CSV that lost rows reaches the box plots and the paired tests"),
    M("r34", "ssl_bench/report_rows.py",
      "            if not np.isclose(mean, float(m[key]), rtol=1e-9, atol=1e-12, equal_nan=True):", "            if False:",
      REPORT, "a metrics CSV edited after its summary was written reaches the per-case statistics"),
    M("r35", "ssl_bench/track_report.py",
      "min(m, again) if again is not None and same else m", "min(m, again) if again is not None else m",
      TRACK, "a re-run that was not identical counted in the budget"),
    M("r36", "scripts/reproduce_cell.py",
      "    if a != b:\n", "    if False:\n",
      TRACK, "a re-run whose log differs called identical"),
    M("r37", "scripts/reproduce_cell.py",
      "TIMING = (\"it_per_s\", \"elapsed_s\")", "TIMING = (\"it_per_s\", \"elapsed_s\", \"loss\")",
      TRACK, "a loss left out of the comparison"),
    M("r38", "ssl_bench/track_report.py",
      "for candidate in (Path(run_dir).parent / Path(recorded).name, Path(recorded)):",
      "for candidate in (Path(recorded),):",
      TRACK + REPORT, "a reused stage 1 looked for only where it was recorded (minutes differ on a clone)"),
    M("r39", "ssl_bench/track_report.py",
      "            if run.teacher is not None:  # the stage 1 it reused", "            if False:  # the stage 1 it reused",
      TRACK, "the budget misses a reused stage 1 that has no row of its own"),
    M("r40", "ssl_bench/track_report.py",
      'if row.protocol != "val" or not row.runs:', 'if not row.runs:',
      TRACK, "honest rows' runs drawn among the val runs' curves"),
    M("sw9", "ssl_bench/sweep.py",
      "            folder.read_summary()  # complete only if its record is whole: one line naming a damaged one",
      "            pass",
      FAULTS, "a finished cell with a damaged summary.json counted complete by the sweep"),
    M("o9", "ssl_bench/occlusion.py",
      'row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else 0.0', 'row[f"{m}_std"] = float(g[m].std(ddof=0))',
      OCCLUSION, "the per-run occlusion std is the population std (docs: sample std, as Fig. 3)"),
]


# -- running ----------------------------------------------------------------------------------------

def _copy_tree(dst: Path) -> None:
    """The work tree as it is (tracked and untracked files, not ignored ones) into ``dst``."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".ci-venv", "runs", "__pycache__", ".pytest_cache"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    for rel in files:
        src = REPO / rel
        if not src.is_file():
            continue  # deleted but still tracked
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if not env.get("SSL_BENCH_DATA"):  # the copy has no ../shared beside it
        shared = REPO.parent / "shared" / "data" / "LA"
        if (shared / "train.list").is_file():
            env["SSL_BENCH_DATA"] = str(shared)
    return env


def _pytest(copy: Path, tests: list[str], timeout: float, first_failure: bool = True) -> tuple[str, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if first_failure else []),
           *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    outcome = {0: "passed", 1: "failed"}.get(proc.returncode, f"error {proc.returncode}")
    return outcome, time.perf_counter() - t0, tail


def check_definitions(mutants) -> list[str]:
    problems = []
    ids = [m.id for m in mutants]
    if len(set(ids)) != len(ids):
        problems.append("duplicate mutant ids")
    for m in mutants:
        path = REPO / m.path
        if not path.is_file():
            problems.append(f"{m.id}: no file {m.path}")
            continue
        n = path.read_text().count(m.find)
        if n != 1:
            problems.append(f"{m.id}: its text occurs {n} times in {m.path} (must be exactly once)")
        for t in m.tests:
            if not (REPO / t).is_file():
                problems.append(f"{m.id}: no test file {t}")
    return problems


def run_mutant(m: Mutant, copy: Path, tests: list[str], timeout: float) -> dict:
    path = copy / m.path
    original = path.read_text()
    try:
        mutated = original.replace(m.find, m.replace, 1)
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as exc:
            return {"id": m.id, "status": "invalid", "detail": f"{type(exc).__name__}: {exc}"}
        path.write_text(mutated)
        outcome, seconds, tail = _pytest(copy, tests, timeout)
    finally:
        path.write_text(original)
    status = {"failed": "killed", "passed": "survived"}.get(outcome, outcome)
    if outcome == "timeout":
        status = "killed (timeout)"
    return {"id": m.id, "status": status, "seconds": round(seconds, 1), "file": m.path, "why": m.why,
            "tests": tests, "detail": tail if status != "killed" else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--all-tests", action="store_true", help="run the whole suite against each mutant")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmodified copy")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {m.id for m in MUTANTS}]
        if unknown:
            print(f"unknown mutant id {unknown[0]!r}", file=sys.stderr)
            return 2
        mutants = [m for m in MUTANTS if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:4s} {m.path:24s} {m.why}\n     tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0
    problems = check_definitions(mutants)
    if problems:
        for p in problems:
            print(f"mutant list error: {p}", file=sys.stderr)
        return 2

    def tests_of(m: Mutant) -> list[str]:
        return ["tests"] if args.all_tests else list(m.tests)

    jobs = max(1, args.jobs)
    with tempfile.TemporaryDirectory(prefix="ssl-bench-mutants-") as tmp:
        copies = [Path(tmp) / f"w{i}" for i in range(jobs)]
        for c in copies:
            _copy_tree(c)
        t_start = time.perf_counter()
        if not args.no_baseline:
            union = ["tests"] if args.all_tests else sorted({t for m in mutants for t in m.tests})
            outcome, seconds, tail = _pytest(copies[0], union, args.timeout * 4, first_failure=False)
            print(f"baseline ({len(union)} test files, unmodified): {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(tail, file=sys.stderr)
                print("the tests fail without any mutation; fix them first", file=sys.stderr)
                return 2
        free = list(copies)
        results = []

        def work(m: Mutant) -> dict:
            copy = free.pop()
            try:
                return run_mutant(m, copy, tests_of(m), args.timeout)
            finally:
                free.append(copy)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for r in pool.map(work, mutants):
                results.append(r)
                extra = f"  <- {r['detail']}" if r["status"] not in ("killed",) and r.get("detail") else ""
                print(f"{r['id']:4s} {r['status']:16s} {r.get('seconds', 0):6.1f} s  {r.get('why', '')}{extra}",
                      flush=True)
        total = time.perf_counter() - t_start
    killed = [r for r in results if r["status"].startswith("killed")]
    invalid = [r for r in results if r["status"] == "invalid"]
    survived = [r for r in results if r not in killed and r not in invalid]
    print(f"mutation score: {len(killed)}/{len(results)} killed, {len(survived)} survived, "
          f"{len(invalid)} invalid, {total:.0f} s")
    for r in survived:
        print(f"  SURVIVED {r['id']} ({r['file']}): {r['why']}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "killed": len(killed), "total": len(results),
                                         "seconds": round(total, 1)}, indent=1) + "\n")
    if invalid:
        return 2
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
