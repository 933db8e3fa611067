"""A RadioDiff *sample* yaml (``configs/radio_sample.yaml``, read by its ``sample_cond_ldm.py``) drives
``evaluate``: its model and data sections are translated by :func:`~radiodiff_resume.config.load_config`
like any RadioDiff config (``model.sampling_timesteps`` included), and its ``sampler`` section — which the
translation reports as ignored, training having no use for it — gives evaluate's defaults here. A flag
given on the command line wins over the yaml.
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from radiodiff_resume.compat.radiodiff_config import is_radiodiff
from radiodiff_resume.errors import UserError

logger = logging.getLogger(__name__)

IGNORED = {
    "sample_num": "RadioDiff's Sampler turns it into a batch_num it never uses: every test map is sampled",
    "warm_up_steps": "warm-up batches for RadioDiff's timer, not evaluated",
    "use_timer": "RadioDiff's CUDA timer; not measured here",
    "target_path": "read by RadioDiff's FID code, which sample_cond_ldm.py no longer runs",
}


@dataclass
class SamplerSection:
    """What a sample yaml's ``sampler`` section sets (None: not set, evaluate's own default applies)."""

    weights: str | None = None
    ema: bool | None = None
    out: str | None = None
    batch_size: int | None = None
    limit: int | None = None
    overrides: list[str] = field(default_factory=list)
    """Config overrides it implies, given before the command line's (which therefore win)."""
    crop: list[int] | None = None
    """The window of RadioDiff's sliding-window sampler, checked against the maps once the config is read."""


def read_sampler(path: Path) -> SamplerSection:
    """The ``sampler`` section of a RadioDiff yaml at ``path`` mapped to evaluate's options, each mapping
    logged; an empty section for any other config."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return SamplerSection()  # load_config reports the file's problem in its own words
    if not is_radiodiff(raw) or not isinstance(raw.get("sampler"), dict):
        return SamplerSection()
    return _Mapping(raw["sampler"], str(path)).run()


class _Mapping:
    def __init__(self, sampler: dict[str, tp.Any], source: str) -> None:
        self.sampler = sampler
        self.source = source
        self.out = SamplerSection()

    def log(self, key: str, what: str) -> None:
        logger.info("%s: sampler.%s: %r → %s", self.source, key, self.sampler[key], what)

    def run(self) -> SamplerSection:
        s, out = self.sampler, self.out
        if s.get("ckpt_path"):
            out.weights = str(s["ckpt_path"])
            self.log("ckpt_path", "--weights (a RadioDiff LDM file; --checkpoint DIR evaluates a checkpoint "
                                  "of this package instead)")
        if "use_ema" in s:
            out.ema = bool(s["use_ema"])
            self.log("use_ema", "--ema" if out.ema else "--online")
        if s.get("save_folder"):
            out.out = str(s["save_folder"])
            self.log("save_folder", "--out")
        batch = s.get("batch_size")
        if batch is not None:
            out.batch_size = self.count("batch_size", batch)
            self.log("batch_size", "--batch-size")
        if s.get("inference_stop_idx") is not None:
            stop = self.count("inference_stop_idx", s["inference_stop_idx"], least=0)
            out.limit = (stop + 1) * (out.batch_size or 1)
            self.log("inference_stop_idx", f"--limit {out.limit} (RadioDiff stops after batch {stop})")
        if s.get("use_fp16"):
            out.overrides.append("trainer.mixed_precision=fp16")
            self.log("use_fp16", "trainer.mixed_precision=fp16 (autocast while sampling, as RadioDiff's)")
        self.sample_type()
        for key in s:
            if key in IGNORED:
                self.log(key, f"ignored: {IGNORED[key]}")
            elif key not in ("ckpt_path", "use_ema", "save_folder", "batch_size", "inference_stop_idx",
                             "use_fp16", "sample_type", "stride", "crop_size"):
                self.log(key, "ignored: sample_cond_ldm.py does not read it")
        return out

    def count(self, key: str, value: tp.Any, least: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{self.source}: sampler.{key} is {value!r}; expected an integer >= {least}")
        return value

    def sample_type(self) -> None:
        """RadioDiff samples ``slide``: windows of ``crop_size`` (default 256) every ``stride`` pixels.
        A map no larger than the window is one window, the whole map, as sampled here; ``whole``
        resizes the condition to 416 pixels (and fails in RadioDiff's own code: raw_h is undefined)."""
        kind = self.sampler.get("sample_type", "slide")
        if kind != "slide":
            raise UserError(f"{self.source}: sampler.sample_type is {kind!r}: only 'slide' (RadioDiff's "
                            "sliding-window sampler over maps no larger than its window) is supported here")
        crop = self.sampler.get("crop_size", [256, 256])
        if not (isinstance(crop, list) and len(crop) == 2 and all(isinstance(c, int) for c in crop)):
            raise UserError(f"{self.source}: sampler.crop_size is {crop!r}; expected [height, width]")
        self.out.crop = crop
        for key in ("sample_type", "stride", "crop_size"):
            if key in self.sampler:
                self.log(key, "the whole map in one window, as sampled here (checked against "
                              "data.image_size)")


def check_window(section: SamplerSection, image_size: int, source: str) -> None:
    """Refuse a sample yaml whose sliding window is smaller than the maps: RadioDiff would stitch several
    windows, which is not sampled here."""
    if section.crop is not None and image_size > min(section.crop):
        raise UserError(f"{source}: sampler.crop_size {section.crop} is smaller than the {image_size}-pixel "
                        "maps (data.image_size): RadioDiff would sample several windows and average them, "
                        "which evaluate does not; set crop_size to at least the map size")
