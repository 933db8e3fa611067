"""``radiodiff-resume evaluate``: sample a split with a trained LDM, as RadioDiff's ``sample_cond_ldm.py``
does, and report NMSE, RMSE, SSIM and PSNR under a named convention.

Each map is sampled (RadioDiff's sampler with ``model.objective: radiodiff``) from a generator seeded by
``--seed`` and the index of its batch's first map, never from the global RNG — RadioDiff's sampler calls
``torch.manual_seed(0)`` inside itself — so a map's sample is the same whether the evaluation ran in one
go or was resumed, on one process or several. Maps go in fixed batches of ``--batch-size`` (RadioDiff's
``radio_sample.yaml``: 1); under ``accelerate launch`` each process takes every N-th pending batch. One PNG
per map is written under RadioDiff's name for it (``{map}_{tx}.png``), and its values are recorded once the
PNG is in place: a re-run with the same settings skips finished maps (the layout:
:mod:`radiodiff_resume.evaluation.folder`). The metric conventions and their data ranges:
:mod:`radiodiff_resume.evaluation.metrics`.

Exit status: 0 done; 2 a user error (one line); 3 stopped by a signal (run the same command to go on).
"""

from __future__ import annotations

import argparse
import logging
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.evaluation.conventions import CONVENTIONS

