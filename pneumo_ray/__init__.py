"""pneumo-ray: distributed hyperparameter sweeps for pneumonia classification on chest X-rays."""


def package_version() -> str:
    """The installed distribution's version (what --version and manifest.json say)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pneumo-ray")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
