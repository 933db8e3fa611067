"""A foreign run's state (a :class:`Source`: plain tensors and numbers) → one verified checkpoint of this
project: the run is built exactly as ``train`` builds it from the config, the source is matched onto it
tensor by tensor (names, shapes and dtypes exactly), and the result is committed through the run's own
:class:`~radiodiff_resume.checkpoint.checkpointer.Checkpointer` with its provenance in the manifest."""

from __future__ import annotations

import argparse
import shlex
import typing as tp
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from radiodiff_resume.compat.torch_files import Tensors, strip_wrappers
from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    from torch import nn

    from radiodiff_resume.config import Config
    from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

ADAM_SLOTS = frozenset({"step", "exp_avg", "exp_avg_sq"})


@dataclass
class Weights:
    """The tensors of one source file, under the names the source wrote."""

    name: str
    tensors: Tensors


@dataclass
class Source:
    """A source read into plain tensors and numbers."""

    path: Path
    what: str
    models: list[Weights]
    """In the order the source prepared them (its optimizer lists their parameters in that order)."""
    optimizer: dict[str, tp.Any] | None
    """None: weights only (RadioDiff's ``{'model'}`` file); AdamW starts with empty moments."""
    optimizer_name: str
    scheduler: dict[str, tp.Any] | None = None
    scheduler_name: str = ""
    ema: Weights | None = None
    ema_config: dict[str, tp.Any] = field(default_factory=dict)
    scaler: dict[str, tp.Any] | None = None
    processes: int = 1
    step: int | None = None
    """The source's own training step when it records one (RadioDiff's ``step``; with fp16 it can exceed
    the optimizer's, which skips overflowing steps), or the step chosen for a weights-only source."""
    described: list[str] = field(default_factory=list)
    """Report lines on what the source holds and how it maps, right after the header."""
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


@dataclass
class Target:
    """A part of our model a source file can be, with its keys as that part names them → our LDM's names."""

    name: str
    module: nn.Module
    keys: dict[str, str]


@dataclass
class Placement:
    """Where one source file's tensors went."""

    weights: Weights
    target: Target
    keys: dict[str, str]
    """Source key (wrappers stripped) → our LDM key."""
    stripped: list[str]


def targets(ldm: nn.Module, trainable: nn.Module) -> list[Target]:
    """The trainable part (what the optimizer sees) and every sub-module, under their own names."""
    ours = ldm.state_dict(keep_vars=True)
    by_id = {id(t): k for k, t in ours.items()}
    found = [Target("the trainable modules", trainable,
                    {k: by_id[id(t)] for k, t in trainable.state_dict(keep_vars=True).items()})]
    for name, module in ldm.named_modules():
        if name:
            keys = {k[len(name) + 1:]: k for k in ours if k.startswith(name + ".")}
            found.append(Target(name, module, keys))
    return found


def check_tensors(what: str, keys: dict[str, str], tensors: Tensors, ours: Tensors) -> None:
    """Every source tensor has exactly the shape and dtype of ours; else name the first that differs."""
    for key, mine in sorted(keys.items()):
        theirs, own = tensors[key], ours[mine]
        if theirs.shape != own.shape or theirs.dtype != own.dtype:
            raise UserError(
                f"import: {what}: tensor {key} is {tuple(theirs.shape)} {theirs.dtype} in the source, our "
                f"{mine} is {tuple(own.shape)} {own.dtype} (the source was trained with another model "
                "config)")


def place(weights: Weights, ldm: nn.Module, parts: list[Target]) -> Placement | str:
    """Where ``weights`` belong in our model: under our whole model's own names (all of every top-level
    part it touches), or exactly one part whose keys it equals. A reason when nowhere."""
    tensors, stripped = strip_wrappers(weights.tensors)
    ours = ldm.state_dict()
    keys = set(tensors)
    if keys <= set(ours):
        touched = {k.split(".")[0] for k in keys}
        partial = sorted(k for k in ours if k.split(".")[0] in touched and k not in keys)
        if partial:
            raise UserError(f"import: {weights.name} holds part of our {', '.join(sorted(touched))} but not "
                            f"{len(partial)} of its tensors (e.g. {', '.join(partial[:3])})")
        whole = Target("our model, under its own names", ldm, {k: k for k in ours})
        placement = Placement(weights, whole, {k: k for k in tensors}, stripped)
    else:
        fits = [t for t in parts if set(t.keys) == keys]
        if len(fits) > 1:
            return f"its keys fit several of our modules ({', '.join(t.name for t in fits[:4])})"
        if not fits:
            return f"it fits no part of our model ({closest(keys, parts)})"
        placement = Placement(weights, fits[0], {k: fits[0].keys[k] for k in tensors}, stripped)
    check_tensors(weights.name, placement.keys, tensors, ours)
    return placement


