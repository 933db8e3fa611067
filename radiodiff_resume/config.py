"""Configuration: a typed schema, YAML + ``key=value`` overrides, one validation pass.

Key names follow RadioDiff's configs where RadioDiff has the key (``trainer.lr``,
``trainer.train_num_steps``, ``data.batch_size``, ``model.scale_factor`` ...), so a
RadioDiff user reads a config at a glance. Pluggable parts use the LDM
``target:`` / ``params:`` convention.

Validation never stops at the first problem: every unknown key, wrong type and
impossible value is collected and raised as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import signal
import typing as tp
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from radiodiff_resume.errors import ConfigError
from radiodiff_resume.slurm.signals import signal_number
from radiodiff_resume.trees import leaves

MIXED_PRECISIONS = ("no", "fp16", "bf16")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LDM_LOSSES = ("l2", "l1")
OBJECTIVES = ("ddpm", "radiodiff", "radiodiff_paper")
RADIODIFF_OBJECTIVES = ("radiodiff", "radiodiff_paper")
SPLITS = ("maps", "radiodiff", "radiodiff_600")
LR_SCHEDULES = ("radiodiff", "cosine")
RECON_LOSSES = ("charbonnier", "l1")
CLIP_MODES = ("zscore", "agc", "fixed", "none")
NONFINITE_GRADS = ("skip", "scrub")
GUARD_PROFILES = ("protective", "faithful")


@dataclass
class PluginConfig:
    """A class named by dotted path and the keyword arguments to build it with."""

    target: str = MISSING
    """Dotted import path, e.g. ``diffusers.UNet2DModel`` or ``mypkg.nets.MyUNet``."""
    params: dict[str, tp.Any] = field(default_factory=dict)
    """Keyword arguments; the builder adds the shape arguments it derives itself."""


@dataclass
class LoopConfig:
    """Settings of one training loop (shared by the first stage and the LDM)."""

    train_num_steps: int = 1000
    """Optimizer steps to train for (RadioDiff: ``trainer.train_num_steps``)."""
    gradient_accumulate_every: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    lr_schedule: str = "radiodiff"
    """``radiodiff``: LR = ``lr`` × max((1 − step/train_num_steps) ** ``lr_decay_power``, ``min_lr``),
    as in RadioDiff. ``cosine``: cosine decay from ``lr`` to the absolute ``final_lr``."""
    min_lr: float = 5e-6
    """``radiodiff`` schedule: floor of the LR *multiplier* (as in RadioDiff, where the end LR is
    ``lr × min_lr``)."""
    lr_decay_power: float = 0.96
    """``radiodiff`` schedule: the exponent (RadioDiff hard-codes 0.96 for the LDM, 0.95 for the
    first stage)."""
    final_lr: float = 0.0
    """``cosine`` schedule: the learning rate at ``train_num_steps``."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps before either schedule (RadioDiff has none: 0)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (RadioDiff's default)."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this total norm; null disables clipping."""
    save_and_sample_every: int = 1000
    """Validate and write a sample grid every this many steps."""
    log_freq: int = 100
    """Log the mean training loss every this many steps."""
    use_ema: bool = True
    """Keep an exponential moving average of the trainable weights."""
    ema_decay: float = 0.999
    """EMA decay: the cap of the power-2/3 warm-up (RadioDiff's ``beta``)."""
    ema_update_after_step: int = 0
    """Optimizer steps during which the EMA copies the online weights (as in RadioDiff)."""
    ema_update_every: int = 1
    """Update the EMA every this many optimizer steps (as in RadioDiff)."""
    val_batches: int = 2
    """Validation batches per process at each validation (0 disables validation)."""
    num_sample_images: int = 4
    """Rows in each PNG sample grid."""


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                    "comet_ml": ("comet_ml",), "aim": ("aim",), "mlflow": ("mlflow",),
                    "clearml": ("clearml",), "dvclive": ("dvclive",), "swanlab": ("swanlab",),
                    "trackio": ("trackio",)}
"""accelerate's experiment trackers by ``log_with`` name, and the packages each works with (any one)."""


def installed(*modules: str) -> bool:
    """Whether one of ``modules`` can be imported here (found, not imported)."""
    return any(importlib.util.find_spec(m) is not None for m in modules)


def default_trackers() -> list[str]:
    """``trainer.log_with`` when the config does not say: tensorboard where it is installed, else none."""
    return ["tensorboard"] if installed(*TRACKER_PACKAGES["tensorboard"]) else []


@dataclass
class TrainerConfig(LoopConfig):
    """The LDM loop plus run-wide settings."""

    results_folder: str = "./results/radiodiff"
    """Where config, metrics, samples and weights go."""
    mixed_precision: str = "no"
    """``no``, ``fp16`` (with a GradScaler) or ``bf16``."""
    amp: bool = False
    """RadioDiff compatibility: with ``fp16: true`` means ``mixed_precision: fp16``."""
    fp16: bool = False
    """RadioDiff compatibility: see ``amp``."""
    seed: int = 0
    """Fixes every random choice of the run."""
    log_with: list[str] = field(default_factory=default_trackers)
    """accelerate's experiment trackers (``tensorboard``, ``wandb`` ...; default: ``[tensorboard]``
    where it is installed, else ``[]``), resumed across restarts; metrics.jsonl is always written."""
    deterministic: bool = False
    """Deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN deterministic, no
    benchmark, ``CUBLAS_WORKSPACE_CONFIG``): what a bit-exact resume on a GPU needs; slower there."""


