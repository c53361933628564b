"""A data handler for an in-house format, usable by name in a data_config.

Records look like ``{"ticket": {"product": ..., "subject": ..., "thread": [...]},
"resolution": ...}``. The handler ``ticket_to_input_output`` turns them into
``input``/``output`` columns, which the built-in
``tokenize_and_apply_input_masking`` then tokenizes with exact masks:

    datasets:
      - name: tickets
        data_paths: [tickets.jsonl]
        data_handlers:
          - name: ticket_to_input_output
            arguments: {remove_columns: all, fn_kwargs: {max_thread: 2}}
          - name: tokenize_and_apply_input_masking
            arguments: {remove_columns: all}

It imports nothing from the data handlers plugin: it only implements the
core's ``register_data_handlers`` hook.
"""

from __future__ import annotations

from fmtune import hookimpl


def ticket_to_input_output(batch, max_thread=3, **_):
    """Batched map handler: ticket -> input prompt, resolution -> output."""
    inputs = []
    for ticket in batch["ticket"]:
        thread = " | ".join(ticket.get("thread", [])[-max_thread:])
        inputs.append(f"[{ticket['product']}] {ticket['subject']}: {thread}\nresolution:")
    return {"input": inputs, "output": batch["resolution"]}


@hookimpl
def register_data_handlers(register):
    register("ticket_to_input_output", ticket_to_input_output, "map")
