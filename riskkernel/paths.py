"""Where rk keeps its data and looks for its config.

`RK_HOME` overrides the data dir (ledger, token files) and `RK_CONFIG_DIR` the user config dir (config.toml,
prices.toml); tests set both. Both files are looked for the same way: in the working directory first
(`rk.toml`, `prices.toml`), else in the user config dir (`config.toml`, `prices.toml`).
"""

import os
from pathlib import Path

APP = "riskkernel"


def data_dir() -> Path:
    """The data dir (ledger, token files), created 0700 if missing."""
    home = os.environ.get("RK_HOME")
    if home:
        path = Path(home).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir(APP))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def ledger_path() -> Path:
    return data_dir() / "ledger.db"


def user_config_dir() -> Path:
    """The user config dir; not created here (only `rk config init --user` writes to it)."""
    override = os.environ.get("RK_CONFIG_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(APP))


def user_config_file() -> Path:
    return user_config_dir() / "config.toml"


def user_prices_file() -> Path:
    return user_config_dir() / "prices.toml"


def _first_file(*candidates: Path) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def config_file() -> Path | None:
    """`rk.toml` in the working directory if present, else the user config file if present."""
    return _first_file(Path("rk.toml"), user_config_file())


def prices_file() -> Path | None:
    """`prices.toml` beside the config file in effect; with no config file, in the working directory, else in
    the user config dir. A project's prices never apply under another project's (or the user's) config."""
    config = config_file()
    if config is not None:
        return _first_file(config.parent / "prices.toml")
    return _first_file(Path("prices.toml"), user_prices_file())