@dataclass
class SyntheticConfig:
    """The embedded default dataset, generated on first use."""

    cache_dir: str = "~/.cache/radiodiff_resume"
    """Folder the generated dataset is cached in."""
    num_maps: int = 40
    """City maps to generate."""
    tx_per_map: int = 4
    """Transmitters per map."""
    seed: int = 0
    """Seed of the generator."""
    size: int = 256
    """Side of the PNGs written, in pixels (RadioMapSeer: 256)."""


@dataclass
class DataConfig:
    """RadioMapSeer (real or synthetic) or a plugged-in dataset."""

    root: str | None = None
    """RadioMapSeer folder; null uses the synthetic dataset from ``data.synthetic``."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    simulation: str = "DPM"
    """Which ``gain/<simulation>`` maps are the targets: ``DPM``, ``IRT2`` ... (the synthetic
    stand-in has ``DPM`` and ``IRT2``)."""
    cars: bool = False
    """RadioDiff's dynamic radio map (its ``DPMCAR`` data): the car map (``png/cars``) replaces
    the second buildings channel of the condition, and the target is ``gain/cars<simulation>``."""
    image_size: int = 256
    """Side the maps are resized to before training."""
    batch_size: int | None = 8
    """The global batch of one micro-step, split across the processes (as in RadioDiff, whose
    Accelerator has ``split_batches=True``); null when ``batch_size_per_process`` is set."""
    batch_size_per_process: int | None = None
    """Instead of ``batch_size``: what each process loads (the global batch then grows with the
    number of processes)."""
    split: str = "maps"
    """``maps``: a seeded map-level split by ``val_fraction`` / ``split_seed``. ``radiodiff``:
    RadioDiff's fixed split of RadioMapSeer's maps as released with the paper (501 training maps),
    so validation numbers compare with the paper. ``radiodiff_600``: the split of RadioDiff's later
    loaders (601 training maps, one of them also the first validation and test map)."""
    val_fraction: float = 0.1
    """Fraction of maps (not samples) held out for validation (``split: maps``)."""
    split_seed: int = 0
    """Seed of the map-level train/val split (``split: maps``)."""
    max_train_samples: int | None = None
    """Use only the first N training samples (null: all)."""
    max_val_samples: int | None = None
    """Use only the first N validation samples (null: all)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    train: PluginConfig | None = None
    """Plug in your own training dataset: ``target`` + ``params``; items are dicts with
    ``image`` [1,H,W] and ``cond`` [C,H,W] in [-1, 1]."""
    validation: PluginConfig | None = None
    """Plug in your own validation dataset (same contract as ``data.train``)."""


@dataclass
class FirstStageLossConfig:
    """Reconstruction loss of the autoencoder."""

    type: str = "charbonnier"
    """``charbonnier`` or ``l1``."""
    kl_weight: float = 1e-6
    """Weight of the KL term."""
    ms_ssim_weight: float = 0.0
    """Weight of the (1 - MS-SSIM) term; 0 disables it."""


def _default_autoencoder() -> dict[str, tp.Any]:
    return {
        "block_out_channels": [64, 128, 256],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 2,
        "latent_channels": 3,
        "norm_num_groups": 32,
    }


@dataclass
class FirstStageConfig:
    """The frozen first stage (an ``AutoencoderKL`` by default)."""

    target: str = "diffusers.AutoencoderKL"
    """Autoencoder class; called with ``in_channels``, ``out_channels``, ``sample_size`` added."""
    params: dict[str, tp.Any] = field(default_factory=_default_autoencoder)
    """Keyword arguments of ``target``."""
    ckpt_path: str | None = None
    """Weights of the trained first stage (``.safetensors``)."""
    train_if_missing: bool = False
    """Train the first stage first when ``ckpt_path`` does not exist yet."""
    batch_size: int | None = None
    """Global batch of first-stage training, split like ``data.batch_size`` (null: the data's)."""
    loss: FirstStageLossConfig = field(default_factory=FirstStageLossConfig)
    trainer: LoopConfig = field(default_factory=lambda: LoopConfig(
        use_ema=False, lr=1e-4, lr_decay_power=0.95, weight_decay=0.0))
    """Loop settings of first-stage training."""


def _default_unet() -> PluginConfig:
    return PluginConfig(
        target="diffusers.UNet2DModel",
        params={
            "block_out_channels": [128, 256, 256, 512],
            "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
        },
    )


def _default_cond_encoder() -> PluginConfig:
    return PluginConfig(
        target="radiodiff_resume.models.ldm.ConditionEncoder",
        params={"hidden_channels": [32, 64, 128], "out_channels": 4},
    )


