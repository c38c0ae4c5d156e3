"""`easel serve` options -> Settings: loopback unless --listen, token, limits."""
from __future__ import annotations

from pathlib import Path

from server.cli import build_parser
from server.settings import DEFAULT_MAX_UPLOAD, Settings


def settings_for(*argv: str) -> Settings:
    return Settings.from_args(build_parser().parse_args(["serve", *argv]))


def test_binds_loopback_unless_listen(tmp_path: Path) -> None:
    plain = settings_for("--base-dir", str(tmp_path))
    assert plain.host == "127.0.0.1" and plain.loopback_only and plain.port == 8188
    assert plain.base_dir == tmp_path.resolve() and plain.token is None
    assert plain.db_path == tmp_path.resolve() / "user" / "easel_queue.sqlite3"
    wide = settings_for("--listen", "--port", "9000", "--token", "t0k")
    assert wide.host == "0.0.0.0" and not wide.loopback_only and wide.port == 9000 and wide.token == "t0k"
    assert wide.max_upload_size == DEFAULT_MAX_UPLOAD and wide.preview_method == "none"
