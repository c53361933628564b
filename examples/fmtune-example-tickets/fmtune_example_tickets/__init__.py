"""A data handler for an in-house format, usable by name in a data_config or with
``--data_handlers``, written from fmtune's docs/plugins.md ("Writing a data handler").

Records look like ``{"ticket": {"product": ..., "subject": ..., "thread": [...]},
"resolution": ...}``. The handler ``ticket_to_input_output`` turns them into
``input``/``output`` columns, which fmtune (or the built-in
``tokenize_and_apply_input_masking``) then tokenizes with exact masks:

    datasets:
      - name: tickets
        data_paths: [tickets.jsonl]
        data_handlers:
          - name: ticket_to_input_output
            arguments: {remove_columns: all, fn_kwargs: {max_thread: 2}}
          - name: tokenize_and_apply_input_masking
            arguments: {remove_columns: all}

It reads one option of its own from the run's config (``tickets_separator``) and imports
nothing from fmtune's core but the public API; the data_handlers plugin, which owns the
``register_data_handlers`` hook, is activated with it (``fmtune_plugins``). The same
distribution ships a second plugin, ``tickets_csv`` (fmtune_example_tickets.tracker): the
tracker of docs/plugins.md's "Writing a tracker".
"""

from __future__ import annotations

from fmtune import hookimpl
from fmtune_data_handlers import RecordError

fmtune_plugins = ["data_handlers"]  # activated with this plugin: it owns the hook below


@hookimpl
def add_options(register):
    register("tickets_separator", str, " | ", "Joins the messages of a ticket's thread.")


def ticket_to_input_output(batch, config, max_thread=3, **_):
    """Batched map handler: ticket -> input prompt, resolution -> output."""
    inputs = []
    for i, ticket in enumerate(batch["ticket"]):
        if not isinstance(ticket.get("subject"), str):
            raise RecordError(i, "field 'ticket.subject' must be a string")
        thread = config.tickets_separator.join((ticket.get("thread") or [])[-max_thread:])
        inputs.append(f"[{ticket['product']}] {ticket['subject']}: {thread}\nresolution:")
    return {"input": inputs, "output": batch["resolution"]}


@hookimpl
def register_data_handlers(register):
    register("ticket_to_input_output", ticket_to_input_output, "map")
