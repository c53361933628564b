"""Built-in data handlers (fms-hf-tuning names) and the handler registry.

A handler is a function plus a kind:

* ``map``: ``fn(batch, **fn_kwargs) -> dict of columns`` with ``batched: true``
  (the default), or ``fn(record, **fn_kwargs) -> dict`` with ``batched: false``;
  run through ``Dataset.map``. A tokenizing handler returns ``input_ids``,
  ``labels``, ``attention_mask`` and a ``status`` column (``ok``,
  ``truncated``, ``dropped: reason``) that fmtune counts and removes;
* ``filter``: ``fn(batch, **fn_kwargs) -> list[bool]`` (or one bool unbatched);
* ``dataset``: ``fn(dataset, **fn_kwargs) -> dataset``.

fmtune passes ``tokenizer``, ``max_seq_length`` and ``chat_template`` to any handler whose
signature names them (or takes ``**kwargs``), and the run's ``config`` to one that names
``config``. A data_config's ``fn_kwargs`` must be parameters the function names;
``**_`` takes what fmtune passes and checks nothing, ``**kwargs`` (any other name) accepts any
key. A handler refuses one record with ``RecordError(index_in_batch, problem)`` (a handler of
one record may raise ``DataError(problem)``): fmtune names the record's file and line.
Third-party plugins register handlers with this plugin's ``register_data_handlers(register,
config)`` hook (:mod:`.hookspecs`): ``register(name, fn, kind="map")``;
``batch_only=True`` declares a map/filter function written for batches only, which
fmtune then runs on batches even under ``batched: false`` (fms-hf-tuning's configs
set it on most handlers). For a function of each record alone the rows are the same.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

from fmtune.config import suggest
from fmtune.plugins import collect as collect_registry
from fmtune.records import join  # the core's (fms-hf-tuning's) separator rule

from .chat import ChatRenderer
from .loading import ROW, DataError, RecordError
from .masking import encode

KINDS = ("map", "filter", "dataset")


@dataclass
class Handler:
    name: str
    fn: Callable[..., Any]
    kind: str
    plugin: str
    batch_only: bool = False

    def accepts(self, arg: str) -> bool:
        params = inspect.signature(self.fn).parameters
        return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def names(self, arg: str) -> bool:
        """Whether the function names ``arg`` as a parameter (``**kwargs`` does not count)."""
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False
        return arg in params and params[arg].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)

    def arguments(self) -> list[str] | None:
        """The ``fn_kwargs`` keys the function takes: the parameters it names after the batch
        (or record, or dataset). None: any key (a ``**kwargs`` named other than ``_``, or no
        signature to read); ``**_`` is the convention for "ignores what fmtune passes"."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD and p.name != "_" for p in params):
            return None
        return [p.name for p in params[1:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class Registry:
    """Handlers by name; collected from every active plugin, duplicates refused."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def register_for(self, plugin: str):
        def register(name: str, fn: Callable[..., Any], kind: str = "map",
                     batch_only: bool = False) -> None:
            if kind not in KINDS:
                raise DataError(f"data handler {name!r} from {plugin}: kind must be one of "
                                f"{', '.join(KINDS)}, got {kind!r}")
            if name in self.handlers:
                raise DataError(f"data handler {name!r} is registered by both "
                                f"{self.handlers[name].plugin} and {plugin}")
            self.handlers[name] = Handler(name, fn, kind, plugin, batch_only)
        return register

    def get(self, name: str, where: str) -> Handler:
        if name not in self.handlers:
            raise DataError(f"{where}: unknown data handler {name!r}"
                            f"{suggest(name, self.handlers)}; known: {', '.join(sorted(self.handlers))}")
        return self.handlers[name]


def _entry(fn: Callable[..., Any], kind: str = "map", batch_only: bool = False) -> tuple:
    """What ``register(name, fn, kind="map", batch_only=False)`` stores, checked."""
    if not callable(fn):
        raise ValueError(f"must be a function, got {type(fn).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return fn, kind, bool(batch_only)


def collect(pm, config=None) -> Registry:
    """The handlers the active plugins register through ``register_data_handlers`` (this
    plugin's hook, :mod:`.hookspecs`); an implementation that names ``config`` gets it."""
    found = collect_registry(pm, "register_data_handlers", "data handler", make=_entry,
                            config=config)
    registry = Registry()
    for name, (fn, kind, batch_only) in found.items():
        registry.handlers[name] = Handler(name, fn, kind, found.owners[name], batch_only)
    return registry


# ----------------------------------------------------------------- helpers


def _column(batch: dict, name: str, what: str) -> list:
    if name not in batch:
        raise DataError(f"{what}: missing column {name!r} (columns: {', '.join(batch)})")
    return batch[name]


def _strings(values: list, name: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise RecordError(i, f"field {name!r} must be a string, got {type(v).__name__}")
    return values


_JINJA = None


def jinja_env():
    """A sandboxed Jinja environment where an undefined field is an error."""
    global _JINJA
    if _JINJA is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return _JINJA


def render_template(template: str, record: dict, where: str = "",
                    tokens: dict | None = None) -> str:
    """Render with the record's fields as names (``{{field}}``), the record itself as
    ``element`` (``{{element['field with spaces']}}``) and the tokenizer's special tokens
    (``{{eos_token}}``), as fms-hf-tuning does; a field of the record wins a name clash."""
    from jinja2 import TemplateError, UndefinedError

    where = f"{where}: " if where else ""
    try:
        return jinja_env().from_string(template).render({"element": record, **(tokens or {}),
                                                         **record})
    except UndefinedError as e:
        raise DataError(f"{where}template field missing: {e.message}") from None
    except TemplateError as e:
        raise DataError(f"{where}template error: {e}") from None


def _records(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


# ------------------------------------------------------------ map handlers


def tokenize_and_apply_input_masking(batch, tokenizer, max_seq_length, input_column_name="input",
                                     output_column_name="output", add_eos_token=True, **_):
    """``input`` masked, ``output`` (+EOS) trained; one space joins them unless one is there."""
    inputs = _strings(_column(batch, input_column_name, "tokenize_and_apply_input_masking"),
                      input_column_name)
    outputs = _strings(_column(batch, output_column_name, "tokenize_and_apply_input_masking"),
                       output_column_name)
    segs = [[(i, False), (join(i, o) + o, True)] for i, o in zip(inputs, outputs)]
    return encode(tokenizer, segs, max_seq_length, add_eos=add_eos_token)


def tokenize(batch, tokenizer, max_seq_length, text_column_name="text", response_template=None,
             instruction_template=None, add_eos_token=True, max_length=None, truncation=True,
             **_):
    """Train on the whole text, or with ``response_template`` only on what follows it (with
    ``instruction_template`` too: on each response up to the next instruction, multi-turn).

    Without a response template there is no ``labels`` column (all tokens are trained), so
    fms-hf-tuning's ``duplicate_columns: input_ids -> labels`` can follow. ``max_length``
    truncates shorter than ``max_seq_length``; ``truncation: false`` keeps whole texts.
    """
    texts = _strings(_column(batch, text_column_name, "tokenize"), text_column_name)
    segs, missing = [], []
    for i, text in enumerate(texts):
        if not response_template:
            segs.append([(text, True)])
            continue
        s = template_segments(text, instruction_template, response_template)
        if not any(t for _, t in s):
            missing.append(i)
        segs.append(s)
    limit = min(max_length or max_seq_length, max_seq_length) if truncation else sys.maxsize
    out = encode(tokenizer, segs, limit, add_eos=add_eos_token,
                 status={i: "dropped: response_template not found" for i in missing})
    if not response_template:
        del out["labels"]
    return out


def apply_custom_jinja_template(batch, template, formatted_text_column_name="formatted_text",
                                tokenizer=None, **_):
    """Render each record with a sandboxed Jinja template (undefined fields are errors)."""
    tokens = {k: v for k, v in tokenizer.special_tokens_map.items()
              if isinstance(v, str)} if tokenizer is not None else {}
    texts = []
    for i, rec in enumerate(_records(batch)):
        with _record(i):
            texts.append(render_template(template, rec, tokens=tokens))
    return {formatted_text_column_name: texts}


CONVERSATION_COLUMNS = ("messages", "conversation", "chat", "turns")  # fms-hf-tuning's guesses


def _chat_extras(batch: dict, i: int) -> dict:
    """``tools`` and ``documents`` of record ``i``, which chat templates may render."""
    return {k: batch[k][i] for k in ("tools", "documents") if k in batch}


def apply_tokenizer_chat_template(batch, tokenizer, conversation_column=None,
                                  formatted_text_column_name="formatted_chat_data",
                                  chat_template=None, conversation_column_name=None, **_):
    """Render conversations to text with the tokenizer's (or the given) chat template.

    The column is ``conversation_column_name`` (fms-hf-tuning) or ``conversation_column``;
    without either, the first of messages/conversation/chat/turns present. A template that
    reads ``messages['messages']`` gets the whole record as ``messages`` (see ``chat``).
    """
    where = "apply_tokenizer_chat_template"
    renderer = ChatRenderer(tokenizer, chat_template, where)
    named = conversation_column_name or conversation_column
    column = named or next((c for c in CONVERSATION_COLUMNS if c in batch), None)
    if renderer.form()[1] and not named:  # the record form needs no conversation column
        convs = batch[column] if column else [None] * _rows_in(batch)
    else:
        convs = _column(batch, column or CONVERSATION_COLUMNS[0], where)
    texts = []
    for i, (conv, rec) in enumerate(zip(convs, _records(batch))):
        extras = _chat_extras(batch, i)
        with _record(i):
            if isinstance(conv, list):
                _check_roles(conv, column, renderer, extras.get("tools"))
            texts.append(renderer.render(conv, rec, **extras))
    return {formatted_text_column_name: texts}


class _record:
    """``with _record(i):`` a DataError raised inside is about record ``i`` of the batch."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and isinstance(error, DataError) and \
                not isinstance(error, RecordError):
            raise RecordError(self.index, str(error)) from None
        return False


def _check_roles(messages: list, column: str | None, renderer: ChatRenderer, tools) -> None:
    """Each message's role is one the chat data may have (``chat.ROLES``, and any role the
    template in use names); a record with another (``wizard``, ShareGPT's ``gpt``) would be
    rendered as is and, not being ``assistant``, never trained."""
    known = renderer.roles(tools)
    for k, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in known:
            raise DataError(f"field {column or 'messages'!r}: message {k + 1} has role "
                            f"{role!r}{suggest(str(role), known)}; the roles are "
                            f"{', '.join(known)} (the standard ones and those the chat "
                            "template names)")


def _rows_in(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def chat_segments(tokenizer, messages: list[dict], chat_template=None, record=None,
                  renderer: ChatRenderer | None = None, **extras) -> list[tuple[str, bool]]:
    """Assistant turns (with their end-of-turn text) trained; everything else not.

    Each assistant turn's text is the difference between the conversation
    rendered up to it with a generation prompt and rendered including it.
    ``extras`` (tools, documents) go to the template. A record-form template
    (``messages['messages']``) sees ``record`` with its conversation column cut the same way.
    """
    renderer = renderer or ChatRenderer(tokenizer, chat_template, "chat template")
    record = record or {}
    column = renderer.column

    def render(msgs, gen):
        rec = {**record, column: msgs} if column else record
        return renderer.render(msgs, rec, add_generation_prompt=gen, **extras)

    segs: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"the chat template renders turn {i + 1} inconsistently (earlier text changes when "
                "a turn is added); use --instruction_template and --response_template instead")
        segs += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(messages, False)
    if rest.startswith(done) and len(rest) > len(done):
        segs.append((rest[len(done):], False))
    return segs


def template_segments(text: str, instruction_template: str | None,
                      response_template: str) -> list[tuple[str, bool]]:
    """Train from after each response_template up to the next instruction_template."""
    segs: list[tuple[str, bool]] = []
    pos = 0
    while True:
        at = text.find(response_template, pos)
        if at < 0:
            break
        start = at + len(response_template)
        end = text.find(instruction_template, start) if instruction_template else -1
        end = len(text) if end < 0 else end
        segs += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    if pos < len(text):
        segs.append((text[pos:], False))
    return segs


def tokenize_and_apply_chat_template_with_masking(
        batch, tokenizer, max_seq_length, conversation_column="messages", chat_template=None,
        instruction_template=None, response_template=None, conversation_column_name=None,
        formatted_text_column_name=None, **_):
    """Chat data: only assistant turns (and their end-of-turn tokens) are trained.
    ``conversation_column_name`` is fms-hf-tuning's older name of ``conversation_column``;
    ``formatted_text_column_name`` is ignored, as fms-hf-tuning does (its example configs give
    it; this handler writes tokens, not text)."""
    where = "tokenize_and_apply_chat_template_with_masking"
    conversation_column = conversation_column_name or conversation_column
    renderer = ChatRenderer(tokenizer, chat_template, where, column=conversation_column)
    convs = _column(batch, conversation_column, where)
    segs, reasons = [], {}
    for i, (conv, record) in enumerate(zip(convs, _records(batch))):
        if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in conv):
            raise RecordError(i, f"field {conversation_column!r} is not a list of "
                                 "{role, content} messages")
        extras = _chat_extras(batch, i)
        with _record(i):
            _check_roles(conv, conversation_column, renderer, extras.get("tools"))
            if response_template:
                text = renderer.render(conv, record, **extras)
                s = template_segments(text, instruction_template, response_template)
                if not any(t for _, t in s):
                    reasons[i] = "dropped: response_template not found"
            else:
                s = chat_segments(tokenizer, conv, record=record, renderer=renderer, **extras)
                if not any(t for _, t in s):
                    reasons[i] = "dropped: no assistant turn"
        segs.append(s or [("", False)])
    return encode(tokenizer, segs, max_seq_length, add_eos=False, add_special_tokens=False,
                  status=reasons)


# -------------------------------------------------------- filters, columns


def skip_samples_with_large_columns(batch, column_name, max_allowed_length, **_):
    """Keep records whose column has at most ``max_allowed_length`` items/characters."""
    return [v is None or len(v) <= max_allowed_length
            for v in _column(batch, column_name, "skip_samples_with_large_columns")]


def duplicate_columns(batch, existing_column_name=None, new_column_name=None, old_column=None,
                      new_column=None, **_):
    """Copy a column (fms-hf-tuning's ``existing_column_name``/``new_column_name``; also
    ``old_column``/``new_column``). The new column must not exist yet."""
    old, new = existing_column_name or old_column, new_column_name or new_column
    if not old or not new:
        raise DataError("duplicate_columns: needs existing_column_name and new_column_name")
    if new in batch:
        raise DataError(f"duplicate_columns: column {new!r} already exists")
    return {new: _column(batch, old, "duplicate_columns")}


def rename_columns(dataset, column_mapping, **_):
    return dataset.rename_columns(dict(column_mapping))


def select_columns(dataset, column_names, **_):
    keep = list(column_names)
    if ROW in (dataset.column_names or []) and ROW not in keep:
        keep.append(ROW)  # fmtune's row numbers (for error messages) stay
    return dataset.select_columns(keep)


def remove_columns(dataset, column_names, **_):
    return dataset.remove_columns(list(column_names))


# column handlers that keep fmtune's row-number column (others never see it)
KEEP_ROW = (rename_columns, select_columns, remove_columns)

BUILTIN = {
    "tokenize_and_apply_input_masking": (tokenize_and_apply_input_masking, "map"),
    "tokenize": (tokenize, "map"),
    "apply_custom_jinja_template": (apply_custom_jinja_template, "map"),
    "apply_custom_data_formatting_template": (apply_custom_jinja_template, "map"),
    "apply_tokenizer_chat_template": (apply_tokenizer_chat_template, "map"),
    "tokenize_and_apply_chat_template_with_masking":
        (tokenize_and_apply_chat_template_with_masking, "map"),
    "skip_samples_with_large_columns": (skip_samples_with_large_columns, "filter"),
    "duplicate_columns": (duplicate_columns, "map"),
    "rename_columns": (rename_columns, "dataset"),
    "select_columns": (select_columns, "dataset"),
    "remove_columns": (remove_columns, "dataset"),
}
