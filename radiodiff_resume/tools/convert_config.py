"""``radiodiff-resume convert-config RADIODIFF.yaml [--out OUR.yaml]``: a RadioDiff config written down in
this package's format, with the translation report as YAML comments above it.

``train --cfg RADIODIFF.yaml`` translates on the fly; a converted file is for reading, editing and
keeping. The translation is validated before anything is written, so the file loads with ``--cfg``.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from radiodiff_resume.errors import UserError

PLACEHOLDER_ROOT = "data.root=/path/to/RadioMapSeer"
"""RadioDiff hard-codes its dataset folder; the translation leaves ``data.root`` required, so it is
validated with a stand-in."""


def read_mapping(path: Path) -> dict[str, tp.Any]:
    """The YAML mapping in ``path`` as plain data; a :class:`UserError` (one line) for anything else."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from radiodiff_resume.config import yaml_problem

    if not path.is_file():
        raise UserError(f"convert-config: {path} not found")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise UserError(f"convert-config: {path} is not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"convert-config: {path} holds no mapping: neither a RadioDiff config nor ours")
    return tp.cast(dict[str, tp.Any], OmegaConf.to_container(loaded))


def convert(src: Path) -> tuple[str, str]:
    """The converted file's text, and a one-line summary of the report."""
    import yaml

    from radiodiff_resume.compat import radiodiff_config as radiodiff
    from radiodiff_resume.config import Config, build_config

    raw = read_mapping(src)
    if not radiodiff.is_radiodiff(raw):
        if radiodiff.looks_ours(raw):
            raise UserError(f"convert-config: {src} is already in this package's format: use it with --cfg")
        raise UserError(f"convert-config: {src} is not a RadioDiff config (it lacks RadioDiff's keys, e.g. "
                        "model.first_stage.ddconfig, model.unet.dim, data.name) nor one of ours")
    ours, report = radiodiff.translate(raw, Config)
    build_config(ours, [PLACEHOLDER_ROOT], source=f"{src}, translated from RadioDiff's format")
    body = yaml.dump(ours, Dumper=_dumper(), sort_keys=False, width=110, allow_unicode=True)
    text = radiodiff.report_comment(report, src.name, raw) + body
    return text, f"{radiodiff.describe(raw)}: {radiodiff.summary(report)}"


def _flow_list(dumper: tp.Any, data: list[tp.Any]) -> tp.Any:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


def _dumper() -> type:
    """YAML written the way our configs are: nested mappings in blocks, lists on one line."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, _flow_list)
    return Dumper


def cmd_convert_config(args: argparse.Namespace) -> None:
    src = Path(args.src)
    text, summary = convert(src)
    if args.out is None:
        sys.stdout.write(text)
        return
    out = Path(args.out)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"convert-config: --out {out} is the RadioDiff config itself; write elsewhere")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({summary}); train with: radiodiff-resume train --cfg {out} "
          "data.root=/path/to/RadioMapSeer", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "convert-config", help="write a RadioDiff config in this package's format, every key reported",
        description="Translate a config of RadioDiff's train_cond_ldm.py or train_vae.py into this package's "
                    "format. The report above the YAML gives every RadioDiff key once: mapped (to which key, "
                    "which value), mapped but MEANING DIFFERS (the value is changed so the run behaves as "
                    "RadioDiff's), ignored (why) or unsupported (what to do instead); then what RadioDiff "
                    "fixes in its code. `train --cfg RADIODIFF.yaml` does the same translation on the fly.")
    parser.add_argument("src", metavar="RADIODIFF.yaml", help="a RadioDiff training config")
    parser.add_argument("--out", metavar="OUR.yaml", default=None, help="file to write (default: stdout)")
    parser.set_defaults(func=cmd_convert_config)
