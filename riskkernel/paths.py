"""Where rk keeps its data and looks for its config. `RK_HOME` overrides the data dir (tests set it)."""

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


def user_config_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def config_file() -> Path | None:
    """`rk.toml` in the working directory if present, else the user config file if present."""
    local = Path("rk.toml")
    if local.is_file():
        return local
    user = user_config_file()
    return user if user.is_file() else None