if tp.TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import Dataset

    from radiodiff_resume.config import Config
    from radiodiff_resume.dist import Ranks
    from radiodiff_resume.evaluation.folder import EvalFolder, Record
    from radiodiff_resume.evaluation.model import EvalModel
    from radiodiff_resume.evaluation.sample_yaml import SamplerSection

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Options:
    """Evaluate's settings once the command line, a sample yaml's ``sampler`` section and the config's
    defaults are merged (a flag given explicitly wins)."""

    checkpoint: str | None
    weights: str | None
    ema: bool | None
    split: str
    steps: int
    batch_size: int
    seed: int
    limit: int | None
    out: Path | None
    metrics: str

    @classmethod
    def resolve(cls, args: argparse.Namespace, section: SamplerSection, cfg: Config) -> Options:
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.evaluation.model import check_weights_file

        explicit = args.checkpoint is not None or args.weights is not None
        options = cls(
            checkpoint=args.checkpoint,
            weights=args.weights if explicit else section.weights,
            ema=args.ema if args.ema is not None else section.ema,
            split=args.split or default_split(cfg),
            steps=_given(args.sampling_timesteps, cfg.model.sampling_timesteps),
            batch_size=_given(args.batch_size, _given(section.batch_size, 1)),
            seed=args.seed,
            limit=_given(args.limit, section.limit),
            out=Path(args.out or section.out).expanduser() if (args.out or section.out) else None,
            metrics=args.metrics,
        )
        if options.weights is not None:
            check_weights_file(options.weights)
        for flag, value in (("--sampling-timesteps", options.steps), ("--batch-size", options.batch_size),
                            ("--limit", options.limit)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: must be 1 or more")
        if options.split == "test" and default_split(cfg) != "test":
            where = "data.train/validation" if cfg.data.train is not None else f"data.split: {cfg.data.split}"
            raise UserError(f"--split test: {where} has no test split (RadioDiff's test maps come with "
                            "data.split: radiodiff); use --split val")
        return options


def _given(value: tp.Any, default: tp.Any) -> tp.Any:
    return default if value is None else value


def default_split(cfg: Config) -> str:
    """RadioDiff's test split where the config has it (``data.split: radiodiff``), else validation."""
    return "test" if cfg.data.split != "maps" and cfg.data.train is None else "val"


class Evaluation:
    """One evaluation run on this process (every process of an ``accelerate launch`` runs one)."""

    def __init__(self, cfg: Config, options: Options) -> None:
        self.cfg = cfg
        self.o = options

    def run(self) -> None:
        from radiodiff_resume.dist import Ranks
        from radiodiff_resume.evaluation.model import evaluation_model
        from radiodiff_resume.run import load_data, make_accelerator

        accelerator = make_accelerator(self.cfg)
        ranks = Ranks(accelerator)
        train_set, val_set = load_data(self.cfg, accelerator)
        dataset = self.split_dataset(accelerator, train_set, val_set)
        total = min(len(dataset), self.o.limit or len(dataset))  # type: ignore[arg-type]
        with evaluation_model(self.cfg, accelerator, train_set, val_set, checkpoint=self.o.checkpoint,
                              weights=self.o.weights, ema=self.o.ema) as model:
            self.evaluate(accelerator, ranks, model, dataset, total)
        accelerator.wait_for_everyone()
        accelerator.end_training()

    def split_dataset(self, accelerator: Accelerator, train_set: Dataset, val_set: Dataset) -> Dataset:
        if self.o.split == "train":
            return train_set
        if self.o.split == "val":
            return val_set
        from radiodiff_resume.build import dataset_root
        from radiodiff_resume.data.radiomapseer import RadioMapSeer

        d = self.cfg.data
        with accelerator.main_process_first():
            root = dataset_root(self.cfg)
        return RadioMapSeer(root, split="test", image_size=d.image_size, simulation=d.simulation,
                            split_mode=d.split, cars=d.cars)

    def settings(self, model: EvalModel, total: int) -> dict[str, tp.Any]:
        """What the maps' samples depend on: a folder evaluated with other settings is not resumed."""
        d, m = self.cfg.data, self.cfg.model
        return {
            "format": "radiodiff-resume evaluate 1",
            "weights": {**model.identity, "ema": model.ema},
            "sampling": {"objective": m.objective, "timesteps": self.o.steps, "eps": m.eps,
                         "seed": self.o.seed, "batch_size": self.o.batch_size,
                         "mixed_precision": self.cfg.trainer.mixed_precision},
            "data": {"split": self.o.split, "maps": total, "image_size": d.image_size,
                     "simulation": d.simulation, "cars": d.cars, "split_mode": d.split,
                     "plugged": d.validation.target if d.validation is not None else None},
        }

    def folder_name(self, model: EvalModel, total: int, maps: int) -> str:
        """``<checkpoint>-<ema|online>-k<steps>-<split>``, then each setting that is not the default."""
        name = f"{model.name}-{'ema' if model.ema else 'online'}-k{self.o.steps}-{self.o.split}"
        extras = (("first", total, maps), ("b", self.o.batch_size, 1), ("s", self.o.seed, 0))
        return name + "".join(f"-{tag}{value}" for tag, value, usual in extras if value != usual)

    def evaluate(self, accelerator: Accelerator, ranks: Ranks, model: EvalModel, dataset: Dataset,
                 total: int) -> None:
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.evaluation.folder import RECORDS, EvalFolder
        from radiodiff_resume.lock import RunLock

        label = self.folder_name(model, total, len(dataset))  # type: ignore[arg-type]
        folder = EvalFolder(self.o.out or self.cfg.results_folder / "eval" / label)
        settings = self.settings(model, total)
        size = self.o.batch_size
        batches = [list(range(i, min(i + size, total))) for i in range(0, total, size)]
        lock = RunLock(folder.path)
        plan: tuple[str | None, list[list[int]], int] = (None, [], 0)
        if ranks.is_main:
            try:
                note = lock.acquire()
                if note:
                    logger.warning("evaluate: %s", note)
                folder.check_settings(settings)
                (folder.path / RECORDS).mkdir(exist_ok=True)
                left = folder.remove_leftovers()
                if left:
                    logger.info("evaluate: removed %d file(s) a killed run left half-written", len(left))
                done = folder.records()
                pending = [b for b in batches if not all(i in done for i in b)]
                plan = (None, pending, sum(i in done for i in range(total)))
            except UserError as exc:
                plan = (str(exc), [], 0)
        error, pending, finished = ranks.broadcast(plan)
        try:
            if error is not None:
                raise UserError(error)
            if ranks.is_main:
                logger.info("evaluate: %d maps of split %s into %s: %d done before, %d to sample on %d "
                            "process(es) (batches of %d, %d sampling steps, %s weights of %s)", total,
                            self.o.split, folder.path, finished, total - finished, ranks.world,
                            self.o.batch_size, self.o.steps, "EMA" if model.ema else "online", model.where)
            self.sample(accelerator, ranks, model, dataset, folder, pending, total - finished)
            accelerator.wait_for_everyone()
            if ranks.is_main:
                self.finish(folder, model, settings, total)
        finally:
            lock.release()

    def sample(self, accelerator: Accelerator, ranks: Ranks, model: EvalModel, dataset: Dataset,
               folder: EvalFolder, pending: list[list[int]], left: int) -> None:
        """Every ``world``-th pending batch on this rank; after each round all ranks agree on a stop
        request or a failure, so none waits for another that is gone. A stop request is a signal, or
        the job's clock (``slurm.stop_margin_s``) leaving no time for one more round: every map is
        written as it is done, so stopping loses nothing."""
        import time

        from tqdm.auto import tqdm

        from radiodiff_resume.errors import StopRequested, UserError
        from radiodiff_resume.slurm.budget import CLOCK, StopBudget, ask_time_left
        from radiodiff_resume.slurm.environment import job_id
        from radiodiff_resume.slurm.signals import STOP, agreed_reason

        budget = StopBudget("evaluate", None, job_id() is not None, margin_s=self.cfg.slurm.stop_margin_s)
        budget.time_left(ask_time_left(ranks, budget))

        mine = pending[ranks.rank::ranks.world]
        bar = tqdm(total=sum(map(len, mine)), unit="map", disable=not ranks.is_main, dynamic_ncols=True,
                   desc="evaluate" if ranks.world == 1 else f"evaluate (rank 0 of {ranks.world})")
        done = 0
        for step in range(math.ceil(len(pending) / ranks.world)):
            failure = None
            if step < len(mine):
                started = time.perf_counter()
                try:
                    self.sample_batch(accelerator, ranks.rank, model, dataset, folder, mine[step])
                except Exception as exc:  # every rank must learn of it before the next round
                    failure = exc
                else:
                    bar.update(len(mine[step]))
                    budget.step(time.perf_counter() - started)
            if STOP.reason is None and budget.out_of_time():
                STOP.request(CLOCK)
            reports = ranks.gather((STOP.reason, None if failure is None else f"{type(failure).__name__}: "
                                                                              f"{failure}"))
            if failure is not None:
                bar.close()
                raise failure
            failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(reports) if e is not None]
            if failed:
                bar.close()
                raise UserError(f"evaluation failed on {'; '.join(failed)}; the maps finished so far are "
                                "kept")
            done += sum(len(pending[k]) for k in range(step * ranks.world,
                                                       min((step + 1) * ranks.world, len(pending))))
            reasons = [why for why, _ in reports]
            if any(reasons):
                bar.close()
                reason, rank = agreed_reason(reasons)
                raise StopRequested(f"evaluate stopped ({reason} on rank {rank}) with {done} of the {left} "
                                    f"maps left sampled, kept in {folder.path}", reason)
        bar.close()

    def sample_batch(self, accelerator: Accelerator, rank: int, model: EvalModel, dataset: Dataset,
                     folder: EvalFolder, indices: list[int]) -> None:
        import torch
        from torch.utils.data import default_collate

        from radiodiff_resume.evaluation.metrics import map_metrics
        from radiodiff_resume.trainer.state import derive_seed

        items = [dataset[i] for i in indices]
        batch = default_collate(items)
        device = accelerator.device
        generator = torch.Generator(device).manual_seed(derive_seed(self.o.seed, "evaluate", indices[0]))
        with accelerator.autocast():
            pred = model.ldm.sample(batch["cond"].to(device), generator=generator, steps=self.o.steps)
        values = map_metrics(pred, batch["image"])
        for j, index in enumerate(indices):
            name = items[j].get("img_name") or f"{index:06d}.png"
            folder.write_map(index, Path(name).name, pred[j], values[j], rank)

    def finish(self, folder: EvalFolder, model: EvalModel, settings: dict[str, tp.Any], total: int) -> None:
        """Tables from every process's records, and the summary on stdout (main process)."""
        from radiodiff_resume.errors import UserError

        found = folder.records()
        missing = [i for i in range(total) if i not in found]
        if missing:
            raise UserError(f"{folder.path}: {len(missing)} of {total} maps have no record after sampling "
                            f"(e.g. index {missing[0]}): did another process write there meanwhile? Run the "
                            "same command again to sample them")
        records = [found[i] for i in range(total)]
        document = {"settings": settings, "checkpoint": str(model.where), "metrics": self.o.metrics}
        folder.write_tables(records, document)
        weights = "EMA" if model.ema else "online"
        print(summary_text(records, self.o.metrics, f"{total} maps of split {self.o.split}, {model.name} "
                           f"(step {model.identity.get('step')}), {weights} weights, {self.o.steps} sampling "
                           f"steps, seed {self.o.seed}: {folder.path}"), flush=True)