@dataclass
class ModelConfig:
    """The conditional latent diffusion model."""

    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    unet: PluginConfig = field(default_factory=_default_unet)
    """Denoiser; called with ``sample_size``, ``in_channels``, ``out_channels`` added."""
    cond_encoder: PluginConfig = field(default_factory=_default_cond_encoder)
    """Condition encoder; called with ``in_channels`` and ``downsample`` added."""
    objective: str = "ddpm"
    """``ddpm``: DDPM loss, DDIM sampling. ``radiodiff``: RadioDiff's decoupled constant-SDE diffusion
    (continuous time, the denoiser predicts drift and noise) with the loss weights of upstream's current
    ``LatentDiffusion`` (``2 exp(1 - t)``, ``exp(sqrt t)``); ``radiodiff_paper``: the same with the weights
    of the code released with the paper (``(t + 1)/sqrt t``, ``sqrt(2 - t)/sqrt(1 - t + eps)``). Both
    ignore ``timesteps``, ``beta_schedule`` and ``prediction_type``."""
    timesteps: int = 1000
    """Diffusion steps of the DDPM noise schedule."""
    sampling_timesteps: int = 50
    """DDIM steps when sampling (``radiodiff``: steps from t=1 to ``eps``, plus one to 0)."""
    beta_schedule: str = "linear"
    """DDPM beta schedule."""
    prediction_type: str = "epsilon"
    """What the denoiser predicts."""
    loss_type: str = "l2"
    """``l2`` or ``l1``."""
    eps: float = 1e-4
    """``radiodiff`` only: smallest training time and the time of the last sampling step."""
    weighting_loss: bool = True
    """``radiodiff`` objectives only: weigh the drift and noise loss terms by time, as upstream's
    ``weighting_loss`` does (the paper-release code applied its weights whatever the flag said; here
    false turns them off for both)."""
    use_l1: bool = True
    """``radiodiff`` only: average the ``loss_type`` terms with the same terms in L1."""
    scale_factor: float = 1.0
    """Latent scale used when ``scale_by_std`` and ``default_scale`` are both true (as in RadioDiff:
    otherwise it must stay 1.0)."""
    scale_by_std: bool = True
    """Scale the latents (as in RadioDiff): by ``scale_factor`` with ``default_scale``, else by 1/std
    of the first training batch's latents, measured on a fresh run. False: latents unscaled."""
    default_scale: bool = False
    """With ``scale_by_std``: use the configured ``scale_factor`` instead of measuring (as in
    RadioDiff, whose shipped configs set it true with ``scale_factor: 0.3``)."""


@dataclass
class CheckpointConfig:
    """Verified checkpoints under ``<results_folder>/checkpoints`` (and ``first_stage/checkpoints``)."""

    resume: str = "auto"
    """``auto``: the newest checkpoint that verifies; ``never``: start fresh; or a checkpoint folder."""
    every: int | None = None
    """Save every N steps (null: every ``trainer.save_and_sample_every``); always at the end."""
    keep_last: int = 3
    """Committed checkpoints kept (at least 2; deleted only after a newer one is committed)."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of this."""
    probe_tolerance: float = 1e-3
    """Relative tolerance of the probe when the environment (device, kernels, library builds,
    dtype, flags) differs from the one that saved; identical environments must match bit for bit."""
    accept_probe_mismatch: bool = False
    """Resume even when the probe does not reproduce (after a deliberate code change); logged."""
    crash_loop_restarts: int | None = 3
    """In a SLURM batch job: a checkpoint from which this many runs in a row died before making
    progress is set aside (moved, not deleted) and the next older one used (null: never)."""
    crash_loop_progress_steps: int = 10
    """Optimizer steps past the resumed checkpoint after which a run has made progress: a later
    death (or one after a stop signal was seen) is not counted against that checkpoint."""
    async_save: bool = True
    """Write a checkpoint in a background thread: training waits only for a host copy of the state
    (false: training waits until the checkpoint is committed). A stop and the end of training still
    wait for the commit."""


@dataclass
class LossGuardConfig:
    """Loss spike detection: the z-score of a step's loss against recent accepted losses."""

    spike_zscore: float | None = 6.0
    """Skip the step when its loss lies this many standard deviations above the window's mean
    (the deviation is floored at 1% of the mean); null disables spike detection."""
    window: int = 100
    """Accepted losses the mean and deviation are taken over."""
    warmup: int = 20
    """Accepted losses needed before spikes are detected."""
    rebaseline_after: int | None = 10
    """After this many steps in a row skipped as spikes with a finite gradient norm at or below the
    clip threshold, the window is refilled with their losses: a lasting change of the loss level is
    accepted (null: never; acts only below ``rollback.max_consecutive_skips``)."""


@dataclass
class ClipConfig:
    """Gradient clipping, applied once per optimizer step with the norm computed once."""

    mode: str = "zscore"
    """``zscore``: ``trainer.max_grad_norm`` as a ceiling plus adaptive spike clipping (ZClip);
    ``agc``: unit-wise adaptive clipping against the weight norm (NFNet); ``fixed``: only
    ``trainer.max_grad_norm``; ``none``: no clipping."""
    zscore: float = 2.5
    """``zscore``: clip a norm whose z-score exceeds this down to mean + zscore * std."""
    alpha: float = 0.97
    """``zscore``: smoothing of the running mean and variance of the (clipped) norm."""
    warmup: int = 25
    """``zscore``: optimizer steps of plain statistics before adaptive clipping starts."""
    agc_lambda: float = 0.01
    """``agc``: largest ratio of a unit's gradient norm to its weight norm."""
    agc_eps: float = 1.0e-3
    """``agc``: floor of the weight norm (so zero-initialised units can move)."""


@dataclass
class NormStatsConfig:
    """Running statistics (BatchNorm and any module with ``running_mean``/``running_var``)."""

    check_every: int | None = None
    """Check them for non-finite values every N steps (null: at each log interval); they are
    also checked after loading, before validation and before every save."""
    recalibrate_batches: int = 4
    """Training batches a repair (and the EMA's own statistics) are recomputed over."""
    ema_statistics: bool = True
    """Validate and export the EMA weights with statistics recomputed for them, not the
    online model's."""
    momentum: float | None = None
    """Set this momentum on every BatchNorm layer (null: keep the model's)."""
    eps: float | None = None
    """Set this eps on every BatchNorm layer (null: keep the model's; larger is safer in fp16)."""


@dataclass
class RollbackConfig:
    """Escalation when skipping does not help."""

    max_consecutive_skips: int = 20
    """Roll back to the newest verified checkpoint after this many skipped steps in a row."""
    skip_batches: int | None = None
    """Batches to skip past the checkpoint's data position after a rollback (null: all batches
    consumed since it, so training continues with the data that comes next)."""
    lr_scale: float = 1.0
    """Multiply the learning rate by this at each rollback (1: unchanged)."""
    max_rollbacks: int = 3
    """Stop, naming the last good checkpoint, after this many rollbacks without a new checkpoint."""


