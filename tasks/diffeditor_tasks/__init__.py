"""The first-party DiffEditor editing tasks, registered through the ``diffeditor`` entry-point
group exactly as a third-party plugin's would be."""

from diffeditor import __version__  # noqa: F401  (one version: the kernel's)
