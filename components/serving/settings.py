"""The `serve:` block of params.yaml, checked once at start so a bad value fails before the port opens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.runtime.errors import ConfigError
from components.runtime.paths import out_path

KEYS = ("host", "port", "max_batch", "max_wait_ms", "k_default", "k_max", "beam_default", "beam_max",
        "max_history_items", "max_text_chars", "max_body_bytes", "reload_every_s", "exclude_history",
        "item_text_chars", "request_log", "request_log_outside_out_dir", "ab")


@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    max_batch: int
    max_wait_ms: float
    k_default: int
    k_max: int
    beam_default: int
    beam_max: int
    max_history_items: int
    max_text_chars: int
    max_body_bytes: int
    reload_every_s: float
    exclude_history: bool        # a request that does not say: drop its own history items from the answer
    item_text_chars: int         # "fields": ["text"] adds each item's text, cut to this many characters
    request_log: Path | None     # None = no log
    out_dir: Path                # version A: the live version of params' out_dir
    ab_out_dir: Path | None      # version B: the live version of this out_dir (None = no split)
    ab_share: float              # share of assignment keys sent to B


def _bounded(cfg: dict, key: str, low: float, high: float | None = None, integer: bool = True) -> int | float:
    """cfg[key] checked to be a number (an integer unless told) in [low, high]."""
    value = cfg[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"serve.{key}", f"must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return value


def _flag(cfg: dict, key: str) -> bool:
    if not isinstance(cfg[key], bool):
        raise ConfigError(f"serve.{key}", f"must be true or false, got {cfg[key]!r}")
    return cfg[key]


def request_log_path(params: dict, log: str, outside_ok: bool) -> Path:
    """serve.request_log under out_dir (a relative path is taken from there); a path that resolves
    outside it (absolute, `..`, a link) only with serve.request_log_outside_out_dir, so a params
    value cannot make the service append to files elsewhere on the machine."""
    out = out_path(params)
    path = out / log
    if not outside_ok and not path.resolve().is_relative_to(out.resolve()):
        raise ConfigError("serve.request_log", f"{log} resolves to {path.resolve()}, outside out_dir "
                                               f"{out.resolve()}; give a path under out_dir, or set "
                                               "serve.request_log_outside_out_dir: true to allow it")
    return path


def serve_settings(params: dict, host: str | None = None, port: int | None = None) -> ServeSettings:
    """params' `serve:` block, with host / port from the command line winning."""
    cfg = dict(params.get("serve") or {})
    missing = [key for key in KEYS if key not in cfg] + [f"ab.{key}" for key in ("out_dir", "share")
                                                          if key not in (cfg.get("ab") or {})]
    if missing:
        raise ConfigError(f"serve.{missing[0]}", "missing (params.yaml's serve: block lists every key)")
    ab = cfg["ab"]
    cfg["host"] = host if host is not None else cfg["host"]
    cfg["port"] = port if port is not None else cfg["port"]
    if not isinstance(cfg["host"], str) or not cfg["host"]:
        raise ConfigError("serve.host", f"must be an address such as 127.0.0.1, got {cfg['host']!r}")
    k_max, beam_max = _bounded(cfg, "k_max", 1), _bounded(cfg, "beam_max", 1)
    log = str(cfg["request_log"] or "")
    ab_dir = str(ab["out_dir"] or "")
    share = float(_bounded({"ab.share": ab["share"]}, "ab.share", 0.0, 1.0, integer=False))
    if ab_dir and not Path(ab_dir).is_dir():
        raise ConfigError("serve.ab.out_dir", f"{ab_dir} is not a folder")
    return ServeSettings(
        host=cfg["host"], port=_bounded(cfg, "port", 0, 65535), max_batch=_bounded(cfg, "max_batch", 1),
        max_wait_ms=float(_bounded(cfg, "max_wait_ms", 0, 1000, integer=False)),
        k_default=_bounded(cfg, "k_default", 1, k_max), k_max=k_max,
        beam_default=_bounded(cfg, "beam_default", 1, beam_max), beam_max=beam_max,
        max_history_items=_bounded(cfg, "max_history_items", 1), max_text_chars=_bounded(cfg, "max_text_chars", 1),
        max_body_bytes=_bounded(cfg, "max_body_bytes", 1024),
        reload_every_s=float(_bounded(cfg, "reload_every_s", 0, integer=False)),
        exclude_history=_flag(cfg, "exclude_history"), item_text_chars=_bounded(cfg, "item_text_chars", 1),
        request_log=request_log_path(params, log, _flag(cfg, "request_log_outside_out_dir")) if log else None,
        out_dir=out_path(params),
        ab_out_dir=Path(ab_dir) if ab_dir and share > 0 else None, ab_share=share)
