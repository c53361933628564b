"""Chat templates by name, file or text (``--chat_template`` in every command).

``resolve(value)`` turns what a user typed into Jinja template text:

1. a built-in name (``names()``: chatml, llama3, granite, gemma, mistral; case, ``-`` and
   ``_`` ignored, so ``chat-ml`` and ``Llama-3`` work). A name wins over a file of the same
   name in the working folder (write ``./chatml`` for the file);
2. an existing file: its UTF-8 text; a ``.json`` file is read as a ``tokenizer_config.json``
   (its ``chat_template``: a string, or Hugging Face's list of named templates, of which
   ``default`` is taken). A folder is read as a tokenizer folder: its ``chat_template.jinja``,
   else its ``tokenizer_config.json``'s template;
3. otherwise the value is the template text itself.

A value with no Jinja markup (``{{``, ``{%`` or ``{#``) that is not a name or a file is an
error, since a template without markup renders the same text for every conversation: "file
not found" when it looks like a path (a path separator, a leading ``~`` or ``.``, or a
``.jinja/.j2/.json/.txt/.tmpl`` suffix), else "not a built-in name" with a did-you-mean. The
text is compiled as ``apply_chat_template`` compiles it; every problem is one
:class:`~fmtune.config.ConfigError` line starting with ``what`` (the option's name).

The built-ins are short, list-form templates (``for message in messages``) written from each
family's documented prompt format. They add no default system prompt. Nothing here imports
torch; compiling imports transformers' Jinja environment (no torch).
"""

from __future__ import annotations

import json
import os

from .config import ConfigError, suggest

# ChatML (OpenAI's format, used by Qwen, SmolLM, ...):
#   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
CHATML = (r"{%- for message in messages %}"
          r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          r"{%- endfor %}"
          r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# Meta Llama 3 / 3.1 (model card "prompt format"), without tools or dates:
#   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>...
LLAMA3 = (r"{{- bos_token }}"
          r"{%- for message in messages %}"
          r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          r" + message['content'] | trim + '<|eot_id|>' }}"
          r"{%- endfor %}"
          r"{%- if add_generation_prompt %}"
          r"{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")

# IBM Granite 3.x: <|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n ...
GRANITE = (r"{%- for message in messages %}"
           r"{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
           r" + '<|end_of_text|>\n' }}"
           r"{%- endfor %}"
           r"{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}"
           r"{%- endif %}")

# Google Gemma 2/3: roles user and model; a system message opens the first user turn
# (Gemma 3's own template): <bos><start_of_turn>user\nSYS\n\nHi<end_of_turn>\n
# <start_of_turn>model\nHello<end_of_turn>\n
GEMMA = (r"{{- bos_token }}"
         r"{%- if messages and messages[0]['role'] == 'system' %}"
         r"{%- set prefix = messages[0]['content'] + '\n\n' %}"
         r"{%- set turns = messages[1:] %}"
         r"{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
         r"{%- for message in turns %}"
         r"{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
         r" + '\n' + (prefix if loop.first else '') + message['content'] | trim"
         r" + '<end_of_turn>\n' }}"
         r"{%- endfor %}"
         r"{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}")

# Mistral Instruct (v0.1/v0.2, Hugging Face's template): <s>[INST] Hi [/INST]Hello</s>
# [INST] ... [/INST]; a system message opens the first user turn, as Mistral's later templates
# do; the assistant's turn ends with the eos token. No generation prompt (the prompt ends
# with [/INST]).
MISTRAL = (r"{{- bos_token }}"
           r"{%- for message in messages %}"
           r"{%- if message['role'] == 'user' %}"
           r"{{- '[INST] ' + (messages[0]['content'] + '\n\n' if loop.index0 == 1"
           r" and messages[0]['role'] == 'system' else '') + message['content'] + ' [/INST]' }}"
           r"{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
           r"{%- endif %}"
           r"{%- endfor %}")

BUILTIN: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "granite": GRANITE,
                           "gemma": GEMMA, "mistral": MISTRAL}

# Strings a built-in writes that its family's tokenizers have as single special tokens
# (Mistral's [INST] is plain text in its first tokenizers, so it is not listed).
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "granite": ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": (),
}

PATH_SUFFIXES = (".jinja", ".j2", ".json", ".txt", ".tmpl")
MARKUP = ("{{", "{%", "{#")


def names() -> list[str]:
    """The built-in template names."""
    return list(BUILTIN)


def _key(value: str) -> str:
    return value.strip().lower().replace("-", "").replace("_", "")


def builtin_name(value: str) -> str | None:
    """The built-in ``value`` names (``Chat-ML`` -> ``chatml``), or None."""
    key = _key(value)
    return key if key in BUILTIN else None


