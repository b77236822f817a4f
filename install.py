"""A1111 / Forge extension installer: installs only what WaveFT needs and the host lacks.

The host runs this file as a subprocess at every start (``launch_utils.run_extension_installer``, with the
webui root on ``PYTHONPATH``, so ``import launch`` works). torch always comes from the host and is never
installed here; so are safetensors in practice, but it is checked all the same.
"""

from __future__ import annotations

from types import ModuleType

# (import name checked with launch.is_installed, pip requirement); mirrors requirements.txt, minus nothing
REQUIREMENTS = (
    ("pywt", "PyWavelets>=1.4"),
    ("safetensors", "safetensors>=0.4"),
)


def missing_requirements(launch: ModuleType) -> list[str]:
    """pip requirements whose module the host environment does not have."""
    return [requirement for module, requirement in REQUIREMENTS if not launch.is_installed(module)]


def install(launch: ModuleType) -> list[str]:
    """Install what is missing through the host's pip wrapper; returns the requirements it asked for."""
    wanted = missing_requirements(launch)
    for requirement in wanted:
        # quoted: run_pip goes through a shell, where ">" would redirect
        launch.run_pip(f'install "{requirement}"', f"{requirement} for WaveFT")
    return wanted


if __name__ == "__main__":
    import launch as _launch

    install(_launch)
