"""The one argument-checking helper, as the callbacks import it (it lives in
``epochwise.datamodules._checks``, the one package all three epochwise packages may import)."""

from epochwise.datamodules._checks import (  # noqa: F401
    ConfigurationError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    is_int,
    is_number,
)