def name_of(template: str | None) -> str | None:
    """The name of a built-in whose text ``template`` is, or None."""
    return next((n for n, t in BUILTIN.items() if t == template), None)


def markers(template: str | None) -> tuple[str | None, tuple[str, ...]]:
    """``(name, markers)`` of the built-in whose text ``template`` is: the strings it writes
    that its family's tokenizers hold as single special tokens (a tokenizer without them
    trains them as ordinary text pieces); ``(None, ())`` for any other template."""
    name = name_of(template)
    return name, MARKERS.get(name, ()) if name else ()


def _looks_like_path(value: str) -> bool:
    v = value.strip()
    return ("/" in v or os.sep in v or v.startswith(("~", "."))
            or v.lower().endswith(PATH_SUFFIXES))


def resolve(value: str | None, what: str = "chat_template", base: str | None = None) -> str | None:
    """The Jinja text ``value`` stands for (a built-in name, a file or folder, or the text;
    see the module docstring); None for None. A relative path not found from the working
    folder is looked for in ``base`` (e.g. the config file's folder). The text is compiled
    (not rendered); problems raise a one-line :class:`ConfigError` starting with ``what``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{what}: must be a string (a template name, a file or Jinja text), "
                          f"got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{what}: empty")
    markup = any(m in value for m in MARKUP)
    source = None
    if not markup:
        name = builtin_name(value)
        if name is not None:
            return BUILTIN[name]
        path = _find(value, base)
        if path is None:
            if _looks_like_path(value):
                raise ConfigError(f"{what}: {value}: file not found")
            raise ConfigError(f"{what}: {value!r} is not a built-in chat template "
                              f"({', '.join(BUILTIN)}), a file, or Jinja template text"
                              f"{suggest(_key(value), BUILTIN)}")
        text, source = _read(path, what)
    else:
        text = value
    why = problem(text)
    if why:
        raise ConfigError(f"{what}: {source + ': ' if source else ''}{why}")
    return text


def _find(value: str, base: str | None) -> str | None:
    name = os.path.expanduser(os.path.expandvars(value.strip()))
    if "\n" in name or "\0" in name:
        return None
    if os.path.exists(name):
        return name
    if base and not os.path.isabs(name) and os.path.exists(os.path.join(base, name)):
        return os.path.join(base, name)
    return None


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{what}: {path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path}: not UTF-8 text (byte offset {e.start})") from None


def _from_json(path: str, what: str) -> str:
    try:
        data = json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):  # Hugging Face's named templates: [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{what}: {path}: chat_template holds the named templates "
                              f"{', '.join(map(str, named))} and no 'default'; give the "
                              "template itself")
        template = named["default"]
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{what}: {path}: no \"chat_template\" string in this JSON file")
    return template


def _read(path: str, what: str) -> tuple[str, str]:
    """(template text, the path it came from) for an existing file or tokenizer folder."""
    if os.path.isdir(path):
        jinja = os.path.join(path, "chat_template.jinja")
        config = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(jinja):
            path = jinja
        elif os.path.isfile(config):
            try:
                return _from_json(config, what), config
            except ConfigError:
                pass
            raise ConfigError(f"{what}: {path}: a folder with no chat template (no "
                              "chat_template.jinja, none in tokenizer_config.json)")
        else:
            raise ConfigError(f"{what}: {path}: a folder with no chat template (no "
                              "chat_template.jinja or tokenizer_config.json); give a file")
    if path.lower().endswith(".json"):
        return _from_json(path, what), path
    text = _read_text(path, what)
    if not text.strip():
        raise ConfigError(f"{what}: {path}: empty file")
    return text, path


def problem(template: str) -> str | None:
    """Why ``template`` does not compile in transformers' chat-template environment (its
    ``{% generation %}`` tag, loop controls, sandbox), as one line; None when it compiles."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_
    except ImportError:  # a transformers without it: apply_chat_template reports at render
        return None
    try:
        compile_(template)
    except Exception as e:  # noqa: BLE001 - TemplateSyntaxError and the sandbox's errors
        return template_error(e)
    return None


def template_error(error: BaseException) -> str:
    """One line for an error Jinja raised compiling or rendering a chat template."""
    import jinja2

    first = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"invalid Jinja (line {error.lineno}): {first}"
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"refused by the Jinja sandbox: {first}"
    if isinstance(error, jinja2.UndefinedError):
        return f"undefined name: {first}"
    if isinstance(error, jinja2.TemplateError):
        return f"the template raised an error: {first}"
    return f"{type(error).__name__}: {first}"