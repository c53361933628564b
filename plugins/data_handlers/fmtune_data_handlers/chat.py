"""Chat templates: the one in use, which form of ``messages`` it wants, and rendering.

fms-hf-tuning documents two forms of chat template. Most (every Hub template) iterate the
conversation: ``{% for message in messages %}``. Others iterate a field of the whole record:
``{% for message in messages['messages'] %}`` -- fms-hf-tuning passes the whole record to
``apply_chat_template`` when no conversation column is named, so ``messages`` is the record.
fmtune renders both, with the same text (so the same ids and labels) for the same records.
"""

from __future__ import annotations

import functools
import os

from .loading import DataError

CHAT_HANDLERS = ("apply_tokenizer_chat_template", "tokenize_and_apply_chat_template_with_masking")
# The roles of chat data (transformers' and OpenAI's message format). A template may know
# others (gpt-oss's developer, Llama 3.1's ipython, Granite's tool_response): the roles it
# compares a message's role with are allowed too (``template_roles``).
ROLES = ("system", "user", "assistant", "tool")
RECORD = "fmtune_record"
# Renders a record-form template through the tokenizer's own apply_chat_template (same Jinja
# environment, special tokens, tools, documents and add_generation_prompt as the list form):
# the conversation is passed as usual, so transformers' checks of it hold, and the template sees
# the record as ``messages``. ``+%}`` keeps trim_blocks from eating a newline the template
# starts with, and the tag renders nothing, so the text is what fms-hf-tuning renders.
_AS_RECORD = "{% set messages = " + RECORD + " +%}"


def configured_template(config) -> str | None:
    """The run's ``chat_template`` option as Jinja text: a built-in name, a file (relative to
    the working folder, or to the config file that set it) or the text
    (:func:`fmtune.records.resolve_chat_template`); None when not set."""
    from fmtune.records import resolve_chat_template

    value, file, base = config.get("chat_template"), getattr(config, "config_file", None), None
    if value is not None and file and config.source("chat_template") == file:
        base = os.path.dirname(os.path.abspath(file))
    return resolve_chat_template(value, "chat_template", base)


def template_in_use(tokenizer, chat_template: str | None, tools=None) -> str | None:
    """The template ``apply_chat_template`` would use (the given one, else the tokenizer's;
    a named one of a tokenizer's several); None when there is none."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template(chat_template, tools)
    except ValueError as e:  # several named templates and no default
        raise DataError(f"chat template: {str(e).splitlines()[0]}") from None


def require_template(tokenizer, chat_template: str | None, where: str) -> None:
    """A chat handler with no template to render with: one line, before any record is read."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the tokenizer has no chat template; pass --chat_template, "
                        "or set dataprocessor.chat_template (or chat_template_path) in the "
                        "data_config")


@functools.lru_cache(maxsize=1)
def _parser():
    """A Jinja environment that parses what transformers' chat environment parses (its
    ``{% generation %}`` tag and loop controls)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[Generation, jinja2.ext.loopcontrols])


@functools.lru_cache(maxsize=64)
def record_keys(template: str) -> tuple[str, ...]:
    """The fields a chat template reads from ``messages`` as from a record:
    ``messages['messages']``, ``messages["conversations"]``, ``messages.messages``.
    Empty: the template wants the conversation itself (the usual form).

    Decided from the template's Jinja syntax tree, not by rendering: what a template reads
    does not depend on the data, costs one parse per template, and a render check cannot
    tell "renders nothing for this record" from "wrong form" (a list-form template renders
    its system prompt or generation prompt from any list; a record-form one renders nothing
    or raises, depending on the record). Reads of ``messages`` by number, slice or variable
    (``messages[0]``, ``messages[1:]``, ``messages[i]``), filters (``messages|length``) and
    list attributes are list reads. Not seen: a template that first copies ``messages`` to
    another name and subscripts that.
    """
    import jinja2
    from jinja2 import nodes

    try:
        tree = _parser().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"chat template: line {e.lineno}: {e.message}") from None
    keys = []
    for node in tree.find_all((nodes.Getitem, nodes.Getattr)):
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == "messages"
                and target.ctx == "load"):
            continue
        if isinstance(node, nodes.Getitem):
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                keys.append(node.arg.value)
        elif not hasattr(list, node.attr):
            keys.append(node.attr)
    return tuple(dict.fromkeys(keys))


@functools.lru_cache(maxsize=64)
def template_roles(template: str) -> tuple[str, ...]:
    """The roles a chat template names: strings it compares a ``role`` with
    (``message['role'] == 'developer'``, ``message.role in ['tool', 'ipython']``, ``role ==
    'tool_response'`` after ``{% set role = message.role %}``) or passes
    with ``'role'`` to a filter or test (``selectattr('role', 'equalto', 'system')``)."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = _parser().parse(template)
    except jinja2.TemplateSyntaxError:
        return ()

    def is_role(node) -> bool:  # message.role, message['role'], or a variable named role
        return any((isinstance(n, nodes.Getattr) and n.attr == "role") or
                   (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const)
                    and n.arg.value == "role") or (isinstance(n, nodes.Name) and n.name == "role")
                   for n in [node, *node.find_all((nodes.Getattr, nodes.Getitem, nodes.Name))])

    def strings(node) -> list[str]:
        return [c.value for c in [node, *node.find_all(nodes.Const)]
                if isinstance(c, nodes.Const) and isinstance(c.value, str)]

    found = []
    for cmp in tree.find_all(nodes.Compare):
        operands = [cmp.expr, *(op.expr for op in cmp.ops)]
        if any(is_role(o) for o in operands):
            found += [v for o in operands if not is_role(o) for v in strings(o)]
    for call in tree.find_all((nodes.Filter, nodes.Test, nodes.Call)):
        args = [a.value for a in call.args if isinstance(a, nodes.Const)]
        if "role" in args:
            found += [a for a in args if isinstance(a, str) and a not in ("role", "equalto",
                                                                           "eq", "==", "in")]
    return tuple(dict.fromkeys(r for r in found if r not in ROLES))


