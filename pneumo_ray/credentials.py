"""Credentials stay out of everything a sweep writes.

A URL that needs a password (``search.optuna_storage``) names it by environment variable:
``postgresql://optuna:${OPTUNA_DB_PASSWORD}@db-host/optuna``, or ``${OPTUNA_URL}`` for the whole URL.
The config, and so ``pneumo_config.yaml``, each trial's config and Tune's pickled state, keep the
reference; only the driver's live database connection sees the value. A password written into the
config itself is refused, because the experiment folder may be a shared bucket.
"""

from __future__ import annotations

import os
import re

import optuna

from pneumo_ray.errors import ConfigError

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(value: str, field: str) -> str:
    """``value`` with every ``${NAME}`` replaced by that environment variable. A reference that is the
    URL's whole password takes the raw password (percent-encoded here, so '@' or ':' in it are fine);
    anywhere else the value is inserted as written."""

    def env(name: str) -> str:
        if name not in os.environ:
            raise ConfigError(f"{field}: environment variable {name} is not set; export it in the shell that "
                              "runs the sweep (the config keeps only the reference ${" + name + "})")
        return os.environ[name]

    password_ref = ENV_REFERENCE.fullmatch(str(_parsed(value).password)) if _parsed(value) else None
    keep = password_ref.group(0) if password_ref else None
    value = ENV_REFERENCE.sub(lambda m: m.group(0) if m.group(0) == keep else env(m.group(1)), value)
    if password_ref:
        value = _parsed(value).set(password=env(password_ref.group(1))).render_as_string(hide_password=False)
    return value


def _parsed(url: str):
    """``url`` parsed by SQLAlchemy (Optuna's own dependency), or None when it is not a database URL."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:
        return None


def clear_text_password(url: str) -> bool:
    """True when ``url`` (as written in the config, references unexpanded) holds a password itself."""
    if ENV_REFERENCE.fullmatch(url):
        return False
    parsed = _parsed(url)
    if parsed is not None:
        password = parsed.password
    else:  # not a database URL (a bucket URI): look for user:password@ by hand
        userinfo = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]
        password = userinfo.partition(":")[2] or None
    return password is not None and not ENV_REFERENCE.fullmatch(str(password))


def masked(url: str) -> str:
    """The URL as SQLAlchemy renders it with the password masked (``***``), whatever characters it holds."""
    parsed = _parsed(url)
    return parsed.render_as_string(hide_password=True) if parsed else url.split(":", 1)[0] + "://***"


class ReferencedRDBStorage(optuna.storages.RDBStorage):
    """Optuna's database storage, pickled as the config's reference rather than the expanded URL.

    Tune pickles the searcher, and with it this storage, into the experiment folder (tuner.pkl and
    searcher-state-*.pkl); plain RDBStorage would carry the password there. Unpickling (on --resume)
    expands the reference again, from the environment of the process that resumes."""

    def __init__(self, reference: str, field: str = "search.optuna_storage"):
        self.reference, self.field = reference, field
        super().__init__(expand(reference, field))

    def __reduce__(self):
        return ReferencedRDBStorage, (self.reference, self.field)