def summary_text(records: tp.Sequence[Record], convention: str, header: str) -> str:
    """Mean ± std (population, over maps) and count per metric under ``convention``, its data range
    stated."""
    from radiodiff_resume.evaluation.metrics import summarize

    rows = summarize(records, convention)
    lines = [header, f"metrics {convention}: {CONVENTIONS[convention]}",
             f"{'metric':<6}  {'mean':>12}  {'std':>12}  count",
             f"{'-' * 6}  {'-' * 12}  {'-' * 12}  -----"]
    for metric, s in rows.items():
        unit = " dB" if metric == "psnr" else ""
        lines.append(f"{metric.upper():<6}  {s['mean']:>12.6g}  {s['std']:>12.6g}  "
                     f"{s['count']}/{len(records)}{unit}")
    other = next(name for name in CONVENTIONS if name != convention)
    lines.append(f"(every map's values under both conventions: metrics.csv, metrics.json; --metrics {other} "
                 "for the other convention)")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from radiodiff_resume.slurm.signals import STOP

    STOP.install()  # first: a preemption while torch imports or the model loads is kept too
    from radiodiff_resume.config import load_config
    from radiodiff_resume.evaluation.sample_yaml import check_window, read_sampler
    from radiodiff_resume.slurm.environment import export_torch_env

    section = read_sampler(Path(args.cfg))
    cfg = load_config(args.cfg, [*section.overrides, *args.overrides])
    check_window(section, cfg.data.image_size, str(args.cfg))
    options = Options.resolve(args, section, cfg)
    STOP.install(cfg.slurm.signals)
    export_torch_env()
    try:
        Evaluation(cfg, options).run()
    finally:
        STOP.ignore()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "evaluate", help="sample a split with a trained LDM: one PNG per map and NMSE/RMSE/SSIM/PSNR "
                         "(resumable, multi-process)",
        description="Sample every map of a split with RadioDiff's sampler, write one PNG per map under "
                    "RadioDiff's file name and a metrics table (metrics.csv, metrics.json, a summary on "
                    "stdout). Run it again with the same settings to finish an interrupted evaluation; under "
                    "`accelerate launch` the processes share the maps. --cfg may be a RadioDiff sample yaml: "
                    "its sampler section sets the defaults (a flag given here wins). Exit 0: done; 2: usage "
                    "or config error; 3: stopped by a signal (run the same command to go on).")
    parser.add_argument("--cfg", required=True, help="the run's YAML config, or a RadioDiff sample yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for train (e.g. data.root=...)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None,
                        help="a checkpoint folder (checkpoints/step-…), or 'latest' (default): the newest "
                             "that verifies")
    source.add_argument("--weights", default=None,
                        help="a RadioDiff LDM file (model-N.pt), loaded as its sample_cond_ldm.py loads it")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                         help="sample with the EMA weights (default when the run keeps an EMA)")
    weights.add_argument("--online", dest="ema", action="store_const", const=False,
                         help="sample with the online (trained) weights")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="the maps to evaluate; default: test (RadioDiff's, with data.split: radiodiff), "
                             "else val")
    parser.add_argument("--sampling-timesteps", type=int, default=None,
                        help="sampler steps (default: model.sampling_timesteps)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="maps sampled together per process (default 1, RadioDiff's); part of the "
                             "settings, since a batch's noise comes from one generator")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N maps of the split")
    parser.add_argument("--out", default=None,
                        help="output folder (default <results_folder>/eval/<checkpoint>-<ema|online>-"
                             "k<steps>-<split>, then -first<N>, -b<batch size>, -s<seed> where not the "
                             "default)")
    parser.add_argument("--metrics", choices=tuple(CONVENTIONS), default="radiodiff",
                        help="convention of the summary: radiodiff (default; data range from each map, as "
                             "RadioDiff's sample_cond_ldm.py with torchmetrics <= 1.4) or fixed (data range "
                             "1, as this package's validation); both are recorded for every map")
    parser.set_defaults(func=cmd_evaluate)
