"""RadioDiff's YAML configs (``train_cond_ldm.py``, ``train_vae.py``) → this package's config.

A RadioDiff user keeps the config they have: :func:`~radiodiff_resume.config.load_config` recognises its
shape and translates it, and ``radiodiff-resume convert-config`` writes the translation down. Every
RadioDiff key gets one report line: mapped (to which key of ours, with which value), ignored (why) or
unsupported (what to do instead). A key whose value has to change for the run to behave as RadioDiff's
did is "mapped, MEANING DIFFERS" with the changed value, never translated silently. What RadioDiff fixes
in its code rather than in its config (weight decay, EMA decay, gradient clipping ...) is carried over
too, each on a "RadioDiff code default" line.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as tp
from dataclasses import dataclass

import yaml

from radiodiff_resume.errors import ConfigError
from radiodiff_resume.trees import leaves

logger = logging.getLogger(__name__)

MAPPED = "mapped"
DIFFERS = "mapped, MEANING DIFFERS"
IGNORED = "ignored"
UNSUPPORTED = "unsupported"
CODE_DEFAULT = "RadioDiff code default"
STATUSES = (MAPPED, DIFFERS, IGNORED, UNSUPPORTED, CODE_DEFAULT)

MISSING = "???"
"""OmegaConf's "required, not set": RadioDiff hard-codes its dataset folder, so ``data.root`` must be
given."""
SIDE = 256
"""RadioDiff's RadioMapSeer loaders yield 256×256 maps whatever its configs say."""
ATTENTION_SIDE = 16
"""Denoiser levels whose feature map is at most this wide get (full) attention."""

MARKERS = (
    "model.first_stage.ddconfig", "model.first_stage.lossconfig", "model.first_stage.embed_dim",
    "model.ddconfig", "model.lossconfig", "model.embed_dim", "model.unet.dim", "model.unet.dim_mults",
    "model.model_type", "model.model_name", "model.default_scale", "model.scale_by_softsign", "data.name",
    "trainer.enable_resume", "trainer.resume_milestone", "trainer.test_before", "finetune", "sampler",
)
"""Keys only RadioDiff's configs have; two of them make a config RadioDiff's."""
OURS = (
    "model.first_stage.target", "model.first_stage.params", "model.unet.target", "model.unet.params",
    "model.cond_encoder", "checkpoint", "guard", "slurm",
)
"""Keys only this package's configs have; any one of them makes a config ours."""

DATASETS = {
    "DPMCAR": "DPM maps simulated with cars, the cars as an extra input channel",
    "DPMCARK": "DPM maps simulated with cars, cars and a K2 channel as extra inputs",
    "DPMK": "DPM maps with a K2 (building-edge) input channel",
    "IRT4": "sparse IRT4 ray-tracing maps",
    "IRT4K": "sparse IRT4 ray-tracing maps with a K2 input channel",
    "MASK": "map completion from measurements sampled on building edges",
    "MASK_R": "map completion from measurements sampled on building edges",
    "RANDOM": "map completion from randomly sampled measurements",
    "VERTEX": "map completion from measurements sampled at building vertices",
    "VERTEX_R": "map completion from measurements sampled at building vertices",
    "edge": "the edge-detection dataset of RadioDiff's ancestor (EdgeDataset)",
}
"""``data.name`` values of RadioDiff and its forks other than ``radio``."""
PARAMS_ORDER = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "latent_channels", "norm_num_groups")
"""The order our configs list ``params`` in."""
RADIODIFF_UNET = "radiodiff_resume.models.radiodiff_unet.RadioDiffUNet"
UNET_PARAMS = frozenset({
    "dim", "channels", "dim_mults", "cond_net", "fix_bb", "out_mul", "cond_in_dim", "cond_dim",
    "cond_dim_mults",
    "window_sizes1", "window_sizes2", "fourier_scale", "cond_pe", "num_pos_feats", "cond_feature_size",
    "input_size", "DPMCARK", "without_pretrain",
})
"""``model.unet`` keys of RadioDiff's yamls that are parameters of :data:`RADIODIFF_UNET` (the same names)."""
FROM_PT = ("a RadioDiff .pt cannot initialise training here; convert its first stage with "
           "`radiodiff-resume import`, the rest starts from random weights")
FIRST_STAGE_ONLY = ("a first-stage config sets model.first_stage.* only: `train` trains the first stage, "
                    "then an LDM with this package's defaults; convert the RadioDiff LDM config too and "
                    "copy this model.first_stage section into it to train both as RadioDiff would")