@dataclass
class GuardConfig:
    """Numerical guards of both stages: batches, losses, gradients, running statistics."""

    enabled: bool = True
    """False: the plain loop (clip to ``trainer.max_grad_norm``, step); for comparisons only."""
    profile: str = "protective"
    """``protective``: every guard as configured. ``faithful``: what RadioDiff itself does to a healthy
    step, for reproducing its numbers: gradients clipped to ``trainer.max_grad_norm`` only
    (``clip.mode: fixed``) and no loss-spike skipping (``loss.spike_zscore: null``); the non-finite
    checks, skips, running-statistics repair and rollbacks stay on (RadioDiff has none: a step they act
    on is one that would have put NaN into its weights)."""
    nonfinite_grads: str = "skip"
    """``skip``: no optimizer, LR, EMA or step advance; ``scrub``: set non-finite entries to 0,
    then clip and step."""
    max_abs_input: float | None = 1.0e4
    """A sample holding a floating value of larger magnitude is left out as a NaN/Inf one is (large
    but finite inputs would reach BatchNorm's running statistics); null: only NaN/Inf."""
    loss: LossGuardConfig = field(default_factory=LossGuardConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    norm_stats: NormStatsConfig = field(default_factory=NormStatsConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)


@dataclass
class SlurmConfig:
    """Stopping on signals, and the SLURM job ``radiodiff-resume submit`` asks for (submitit)."""

    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    """Signals that stop the run at the next step boundary with a committed checkpoint (exit 3)."""
    signal_lead_s: int = 120
    """Seconds before the time limit Slurm sends the signal (``--signal=USR2@lead``); it must cover
    one step (a validation, if one is due) plus one save."""
    stop_margin_s: int | None = 60
    """The clock-based stop: inside a SLURM job with a time limit, the run stops by itself (a
    committed checkpoint, exit 3, stop reason ``clock``) once one more step, the validation due with it
    and one save — as measured in this job — would end less than this many seconds before the job's end
    time (asked from the controller when training starts and after each save). It needs no ``--signal``.
    null: no clock-based stop. It backs up the signal (``signal_lead_s``, 120 by default, comes first
    whenever a step and a save take under a minute)."""
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    """0 for CPU jobs."""
    tasks_per_node: int | None = None
    """null: one task per GPU (1 without GPUs). Each task is one training process."""
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 60
    """The job's time limit; the job requeues itself when it reaches it."""
    max_num_timeout: int = 20
    """Requeues on reaching the time limit before the job gives up (preemptions are not counted)."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "radiodiff"
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job starts (``module load``, ``source venv/bin/activate``)."""
    additional_parameters: dict[str, tp.Any] = field(default_factory=dict)
    """Other sbatch options, e.g. ``{exclusive: true, mail_type: END}``."""
    log_folder: str | None = None
    """Where submitit keeps its job files and logs (null: ``<results_folder>/slurm``)."""


@dataclass
class Config:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def results_folder(self) -> Path:
        return Path(self.trainer.results_folder)

    def first_stage_folder(self) -> Path:
        """Where first-stage training writes its logs and samples."""
        return self.results_folder / "first_stage"


def resolved_mixed_precision(trainer: TrainerConfig) -> str:
    """Fold RadioDiff's ``amp``/``fp16`` flags into one ``mixed_precision`` value."""
    if trainer.amp and trainer.fp16:
        return "fp16"
    return trainer.mixed_precision


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML parse error: what and where (PyYAML's own message spans several)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_config(path: str | Path, overrides: tp.Sequence[str] = ()) -> Config:
    """Read ``path``, apply ``key=value`` overrides, validate, return the typed config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found; pass --cfg configs/radio_tiny.yaml or another YAML file"
        )
    try:
        user = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(user, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    from radiodiff_resume.compat import radiodiff_config as radiodiff

    raw = OmegaConf.to_container(user)
    if radiodiff.is_radiodiff(raw):  # translated first, so overrides apply to our keys
        ours, report = radiodiff.translate(tp.cast(dict, raw), Config)
        radiodiff.log_report(report, str(path), tp.cast(dict, raw))
        return build_config(ours, overrides, source=f"{path}, translated from RadioDiff's format")
    return build_config(user, overrides, source=str(path))


def build_config(
    user: tp.Mapping[str, tp.Any] | DictConfig,
    overrides: tp.Sequence[str] = (),
    source: str = "<config>",
) -> Config:
    """Merge ``user`` and ``overrides`` onto the schema; raise one error listing every problem."""
    problems: list[str] = []
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    for o in bad:
        problems.append(f"override '{o}': expected key=value, e.g. trainer.lr=1e-4")
    try:
        dotlist = OmegaConf.from_dotlist([o for o in overrides if o not in bad])
    except OmegaConfBaseException as exc:
        problems.append(f"overrides: {exc}")
        dotlist = OmegaConf.create()
    raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(dict(user)), dotlist))
    schema = OmegaConf.structured(Config)
    _assign(schema, raw, Config, "", problems)
    _missing(schema, "", problems)
    cfg: Config | None = None
    if not any(p.endswith(": required but not set") for p in problems):
        cfg = tp.cast(Config, OmegaConf.to_object(schema))
        problems.extend(apply_guard_profile(cfg.guard))
        reported = [p.split(":", 1)[0] for p in problems]
        problems.extend(p for p in validate(cfg) if not any(_mentions(p, k) for k in reported))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise ConfigError(
            f"invalid config ({source} + overrides), {n} problem{'s' * (n > 1)}:\n{lines}\n"
            "Fix these in the YAML file or with key=value overrides and run again."
        )
    assert cfg is not None
    return cfg


def _assign(node: DictConfig, raw: tp.Any, schema: type, prefix: str, problems: list[str]) -> None:
    """Assign ``raw`` into the structured ``node`` leaf by leaf, collecting every problem."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<top>'}: got {raw!r}; expected a mapping")
        return
    hints = tp.get_type_hints(schema)
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            problems.append(f"{path}: unknown key{hint}; allowed here: {', '.join(allowed)}")
            continue
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, dict):
            if node[key] is None:
                node[key] = OmegaConf.structured(sub)
            _assign(node[key], value, sub, f"{path}.", problems)
            continue
        if hints[key] is float and isinstance(value, str):
            value = _float_or_str(value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                node[key] = value
        except OmegaConfBaseException as exc:
            msg = str(exc).splitlines()[0]
            problems.append(f"{path}: got {value!r}; expected {_type_name(hints[key])} ({msg})")


def _mentions(problem: str, key: str) -> bool:
    """Whether ``problem`` is about ``key`` (a value check on a leaf whose type already failed)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", problem) is not None


def _missing(node: DictConfig, prefix: str, problems: list[str]) -> None:
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            problems.append(f"{path}: required but not set")
        elif isinstance(node[key], DictConfig) and OmegaConf.get_type(node[key]) is not dict:
            _missing(node[key], f"{path}.", problems)


def _dataclass_of(hint: tp.Any) -> type | None:
    for candidate in (hint, *tp.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return tp.cast(type, candidate)
    return None


def _float_or_str(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _type_name(hint: tp.Any) -> str:
    args = [a for a in tp.get_args(hint) if a is not type(None)]
    if tp.get_origin(hint) is tp.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    return getattr(hint, "__name__", str(hint))


def measures_scale_factor(m: ModelConfig) -> bool:
    """Whether a fresh run sets ``scale_factor`` to 1/std of the first batch's latents (RadioDiff's
    ``scale_by_std`` without ``default_scale``); otherwise ``model.scale_factor`` is used as is
    (validation keeps it at 1.0 unless both flags are set, as in RadioDiff)."""
    return m.scale_by_std and not m.default_scale


def validate(cfg: Config) -> list[str]:
    """Value checks that types cannot express; returns every problem found."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: tp.Any, allowed: str) -> None:
        if not ok:
            problems.append(f"{key}: got {value!r}; allowed: {allowed}")

    def loop(p: str, c: LoopConfig) -> None:
        need(c.train_num_steps >= 1, f"{p}.train_num_steps", c.train_num_steps, ">= 1")
        need(
            c.gradient_accumulate_every >= 1,
            f"{p}.gradient_accumulate_every",
            c.gradient_accumulate_every,
            ">= 1",
        )
        need(c.lr > 0 and math.isfinite(c.lr), f"{p}.lr", c.lr, "a finite value > 0")
        need(c.lr_schedule in LR_SCHEDULES, f"{p}.lr_schedule", c.lr_schedule, ", ".join(LR_SCHEDULES))
        need(0 <= c.min_lr <= 1, f"{p}.min_lr", c.min_lr,
             "0 .. 1 (a floor on the LR multiplier, as in RadioDiff; an absolute end LR is "
             f"{p}.final_lr with {p}.lr_schedule=cosine)")
        need(c.lr_decay_power > 0 and math.isfinite(c.lr_decay_power), f"{p}.lr_decay_power",
             c.lr_decay_power, "a finite value > 0")
        need(0 <= c.final_lr <= c.lr, f"{p}.final_lr", c.final_lr, f"between 0 and {p}.lr ({c.lr})")
        unused = ("final_lr",) if c.lr_schedule == "radiodiff" else ("min_lr", "lr_decay_power")
        defaults = LoopConfig() if p == "trainer" else FirstStageConfig().trainer
        for key in unused:
            if getattr(c, key) != getattr(defaults, key):
                problems.append(f"{p}.{key}: got {getattr(c, key)!r}, but {p}.lr_schedule is "
                                f"{c.lr_schedule!r}, which does not use it; remove it or change "
                                f"{p}.lr_schedule")
        need(c.lr_warmup_steps >= 0, f"{p}.lr_warmup_steps", c.lr_warmup_steps, ">= 0")
        need(c.weight_decay >= 0, f"{p}.weight_decay", c.weight_decay, ">= 0")
        need(
            c.max_grad_norm is None or c.max_grad_norm > 0,
            f"{p}.max_grad_norm",
            c.max_grad_norm,
            "> 0, or null to disable clipping",
        )
        for k in ("save_and_sample_every", "log_freq", "ema_update_every"):
            need(getattr(c, k) >= 1, f"{p}.{k}", getattr(c, k), ">= 1")
        need(0.0 <= c.ema_decay < 1.0, f"{p}.ema_decay", c.ema_decay, "0 <= decay < 1")
        need(c.ema_update_after_step >= 0, f"{p}.ema_update_after_step", c.ema_update_after_step, ">= 0")
        need(c.val_batches >= 0, f"{p}.val_batches", c.val_batches, ">= 0")
        need(c.num_sample_images >= 1, f"{p}.num_sample_images", c.num_sample_images, ">= 1")

    t = cfg.trainer
    loop("trainer", t)
    need(t.mixed_precision in MIXED_PRECISIONS, "trainer.mixed_precision", t.mixed_precision,
         ", ".join(MIXED_PRECISIONS))
    if t.amp and not t.fp16:
        problems.append(
            "trainer.amp: true with trainer.fp16: false means fp16 autocast without a loss "
            "scaler (RadioDiff's setting), a common NaN source; set trainer.mixed_precision=bf16 "
            "(and trainer.amp=false), or trainer.fp16=true to get fp16 with a GradScaler"
        )
    if t.fp16 and not t.amp:
        problems.append("trainer.fp16: true needs trainer.amp: true; or use trainer.mixed_precision=fp16")
    if t.amp and t.fp16 and t.mixed_precision not in ("no", "fp16"):
        problems.append(
            f"trainer.mixed_precision: got {t.mixed_precision!r} but trainer.amp/fp16 ask for fp16; "
            "set only one of them"
        )
    need(bool(t.results_folder), "trainer.results_folder", t.results_folder, "a folder path")
    need(t.seed >= 0, "trainer.seed", t.seed, ">= 0")
    for name in t.log_with:
        if name not in TRACKER_PACKAGES:
            problems.append(f"trainer.log_with: got {name!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
        elif not installed(*TRACKER_PACKAGES[name]):
            problems.append(f"trainer.log_with: {name} is not installed here; pip install "
                            f"{TRACKER_PACKAGES[name][0]}, or leave it out (trainer.log_with=[])")
    need(len(set(t.log_with)) == len(t.log_with), "trainer.log_with", t.log_with, "each tracker once")

    fs = cfg.model.first_stage
    loop("model.first_stage.trainer", fs.trainer)
    need(fs.loss.type in RECON_LOSSES, "model.first_stage.loss.type", fs.loss.type, ", ".join(RECON_LOSSES))
    need(fs.loss.kl_weight >= 0, "model.first_stage.loss.kl_weight", fs.loss.kl_weight, ">= 0")
    need(fs.loss.ms_ssim_weight >= 0, "model.first_stage.loss.ms_ssim_weight", fs.loss.ms_ssim_weight, ">= 0")
    need(fs.batch_size is None or fs.batch_size >= 1, "model.first_stage.batch_size", fs.batch_size, ">= 1")
    if fs.ckpt_path is None:
        problems.append(
            "model.first_stage.ckpt_path: required; the path of the first-stage weights "
            "(.safetensors), with model.first_stage.train_if_missing=true to train them first"
        )
    elif not fs.ckpt_path.endswith(".safetensors"):
        problems.append(
            f"model.first_stage.ckpt_path: got {fs.ckpt_path!r}; expected a .safetensors file"
        )

    m = cfg.model
    need(m.objective in OBJECTIVES, "model.objective", m.objective, ", ".join(OBJECTIVES))
    need(m.timesteps >= 1, "model.timesteps", m.timesteps, ">= 1")
    if m.objective in RADIODIFF_OBJECTIVES:
        need(m.sampling_timesteps >= 1, "model.sampling_timesteps", m.sampling_timesteps, ">= 1")
        need(0 < m.eps < 1 / max(m.sampling_timesteps, 1), "model.eps", m.eps,
             "0 < eps < 1/model.sampling_timesteps (the stride from t=1 to eps must stay positive)")
    else:
        need(1 <= m.sampling_timesteps <= m.timesteps, "model.sampling_timesteps", m.sampling_timesteps,
             f"1 .. model.timesteps ({m.timesteps})")
        unused = ModelConfig()
        for key in ("eps", "weighting_loss", "use_l1"):
            if getattr(m, key) != getattr(unused, key):
                problems.append(f"model.{key}: got {getattr(m, key)!r}, but only model.objective=radiodiff "
                                f"uses it (model.objective is {m.objective!r}); remove it, or set "
                                "model.objective=radiodiff")
    need(m.beta_schedule in BETA_SCHEDULES, "model.beta_schedule", m.beta_schedule, ", ".join(BETA_SCHEDULES))
    need(m.prediction_type in PREDICTION_TYPES, "model.prediction_type", m.prediction_type,
         ", ".join(PREDICTION_TYPES))
    need(m.loss_type in LDM_LOSSES, "model.loss_type", m.loss_type, ", ".join(LDM_LOSSES))
    need(m.scale_factor > 0 and math.isfinite(m.scale_factor), "model.scale_factor", m.scale_factor,
         "a finite value > 0")
    if m.scale_factor != 1.0 and not (m.scale_by_std and m.default_scale):
        problems.append(f"model.scale_factor: got {m.scale_factor!r}, but it is used only with "
                        "model.scale_by_std=true and model.default_scale=true (as in RadioDiff: "
                        + ("1/std is measured instead" if m.scale_by_std else "latents are not scaled")
                        + "); set both to use it, or remove model.scale_factor")
    for key, target in targets_in(to_dict(cfg)).items():
        if target is not None:
            err = _import_problem(target)
            if err:
                problems.append(f"{key}: {err}")

    ck = cfg.checkpoint
    need(ck.resume in ("auto", "never") or bool(ck.resume), "checkpoint.resume", ck.resume,
         "auto, never, or a checkpoint folder")
    need(ck.every is None or ck.every >= 1, "checkpoint.every", ck.every, ">= 1, or null")
    need(ck.keep_last >= 2, "checkpoint.keep_last", ck.keep_last,
         ">= 2 (the newest may be the one being written when a job dies)")
    need(ck.keep_every is None or ck.keep_every >= 1, "checkpoint.keep_every", ck.keep_every, ">= 1, or null")
    need(0 <= ck.probe_tolerance < 1, "checkpoint.probe_tolerance", ck.probe_tolerance, "0 <= tol < 1")
    need(ck.crash_loop_restarts is None or ck.crash_loop_restarts >= 1, "checkpoint.crash_loop_restarts",
         ck.crash_loop_restarts, ">= 1, or null")
    need(ck.crash_loop_progress_steps >= 1, "checkpoint.crash_loop_progress_steps",
         ck.crash_loop_progress_steps, ">= 1")

    _check_guard(cfg.guard, need)
    _check_slurm(cfg.slurm, need)

    d = cfg.data
    if (d.batch_size is None) == (d.batch_size_per_process is None):
        problems.append("data.batch_size / data.batch_size_per_process: set exactly one (data.batch_size "
                        "is the global batch, as in RadioDiff; to set the per-process batch instead, "
                        "add data.batch_size=null)")
    for key in ("batch_size", "batch_size_per_process"):
        v = getattr(d, key)
        need(v is None or v >= 1, f"data.{key}", v, ">= 1")
    need(d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
    need(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "0 < fraction < 1")
    need(d.split in SPLITS, "data.split", d.split, ", ".join(SPLITS))
    if d.split in SPLITS[1:] and d.root is None and d.train is None:
        problems.append(f"data.split: {d.split} selects RadioDiff's maps of the RadioMapSeer release, but "
                        "data.root is null (the synthetic stand-in has other maps); set "
                        "data.root=/path/to/RadioMapSeer, or data.split=maps")
    if d.cars and d.simulation.startswith("cars"):
        problems.append(f"data.simulation: got {d.simulation!r} with data.cars: true, which reads gain/"
                        f"cars<simulation> itself; set data.simulation={d.simulation.removeprefix('cars')}")
    if d.root is None and d.train is None and d.simulation not in ("DPM", "IRT2"):
        problems.append(f"data.simulation: got {d.simulation!r} with data.root: null; the synthetic "
                        "stand-in simulates DPM and IRT2 only: set data.root=/path/to/RadioMapSeer")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    for k in ("max_train_samples", "max_val_samples"):
        v = getattr(d, k)
        need(v is None or v >= 1, f"data.{k}", v, ">= 1, or null for all")
    s = d.synthetic
    need(s.num_maps >= 2, "data.synthetic.num_maps", s.num_maps, ">= 2 (the split is by map)")
    need(s.tx_per_map >= 1, "data.synthetic.tx_per_map", s.tx_per_map, ">= 1")
    need(s.size >= 16, "data.synthetic.size", s.size, ">= 16")
    if (d.train is None) != (d.validation is None):
        problems.append("data.train / data.validation: plug in both datasets or neither")
    return problems


def apply_guard_profile(g: GuardConfig) -> list[str]:
    """Set what ``guard.profile: faithful`` turns off; a value that contradicts it is a problem (the
    schema's defaults are taken as unset: ``clip.mode`` zscore, ``loss.spike_zscore`` 6)."""
    if g.profile != "faithful":
        return []
    defaults = GuardConfig()
    problems = [f"guard.{key}: got {value!r}, but guard.profile=faithful sets it to {wanted!r}; remove it or "
                "use guard.profile=protective"
                for key, value, default, wanted in (
                    ("clip.mode", g.clip.mode, defaults.clip.mode, "fixed"),
                    ("loss.spike_zscore", g.loss.spike_zscore, defaults.loss.spike_zscore, None))
                if value not in (default, wanted)]
    g.clip.mode, g.loss.spike_zscore = "fixed", None
    return problems


def _check_guard(g: GuardConfig, need: tp.Callable[[bool, str, tp.Any, str], None]) -> None:
    need(g.profile in GUARD_PROFILES, "guard.profile", g.profile, ", ".join(GUARD_PROFILES))
    need(g.nonfinite_grads in NONFINITE_GRADS, "guard.nonfinite_grads", g.nonfinite_grads,
         ", ".join(NONFINITE_GRADS))
    need(g.max_abs_input is None or 0 < g.max_abs_input < math.inf, "guard.max_abs_input", g.max_abs_input,
         "a finite value > 0, or null")
    lo = g.loss
    need(lo.spike_zscore is None or lo.spike_zscore > 0, "guard.loss.spike_zscore", lo.spike_zscore,
         "> 0, or null to disable")
    need(lo.window >= 2, "guard.loss.window", lo.window, ">= 2")
    need(1 <= lo.warmup <= lo.window, "guard.loss.warmup", lo.warmup, f"1 .. guard.loss.window ({lo.window})")
    need(lo.rebaseline_after is None or lo.rebaseline_after >= 1, "guard.loss.rebaseline_after",
         lo.rebaseline_after, ">= 1, or null")
    c = g.clip
    need(c.mode in CLIP_MODES, "guard.clip.mode", c.mode, ", ".join(CLIP_MODES))
    need(c.zscore > 0, "guard.clip.zscore", c.zscore, "> 0")
    need(0 < c.alpha < 1, "guard.clip.alpha", c.alpha, "0 < alpha < 1")
    need(c.warmup >= 2, "guard.clip.warmup", c.warmup, ">= 2")
    need(c.agc_lambda > 0, "guard.clip.agc_lambda", c.agc_lambda, "> 0")
    need(c.agc_eps > 0, "guard.clip.agc_eps", c.agc_eps, "> 0")
    n = g.norm_stats
    need(n.check_every is None or n.check_every >= 1, "guard.norm_stats.check_every", n.check_every,
         ">= 1, or null for every log interval")
    need(n.recalibrate_batches >= 1, "guard.norm_stats.recalibrate_batches", n.recalibrate_batches, ">= 1")
    need(n.momentum is None or 0 < n.momentum <= 1, "guard.norm_stats.momentum", n.momentum,
         "0 < momentum <= 1, or null")
    need(n.eps is None or n.eps > 0, "guard.norm_stats.eps", n.eps, "> 0, or null")
    r = g.rollback
    need(r.max_consecutive_skips >= 1, "guard.rollback.max_consecutive_skips", r.max_consecutive_skips,
         ">= 1")
    need(r.skip_batches is None or r.skip_batches >= 0, "guard.rollback.skip_batches", r.skip_batches,
         ">= 0, or null")
    need(0 < r.lr_scale <= 1, "guard.rollback.lr_scale", r.lr_scale, "0 < scale <= 1")
    need(r.max_rollbacks >= 0, "guard.rollback.max_rollbacks", r.max_rollbacks, ">= 0")


def _check_slurm(c: SlurmConfig, need: tp.Callable[[bool, str, tp.Any, str], None]) -> None:
    for name in c.signals:
        try:
            number = signal_number(str(name))
        except (KeyError, ValueError):
            number = None
        need(number is not None and number not in (int(signal.SIGKILL), int(signal.SIGSTOP)),
             "slurm.signals", name, "signal names that can be caught, e.g. SIGUSR1, SIGUSR2, SIGTERM")
    need(c.signal_lead_s >= 0, "slurm.signal_lead_s", c.signal_lead_s, ">= 0")
    need(c.nodes >= 1, "slurm.nodes", c.nodes, ">= 1")
    need(c.gpus_per_node >= 0, "slurm.gpus_per_node", c.gpus_per_node, ">= 0")
    for key in ("tasks_per_node", "cpus_per_task"):
        v = getattr(c, key)
        need(v is None or v >= 1, f"slurm.{key}", v, ">= 1, or null")
    need(c.mem_gb is None or c.mem_gb > 0, "slurm.mem_gb", c.mem_gb, "> 0, or null")
    need(c.time_min >= 1, "slurm.time_min", c.time_min, ">= 1")
    need(c.signal_lead_s < c.time_min * 60, "slurm.signal_lead_s", c.signal_lead_s,
         f"less than slurm.time_min ({c.time_min} min)")
    need(c.stop_margin_s is None or 0 <= c.stop_margin_s < c.time_min * 60, "slurm.stop_margin_s",
         c.stop_margin_s, f">= 0 and less than slurm.time_min ({c.time_min} min), or null")
    need(c.max_num_timeout >= 0, "slurm.max_num_timeout", c.max_num_timeout, ">= 0")
    need(bool(c.job_name), "slurm.job_name", c.job_name, "a name")


TARGET_KEYS = ("model.first_stage.target", "model.unet.target", "model.cond_encoder.target",
               "data.train.target", "data.validation.target")
"""Every key whose value names code to import and call (:func:`get_target`)."""


def targets_in(tree: tp.Mapping[str, tp.Any]) -> dict[str, tp.Any]:
    """The value at each of :data:`TARGET_KEYS` in a plain config tree (None where there is none), read
    without importing anything: how a config from elsewhere (a checkpoint's) is checked before it is
    built."""
    found = {}
    for key in TARGET_KEYS:
        node: tp.Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        found[key] = node
    return found


def _import_problem(target: str) -> str | None:
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        return f"got {target!r}; expected a dotted path like package.module.ClassName"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"cannot import module '{module_name}' for {target!r} ({exc})"
    if not hasattr(module, attr):
        return f"module '{module_name}' has no attribute '{attr}'"
    return None


def get_target(target: str) -> tp.Callable[..., tp.Any]:
    """The class or function a validated ``target`` names. Importing it runs code, so a target must
    come from the user's own config: a checkpoint's stored config is checked against the user's first
    (``doctor --fix``), never built on its own."""
    module_name, _, attr = target.rpartition(".")
    return tp.cast(tp.Callable[..., tp.Any], getattr(importlib.import_module(module_name), attr))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` in the results folder holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """A short digest of the resolved config, for logs and checkpoint manifests."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def to_dict(cfg: Config) -> dict[str, tp.Any]:
    """The resolved config as plain data (what a checkpoint's ``config.yaml`` holds)."""
    return tp.cast(dict[str, tp.Any], OmegaConf.to_container(OmegaConf.structured(cfg)))


class _Absent:
    """A key one of two configs does not have (a key added or removed since a checkpoint was written):
    not a value, so it is never offered as an override to set back."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT: tp.Any = _Absent()


def config_changes(
    saved: tp.Mapping[str, tp.Any], now: tp.Mapping[str, tp.Any]
) -> list[tuple[str, tp.Any, tp.Any]]:
    """``(dotted key, saved value, current value)`` for every leaf that differs, sorted by key.

    Lists compare as whole values; a key present on one side only shows :data:`ABSENT` on the other.
    """
    old, new = leaves(saved), leaves(now)
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if not _same(k, old.get(k, ABSENT), new.get(k, ABSENT))]


PATH_KEYS = ("results_folder", "root", "ckpt_path", "log_folder")
"""Config keys holding a file or folder path: ``runs/ldm`` and its absolute form are one place."""


def _same(key: str, saved: tp.Any, now: tp.Any) -> bool:
    """Equal values, or two spellings of one path (relative to the current folder) under a path key."""
    if saved == now:
        return True
    if key.rsplit(".", 1)[-1] in PATH_KEYS and isinstance(saved, str) and isinstance(now, str):
        return os.path.abspath(os.path.expanduser(saved)) == os.path.abspath(os.path.expanduser(now))
    return False


def jsonable(value: tp.Any) -> tp.Any:
    """A config value for an event record: :data:`ABSENT` becomes ``None``."""
    return None if value is ABSENT else value
