"""The first-party DiffEditor editing tasks, registered through the ``diffeditor`` entry-point
group exactly as a third-party plugin's would be."""

__version__ = "0.1.0"