def closest(keys: set[str], parts: list[Target]) -> str:
    def distance(t: Target) -> int:
        return len(keys ^ set(t.keys))

    best = min(parts, key=distance)
    missing, unexpected = sorted(set(best.keys) - keys), sorted(keys - set(best.keys))
    return (f"closest: {best.name}, missing {len(missing)} (e.g. {', '.join(missing[:2]) or '-'}), "
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:2]) or '-'})")


def source_tensors(placement: Placement) -> Tensors:
    """The placed file's tensors under our LDM's names."""
    tensors, _ = strip_wrappers(placement.weights.tensors)
    return {placement.keys[k]: v for k, v in tensors.items()}


def groups(keys: tp.Iterable[str], covered: tp.Iterable[str] = ()) -> Counter[str]:
    """Keys counted by the shortest module path none of ``covered`` lies under (or their first part)."""
    inside = {".".join(k.split(".")[:i]) for k in covered for i in range(1, k.count(".") + 1)}
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        depth = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) not in inside), len(parts))
        counts[".".join(parts[:depth]) + (".*" if depth < len(parts) else "")] += 1
    return counts


def mapping_lines(placement: Placement) -> list[str]:
    """Source prefix → our prefix, one line per top-level group of the source file."""
    lines: Counter[tuple[str, str]] = Counter()
    for key, mine in placement.keys.items():
        head, _, rest = key.partition(".")
        lines[(head + (".*" if rest else ""), mine[: len(mine) - len(rest)] + ("*" if rest else ""))] += 1
    return [f"    {src:<28} {n:>5} → {dst}" for (src, dst), n in sorted(lines.items())]


def resume_command(args: argparse.Namespace, cfg: Config) -> str:
    """``train`` with the import's own config and overrides, which resumes from what it wrote."""
    resume = ["radiodiff-resume", "train", "--cfg", args.cfg, *args.overrides]
    if args.out is not None:
        resume.append(f"trainer.results_folder={cfg.results_folder.resolve()}")
    if cfg.checkpoint.resume != "auto":
        resume.append("checkpoint.resume=auto")
    return shlex.join(resume)


def load_run_config(args: argparse.Namespace) -> Config:
    """CFG with the overrides, ``--out`` as ``trainer.results_folder`` (the run the import writes)."""
    from radiodiff_resume.config import load_config

    overrides = list(args.overrides)
    if args.out is not None:
        if any(o.startswith("trainer.results_folder=") for o in overrides):
            raise UserError("import: give the results folder once: --out DIR or trainer.results_folder=")
        overrides.append(f"trainer.results_folder={Path(args.out).expanduser().resolve()}")
    return load_config(args.cfg, overrides)


def refuse_existing_run(cfg: Config) -> None:
    """An import never mixes with a run: its results folder must hold no checkpoint yet."""
    folder = cfg.results_folder.resolve() / "checkpoints"
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present:
        raise UserError(f"import: {folder} already holds {', '.join(present[:3])}"
                        f"{' …' if len(present) > 3 else ''}; an import never mixes with an existing run: "
                        "pass --out with a new results folder")


def import_into_ldm(source: Source, cfg: Config,
                    before_save: tp.Callable[[LdmImport], None] | None = None) -> list[str]:
    """Build the run as ``train`` does, put the source's state into it, commit one verified checkpoint
    (``before_save`` sees the loaded state first and may add to the report and the provenance)."""
    from radiodiff_resume.lock import RunLock
    from radiodiff_resume.run import build_ldm_trainer, make_accelerator

    first_stage = Path(str(cfg.model.first_stage.ckpt_path))
    if not first_stage.is_file():
        raise UserError(f"import: model.first_stage.ckpt_path: {first_stage} not found; an import never "
                        "trains a first stage: point it at the trained autoencoder's weights")
    refuse_existing_run(cfg)
    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        raise UserError("import: run it as one process (not under accelerate launch / srun)")
    lock = RunLock(cfg.results_folder)
    lock.acquire()
    try:
        trainer = build_ldm_trainer(cfg, accelerator)
        return LdmImport(source, cfg, trainer, first_stage).run(before_save)
    finally:
        lock.release()
        accelerator.end_training()


