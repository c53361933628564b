"""The hook this plugin owns: other plugins add data handlers through it.

Added to the plugin manager by the plugin's ``add_hookspecs`` when ``data_handlers`` is
active (a plugin that registers handlers declares ``fmtune_plugins = ["data_handlers"]``);
collected with :func:`fmtune.plugins.collect` (a name registered twice, a wrapper or an
implementation that raises is refused, naming the plugin). Importing this module is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fmtune.hookspecs import hookspec

if TYPE_CHECKING:
    from fmtune.config import Config


@hookspec
def register_data_handlers(register: Callable[..., None], config: Config) -> None:
    """Add data handlers, usable by name in a data_config (``data_handlers: [{name: ...}]``)
    and with ``--data_handlers NAME`` on ``--training_data_path``.

    ``register(name, fn, kind="map", batch_only=False)``; ``kind`` is ``"map"``
    (``fn(batch, **fn_kwargs) -> dict of columns``; one record's dict with ``batched:
    false``), ``"filter"`` (``fn(batch, ...) -> list[bool]``) or ``"dataset"``
    (``fn(dataset, ...) -> dataset``). ``batch_only=True``: ``fn`` is written for batches only
    and runs on batches under ``batched: false`` too. fmtune passes ``tokenizer``,
    ``max_seq_length`` and ``chat_template`` to a function whose signature names them, and the
    run's ``config`` (plugin options: ``config.my_option``) to one that names ``config``.
    ``config`` here is the same run's config, for a plugin that registers handlers by option.
    Names are unique across plugins. See docs/plugins.md, "Writing a data handler".
    """
