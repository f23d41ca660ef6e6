"""The `serve:` block of params.yaml, checked once at start so a bad value fails before the port opens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.runtime.config import merge
from components.runtime.config_schema import typed_params
from components.runtime.errors import ConfigError
from components.runtime.paths import out_path


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
    """params' `serve:` block (checked once by the schema, with the command line's host / port laid over it,
    so a bad value fails before the port opens), plus what only a start can check: the A/B folder exists,
    the request log stays under out_dir."""
    given = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    cfg = typed_params(merge(params, {"serve": given}) if given else params).serve
    ab_dir = str(cfg.ab.out_dir or "")
    if ab_dir and not Path(ab_dir).is_dir():
        raise ConfigError("serve.ab.out_dir", f"{ab_dir} is not a folder")
    return ServeSettings(
        host=cfg.host, port=cfg.port, max_batch=cfg.max_batch, max_wait_ms=float(cfg.max_wait_ms),
        k_default=cfg.k_default, k_max=cfg.k_max, beam_default=cfg.beam_default, beam_max=cfg.beam_max,
        max_history_items=cfg.max_history_items, max_text_chars=cfg.max_text_chars,
        max_body_bytes=cfg.max_body_bytes, reload_every_s=float(cfg.reload_every_s),
        exclude_history=cfg.exclude_history, item_text_chars=cfg.item_text_chars,
        request_log=request_log_path(params, cfg.request_log, cfg.request_log_outside_out_dir)
        if cfg.request_log else None,
        out_dir=out_path(params),
        ab_out_dir=Path(ab_dir) if ab_dir and cfg.ab.share > 0 else None, ab_share=float(cfg.ab.share))
