"""The one error type of the sparse-delta package.

The codecs (a corrupted index array), the config parser (a bad `delta_config.json`) and the delta itself
(a wrong base model) all raise it, so callers catch one type; it sits at the bottom of the package so
each of those modules can raise it without importing another.
"""


class DeltaError(ValueError):
    """Any bad delta file, wrong base model or unusable input: callers need to catch only this."""
