"""The YAML application above the library: ``autolora train | export | report``."""