def show(value: tp.Any) -> str:
    """A value as YAML writes it in flow style (``[1, 2, 4]``, ``true``, ``null``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


@dataclass(frozen=True)
class Line:
    """What became of one RadioDiff key (or of one behaviour fixed in RadioDiff's code)."""

    key: str
    value: tp.Any
    status: str
    targets: tuple[tuple[str, tp.Any], ...] = ()
    """Our keys and the values this line gave them."""
    note: str = ""
    """Why, and what to do."""

    @property
    def level(self) -> int:
        """WARNING for the lines a user must read: a changed meaning, a setting without an equal."""
        return logging.WARNING if self.status in (DIFFERS, UNSUPPORTED) else logging.INFO

    def text(self) -> str:
        head = f"[{self.status}] {self.key}: {show(self.value)}"
        if self.targets:
            head += " → " + ", ".join(f"{k}: {show(v)}" for k, v in self.targets)
        return f"{head} — {self.note}" if self.note else head


def _has(raw: tp.Mapping[str, tp.Any], key: str) -> bool:
    node: tp.Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def is_radiodiff(raw: tp.Any) -> bool:
    """Whether ``raw`` has RadioDiff's shape: two keys only RadioDiff has and none only we have."""
    if not isinstance(raw, dict) or any(_has(raw, key) for key in OURS):
        return False
    return sum(_has(raw, key) for key in MARKERS) >= 2


def looks_ours(raw: tp.Any) -> bool:
    """Whether ``raw`` has a key only this package's configs have."""
    return isinstance(raw, dict) and any(_has(raw, key) for key in OURS)


def describe(raw: tp.Mapping[str, tp.Any]) -> str:
    """Which of RadioDiff's training scripts the config is for."""
    if _first_stage_only(raw):
        return "RadioDiff first-stage config (train_vae.py)"
    return "RadioDiff LDM config (train_cond_ldm.py)"


def _first_stage_only(raw: tp.Mapping[str, tp.Any]) -> bool:
    """``train_vae.py``'s config: the model is the autoencoder itself."""
    return _has(raw, "model.ddconfig")


def translate(raw: tp.Mapping[str, tp.Any], schema: type) -> tuple[dict[str, tp.Any], list[Line]]:
    """Our raw config mapping for RadioDiff's ``raw``, its keys in the order of ``schema`` (our config's
    dataclass, passed in so that this module never imports the config it feeds), and the report: one line
    per RadioDiff key (in file order), then the RadioDiff code defaults carried over.

    Raises :class:`ConfigError` for what RadioDiff itself needs and ``raw`` lacks.
    """
    out, lines = _Translation(raw).run()
    return _ordered(out, schema), lines


def summary(lines: tp.Sequence[Line]) -> str:
    """How many lines of each status, e.g. ``24 mapped; 7 mapped, MEANING DIFFERS; 36 ignored``."""
    return "; ".join(f"{n} {s}" for s in STATUSES if (n := sum(line.status == s for line in lines)))


def log_report(lines: tp.Sequence[Line], source: str, raw: tp.Mapping[str, tp.Any]) -> None:
    """Log the report: a summary, then each line (changed meanings and unsupported keys as WARNING)."""
    logger.info("%s is a %s; translated to this package's config (%s)", source, describe(raw), summary(lines))
    if _first_stage_only(raw):
        logger.info("%s: %s", source, FIRST_STAGE_ONLY)
    for line in lines:
        logger.log(line.level, "%s", line.text())


def report_comment(lines: tp.Sequence[Line], source: str, raw: tp.Mapping[str, tp.Any]) -> str:
    """The report as the YAML comment block ``convert-config`` writes above the translation."""
    head = [
        f"Translated by `radiodiff-resume convert-config` from the {describe(raw)} {source}.",
        "Use: radiodiff-resume train --cfg THIS.yaml data.root=/path/to/RadioMapSeer [key=value ...]",
        "Report: every RadioDiff key once (mapped / mapped, MEANING DIFFERS / ignored / unsupported), then",
        "what RadioDiff fixes in its code rather than its config (RadioDiff code default).",
        *([f"Note: {FIRST_STAGE_ONLY}."] if _first_stage_only(raw) else []),
        "",
    ]
    return "".join(f"# {text}".rstrip() + "\n" for text in [*head, *(line.text() for line in lines)])


class _Translation:
    """One translation: reads RadioDiff's leaves, writes our nested mapping and the report."""

    def __init__(self, raw: tp.Mapping[str, tp.Any]) -> None:
        self.leaves = leaves(raw)
        self.ldm = not _first_stage_only(raw)
        self.fs = "model.first_stage" if self.ldm else "model"
        """Where RadioDiff keeps the first stage: inside the LDM's model, or as the model itself."""
        self.out: dict[str, tp.Any] = {}
        self.lines: dict[str, Line] = {}
        self.defaults: list[Line] = []
        self.problems: list[str] = []

    def run(self) -> tuple[dict[str, tp.Any], list[Line]]:
        self.data()
        self.first_stage()
        if self.ldm:
            self.ldm_model()
            self.scale()
            self.unet()
            self.ldm_trainer()
        else:
            self.first_stage_trainer()
        self.first_stage_code_defaults()
        self.rest()
        if self.problems:
            raise ConfigError(f"RadioDiff config: {'; '.join(self.problems)} (RadioDiff needs these too)")
        return self.out, [self.lines[key] for key in self.leaves] + self.defaults

    # -- plumbing ---------------------------------------------------------------------------------

    def get(self, key: str, default: tp.Any = None) -> tp.Any:
        return self.leaves.get(key, default)

    def need(self, key: str, check: tp.Callable[[tp.Any], bool], expected: str,
             default: tp.Any = None) -> tp.Any:
        """The value of ``key`` if it passes ``check``; ``default`` when absent (required when None)."""
        if key not in self.leaves:
            if default is None:
                self.problems.append(f"{key} is missing")
            return default
        value = self.leaves[key]
        if check(value):
            return value
        self.problems.append(f"{key}: got {value!r}; expected {expected}")
        return None

    def set(self, key: str, value: tp.Any) -> None:
        node = self.out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    def report(self, key: str, status: str, targets: tp.Mapping[str, tp.Any] | None = None,
               note: str = "") -> None:
        """Set ``targets`` in our config; record the line when the RadioDiff config has ``key``."""
        targets = targets or {}
        for target, value in targets.items():
            self.set(target, value)
        if key in self.leaves:
            assert key not in self.lines, f"{key} reported twice"
            self.lines[key] = Line(key, self.leaves[key], status, tuple(targets.items()), note)

    def same(self, keys: tp.Iterable[str], status: str, note: str) -> None:
        for key in keys:
            self.report(key, status, note=note)

    def default(self, what: str, value: tp.Any, targets: tp.Mapping[str, tp.Any], note: str) -> None:
        for target, v in targets.items():
            self.set(target, v)
        self.defaults.append(Line(what, value, CODE_DEFAULT, tuple(targets.items()), note))

    # -- sections ---------------------------------------------------------------------------------

    def data(self) -> None:
        name = self.get("data.name", "radio")
        targets = {"data.simulation": "DPM", "data.root": MISSING, "data.image_size": SIDE}
        if name == "radio":
            targets["data.split"] = "radiodiff"
            self.report("data.name", MAPPED, targets,
                        "RadioDiff's RadioUNet_c: gain/DPM maps at 256×256 conditioned on (buildings, "
                        "transmitter, buildings), as here; RadioDiff hard-codes the dataset folder in "
                        "lib/loaders.py, so give data.root=/path/to/RadioMapSeer; data.split: radiodiff is "
                        "the split released with the paper (501 training maps, 51 validation maps); "
                        "RadioDiff's current loader trains on 601 (data.split: radiodiff_600)")
        elif name == "DPMCAR":
            targets.update({"data.split": "radiodiff_600", "data.cars": True})
            self.report("data.name", MAPPED, targets,
                        "RadioDiff's dynamic radio maps (RadioUNet_c_WithCar_NOK_or_K): condition "
                        "(buildings, transmitter, cars from png/cars/), target gain/carsDPM, its 0..600 "
                        "training split")
        else:
            what = DATASETS.get(str(name), "a dataset this translation does not know")
            self.problems.append(f"data.name: {name} is {what}, which is not built here (built: radio, "
                                 "DPMCAR); plug your dataset in with data.train / data.validation "
                                 "(target/params) in a config of this package")
        batch = self.need("data.batch_size", _is_count, "an integer >= 1")
        if batch:
            target = "data.batch_size" if self.ldm else "model.first_stage.batch_size"
            self.report("data.batch_size", MAPPED, {target: batch},
                        "the global batch, split across the processes, as in RadioDiff (split_batches=True)")
        if "data.num_workers" in self.leaves:
            self.report("data.num_workers", MAPPED, {"data.num_workers": self.get("data.num_workers")})
        self.same(("data.img_folder", "data.augment_horizontal_flip"), IGNORED,
                  "read only by the edge dataset (see data.name)")

    def first_stage(self) -> None:
        fs, dd, p = self.fs, f"{self.fs}.ddconfig", "model.first_stage.params"
        ch = self.need(f"{dd}.ch", _is_count, "an integer >= 1")
        mult = self.need(f"{dd}.ch_mult", _is_counts, "a list of integers >= 1", [1, 2, 4, 8])
        blocks = self.need(f"{dd}.num_res_blocks", _is_count, "an integer >= 1")
        embed = self.need(f"{fs}.embed_dim", _is_count, "an integer >= 1")
        if not (ch and mult and blocks and embed):
            return
        widths = [ch * m for m in mult]
        side = self.get(f"{dd}.resolution", SIDE)
        levels = _attention_levels(side, len(mult), self.get(f"{dd}.attn_resolutions") or [])
        order = range(len(mult))
        down = ["AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D" for i in order]
        up = ["AttnUpDecoderBlock2D" if i in levels else "UpDecoderBlock2D" for i in reversed(order)]
        self.set("model.first_stage.target", "diffusers.AutoencoderKL")
        self.set(f"{p}.norm_num_groups", 32)
        self.report(f"{dd}.ch", MAPPED, {f"{p}.block_out_channels": widths}, "ch × ch_mult")
        self.report(f"{dd}.ch_mult", MAPPED, {f"{p}.block_out_channels": widths},
                    f"one level per entry, {len(mult) - 1} downsamplings: the latent is "
                    f"1/{2 ** (len(mult) - 1)} of the image side, as in RadioDiff; GroupNorm with 32 groups, "
                    "as RadioDiff's")
        self.report(f"{dd}.num_res_blocks", MAPPED, {f"{p}.layers_per_block": blocks},
                    "decoder levels get one block more, as in RadioDiff")
        where = (f"attention in level(s) {', '.join(map(str, levels))} (resolution "
                 f"{', '.join(show(_level_side(side, i)) for i in levels)}; RadioDiff's own code compares "
                 "its tuple resolutions with these YAML lists, so there only a full-resolution [h, w] entry "
                 "takes effect, in the encoder: check against your RadioDiff weights)" if levels
                 else "no attention in the down/up levels")
        self.report(f"{dd}.attn_resolutions", MAPPED,
                    {f"{p}.down_block_types": down, f"{p}.up_block_types": up},
                    f"{where}; the middle block has attention, as in RadioDiff")
        self.report(f"{fs}.embed_dim", MAPPED, {f"{p}.latent_channels": embed},
                    f"the latent the LDM sees has {embed} channels, as in RadioDiff")
        z = self.get(f"{dd}.z_channels", embed)
        if z == embed:
            self.report(f"{dd}.z_channels", MAPPED, {f"{p}.latent_channels": embed},
                        "diffusers' AutoencoderKL has one width for the encoder output (z_channels) and the "
                        "latent (embed_dim); they are equal here")
        else:
            self.report(f"{dd}.z_channels", UNSUPPORTED, {f"{p}.latent_channels": embed},
                        f"diffusers' AutoencoderKL has one width for the encoder output and the latent: its "
                        f"encoder output and post_quant_conv use embed_dim ({embed}) instead of z_channels "
                        f"({z}); the latent keeps {embed} channels as in RadioDiff, but RadioDiff's weights "
                        "do not fit (train with z_channels = embed_dim to compare like with like)")
        if self.get(f"{dd}.double_z", True) is True:
            self.report(f"{dd}.double_z", MAPPED, {"model.first_stage.target": "diffusers.AutoencoderKL"},
                        "its encoder always outputs a mean and a log-variance")
        else:
            self.report(f"{dd}.double_z", UNSUPPORTED,
                        note="RadioDiff's AutoencoderKL asserts double_z: true too; diffusers' is always so")
        for key, builder in (("in_channels", "in_channels"), ("out_ch", "out_channels")):
            if self.get(f"{dd}.{key}", 1) == 1:
                self.report(f"{dd}.{key}", IGNORED,
                            note=f"derived here: the builder passes {builder}=1 (one radio-map channel)")
            else:
                self.report(f"{dd}.{key}", UNSUPPORTED, note=f"radio maps have one channel here "
                            f"({builder}=1); more channels need your own dataset (data.train)")
        self.report(f"{dd}.resolution", IGNORED,
                    note="RadioDiff's radio loaders yield 256×256 maps whatever this says (data.image_size: "
                         "256 here); it only decides where attn_resolutions put attention")
        if self.get(f"{dd}.dropout"):
            self.report(f"{dd}.dropout", UNSUPPORTED, note="diffusers' AutoencoderKL has no dropout")
        else:
            self.report(f"{dd}.dropout", IGNORED, note="diffusers' AutoencoderKL has no dropout: 0, the same")
        self.first_stage_loss()
        self.first_stage_weights()

    def first_stage_loss(self) -> None:
        loss, pixels = f"{self.fs}.lossconfig", SIDE * SIDE
        kl = self.get(f"{loss}.kl_weight", 1.0)
        if _is_number(kl):
            ours = _round(kl / pixels)
            self.report(f"{loss}.kl_weight", DIFFERS, {"model.first_stage.loss.kl_weight": ours},
                        f"RadioDiff sums its reconstruction loss over the {SIDE}×{SIDE} pixels of a map and "
                        "adds kl_weight × the KL summed over the latent; ours averages the reconstruction "
                        f"over the pixels (and sums the KL): kl_weight / {pixels} keeps RadioDiff's balance")
        rest = [k for k in self.leaves if k.startswith(f"{loss}.") and k != f"{loss}.kl_weight"]
        start, steps = self.get(f"{loss}.disc_start", 0), self.get("trainer.train_num_steps", 0)
        if self.ldm:
            self.same(rest, IGNORED, "RadioDiff builds its first-stage loss from the LDM config but the LDM "
                                     "never uses it")
        elif _is_number(start) and _is_number(steps) and start >= steps:
            self.same(rest, IGNORED, f"RadioDiff's discriminator would switch on at step {start}, after "
                                     f"trainer.train_num_steps ({steps}): never active there, none here")
        else:
            self.same(rest, UNSUPPORTED, "the first stage here has no discriminator and no LPIPS: it trains "
                                         "on reconstruction + KL (+ model.first_stage.loss.ms_ssim_weight)")

    def first_stage_weights(self) -> None:
        key, given = f"{self.fs}.ckpt_path", self.get(f"{self.fs}.ckpt_path")
        ours = f"{self.results_folder().rstrip('/')}/first_stage/autoencoder.safetensors"
        targets = {"model.first_stage.ckpt_path": ours, "model.first_stage.train_if_missing": True}
        if self.ldm and given:
            targets["model.first_stage.train_if_missing"] = False
            self.report(key, MAPPED, targets,
                        f"RadioDiff's first stage: convert it once with `radiodiff-resume import {given} "
                        f"--cfg THIS.yaml`, which writes {ours}; `train` never trains a substitute for it "
                        "and stops, naming that command, while the file is missing")
        elif self.ldm:
            self.report(key, IGNORED, targets, "empty: RadioDiff would run with an untrained first stage; "
                                               "here it is trained first")
        elif given:
            self.report(key, UNSUPPORTED, targets, "RadioDiff starts the first stage from these pretrained "
                                                   "weights; here it trains from scratch")
        else:
            self.report(key, IGNORED, targets, "empty: the first stage trains from scratch, the same")

    def results_folder(self) -> str:
        folder = self.get("trainer.results_folder")
        return folder if isinstance(folder, str) and folder else "./results/radiodiff"

    def ldm_model(self) -> None:
        m, sde = "model", {"model.objective": "radiodiff"}
        if self.get(f"{m}.model_type", "const_sde") == "const_sde":
            self.report(f"{m}.model_type", MAPPED, sde,
                        "RadioDiff's decoupled constant-SDE diffusion: continuous time t in [eps, 1], the "
                        "denoiser predicts the drift C (= −x0) and the noise")
        else:
            self.report(f"{m}.model_type", UNSUPPORTED, sde, "RadioDiff builds only const_sde (anything else "
                        "raises there); translated to it")
        name = self.get(f"{m}.model_name", "cond_unet")
        if name == "cond_unet":
            self.report(f"{m}.model_name", MAPPED, {"model.unet.target": RADIODIFF_UNET},
                        "RadioDiff's Swin-conditioned Unet (mask_cond_unet.Unet), with upstream's state_dict "
                        "names, so its weights load as they are")
        else:
            self.problems.append(f"{m}.model_name: {name!r} is not built here (built: cond_unet, "
                                 "RadioDiff's Swin-conditioned Unet)")
        self.report(f"{m}.objective", IGNORED, note="RadioDiff's const-SDE LatentDiffusion predicts C and "
                                                    "the noise (pred_KC) whatever this says, as "
                                                    "model.objective: radiodiff does")
        steps = self.get(f"{m}.sampling_timesteps")
        if _is_count(steps):
            self.report(f"{m}.sampling_timesteps", MAPPED, {"model.sampling_timesteps": steps},
                        "equal steps from t = 1 to eps, then one to 0, as RadioDiff samples (validation "
                        "samples here; training is unaffected)")
        else:
            self.report(f"{m}.sampling_timesteps", IGNORED,
                        note="not a number of steps; model.sampling_timesteps keeps its default")
        for key in ("eps", "loss_type", "use_l1"):
            if f"{m}.{key}" in self.leaves:
                self.report(f"{m}.{key}", MAPPED, {f"model.{key}": self.get(f"{m}.{key}")})
        theirs = self.get(f"{m}.weighting_loss", True)
        self.report(f"{m}.weighting_loss", MAPPED, {"model.weighting_loss": theirs is True},
                    "RadioDiff's current LatentDiffusion weighs its drift and noise terms by 2·exp(1 − t) "
                    "and exp(√t) when true, as model.objective: radiodiff does (the paper release applied "
                    "(t + 1)/√t and √(2 − t)/√(1 − t + eps) whatever this said: model.objective: "
                    "radiodiff_paper)")
        if self.get(f"{m}.start_dist", "normal") == "normal":
            self.report(f"{m}.start_dist", IGNORED, note="Gaussian noise, the same")
        else:
            self.report(f"{m}.start_dist", UNSUPPORTED, note="the noise here is Gaussian (RadioDiff: normal)")
        if self.get(f"{m}.ckpt_path"):
            self.report(f"{m}.ckpt_path", UNSUPPORTED, note=FROM_PT)
        else:
            self.report(f"{m}.ckpt_path", IGNORED, note="empty: the LDM starts from random weights, the same")
        self.same((f"{m}.ignore_keys", f"{m}.only_model"), IGNORED, "used only with model.ckpt_path")
        for key, note in (
            ("timesteps", "the const-SDE trains in continuous time, in RadioDiff and here"),
            ("image_size", "RadioDiff samples at the condition's size; here data.image_size (256)"),
            ("input_keys", "image and cond are the inputs here, as RadioDiff's LatentDiffusion reads them"),
            ("train_sample", "not used by RadioDiff's const-SDE training"),
            ("perceptual_weight", "not used by RadioDiff's LatentDiffusion loss"),
            ("use_disloss", "feeds loss_vlb, which RadioDiff's LatentDiffusion leaves out of its training "
                            "loss"),
        ):
            self.report(f"{m}.{key}", IGNORED, note=note)

    def scale(self) -> None:
        """RadioDiff's latent scale keys mean the same here; only softsign scaling has no equivalent."""
        by_std = self.get("model.scale_by_std", True)
        default_scale = self.get("model.default_scale", False)
        factor = self.get("model.scale_factor", 1.0)
        if self.get("model.scale_by_softsign", False):
            targets = {"model.scale_by_std": True, "model.default_scale": False, "model.scale_factor": 1.0}
            self.report("model.scale_by_softsign", UNSUPPORTED, targets, "softsign latent rescaling does not "
                        "exist here; translated to 1/std scaling")
            self.same(("model.scale_by_std", "model.default_scale", "model.scale_factor"), IGNORED,
                      "see model.scale_by_softsign")
            return
        self.report("model.scale_by_softsign", IGNORED, note="off, as here")
        self.report("model.scale_by_std", MAPPED, {"model.scale_by_std": bool(by_std)}, "as in RadioDiff")
        if not by_std:
            self.same(("model.default_scale", "model.scale_factor"), IGNORED,
                      "latents are not scaled when model.scale_by_std is false, in RadioDiff and here")
            return
        self.report("model.default_scale", MAPPED, {"model.default_scale": bool(default_scale)},
                    "true: the configured scale_factor; false: 1/std of the first batch, as in RadioDiff")
        if default_scale:
            self.report("model.scale_factor", MAPPED, {"model.scale_factor": factor}, "used as is")
        elif factor == 1.0:
            self.report("model.scale_factor", MAPPED, {"model.scale_factor": 1.0}, "replaced by 1/std")
        else:
            self.report("model.scale_factor", UNSUPPORTED, {"model.scale_factor": 1.0},
                        f"RadioDiff refuses scale_factor {factor} with 1/std scaling (an assertion in "
                        "on_train_batch_start); set model.default_scale: true to use it")

    def unet(self) -> None:
        """RadioDiff's Unet section is our network's params, key for key (same names, same meaning)."""
        u, p = "model.unet", "model.unet.params"
        self.need(f"{u}.dim", _is_count, "an integer >= 1")
        self.need(f"{u}.dim_mults", _is_counts, "a list of integers >= 1", [1, 2, 4, 8])
        section = {k[len(u) + 1:]: v for k, v in self.leaves.items() if k.startswith(f"{u}.")}
        cond_net = section.get("cond_net", "swin")
        if cond_net != "swin":
            self.problems.append(f"{u}.cond_net: {cond_net!r} is not built here (built: swin, as "
                                 "radio_train.yaml has it)")
        for key in UNET_PARAMS & set(section) - {"without_pretrain", "fix_bb"}:
            self.report(f"{u}.{key}", MAPPED, {f"{p}.{key}": section[key]}, "the same parameter of the same "
                                                                            "network")
        fix_bb = section.get("fix_bb", True)
        self.report(f"{u}.fix_bb", MAPPED, {f"{p}.fix_bb": fix_bb},
                    "freezes the Swin condition encoder when true (RadioDiff's default when absent)")
        if section.get("without_pretrain", False):
            self.report(f"{u}.without_pretrain", MAPPED, {f"{p}.cond_weights": "none"},
                        "the Swin starts from random weights, as in RadioDiff")
        else:
            self.default("mask_cond_unet.py: Swin-B weights", "ImageNet", {f"{p}.cond_weights": "imagenet"},
                         "RadioDiff starts its Swin-B from torchvision's ImageNet weights: a fresh run reads "
                         "swin_b-68c6b09e.pth from the torch hub cache (or through torchvision), or set "
                         f"{p}.cond_weights to the file's path; a resume takes every weight from its "
                         "checkpoint")
        if section.get("DPMCARK"):
            self.problems.append(f"{u}.DPMCARK: true feeds the K2 input channels of the DPMCARK dataset, "
                                 "which is not built here")
        for key in ("channels", "cond_in_dim"):
            if key in section and section[key] != 3:
                self.problems.append(f"{u}.{key}: got {section[key]!r}; RadioDiff's radio maps have a "
                                     "3-channel latent and a 3-channel condition (built: 3)")
        rest = [k for k in self.leaves if k.startswith(f"{u}.") and k not in self.lines]
        self.same(rest, UNSUPPORTED, "not a parameter of RadioDiff's Swin-conditioned Unet: left out")

    def ldm_trainer(self) -> None:
        t = "trainer"
        self.loop(t, power=0.96)
        for key, note in (("gradient_accumulate_every", "loss / N over N micro-batches per optimizer step, "
                                                        "the same"), ("weight_decay", "AdamW's")):
            if f"{t}.{key}" in self.leaves:
                self.report(f"{t}.{key}", MAPPED, {f"{t}.{key}": self.get(f"{t}.{key}")}, note)
        every = self.get(f"{t}.ema_update_every", 1)
        if _is_count(every):
            self.report(f"{t}.ema_update_every", MAPPED, {f"{t}.ema_update_every": every},
                        "an EMA update every N optimizer steps, the same")
        else:
            every = 1
        after = self.get(f"{t}.ema_update_after_step")
        if _is_number(after) and after >= 0:
            self.report(f"{t}.ema_update_after_step", MAPPED, {f"{t}.ema_update_after_step": after},
                        "optimizer steps of exact copies before the first average, then ema-pytorch's "
                        "power-2/3 warm-up, as in RadioDiff")
        self.report(f"{t}.enable_resume", IGNORED, note="resuming is always on here: checkpoint.resume: auto "
                                                        "takes the newest checkpoint that verifies")
        milestone = self.get(f"{t}.resume_milestone", 0)
        if milestone:
            self.report(f"{t}.resume_milestone", UNSUPPORTED, note=f"RadioDiff resumes from model-{milestone}"
                        ".pt; that file is not resumed here, the run starts fresh (checkpoint.resume finds "
                        "only this package's checkpoints)")
        else:
            self.report(f"{t}.resume_milestone", IGNORED,
                        note="0: RadioDiff starts fresh; checkpoint.resume: auto resumes this package's own")
        self.report(f"{t}.test_before", IGNORED, note="RadioDiff samples once before training; here samples "
                                                      "are written at each validation")
        if f"{t}.weight_decay" not in self.leaves:
            self.default("train_cond_ldm.py: AdamW weight decay", 1e-4, {f"{t}.weight_decay": 1e-4},
                         "trainer.weight_decay is absent: 1e-4, in RadioDiff and here")
        self.default("train_cond_ldm.py: EMA decay", 0.999, {f"{t}.use_ema": True, f"{t}.ema_decay": 0.999},
                     "fixed in RadioDiff's code")
        self.loop_defaults("train_cond_ldm.py", t)

    def first_stage_trainer(self) -> None:
        t, ours = "trainer", "model.first_stage.trainer"
        self.loop(ours, power=0.95)
        if self.get(f"{t}.gradient_accumulate_every", 1) == 1:
            self.report(f"{t}.gradient_accumulate_every", MAPPED, {f"{ours}.gradient_accumulate_every": 1},
                        "one autoencoder update per batch, the same")
        else:
            self.report(f"{t}.gradient_accumulate_every", UNSUPPORTED,
                        {f"{ours}.gradient_accumulate_every": 1},
                        "not accumulation in train_vae.py: each step updates the autoencoder on a batch, "
                        "then the discriminator on the same batch; there is no discriminator here")
        self.same([f"{t}.{k}" for k in ("weight_decay", "ema_update_every", "ema_update_after_step",
                                        "enable_resume", "resume_milestone", "test_before")],
                  IGNORED, "train_vae.py does not read it (see the train_vae.py code defaults)")

    def loop(self, ours: str, power: float) -> None:
        """The ``trainer.*`` keys both RadioDiff scripts read; ``ours``: the loop they set here."""
        t = "trainer"
        notes = {"save_and_sample_every": "validation and a sample grid; checkpoint.every defaults to it"}
        for key in ("lr", "train_num_steps", "save_and_sample_every", "log_freq"):
            if f"{t}.{key}" in self.leaves:
                value = self.get(f"{t}.{key}")
                self.report(f"{t}.{key}", MAPPED, {f"{ours}.{key}": value}, notes.get(key, ""))
        floor = self.get(f"{t}.min_lr")
        if _is_number(floor):
            self.report(f"{t}.min_lr", MAPPED, {f"{ours}.lr_schedule": "radiodiff", f"{ours}.min_lr": floor,
                                                f"{ours}.lr_decay_power": power},
                        f"LR = lr × max((1 − step/N)^{power}, min_lr), as in RadioDiff")
        self.report(f"{t}.results_folder", MAPPED, {"trainer.results_folder": self.results_folder()},
                    "" if self.ldm else "the first stage writes to first_stage/ in it")
        self.precision()

    def precision(self) -> None:
        t = "trainer"
        amp, fp16 = bool(self.get(f"{t}.amp", False)), bool(self.get(f"{t}.fp16", False))
        if amp and not fp16:
            targets = {f"{t}.amp": False, f"{t}.fp16": False, f"{t}.mixed_precision": "bf16"}
            self.report(f"{t}.amp", UNSUPPORTED, targets,
                        "amp: true with fp16: false runs RadioDiff in fp16 autocast without a loss scaler, a "
                        "common NaN source, refused here: translated to bf16 autocast; on GPUs without bf16 "
                        "use trainer.mixed_precision=fp16 (with a GradScaler)")
            self.report(f"{t}.fp16", UNSUPPORTED, targets, "see trainer.amp")
        elif fp16 and not amp:
            targets = {f"{t}.amp": False, f"{t}.fp16": False, f"{t}.mixed_precision": "no"}
            self.report(f"{t}.fp16", MAPPED, targets, "fp16: true without amp gives RadioDiff a loss scaler "
                                                      "but no autocast: it computes in fp32, so does ours")
            self.report(f"{t}.amp", MAPPED, targets, "see trainer.fp16")
        else:
            note = "fp16 autocast with a GradScaler" if amp else "fp32"
            for key in ("amp", "fp16"):
                self.report(f"{t}.{key}", MAPPED, {f"{t}.{key}": amp}, note)

    def loop_defaults(self, script: str, ours: str) -> None:
        self.default(f"{script}: LR warm-up", 0, {f"{ours}.lr_warmup_steps": 0}, "none in RadioDiff")
        self.default(f"{script}: gradient clipping", 1.0, {f"{ours}.max_grad_norm": 1.0},
                     "the norm RadioDiff clips to; guard.clip adds adaptive spike clipping on top "
                     "(guard.clip.mode: fixed for RadioDiff's plain clipping)")

    def first_stage_code_defaults(self) -> None:
        ours = "model.first_stage.trainer"
        self.default("train_vae.py: AdamW weight decay", 0.01, {f"{ours}.weight_decay": 0.01},
                     "torch's AdamW default: train_vae.py passes none")
        self.default("train_vae.py: EMA", {"beta": 0.995, "update_every": 10, "update_after_step": 100}, {
            f"{ours}.use_ema": True, f"{ours}.ema_decay": 0.995, f"{ours}.ema_update_every": 10,
            f"{ours}.ema_update_after_step": 100,
        }, "the same EMA schedule here (update_after_step in optimizer steps); RadioDiff's LDM loads "
           "these EMA weights of the first stage, and ours exports its EMA weights")
        self.default("train_vae.py: reconstruction loss", "L1 + L2 + LPIPS over a learned log-variance",
                     {"model.first_stage.loss.type": "l1"}, "closest here: L1 (no LPIPS, no learned "
                     "log-variance; model.first_stage.loss.ms_ssim_weight adds a structural term)")
        self.loop_defaults("train_vae.py", ours)

    def rest(self) -> None:
        """``finetune``, ``sampler`` and whatever no section above knew."""
        if self.get("finetune.ckpt_path"):
            self.report("finetune.ckpt_path", UNSUPPORTED, note=FROM_PT)
        else:
            self.same(("finetune.ckpt_path", "finetune"), IGNORED, "empty: no fine-tuning, the same")
        self.same([k for k in self.leaves if k.split(".")[0] == "sampler"], IGNORED,
                  "settings of RadioDiff's sample_cond_ldm.py, read by `radiodiff-resume evaluate` (training "
                  "ignores them; its validation samples use model.sampling_timesteps)")
        self.same([k for k in self.leaves if k not in self.lines], UNSUPPORTED,
                  "unknown to this translation and not read by RadioDiff's train_cond_ldm.py / train_vae.py: "
                  "left out; if your fork reads it, set its equivalent here by hand")


def _is_count(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_counts(value: tp.Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_is_count, value))


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _level_side(side: tp.Any, level: int) -> tp.Any:
    if isinstance(side, list):
        return [s // 2**level for s in side]
    return side // 2**level if isinstance(side, int) else side


def _attention_levels(side: tp.Any, levels: int, attn: tp.Any) -> list[int]:
    """The levels RadioDiff puts attention in: those whose resolution is listed in attn_resolutions."""
    wanted = {(a, a) if isinstance(a, int) else tuple(a) for a in attn if isinstance(a, (int, list))}
    found = []
    for i in range(levels):
        at = _level_side(side, i)
        if (tuple(at) if isinstance(at, list) else (at, at)) in wanted:
            found.append(i)
    return found


def _ordered(tree: dict[str, tp.Any], schema: type | None) -> dict[str, tp.Any]:
    """``tree`` with its keys in the order our schema (and our configs) list them, so the YAML
    ``convert-config`` writes reads like ours."""
    hints = tp.get_type_hints(schema) if schema is not None else {}
    first = [f.name for f in dataclasses.fields(schema)] if schema is not None else list(PARAMS_ORDER)
    names = [k for k in first if k in tree] + [k for k in tree if k not in first]
    return {k: _ordered(v, _schema(hints.get(k))) if isinstance(v := tree[k], dict) else v for k in names}


def _schema(hint: tp.Any) -> type | None:
    for candidate in (hint, *tp.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return tp.cast(type, candidate)
    return None


def _round(value: float) -> float:
    """``value`` without float noise (``5e-05 * 5e-06`` is ``2.5e-10``, not ``2.5000000000000002e-10``)."""
    return float(f"{value:.12g}")