def _normalized(value):
    """Messages as apply_chat_template gives them to a template: keys whose value is None
    dropped (datasets fills a field missing from some messages with None)."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{k: v for k, v in m.items() if v is not None} for m in value]
    return value


class ChatRenderer:
    """``render(messages, record, add_generation_prompt)`` -> text, for either form.

    ``record`` is the row the conversation comes from (all its columns, the conversation
    column holding ``messages``): a record-form template sees it as ``messages``, a list-form
    one sees ``messages``. ``column`` (the masking handler's conversation column) must be a
    field the record-form template reads, since that is the one cut turn by turn."""

    def __init__(self, tokenizer, chat_template: str | None, where: str,
                 column: str | None = None) -> None:
        require_template(tokenizer, chat_template, where)
        self.tokenizer, self.chat_template, self.where = tokenizer, chat_template, where
        self.column = column
        self._forms: dict[bool, tuple[str, tuple[str, ...]]] = {}
        self.form()  # a bad template fails before the first record

    def form(self, tools=None) -> tuple[str, tuple[str, ...]]:
        """(template, fields it reads from a record) for records with/without tools (a
        tokenizer's named templates may differ)."""
        key = tools is not None
        if key not in self._forms:
            template = template_in_use(self.tokenizer, self.chat_template, tools)
            keys = record_keys(template)
            if keys and self.column is not None and self.column not in keys:
                fields = ", ".join(f"messages[{k!r}]" for k in keys)
                raise DataError(f"{self.where}: the chat template reads {fields} but the "
                                f"conversation column is {self.column!r}; name the column the "
                                "template iterates (--dataset_conversation_field, or the "
                                "handler's conversation_column)")
            self._forms[key] = (template, keys)
        return self._forms[key]

    def roles(self, tools=None) -> tuple[str, ...]:
        """The roles messages may have: ``ROLES`` and those the template names."""
        return ROLES + template_roles(self.form(tools)[0])

    def render(self, messages, record: dict, add_generation_prompt: bool = False,
               **extras) -> str:
        """``messages``: the conversation (a list-form template's ``messages``); ``record``:
        the row it comes from, with all its columns (a record-form template's)."""
        from jinja2 import TemplateError

        template, keys = self.form(extras.get("tools"))
        kwargs = {}
        if keys:
            if not any(k in record for k in keys):
                fields = ", ".join(f"messages[{k!r}]" for k in keys)
                raise DataError(f"{self.where}: the chat template reads {fields}, and the "
                                f"records have none of these fields (columns: "
                                f"{', '.join(record)})")
            template = _AS_RECORD + template
            kwargs[RECORD] = {k: _normalized(v) if k in keys else v for k, v in record.items()}
            if not isinstance(messages, list):  # no conversation column: only transformers'
                messages = [{"role": "user", "content": ""}]  # checks see this
        else:
            template = self.chat_template
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=template, **extras, **kwargs)
        except TemplateError as e:
            raise DataError(f"{self.where}: chat template error: {e}") from None
        except ValueError as e:  # e.g. an empty conversation
            raise DataError(f"{self.where}: {str(e).splitlines()[0]}") from None