class LdmImport:
    """One source into one freshly built LDM trainer; collects the report as it goes."""

    def __init__(self, source: Source, cfg: Config, trainer: LatentDiffusionTrainer,
                 first_stage: Path) -> None:
        self.source, self.cfg, self.trainer, self.first_stage = source, cfg, trainer, first_stage
        self.ldm = trainer.ldm
        self.report = [f"import: {source.what} ({source.processes} process(es))", *source.described]
        self.provenance = [f"imported by `radiodiff-resume import` from the {source.what}"]

    def run(self, before_save: tp.Callable[[LdmImport], None] | None = None) -> list[str]:
        from radiodiff_resume.checkpoint.verify import nonfinite_names

        t = self.trainer
        placements = self.place_weights()
        model = dict(self.ldm.state_dict())
        for placement in placements:
            model.update(source_tensors(placement))
        self.ldm.load_state_dict(model)
        mapped = {k for p in placements for k in p.keys.values()}
        self.report_unplaced(mapped)
        self.report.append(f"  scale_factor {self.scale_factor(mapped)}")
        optimizer, step = (self.optimizer_state(placements) if self.source.optimizer is not None
                           else self.no_optimizer_state())
        shared = t.state_dict()
        shared.update(model=self.ldm.state_dict(), optimizer=optimizer,
                      train_state={"step": step, "samples_seen": 0})
        if t.ema is not None:
            shared["ema"] = self.ema_state(step)
        elif self.source.ema is not None:
            self.report.append(f"EMA: {self.source.ema.name} not used: trainer.use_ema is false")
        self.grad_scaler(shared)
        bad = nonfinite_names({k: shared[k] for k in ("model", "ema", "optimizer") if k in shared})
        if bad:
            raise UserError(f"import: the source holds non-finite values in {len(bad)} tensor(s) "
                            f"({', '.join(bad[:4])}); nothing was written")
        t.load_state_dict(shared)
        self.report += [
            f"learning rate: {t.lr_schedule.get_last_lr()[0]:.6g} at step {step} by this config's schedule "
            f"(trainer.lr_schedule={self.cfg.trainer.lr_schedule}, trainer.lr, warm-up), which `train` "
            f"rebuilds at the step{self.source_lr()}",
            "data: starts at epoch 0 of this config's data stream (the source's loader position does not "
            "carry over)", *self.source.notes,
            f"not used: {', '.join(self.source.unused) or 'nothing'}",
        ]
        if step >= self.cfg.trainer.train_num_steps:
            self.report.append(f"note: step {step} is not below trainer.train_num_steps="
                               f"{self.cfg.trainer.train_num_steps}: `train` will only write the final "
                               "weights unless you raise it")
        self.provenance.append("not carried over: random streams and data position (new ones from the seed)")
        if before_save is not None:
            before_save(self)
        path = t.checkpointer.save(provenance=self.provenance)
        verified = t.checkpointer.verify_and_load(path)
        if not verified.ok:
            raise UserError(f"import: the checkpoint written to {path} does not verify "
                            f"({verified.summary()}): {tp.cast(tp.Any, verified.failure).detail}")
        t.events.emit("imported", stage=t.stage, step=step, path=str(path), source=str(self.source.path))
        return [*self.report, f"written: {path} ({verified.summary()})"]

    # ----- weights ---------------------------------------------------------------------------------
    def place_weights(self) -> list[Placement]:
        parts = targets(self.ldm, self.trainer.trainable_module(self.ldm))
        placements, reasons = [], []
        for weights in self.source.models:
            found = place(weights, self.ldm, parts)
            if isinstance(found, str):
                reasons.append(f"{weights.name} ({len(weights.tensors)} tensors): {found}")
            else:
                placements.append(found)
        if not placements:
            raise UserError(f"import: none of the source's weights fit this config's model: "
                            f"{'; '.join(reasons)}")
        seen: dict[str, str] = {}
        for p in placements:
            for mine in p.keys.values():
                if mine in seen:
                    raise UserError(f"import: {seen[mine]} and {p.weights.name} both hold our {mine}")
                seen[mine] = p.weights.name
        self.report.append("weights (shapes and dtypes equal, bit for bit):")
        for p in placements:
            stripped = f"; removed {', '.join(p.stripped)}" if p.stripped else ""
            self.report.append(f"  {p.weights.name} ({len(p.keys)} tensors) → {p.target.name}{stripped}")
            self.report += mapping_lines(p)
        self.provenance.append("weights: " + "; ".join(f"{p.weights.name} → {p.target.name}"
                                                       for p in placements))
        self.report += [f"  {reason}: not used" for reason in reasons]
        return placements

    def scale_factor(self, mapped: set[str]) -> str:
        """From the source when it holds one, else as a fresh run of this config sets it."""
        import torch

        from radiodiff_resume.config import measures_scale_factor

        value = float(self.ldm.scale_factor)
        m = self.cfg.model
        if "scale_factor" in mapped:
            fixed = torch.tensor(m.scale_factor, dtype=self.ldm.scale_factor.dtype).item()
            if not measures_scale_factor(m) and fixed != value:
                raise UserError(f"import: the source's scale_factor is {value!r} but the config fixes "
                                f"model.scale_factor={m.scale_factor!r}, and `train` would refuse to resume "
                                f"with another one: set model.scale_factor={value!r}")
            how = "from the source"
        else:
            self.trainer.on_fit_start()  # step 0: exactly what a fresh run of this config does
            value = float(self.ldm.scale_factor)
            how = ("measured by model.scale_by_std (1/std of the first training batch's latents, as a fresh "
                   "run does)" if measures_scale_factor(m) else "model.scale_factor")
        self.provenance.append(f"scale_factor {value!r}: {how}")
        return f"{value:.6g}: {how}"

    def report_unplaced(self, mapped: set[str]) -> None:
        """Which of our tensors the source did not hold, and where each came from instead."""
        missing = [k for k in self.ldm.state_dict() if k not in mapped and k != "scale_factor"]
        self.report.append(f"  not in the source:{'' if missing else ' nothing'}")
        for prefix, n in sorted(groups(missing, mapped).items()):
            where = (f"model.first_stage.ckpt_path {self.first_stage}" if prefix.startswith("first_stage")
                     else f"initialised as a fresh run of this config (trainer.seed={self.cfg.trainer.seed})")
            self.report.append(f"    {prefix:<28} {n:>5} ← {where}")

    # ----- optimizer and step --------------------------------------------------------------------
    def optimizer_state(self, placements: list[Placement]) -> tuple[dict[str, tp.Any], int]:
        """The source's Adam moments on our parameters, and the step they were taken at."""
        import torch

        t, opt = self.trainer, self.source.optimizer
        name = self.source.optimizer_name
        groups_ = opt.get("param_groups") if isinstance(opt, dict) else None
        if not (isinstance(groups_, list) and isinstance(opt.get("state"), dict)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups_)):
            raise UserError(f"import: {name} is not a torch optimizer state_dict")
        flat = [i for g in groups_ for i in g["params"]]
        state = opt["state"]
        if not set(state) <= set(flat) or len(set(flat)) != len(flat):
            raise UserError(f"import: {name}: its state and param_groups list different parameters")
        for i, slots in state.items():
            if not (isinstance(slots, dict) and set(slots) == ADAM_SLOTS
                    and all(isinstance(slots[k], torch.Tensor) for k in ("exp_avg", "exp_avg_sq"))):
                raise UserError(f"import: {name}: parameter {i} has state {sorted(slots)}, not Adam/AdamW's "
                                f"{sorted(ADAM_SLOTS)} tensors; this run trains with AdamW")
        if any(g.get("amsgrad") for g in groups_):
            raise UserError(f"import: {name} was trained with amsgrad; this run's AdamW has none")
        params, order = self.fitting_params(flat, state, placements)
        index = {id(p): j for j, p in enumerate(t.params)}
        ours = t.optimizer.state_dict()
        ours["state"] = {}
        for i, p in zip(flat, params, strict=True):
            if i in state:
                slots = state[i]
                step = slots["step"]
                ours["state"][index[id(p)]] = {
                    "step": step if isinstance(step, torch.Tensor) else torch.tensor(float(step)),
                    "exp_avg": slots["exp_avg"], "exp_avg_sq": slots["exp_avg_sq"]}
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        fresh = [names[id(p)] for p in t.params if id(p) not in {id(q) for q in params}]
        line = (f"optimizer: {name}: Adam state of {len(flat)} parameters in {len(groups_)} group(s) → "
                f"ours, {order}")
        if fresh:
            line += f"; {len(fresh)} of ours ({', '.join(sorted(groups(fresh)))}) start with empty Adam state"
        self.report.append(line)
        self.report += self.hyper_parameters(groups_)
        step = self.step(state, name)
        self.provenance.append(f"optimizer: {name}, {order}; step {step}")
        return ours, step

    def no_optimizer_state(self) -> tuple[dict[str, tp.Any], int]:
        """A weights-only source: our AdamW with empty moments, at the step the source was given."""
        step = tp.cast(int, self.source.step)
        ours = self.trainer.optimizer.state_dict()
        ours["state"] = {}
        self.report.append(f"optimizer: none in the source ({self.source.optimizer_name}); AdamW starts with "
                           "empty moments (its bias correction starts again)")
        self.provenance.append(f"optimizer: none in the source, empty moments; step {step}")
        return ours, step

    def fitting_params(self, flat: list[int], state: dict[int, tp.Any],
                       placements: list[Placement]) -> tuple[list[nn.Parameter], str]:
        """Our parameters in the order the source's optimizer lists them: that of its weights files (each
        part's own order), or our optimizer's; the first whose count and shapes fit."""
        t = self.trainer
        trainable = {id(p) for p in t.params}
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        placed = [(pl.target.module, set(pl.keys.values())) for pl in placements]
        by_files = [p for module, keys in placed for p in module.parameters()
                    if id(p) in trainable and names[id(p)] in keys]
        candidates = [(by_files, "in the order of the placed weights' parameters"),
                      (list(t.params), "in our optimizer's parameter order")]
        problems = []
        for params, order in candidates:
            if len(params) != len(flat):
                problems.append(f"{len(params)} parameters {order.removeprefix('in ')}")
                continue
            wrong = next((f"#{n}: {tuple(state[i]['exp_avg'].shape)} {state[i]['exp_avg'].dtype} vs our "
                          f"{names[id(p)]} {tuple(p.shape)} {p.dtype}"
                          for n, (i, p) in enumerate(zip(flat, params, strict=True)) if i in state and (
                              state[i]["exp_avg"].shape != p.shape or state[i]["exp_avg"].dtype != p.dtype)),
                         None)
            if wrong is None:
                return params, order
            problems.append(f"{order.removeprefix('in ')}: parameter {wrong}")
        raise UserError(f"import: {self.source.optimizer_name} holds state for {len(flat)} parameters and "
                        f"does not fit ours ({'; '.join(problems)})")

    def hyper_parameters(self, source_groups: list[dict[str, tp.Any]]) -> list[str]:
        ours = self.trainer.optimizer.state_dict()["param_groups"][0]
        lines = []
        for key in ("betas", "eps", "weight_decay"):
            theirs = sorted({repr(tuple(g[key]) if key == "betas" else g[key])
                             for g in source_groups if key in g})
            mine = repr(tuple(ours[key]) if key == "betas" else ours[key])
            if theirs and theirs != [mine]:
                lines.append(f"  {key}: {', '.join(theirs)} in the source, {mine} in this run (this run's "
                             "applies)")
        return lines

    def step(self, state: dict[int, tp.Any], name: str) -> int:
        """The source's own step when it records one, else the optimizer's per-parameter step (the count
        its Adam bias correction uses); checked against the LR scheduler's ``last_epoch`` (accelerate
        steps a prepared scheduler once per process)."""
        steps = sorted({int(float(s["step"])) for s in state.values()})
        if not steps or steps[-1] == 0:
            raise UserError(f"import: {name} holds no optimizer step: nothing was trained yet, start a "
                            "fresh run")
        step = steps[-1]
        how = f"{name} per-parameter step {step}"
        if len(steps) > 1:
            how += f" (the largest; some parameters were stepped {', '.join(map(str, steps[:-1]))} times)"
        sched = self.source.scheduler
        last = sched.get("last_epoch") if isinstance(sched, dict) else None
        if self.source.step is not None:
            own = self.source.step
            agrees = own == step and last == own
            how = (f"the file's step, = {how} = {self.source.scheduler_name} last_epoch" if agrees else
                   f"the file's step; {how}, {self.source.scheduler_name} last_epoch {last} (Adam keeps its "
                   "own count for its bias correction)")
            self.report.append(f"step: {own} ({how})")
            return own
        if not isinstance(last, int):
            how += f"; {self.source.scheduler_name or 'scheduler.bin'} absent or without last_epoch"
        elif last == step:
            how += f" = {self.source.scheduler_name} last_epoch"
        elif last == step * self.source.processes:
            how += (f" = {self.source.scheduler_name} last_epoch {last} / {self.source.processes} processes "
                    "(accelerate steps a prepared scheduler once per process)")
        else:
            how += (f"; {self.source.scheduler_name} last_epoch is {last}: they disagree, the optimizer's "
                    "is used (its moments were built over that many steps)")
        self.report.append(f"step: {step} ({how})")
        return step

    def source_lr(self) -> str:
        sched = self.source.scheduler
        last = sched.get("_last_lr") if isinstance(sched, dict) else None
        if isinstance(last, list) and last:
            return f"; the source's last was {', '.join(f'{float(v):.6g}' for v in last)}"
        return ""

    # ----- EMA and loss scale --------------------------------------------------------------------
    def ema_state(self, step: int) -> dict[str, tp.Any]:
        """Shadow parameters from the source's EMA where it has them, else the imported online weights."""
        t = self.trainer
        ema = tp.cast(tp.Any, t.ema)
        state = dict(ema.state_dict())
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        shadow = {names[id(p)]: p.detach().clone() for p in t.params}
        fresh = set(shadow)
        if self.source.ema is None:
            state["optimization_step"] = 0
            self.report.append("EMA: none in the source; ours starts from the imported online weights "
                               "(its decay warms up again, as after a checkpoint saved without EMA)")
            self.provenance.append("EMA: none in the source, started from the imported weights")
        else:
            weights = self.source.ema
            found = place(weights, self.ldm, targets(self.ldm, t.trainable_module(self.ldm)))
            if isinstance(found, str):
                raise UserError(f"import: EMA {weights.name}: {found}")
            tensors = source_tensors(found)
            used = {k: v for k, v in tensors.items() if k in shadow}
            shadow.update({k: v.clone() for k, v in used.items()})
            fresh -= set(used)
            recorded = self.source.ema_config.get("optimization_step")
            state["optimization_step"] = recorded if isinstance(recorded, int) else step
            line = (f"EMA: {weights.name} ({len(used)} parameters) → our EMA of {found.target.name} "
                    f"(optimization_step {state['optimization_step']}"
                    f"{'' if isinstance(recorded, int) else ': none recorded, the step'})")
            if fresh:
                line += f"; {len(fresh)} of ours ({', '.join(sorted(groups(fresh)))}) from the online weights"
            skipped = sorted(set(tensors) - set(used))
            if skipped:
                line += (f"; {len(skipped)} tensors outside our EMA (buffers, frozen parameters) not used "
                         f"({', '.join(sorted(groups(skipped)))})")
            self.report.append(line)
            self.provenance.append(f"EMA: {weights.name}")
        state["shadow_params"] = [shadow[names[id(p)]] for p in t.params]
        return state

    def grad_scaler(self, shared: dict[str, tp.Any]) -> None:
        scaler, theirs = self.trainer.accelerator.scaler, self.source.scaler
        if scaler is not None and theirs is not None:
            state = scaler.state_dict()
            if set(theirs) != set(state):
                raise UserError(f"import: scaler.pt holds {sorted(theirs)}, a GradScaler has {sorted(state)}")
            shared["grad_scaler"] = theirs
            self.report.append(f"fp16 loss scale: scaler.pt (scale {theirs.get('scale')})")
        elif theirs is not None:
            self.report.append("fp16 loss scale: scaler.pt not used: this run has no GradScaler "
                               "(trainer.mixed_precision is not fp16)")
        elif scaler is not None:
            self.report.append("fp16 loss scale: none in the source; ours starts afresh")
